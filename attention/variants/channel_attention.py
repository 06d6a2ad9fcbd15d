"""DaViT channel group attention and the spatial-window / channel pairing.

"DaViT: Dual Attention Vision Transformers" (Ding et al., ECCV 2022). Channel group
attention treats the channels as tokens: the C channels are split into N_g groups of
C_g = C / N_g channels (here: the heads, C_g = head_dim), and per group (Eq. 3)

    A(Q_g, K_g, V_g) = [softmax(Q_g^T K_g / sqrt(C_g)) V_g^T]^T

with Q_g, K_g, V_g [P, C_g] over the P spatial tokens: the C_g x C_g attention is a
sum over all P tokens (a global receptive field) and the cost is linear in P. The
scaling is the paper's 1 / sqrt(C_g) (the group's channel count, not P). The softmax
normalises over the key channels (the rows of the C_g x C_g matrix). Note: the
released DaViT code computes softmax(K^T V * scale) and applies it to Q (roles of
Q and V swapped, scale on K); this module follows the paper's equation.

Spatial window attention (the other half of the dual attention block) is softmax
attention inside non-overlapping W x W windows of the token grid, which here is the
mask `attention.masks.halo_blocks(grid, block=W, halo=0)` (block-diagonal on the
grid) through `attention.dot_product_attention`.

A DaViT "dual attention block" is a spatial-window transformer block followed by a
channel-attention transformer block, each with its own FFN and residuals. The ViT's
registry layer 'davit' reproduces exactly that by alternating with the block depth:
even `layer_index` -> `WindowAttention`, odd -> `ChannelAttention` (so an encoder of
depth 2L is L dual blocks). Not included: DaViT's depthwise-conv position encoding
(ConvPosEnc) before each attention (the ViT has its learned position embedding) and
the hierarchical stages / patch merging.

Einsum letters: b batch, t token, n group (head), c / e channel within a group, d
model dim.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api as attention_api
from attention import masks


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def channel_group_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                            scale: float | None = None) -> jax.Array:
  """DaViT channel group attention, A = [softmax(Q_g^T K_g / sqrt(C_g)) V_g^T]^T.

  Args:
    query: [B, T, N, C_g]: N channel groups of C_g channels over T tokens.
    key: [B, T, K, C_g] (N a multiple of K; key groups are repeated, GQA-style).
    value: [B, T, K, C_g] (the same channel count as key: it is what A mixes).
    scale: logit scale, default 1 / sqrt(C_g) (the paper).

  Returns:
    [B, T, N, C_g] in the dtype of `query` (computed in float32, or float64).
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, c = query.shape
  if tuple(key.shape[:2]) != (b, t) or key.shape[3] != c:
    raise ValueError(f'key must have shape [B, T, K, C_g] = [{b}, {t}, K, {c}], '
                     f'got {list(key.shape)}.')
  if tuple(value.shape) != tuple(key.shape):
    raise ValueError(f'value must have the shape of key {list(key.shape)} (A mixes '
                     f'the key channels), got {list(value.shape)}.')
  if key.shape[2] < 1 or n % key.shape[2]:
    raise ValueError(f'query groups ({n}) must be a multiple of key groups '
                     f'({key.shape[2]}).')
  if scale is None:
    scale = 1.0 / math.sqrt(c)
  else:
    _checks.check_positive('scale', scale, allow_none=False)
  dt = jnp.promote_types(query.dtype, jnp.float32)
  rep = n // key.shape[2]
  k = jnp.repeat(key.astype(dt), rep, axis=2)
  v = jnp.repeat(value.astype(dt), rep, axis=2)
  logits = jnp.einsum('btnc,btne->bnce', query.astype(dt), k) * scale  # [B, N, C, C]
  attn = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bnce,btne->btnc', attn, v)  # [B, T, N, C]
  return out.astype(query.dtype)


def default_window(grid: Sequence[int]) -> tuple[int, ...]:
  """Per axis the largest divisor of the side that is <= 7 and < the side.

  DaViT uses 7 x 7 windows (56 / 28 / 14 / 7 token sides at 224 px).
  """
  out = []
  for i, g in enumerate(grid):
    g = _positive_int(f'grid[{i}]', g)
    out.append(max(d for d in range(1, min(7, max(g - 1, 1)) + 1) if g % d == 0))
  return tuple(out)


