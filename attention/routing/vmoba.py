"""VMoBA: Mixture-of-Block Attention for Video Diffusion Models (Wu et al., 2025).

Non-causal MoBA over a token grid (frames, height, width) (or (height, width)):

* Partitions cycled over layers (layer l uses PARTITIONS[l % 3]): '1d' = runs of
  frames (all of each frame), '2d' = a spatial tile (ch, cw) over all frames, '3d' =
  a cube (ct, ch, cw). A partition is a `cell` (one block's extent along each grid
  axis, each dividing the axis); tokens are permuted cell-major so every block is
  contiguous (`cell_permutation`, applied with `attention.masks.apply_permutation`).
* Gate g[c, s] = <q_s, mean K over block c>. As MoBA here (see attention.routing.moba),
  the kernel format holds one list per query BLOCK, so the routed pair is (q block j,
  kv block c) with G[j, c] = <mean q over block j, mean K over block c> (the sum of
  the per-token gates of block j, up to the positive factor |block|).
* Global selection ('head_global'): per head, min-max normalise G over all
  (q block, kv block) pairs; the own block (c = j) is always attended; the non-own
  pairs are taken in descending order (ties: lower flat index (j, c) first) until the
  taken mass plus the own-block mass reaches tau * total (`global_threshold_blocks`).
  The static list width `budget` (default n, exact) caps each q block's list; a row
  selecting more keeps its `budget` highest pairs (own block first).
* One softmax over the chosen blocks (the code merges branches by LSE, equivalently),
  then the tokens are put back in the original order.

No parameters, no gradient through the routing (the gate is stop_gradient'ed).
Einsum letters: b batch, t positions, n query heads, k kv heads, h head dim.
"""

from __future__ import annotations

from typing import Any, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import api
from attention.masks import dynamic
from attention.masks import permutation
from attention.routing import _common

PARTITIONS = ('1d', '2d', '3d')


def layer_partition(layer_index: int) -> str:
  """The partition of layer `layer_index`: '1d', '2d', '3d', '1d', ... (VMoBA)."""
  return PARTITIONS[_common.check_int('layer_index', layer_index, 0) % 3]


def _check_grid(grid: Any) -> tuple[int, ...]:
  if (not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or
      any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1
          for g in grid)):
    raise ValueError(f'grid must be (frames, height, width) or (height, width) of '
                     f'positive ints, got {grid!r}.')
  return tuple(int(g) for g in grid)


def _check_cell(cell: Any, grid: tuple[int, ...]) -> tuple[int, ...]:
  if (not isinstance(cell, (tuple, list)) or len(cell) != len(grid) or
      any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1
          for c in cell)):
    raise ValueError(f'cell must be {len(grid)} positive ints (one block\'s extent '
                     f'per grid axis of {grid}), got {cell!r}.')
  cell = tuple(int(c) for c in cell)
  if any(g % c for g, c in zip(grid, cell)):
    raise ValueError(f'cell {cell} must divide the grid {grid} along every axis.')
  return cell


def default_cell(grid: Sequence[int], partition: str) -> tuple[int, ...]:
  """A block shape for `partition`: each partitioned axis halved (when even).

  (F, H, W): '1d' -> (F/2, H, W), '2d' -> (F, H/2, W/2), '3d' -> (F/2, H/2, W/2).
  (H, W) (an image: no time axis): '1d' -> (H/2, W) (runs of rows), '2d' and '3d'
  -> (H/2, W/2). The paper's block shapes are model specific [unverified].
  """
  grid = _check_grid(grid)
  if partition not in PARTITIONS:
    raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}.')
  half = lambda g: g // 2 if g % 2 == 0 else g
  if len(grid) == 2:
    h, w = grid
    return (half(h), w) if partition == '1d' else (half(h), half(w))
  f, h, w = grid
  return {'1d': (half(f), h, w), '2d': (f, half(h), half(w)),
          '3d': (half(f), half(h), half(w))}[partition]


