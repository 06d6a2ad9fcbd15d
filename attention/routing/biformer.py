"""Bi-level routing attention (BiFormer) on 2D feature maps.

"BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu et al., CVPR
2023). The H x W token grid is cut into S_h x S_w regions. Region-level queries and
keys are the means over each region's tokens (one routing for all heads: the heads'
features are concatenated), the region affinity is

    A^r = q^r (k^r)^T / sqrt(C)          C = N * head_dim (the code's qk_dim)

and each query region keeps its top-k key regions I^r (ties: lower region index).
Every token of a query region then attends, token to token and per head, over the
tokens of its k routed regions. The router input is detached (no gradient through
the routing). The layer adds the local context enhancement LCE(V) (a 5 x 5 depthwise
convolution of V on the grid) before the output projection W_o.

Here the token attention runs through a `DynamicBlockMask` on the region-permuted
token order (each region contiguous, `region_permutation`): with block size = region
size, a query block is a query region and its kv-block list is I^r, shared by all
heads (Hm = 1). Attention over this mask is exactly the gather-the-top-k-regions
attention of the paper, so any implementation of the block-sparse contract runs it.

Einsum letters: b batch, r / u query / key region, c routing feature (all heads),
t token.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention as attention_api
from attention import _checks
from attention import masks
from attention.linear import _grid


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def check_grid_regions(grid: Any, regions: Any) -> tuple[tuple[int, int],
                                                          tuple[int, int]]:
  """((H, W), (S_h, S_w)) validated: S_h divides H and S_w divides W."""
  if (not isinstance(grid, (tuple, list)) or len(grid) != 2):
    raise ValueError(f'grid must be a 2D feature map (H, W), got {grid!r}.')
  grid = tuple(_positive_int(f'grid[{i}]', g) for i, g in enumerate(grid))
  if isinstance(regions, (int, np.integer)) and not isinstance(regions, bool):
    regions = (regions, regions)
  if not isinstance(regions, (tuple, list)) or len(regions) != 2:
    raise ValueError(f'regions must be an int S or a pair (S_h, S_w), got '
                     f'{regions!r}.')
  regions = tuple(_positive_int(f'regions[{i}]', s) for i, s in enumerate(regions))
  for axis, (g, s) in enumerate(zip(grid, regions)):
    if g % s:
      raise ValueError(
          f'regions[{axis}] ({s}) must divide the grid size {g} (grid {grid}); '
          f'got regions {regions}.')
  return grid, regions


def default_regions(grid: Sequence[int]) -> tuple[int, int]:
  """Per axis, the largest divisor of the side that is <= 7 and < the side.

  S = 7 is the paper's ImageNet choice at 224 px (56 / 28 / 14 token sides).
  """
  out = []
  for g in grid:
    g = _positive_int('grid', g)
    out.append(max(d for d in range(1, min(7, max(g - 1, 1)) + 1) if g % d == 0))
  return tuple(out)


def region_permutation(grid: Sequence[int], regions: Any) -> np.ndarray:
  """int64 [T]: region-major token order (regions contiguous, row-major inside).

  perm[p] is the row-major grid index of the token placed at position p (the
  `attention.masks.apply_permutation` convention); position p lies in region
  p // (T / (S_h S_w)), regions numbered row-major.
  """
  (h, w), (sh, sw) = check_grid_regions(grid, regions)
  idx = np.arange(h * w).reshape(sh, h // sh, sw, w // sw)
  return idx.transpose(0, 2, 1, 3).reshape(-1)


def _check_qk(query: Any, key: Any, grid: tuple[int, int]) -> None:
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  b, t, n, h = query.shape
  if t != grid[0] * grid[1]:
    raise ValueError(f'query length ({t}) must equal H * W of grid {grid} '
                     f'({grid[0] * grid[1]}).')
  if tuple(key.shape[:2]) != (b, t) or key.shape[3] != h:
    raise ValueError(f'key must have shape [B, T, K, H] = [{b}, {t}, K, {h}], got '
                     f'{list(key.shape)}.')
  if key.shape[2] < 1 or n % key.shape[2]:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads '
                     f'({key.shape[2]}).')


def region_scores(query: jax.Array, key: jax.Array, *, grid: Sequence[int],
                  regions: Any) -> jax.Array:
  """float [B, R, R]: A^r = q^r k^r^T / sqrt(C) between region means (R = S_h S_w).

  query [B, T, N, H], key [B, T, K, H] in row-major grid order; key heads are
  repeated to the N query heads (GQA) before the means are concatenated over heads.
  """
  grid, regions = check_grid_regions(grid, regions)
  _check_qk(query, key, grid)
  b, t, n, h = query.shape
  key = jnp.repeat(key, n // key.shape[2], axis=2)
  perm = region_permutation(grid, regions)
  r = regions[0] * regions[1]
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  qr = jnp.take(query, perm, axis=1).astype(dtype).reshape(b, r, t // r, n * h)
  kr = jnp.take(key, perm, axis=1).astype(dtype).reshape(b, r, t // r, n * h)
  qr, kr = jnp.mean(qr, axis=2), jnp.mean(kr, axis=2)  # [B, R, C]
  return jnp.einsum('brc,buc->bru', qr, kr) / math.sqrt(n * h)  # [B, R, R]


def _check_top_k(top_k: Any, num_regions: int) -> int:
  if isinstance(top_k, (bool, np.bool_)) or not isinstance(top_k, (int, np.integer)):
    raise TypeError(f'top_k must be an int, got {type(top_k).__name__}.')
  if not 1 <= top_k <= num_regions:
    raise ValueError(f'top_k must be in [1, {num_regions}] (the number of regions), '
                     f'got {top_k}.')
  return int(top_k)


def region_routing(query: jax.Array, key: jax.Array, *, grid: Sequence[int],
                   regions: Any, top_k: int) -> jax.Array:
  """int32 [B, R, top_k]: I^r, the routed key regions of each query region.

  Descending affinity, ties to the lower region index; computed on detached inputs.
  """
  grid, regions = check_grid_regions(grid, regions)
  top_k = _check_top_k(top_k, regions[0] * regions[1])
  scores = region_scores(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key),
                         grid=grid, regions=regions)
  return jax.lax.top_k(scores, top_k)[1].astype(jnp.int32)


def bi_level_routing_mask(query: jax.Array, key: jax.Array, *, grid: Sequence[int],
                          regions: Any, top_k: int) -> masks.DynamicBlockMask:
  """The routing as a DynamicBlockMask on the region-permuted order.

  Block size = region size (T / R tokens), kv lists [B, 1, R, top_k] (one routing
  for every head), no inner mask. query / key are in row-major grid order.
  """
  grid, regions = check_grid_regions(grid, regions)
  r = regions[0] * regions[1]
  top_k = _check_top_k(top_k, r)
  scores = region_scores(jax.lax.stop_gradient(query), jax.lax.stop_gradient(key),
                         grid=grid, regions=regions)
  t = grid[0] * grid[1]
  return masks.top_k_blocks(scores[:, None], top_k, q_len=t, kv_len=t,
                            block_q=t // r, block_kv=t // r)


def bi_level_routing_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                               *, grid: Sequence[int], regions: Any, top_k: int,
                               scale: float | None = None,
                               implementation: str | None = None) -> jax.Array:
  """BiFormer's token-to-token attention over the top-k routed regions.

  Args:
    query: [B, T, N, H], T = H_grid * W_grid tokens in row-major grid order.
    key: [B, T, K, H] (N a multiple of K).
    value: [B, T, K, H_v].
    grid: the feature map (H_grid, W_grid).
    regions: S or (S_h, S_w), dividing the grid sides.
    top_k: routed regions per query region, in [1, S_h S_w].
    scale: token logits scale, default 1 / sqrt(H).
    implementation: passed to `attention.dot_product_attention`.

  Returns:
    [B, T, N, H_v] in row-major grid order (without LCE or W_o; see the layer).
  """
  mask = bi_level_routing_mask(query, key, grid=grid, regions=regions, top_k=top_k)
  perm = region_permutation(grid, regions)
  qp, kp, vp = (masks.apply_permutation(x, perm) for x in (query, key, value))
  out = attention_api.dot_product_attention(  # [B, T, N, H_v], permuted order
      qp, kp, vp, mask=mask, scale=scale, implementation=implementation)
  return masks.invert_permutation(out, perm)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
           axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class BiLevelRoutingAttention(nnx.Module):
  """BiFormer's bi-level routing attention layer x [B, T, D] -> [B, T, D].

  q / k / v projections (no biases), routing + token attention
  (`bi_level_routing_attention`), LCE = depthwise `lce_kernel` x `lce_kernel`
  convolution of V (with bias) added to the attention output, then W_o. Not included:
  the code's optional routing projection (param_routing) and soft routing weights
  (mul_weight); both are off in the released BiFormer models.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], regions: Any = None, top_k: int | None = None,
               lce_kernel: int = 5, implementation: str | None = None,
               rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      _positive_int(name, val)
    if grid is None:
      raise ValueError('grid is required: the 2D feature map (H, W).')
    regions = default_regions(grid) if regions is None else regions
    self.grid, self.regions = check_grid_regions(grid, regions)
    r = self.regions[0] * self.regions[1]
    self.top_k = _check_top_k(min(4, max(1, r // 2)) if top_k is None else top_k, r)
    self.lce_kernel = _grid.check_kernel_size('lce_kernel', lce_kernel)
    self.implementation = implementation
    self.num_heads, self.head_dim = num_heads, head_dim
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim),
                     (num_heads * head_dim) ** -0.5, ('heads', 'head_dim', 'embed'))
    self.lce_weight = _param(rngs, (self.lce_kernel, self.lce_kernel,
                                    num_heads * head_dim), 1.0 / self.lce_kernel,
                             (None, None, 'heads'))
    self.lce_bias = nnx.Param(jnp.zeros((num_heads * head_dim,), jnp.float32),
                              logical_axes=('heads',))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    _grid.check_grid(self.grid, x.shape[1])
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)  # [B, T, N, H]
    o = bi_level_routing_attention(q, k, v, grid=self.grid, regions=self.regions,
                                   top_k=self.top_k,
                                   implementation=self.implementation)
    b, t, n, h = v.shape
    lce = _grid.depthwise_conv(v.reshape(b, t, n * h),
                               self.lce_weight[...].astype(dt), self.grid)
    o = o + (lce + self.lce_bias[...].astype(dt)).reshape(b, t, n, h)
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
