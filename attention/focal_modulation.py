"""Focal modulation: an attention-free token mixer.

"Focal Modulation Networks" (Yang, Li, Dai, Gao; NeurIPS 2022). Instead of attending,
each token modulates its query with gated, hierarchical context:

    z^0 = x W_z,   z^l = GELU(DWConv_l(z^{l-1}))  for l = 1..L   (kernel k_l)
    z^{L+1} = GELU(mean_t z^L)                                   (global level)
    g = x W_g  ([T, L + 1] gates),   m = h(sum_{l=1}^{L+1} g^l * z^l)
    y_i = q(x_i) * m_i,   out = y W_o

with kernel sizes k_l = focal_factor (l - 1) + focal_window (3, 5 by default, L = 2),
h a linear map (the paper's 1x1 conv) and q(x) = x W_q. Non-causal (the depthwise
convolutions and the global level see the whole grid); for ViT-style token grids.

Einsum letters: b batch, t position, c / e channel, d model dim.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from attention import _checks
from attention.linear import _grid


def focal_kernel_sizes(focal_level: int, focal_window: int = 3,
                       focal_factor: int = 2) -> tuple[int, ...]:
  """k_l = focal_factor * l + focal_window, l = 0..L-1 (the paper's schedule)."""
  for name, val in (('focal_level', focal_level), ('focal_window', focal_window)):
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
      raise ValueError(f'{name} must be a positive int, got {val!r}.')
  if (isinstance(focal_factor, bool) or not isinstance(focal_factor, int) or
      focal_factor < 0 or focal_factor % 2):
    raise ValueError(f'focal_factor must be a non-negative even int (odd kernels), '
                     f'got {focal_factor!r}.')
  return tuple(_grid.check_kernel_size('focal_window', focal_window) +
               focal_factor * l for l in range(focal_level))


def focal_modulation(query: jax.Array, context: jax.Array, gates: jax.Array,
                     kernels: Sequence[jax.Array], modulator_weight: jax.Array,
                     grid: Sequence[int], *,
                     modulator_bias: jax.Array | None = None,
                     normalize: bool = False) -> jax.Array:
  """y = q * h(sum_l g^l z^l) with hierarchical depthwise-conv contexts.

  Args:
    query: [B, T, C] q(x).
    context: [B, T, C] z^0 = x W_z.
    gates: [B, T, L + 1] g = x W_g (L focal levels plus the global level).
    kernels: L depthwise kernels [*K_l, C] (odd sizes, one axis per grid axis).
    modulator_weight: [C, C] h.
    grid: the token grid of T (e.g. (H, W)).
    modulator_bias: [C] or None.
    normalize: divide the aggregated context by L + 1 (the paper's option).

  Returns:
    [B, T, C].
  """
  for name, x in (('query', query), ('context', context), ('gates', gates)):
    _checks.check_array(name, x, ndim=3, floating=True)
  b, t, c = query.shape
  if context.shape != query.shape:
    raise ValueError(f'context must have the shape of query {(b, t, c)}, got '
                     f'{tuple(context.shape)}.')
  levels = len(kernels)
  if levels == 0:
    raise ValueError('kernels must hold at least one focal level.')
  if tuple(gates.shape) != (b, t, levels + 1):
    raise ValueError(f'gates must have shape {(b, t, levels + 1)} [B, T, L + 1], '
                     f'got {tuple(gates.shape)}.')
  grid = _grid.check_grid(grid, t)
  for i, kern in enumerate(kernels):
    _checks.check_array(f'kernels[{i}]', kern, floating=True)
    if kern.ndim != len(grid) + 1 or kern.shape[-1] != c:
      raise ValueError(f'kernels[{i}] must have shape [*K, {c}] with {len(grid)} '
                       f'kernel axes, got {tuple(kern.shape)}.')
    for size in kern.shape[:-1]:
      _grid.check_kernel_size(f'kernels[{i}] size', size)
  _checks.check_array('modulator_weight', modulator_weight, ndim=2, floating=True)
  if tuple(modulator_weight.shape) != (c, c):
    raise ValueError(f'modulator_weight must have shape {(c, c)}, got '
                     f'{tuple(modulator_weight.shape)}.')
  _grid.check_bool('normalize', normalize)
  dtype = _grid.compute_dtype(query, context, gates, modulator_weight)
  z = context.astype(dtype)
  g = gates.astype(dtype)
  total = 0.0
  for l, kern in enumerate(kernels):
    z = jax.nn.gelu(_grid.depthwise_conv(z, kern.astype(dtype), grid),
                    approximate=False)  # [B, T, C]
    total = total + z * g[..., l:l + 1]
  glob = jax.nn.gelu(jnp.mean(z, axis=1, keepdims=True), approximate=False)
  total = total + glob * g[..., levels:]  # [B, T, C]
  if normalize:
    total = total / (levels + 1)
  mod = jnp.einsum('btc,ce->bte', total, modulator_weight.astype(dtype))
  if modulator_bias is not None:
    mod = mod + modulator_bias.astype(dtype)
  return (query.astype(dtype) * mod).astype(query.dtype)  # [B, T, C]


class FocalModulation(nnx.Module):
  """The focal modulation layer (FocalNets) for a token grid: x [B, T, D] -> [B, T, D].

  f = x W_f + b_f split into (q, z^0, g) (the paper's single linear layer), L depthwise
  convs without bias, h = 1x1 conv with bias, output projection with bias.
  """

  def __init__(self, dim: int, *, grid: Sequence[int], focal_level: int = 2,
               focal_window: int = 3, focal_factor: int = 2,
               normalize: bool = False, rngs: nnx.Rngs):
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
      raise ValueError(f'dim must be a positive int, got {dim!r}.')
    if grid is None:
      raise ValueError('grid is required, e.g. grid=(14, 14).')
    self.grid = _grid.check_dims('grid', grid)
    self.sizes = focal_kernel_sizes(focal_level, focal_window, focal_factor)
    self.normalize = _grid.check_bool('normalize', normalize)
    self.dim, self.levels = dim, focal_level
    normal = lambda shape, fan_in, axes: nnx.Param(
        jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in),
        logical_axes=axes)
    zeros = lambda shape, axes: nnx.Param(jnp.zeros(shape, jnp.float32),
                                          logical_axes=axes)
    self.w_f = normal((dim, 2 * dim + focal_level + 1), dim, ('embed', None))
    self.b_f = zeros((2 * dim + focal_level + 1,), (None,))
    nd = len(self.grid)
    self.kernels = nnx.List([
        normal((k,) * nd + (dim,), k ** nd, (None,) * nd + ('embed',))
        for k in self.sizes])
    self.w_h = normal((dim, dim), dim, ('embed', 'embed'))
    self.b_h = zeros((dim,), ('embed',))
    self.w_o = normal((dim, dim), dim, ('embed', 'embed'))
    self.b_o = zeros((dim,), ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f'x must have shape [B, T, {self.dim}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    f = jnp.einsum('btd,de->bte', x, self.w_f[...].astype(dt)) + self.b_f[...]
    q, ctx, gates = jnp.split(f.astype(dt), [self.dim, 2 * self.dim], axis=-1)
    y = focal_modulation(q, ctx, gates, [k[...] for k in self.kernels],
                         self.w_h[...], self.grid, modulator_bias=self.b_h[...],
                         normalize=self.normalize)  # [B, T, D]
    return (jnp.einsum('btd,de->bte', y, self.w_o[...].astype(dt)) +
            self.b_o[...].astype(dt))