def cell_permutation(grid: Sequence[int], cell: Sequence[int]) -> np.ndarray:
  """int64 [T]: token order visiting the grid cell by cell (each cell row-major).

  `perm[p]` is the raster index of the token placed at p (as
  `attention.masks.grid_permutation`), so block c is positions [c |cell|, (c+1)|cell|).
  """
  grid = _check_grid(grid)
  cell = _check_cell(cell, grid)
  r = len(grid)
  split = []
  for g, c in zip(grid, cell):
    split += [g // c, c]
  axes = tuple(range(0, 2 * r, 2)) + tuple(range(1, 2 * r, 2))
  return np.arange(int(np.prod(grid))).reshape(split).transpose(axes).reshape(-1)


def vmoba_block_scores(query: jax.Array, key: jax.Array, *, block_size: int,
                       heads: str = 'query') -> jax.Array:
  """float32 [B, Hm, n, n]: G[j, c] = <mean q over block j, mean K over block c>.

  On tokens already in block-contiguous order; T must be a multiple of block_size.
  stop_gradient'ed (the routing takes no gradient).
  """
  _, t, _, _, _ = _common.check_qk(query, key)
  block_size = _common.check_int('block_size', block_size)
  if t % block_size:
    raise ValueError(f'block_size ({block_size}) must divide the sequence length '
                     f'({t}) (VMoBA blocks are whole cells).')
  heads = _common.check_heads(heads)
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  return _common.pair_scores(_common.block_mean(query, block_size),
                             _common.block_mean(key, block_size), heads)


def global_threshold_blocks(scores: jax.Array, threshold: float, budget: int, *,
                            q_len: int, kv_len: int, block_q: int, block_kv: int,
                            always: Any = None) -> dynamic.DynamicBlockMask:
  """VMoBA's per-head global cumulative threshold over all (q block, kv block) pairs.

  Per (batch, head): mass = min-max normalised scores over the nq x nk pairs (all 0
  when they are all equal); the `always` pairs are taken and their mass counts; the
  other pairs are taken in descending mass (ties: lower flat index) while the mass
  taken before them is below threshold * total (zero-mass pairs never). Each q
  block's list is then capped at `budget` (its highest-mass pairs, `always` first).

  Args:
    scores: floating [Bm, Hm, nq, nk].
    threshold: tau in (0, 1].
    budget: the static list width in [1, nk].
    always: optional bool, broadcastable to scores (VMoBA: the own block).
  """
  nq, nk = _common.ceil_div(q_len, block_q), _common.ceil_div(kv_len, block_kv)
  if not hasattr(scores, 'shape') or scores.ndim != 4 or tuple(
      scores.shape[2:]) != (nq, nk):
    raise ValueError(f'scores must have shape [B, H, {nq}, {nk}], got '
                     f'{getattr(scores, "shape", type(scores).__name__)}.')
  threshold = _common.check_fraction('threshold', threshold)
  budget = _common.check_int('budget', budget)
  if budget > nk:
    raise ValueError(f'budget must be in [1, {nk}] (the number of kv blocks), got '
                     f'{budget}.')
  x = jnp.asarray(scores).astype(jnp.promote_types(scores.dtype, jnp.float32))
  bm, hm = x.shape[:2]
  always = (jnp.zeros(x.shape, bool) if always is None else
            jnp.broadcast_to(jnp.asarray(always, bool), x.shape))
  flat = x.reshape(bm, hm, nq * nk)
  lo = jnp.min(flat, -1, keepdims=True)
  span = jnp.max(flat, -1, keepdims=True) - lo
  mass = jnp.where(span > 0, (flat - lo) / jnp.where(span > 0, span, 1.0), 0.0)
  own = always.reshape(bm, hm, nq * nk)
  total = jnp.sum(mass, -1, keepdims=True)
  need = threshold * total - jnp.sum(jnp.where(own, mass, 0.0), -1, keepdims=True)
  order_key = jnp.where(own, -1.0, mass)  # own pairs last (already taken)
  values, idx = jax.lax.top_k(order_key, nq * nk)  # descending, ties lower index
  before = jnp.cumsum(values, -1) - values
  take = (values > 0) & (before < need)
  picked = jnp.zeros((bm, hm, nq * nk), bool).at[
      jnp.arange(bm)[:, None, None], jnp.arange(hm)[None, :, None], idx].set(take)
  chosen = (picked | own).reshape(x.shape)
  return dynamic.top_k_blocks(
      jnp.where(chosen, mass.reshape(x.shape), -jnp.inf), budget, q_len=q_len,
      kv_len=kv_len, block_q=block_q, block_kv=block_kv, always=always & chosen)


def vmoba_mask(query: jax.Array, key: jax.Array, *, block_size: int,
               threshold: float = 0.25, budget: int | None = None,
               heads: str = 'query') -> dynamic.DynamicBlockMask:
  """The VMoBA block lists of tokens in block-contiguous order (own block + global
  cumulative threshold); `budget` defaults to the number of blocks (exact)."""
  scores = vmoba_block_scores(query, key, block_size=block_size, heads=heads)
  t, n = query.shape[1], scores.shape[-1]
  return global_threshold_blocks(
      scores, threshold, n if budget is None else budget, q_len=t, kv_len=t,
      block_q=block_size, block_kv=block_size, always=jnp.eye(n, dtype=bool))


def vmoba_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    grid: Sequence[int], cell: Sequence[int],
                    threshold: float = 0.25, budget: int | None = None,
                    heads: str = 'query', implementation: str | None = None,
                    return_mask: bool = False) -> Any:
  """Non-causal VMoBA attention on tokens in raster order of `grid`.

  Args:
    query: [B, T, N, H], key: [B, T, K, H], value: [B, T, K, H_v], T = prod(grid).
    grid: (F, H, W) or (H, W).
    cell: one block's extent per grid axis (`default_cell(grid, partition)`).
    threshold: tau of the global cumulative selection, in (0, 1].
    budget: kv blocks per q block at most (static); default all (exact).
    heads: 'query' or 'kv' routing under GQA.
    implementation: as `attention.dot_product_attention`.
    return_mask: also return the DynamicBlockMask (in permuted token order) and the
      permutation.

  Returns:
    out [B, T, N, H_v] in the original token order (and (mask, perm)).
  """
  _common.check_qk(query, key, value)
  grid = _check_grid(grid)
  if int(np.prod(grid)) != query.shape[1]:
    raise ValueError(f'grid {grid} must have prod(grid) = query length '
                     f'({query.shape[1]}) tokens.')
  perm = cell_permutation(grid, cell)
  block = int(np.prod(cell))
  qp, kp, vp = (permutation.apply_permutation(x, perm) for x in (query, key, value))
  routed = vmoba_mask(qp, kp, block_size=block, threshold=threshold, budget=budget,
                      heads=heads)
  out = api.dot_product_attention(qp, kp, vp, mask=routed, is_causal=False,
                                  implementation=implementation)  # [B, T, N, H_v]
  out = permutation.invert_permutation(out, perm)
  return (out, (routed, perm)) if return_mask else out


