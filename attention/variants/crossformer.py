"""CrossFormer: cross-scale embedding layer and short / long distance attention.

"CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention" (Wang
et al., ICLR 2022).

* Cross-scale embedding layer (CEL): the feature map is sampled by several kernels of
  different sizes with the same stride; the convolution outputs are concatenated on
  the channel axis. Padding (k - s) / 2 per side keeps every output at H / s x W / s
  (the code pads floor((k - s) / 2) before and the rest after, the same for even k -
  s). Channels per kernel: the paper gives larger kernels fewer channels (stage 1:
  kernels 4, 8, 16, 32 with D/2, D/4, D/8, D/8); `cel_dims` implements that rule
  (halve per kernel, the last two equal).
* Short-distance attention (SDA): tokens grouped in G x G adjacent windows; long-
  distance attention (LDA): tokens sampled with interval I (q_i mod I == k_i mod I
  per axis). Both masks exist as `attention.masks.crossformer` (CrossFormerGroups);
  CrossFormer blocks alternate SDA and LDA (SDA first).

The ViT registry layer 'crossformer' is `CrossFormerAttention`: SDA at even block
depth, LDA at odd depth (`layer_index`). The first block's layer (layer_index 0)
also runs a stride-1 CEL over the token grid (kernels 2 and 4, the paper's inter-
stage kernels, with 'same' padding) before its attention, so the ViT, whose patch
embedding is a single-scale linear map, mixes cross-scale features. (In the paper the
CEL replaces the features at the start of each stage and downsamples; here it sits in
the attention branch of the residual block, since the layer interface has no
access to the patch embedding.) Not included: the dynamic position bias (DPB).

Einsum letters: b batch, t token, n head, h head dim, d model dim.
"""

from __future__ import annotations

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