def window_mask(grid: Sequence[int], window: int | Sequence[int]) -> masks.Mask:
  """Non-overlapping window attention on the grid (tokens row-major): q and k see
  each other iff they lie in the same window (per axis q // W == k // W)."""
  if not isinstance(grid, (tuple, list)) or not grid:
    raise ValueError(f'grid must be a non-empty tuple of ints, got {grid!r}.')
  return masks.halo_blocks(tuple(grid), window, 0)


def window_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     grid: Sequence[int], window: int | Sequence[int],
                     implementation: str | None = None) -> jax.Array:
  """Softmax attention within W x W windows (Swin / DaViT spatial attention).

  query [B, T, N, H], key / value [B, T, K, H(_v)] in row-major grid order, T =
  prod(grid); returns [B, T, N, H_v].
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  t = query.shape[1]
  if int(np.prod(grid)) != t:
    raise ValueError(f'grid {tuple(grid)} must multiply to the number of tokens '
                     f'({t}), got {int(np.prod(grid))}.')
  return attention_api.dot_product_attention(
      query, key, value, mask=window_mask(grid, window),
      implementation=implementation)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
           axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(fan_in ** -0.5 * jax.random.normal(rngs.params(), shape,
                                                       jnp.float32),
                   logical_axes=axes)


class _Projections(nnx.Module):
  """q / k / v / output projections (no biases) shared by the two layers."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      _positive_int(name, val)
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))

  def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    return tuple(jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))  # [B, T, N, H]
                 for w in (self.wq, self.wk, self.wv))

  def out(self, o: jax.Array, dtype: Any) -> jax.Array:
    return jnp.einsum('btnh,nhd->btd', o.astype(dtype),
                      self.wo[...].astype(dtype))  # [B, T, D]


class ChannelAttention(nnx.Module):
  """DaViT channel group attention layer x [B, T, D] -> [B, T, D] (groups = heads)."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.proj = _Projections(dim, num_heads, head_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.proj.qkv(x)
    return self.proj.out(channel_group_attention(q, k, v), x.dtype)


class WindowAttention(nnx.Module):
  """Spatial window attention layer on a token grid, x [B, T, D] -> [B, T, D]."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], window: int | Sequence[int] | None = None,
               implementation: str | None = None, rngs: nnx.Rngs):
    if grid is None:
      raise ValueError('grid is required: the token grid, e.g. (14, 14).')
    self.grid = tuple(_positive_int(f'grid[{i}]', g) for i, g in enumerate(grid))
    self.window = default_window(self.grid) if window is None else window
    self.mask = window_mask(self.grid, self.window)  # validates the window
    self.implementation = implementation
    self.proj = _Projections(dim, num_heads, head_dim, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.proj.qkv(x)
    if x.shape[1] != self.mask.shape[0]:
      raise ValueError(f'x has {x.shape[1]} tokens, the grid {self.grid} has '
                       f'{self.mask.shape[0]}.')
    o = attention_api.dot_product_attention(q, k, v, mask=self.mask,
                                            implementation=self.implementation)
    return self.proj.out(o, x.dtype)


def davit_layer(dim: int, num_heads: int, head_dim: int, *, grid: Sequence[int],
                layer_index: int = 0, window: int | Sequence[int] | None = None,
                rngs: nnx.Rngs) -> WindowAttention | ChannelAttention:
  """The DaViT layer of block `layer_index`: spatial window attention at even
  depths, channel group attention at odd depths (the paper's dual attention block
  = one spatial block + one channel block)."""
  if isinstance(layer_index, bool) or not isinstance(layer_index, (int, np.integer)
                                                     ) or layer_index < 0:
    raise ValueError(f'layer_index must be a non-negative int, got {layer_index!r}.')
  if layer_index % 2 == 0:
    return WindowAttention(dim, num_heads, head_dim, grid=grid, window=window,
                           rngs=rngs)
  return ChannelAttention(dim, num_heads, head_dim, rngs=rngs)