class VMoBA(nnx.Module):
  """VMoBA attention for layer `layer_index` (its partition) as an NNX module.

  No parameters. `cells` maps partitions to block shapes (default `default_cell`).
  """

  def __init__(self, grid: Sequence[int], layer_index: int, *,
               threshold: float = 0.25, budget: int | None = None,
               heads: str = 'query', cells: dict[str, Sequence[int]] | None = None,
               implementation: str | None = None):
    self.grid = _check_grid(grid)
    self.partition = layer_partition(layer_index)
    cell = (cells or {}).get(self.partition) or default_cell(self.grid,
                                                            self.partition)
    self.cell = _check_cell(cell, self.grid)
    self.threshold = _common.check_fraction('threshold', threshold)
    self.budget = budget
    self.heads = _common.check_heads(heads)
    self.implementation = implementation

  def __call__(self, query: jax.Array, key: jax.Array,
               value: jax.Array) -> jax.Array:
    return vmoba_attention(query, key, value, grid=self.grid, cell=self.cell,
                           threshold=self.threshold, budget=self.budget,
                           heads=self.heads, implementation=self.implementation)


class VMoBAAttention(nnx.Module):
  """Self-attention layer x [B, T, D] -> [B, T, D] with VMoBA routing (its own
  q / k / v / output projections; tokens in raster order of `grid`).

  The partition is `partition` if given, else `layer_partition(layer_index)`.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], layer_index: int = 0,
               partition: str | None = None, threshold: float = 0.25,
               cell: Sequence[int] | None = None,
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, v in (('dim', dim), ('num_heads', num_heads), ('head_dim', head_dim)):
      _common.check_int(name, v)
    self.grid = _check_grid(grid)
    if partition is None:
      partition = layer_partition(layer_index)
    if partition not in PARTITIONS:
      raise ValueError(f'partition must be one of {PARTITIONS}, got {partition!r}.')
    self.partition = partition
    self.cell = _check_cell(cell or default_cell(self.grid, partition), self.grid)
    self.threshold = _common.check_fraction('threshold', threshold)
    self.implementation = implementation
    p = lambda shape, fan, axes: _common.lecun_param(rngs, shape, fan, axes)
    self.wq = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wk = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wv = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wo = p((num_heads, head_dim, dim), num_heads * head_dim,
                ('heads', 'head_dim', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dtype))  # [B, T, N, H]
    k = jnp.einsum('btd,dnh->btnh', x, self.wk[...].astype(dtype))  # [B, T, N, H]
    v = jnp.einsum('btd,dnh->btnh', x, self.wv[...].astype(dtype))  # [B, T, N, H]
    out = vmoba_attention(q, k, v, grid=self.grid, cell=self.cell,
                          threshold=self.threshold,
                          implementation=self.implementation)  # [B, T, N, H]
    return jnp.einsum('btnh,nhd->btd', out.astype(dtype),
                      self.wo[...].astype(dtype))  # [B, T, D]