def cel_dims(dim: int, num_kernels: int) -> tuple[int, ...]:
  """Channels per CEL kernel (smallest kernel first): D/2, D/4, ..., the last two
  equal, summing to D (stage 1 of the paper: D/2, D/4, D/8, D/8)."""
  dim = _positive_int('dim', dim)
  num_kernels = _positive_int('num_kernels', num_kernels)
  if num_kernels == 1:
    return (dim,)
  if dim % (2 ** (num_kernels - 1)):
    raise ValueError(f'dim ({dim}) must be divisible by 2**(num_kernels - 1) = '
                     f'{2 ** (num_kernels - 1)}, got num_kernels={num_kernels}.')
  dims = [dim // 2 ** (i + 1) for i in range(num_kernels - 1)]
  return tuple(dims + [dims[-1]])


def _check_kernels(kernels: Any, stride: int) -> tuple[int, ...]:
  if not isinstance(kernels, (tuple, list)) or not kernels:
    raise ValueError(f'kernels must be a non-empty sequence of ints, got '
                     f'{kernels!r}.')
  kernels = tuple(_positive_int(f'kernels[{i}]', k) for i, k in enumerate(kernels))
  for i, k in enumerate(kernels):
    if k < stride:
      raise ValueError(f'kernels[{i}] ({k}) must be >= stride ({stride}).')
  return kernels


def cross_scale_embedding(x: jax.Array, weights: Sequence[jax.Array],
                          biases: Sequence[jax.Array], *, stride: int
                          ) -> jax.Array:
  """CEL: concat_i conv_{k_i, stride}(x) on the channel axis.

  Args:
    x: [B, H, W, C] feature map (H, W multiples of `stride`).
    weights: per kernel [k_i, k_i, C, D_i] (HWIO), k_i >= stride.
    biases: per kernel [D_i].
    stride: the common stride s; padding floor((k - s) / 2) before, the rest after.

  Returns:
    [B, H / s, W / s, sum_i D_i].
  """
  _checks.check_array('x', x, ndim=4, floating=True)
  stride = _positive_int('stride', stride)
  b, h, w, c = x.shape
  if h % stride or w % stride:
    raise ValueError(f'x spatial size ({h}, {w}) must be a multiple of stride '
                     f'({stride}).')
  if len(weights) != len(biases) or not weights:
    raise ValueError(f'weights and biases must be non-empty and of equal length, '
                     f'got {len(weights)} and {len(biases)}.')
  kernels = _check_kernels([wt.shape[0] for wt in weights], stride)
  outs = []
  for i, (wt, bias, k) in enumerate(zip(weights, biases, kernels)):
    if wt.ndim != 4 or wt.shape[1] != k or wt.shape[2] != c:
      raise ValueError(f'weights[{i}] must have shape [k, k, {c}, D_i], got '
                       f'{tuple(wt.shape)}.')
    if tuple(bias.shape) != (wt.shape[3],):
      raise ValueError(f'biases[{i}] must have shape ({wt.shape[3]},), got '
                       f'{tuple(bias.shape)}.')
    lo = (k - stride) // 2
    pad = (lo, k - stride - lo)
    y = jax.lax.conv_general_dilated(
        x, wt.astype(x.dtype), window_strides=(stride, stride), padding=[pad, pad],
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)
    outs.append(y + bias.astype(x.dtype))
  return jnp.concatenate(outs, axis=-1)  # [B, H/s, W/s, sum D_i]


class CrossScaleEmbedding(nnx.Module):
  """CEL module: [B, H, W, C] -> [B, H/s, W/s, dim] (kernels, stride, `cel_dims`).

  The paper's stage-1 CEL is kernels (4, 8, 16, 32), stride 4; between stages
  kernels (2, 4), stride 2.
  """

  def __init__(self, in_channels: int, dim: int, *,
               kernels: Sequence[int] = (4, 8, 16, 32), stride: int = 4,
               rngs: nnx.Rngs):
    in_channels = _positive_int('in_channels', in_channels)
    self.stride = _positive_int('stride', stride)
    self.kernels = _check_kernels(kernels, self.stride)
    dims = cel_dims(dim, len(self.kernels))
    self.weights = nnx.List([
        nnx.Param((k * k * in_channels) ** -0.5 * jax.random.normal(
            rngs.params(), (k, k, in_channels, d), jnp.float32),
                  logical_axes=(None, None, 'embed', None))
        for k, d in zip(self.kernels, dims)])
    self.biases = nnx.List([nnx.Param(jnp.zeros((d,), jnp.float32),
                                      logical_axes=(None,)) for d in dims])

  def __call__(self, x: jax.Array) -> jax.Array:
    return cross_scale_embedding(x, [w[...] for w in self.weights],
                                 [b[...] for b in self.biases], stride=self.stride)


def default_group(grid: Sequence[int]) -> tuple[int, ...]:
  """Per axis the largest divisor of the side that is <= 7 and < the side (the
  paper's G = I = 7)."""
  out = []
  for i, g in enumerate(grid):
    g = _positive_int(f'grid[{i}]', g)
    out.append(max(d for d in range(1, min(7, max(g - 1, 1)) + 1) if g % d == 0))
  return tuple(out)


def sda_lda_mask(grid: Sequence[int], size: int | Sequence[int], *,
                 long_distance: bool) -> masks.Mask:
  """SDA (groups of G adjacent tokens per axis) or LDA (interval I) on the grid."""
  if not isinstance(long_distance, bool):
    raise TypeError(f'long_distance must be a bool, got '
                    f'{type(long_distance).__name__}.')
  return masks.crossformer(tuple(grid), size, 'long' if long_distance else 'short')


class CrossFormerAttention(nnx.Module):
  """CrossFormer attention layer on a token grid, x [B, T, D] -> [B, T, D].

  SDA at even `layer_index`, LDA at odd; with `embed` (default: layer_index == 0)
  a stride-1 CEL of the token grid (`embed_kernels`, 'same' padding) runs first.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], layer_index: int = 0,
               size: int | Sequence[int] | None = None, embed: bool | None = None,
               embed_kernels: Sequence[int] = (2, 4),
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      _positive_int(name, val)
    if grid is None or not isinstance(grid, (tuple, list)) or len(grid) != 2:
      raise ValueError(f'grid must be the 2D token grid (H, W), got {grid!r}.')
    self.grid = tuple(_positive_int(f'grid[{i}]', g) for i, g in enumerate(grid))
    if isinstance(layer_index, bool) or not isinstance(
        layer_index, (int, np.integer)) or layer_index < 0:
      raise ValueError(f'layer_index must be a non-negative int, got '
                       f'{layer_index!r}.')
    self.long_distance = bool(layer_index % 2)
    self.size = default_group(self.grid) if size is None else size
    self.mask = sda_lda_mask(self.grid, self.size,
                             long_distance=self.long_distance)
    self.implementation = implementation
    embed = layer_index == 0 if embed is None else embed
    self.embed = (CrossScaleEmbedding(dim, dim, kernels=tuple(embed_kernels),
                                      stride=1, rngs=rngs) if embed else None)
    def init(shape, fan_in, axes):
      return nnx.Param(fan_in ** -0.5 * jax.random.normal(rngs.params(), shape,
                                                           jnp.float32),
                       logical_axes=axes)
    axes = ('embed', 'heads', 'head_dim')
    self.wq = init((dim, num_heads, head_dim), dim, axes)
    self.wk = init((dim, num_heads, head_dim), dim, axes)
    self.wv = init((dim, num_heads, head_dim), dim, axes)
    self.wo = init((num_heads, head_dim, dim), num_heads * head_dim,
                   ('heads', 'head_dim', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.wq.shape[0]
    if x.ndim != 3 or x.shape[-1] != d:
      raise ValueError(f'x must have shape [B, T, {d}], got {tuple(x.shape)}.')
    b, t, _ = x.shape
    if t != self.grid[0] * self.grid[1]:
      raise ValueError(f'x has {t} tokens, the grid {self.grid} has '
                       f'{self.grid[0] * self.grid[1]}.')
    dt = x.dtype
    if self.embed is not None:
      x = self.embed(x.reshape(b, *self.grid, d)).reshape(b, t, d)
    q, k, v = (jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))  # [B, T, N, H]
               for w in (self.wq, self.wk, self.wv))
    o = attention_api.dot_product_attention(q, k, v, mask=self.mask,
                                            implementation=self.implementation)
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
