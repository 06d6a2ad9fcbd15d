"""DynamicBlockMask: block-sparse structure chosen under `jit` (routers, gates, top-k).

A static `BlockMask` is NumPy, built on the host before tracing. Content-dependent
sparse attention (MoBA, SeerAttention, BiFormer, MInference, ...) chooses its blocks
from the data, so the choice must be a traced array with a static shape. Here it is the
per-(batch, head, q-block) list of active kv blocks, padded to a static `budget` (the
most blocks any q block may visit), plus the counts:

    kv_indices  int32 [Bm, Hm, nq, budget]  ascending; entries past the count repeat the
                                            last active block (0 when none), so a kernel
                                            re-reading them fetches nothing new
    kv_counts   int32 [Bm, Hm, nq]          active blocks per q block, <= budget

The list format is part of the contract (every constructor here produces it): within
the count the indices are strictly ascending and distinct; past it they repeat the
last active block. Kernels rely on it: the TPU kernel issues no copy for a repeated
block index, and its d-bias pipeline writes back exactly the blocks it visits. A
hand-built DynamicBlockMask must follow it too.

Bm is 1 (shared by the batch) or B; Hm divides the query heads N and query head n
reads row n // (N // Hm) (Hm = 1: one routing for all heads, as BiFormer; Hm = K:
per kv head, as GQA kernels share K/V tiles; Hm = N: per query head). An optional
static `inner` Mask still applies token by token inside the chosen blocks (causal on
the diagonal block, a window, segments of a document): the visible set is

    visible(b, n, q, k) = block (q // block_q, k // block_kv) is listed  AND  inner(q, k).

The same structure is what the splash-attention TPU kernel scalar-prefetches and the
xla path iterates over; the transposed lists of the backward pass (per kv block, the q
blocks that read it) are built on device by `transpose`. Indices carry no gradient:
routers learn through side losses or biases (see the routing methods).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.masks import base
from attention.masks import block as block_lib


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class DynamicBlockMask:
  """Traced per-(batch, head, q-block) kv-block lists with a static budget.

  Attributes:
    kv_indices: int32 [Bm, Hm, nq, budget] (see the module docstring).
    kv_counts: int32 [Bm, Hm, nq].
    q_len, kv_len: real (unpadded) lengths T, S.
    block_q, block_kv: block sizes; nq = ceil(T / block_q), nk = ceil(S / block_kv)
      (padding beyond T, S is masked).
    inner: optional static `Mask` of shape (T, S) applied inside the chosen blocks.
  """
  kv_indices: jax.Array
  kv_counts: jax.Array
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  inner: base.Mask | None = None

  # ----- pytree -----
  def tree_flatten(self):
    return ((self.kv_indices, self.kv_counts),
            (self.q_len, self.kv_len, self.block_q, self.block_kv, self.inner))

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    for name, value in zip(('kv_indices', 'kv_counts', 'q_len', 'kv_len', 'block_q',
                            'block_kv', 'inner'), tuple(children) + tuple(aux)):
      object.__setattr__(obj, name, value)
    return obj

  # ----- shape -----
  @property
  def num_q_blocks(self) -> int:
    return _ceil_div(self.q_len, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return _ceil_div(self.kv_len, self.block_kv)

  @property
  def budget(self) -> int:
    return int(self.kv_indices.shape[-1])

  @property
  def batch(self) -> int:
    return int(self.kv_indices.shape[0])

  @property
  def num_heads(self) -> int:
    """Hm, the head rows of the lists (query head n reads row n // (N // Hm))."""
    return int(self.kv_indices.shape[1])

  @property
  def static_key(self) -> tuple[Any, ...]:
    """Hashable description of everything static (not the traced lists)."""
    return ('DynamicBlockMask', self.q_len, self.kv_len, self.block_q,
            self.block_kv, self.inner, tuple(self.kv_indices.shape))

  def replace(self, **changes) -> 'DynamicBlockMask':
    return dataclasses.replace(self, **changes)

  def check(self, batch: int, num_heads: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError unless this mask fits a [B, N, T, S] attention problem."""
    if (self.q_len, self.kv_len) != (q_len, kv_len):
      raise ValueError(
          f'mask (DynamicBlockMask) must have lengths (T, S) = {(q_len, kv_len)}, '
          f'got {(self.q_len, self.kv_len)}.')
    if self.batch not in (1, batch):
      raise ValueError(f'mask (DynamicBlockMask) batch must be 1 or {batch}, got '
                       f'{self.batch}.')
    if num_heads % self.num_heads:
      raise ValueError(
          f'mask (DynamicBlockMask) heads must divide the query heads ({num_heads}), '
          f'got {self.num_heads}.')
    if (self.inner is not None and self.inner.head_dependent and
        self.inner.num_heads != num_heads):
      raise ValueError(
          f'mask (DynamicBlockMask) inner mask heads must equal the query heads '
          f'({num_heads}), got {self.inner.num_heads}.')

  def head_rows(self, num_heads: int) -> np.ndarray:
    """int32 [N]: the row of the lists each query head reads."""
    return (np.arange(num_heads) // (num_heads // self.num_heads)).astype(np.int32)

  # ----- derived structure (traced) -----
  def block_matrix(self) -> jax.Array:
    """bool [Bm, Hm, nq, nk]: which blocks are listed."""
    return _scatter_blocks(self.kv_indices, self.kv_counts, self.num_kv_blocks)

  def transpose(self, budget: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(q_indices int32 [Bm, Hm, nk, Qb], q_counts int32 [Bm, Hm, nk]) on device.

    For each kv block, the q blocks that list it (ascending, padded like kv_indices);
    the lists of the dK / dV pass. `budget` (default nq) bounds Qb; when fewer
    suffice the caller may pass it (exceeding it drops the highest q blocks).
    """
    nq = self.num_q_blocks
    budget = nq if budget is None else _check_budget('budget', budget, nq)
    return _compact(jnp.swapaxes(self.block_matrix(), -1, -2), budget)

  def density(self) -> jax.Array:
    """float32 [Bm, Hm]: fraction of the nq x nk blocks that are listed."""
    return (jnp.sum(self.kv_counts, -1).astype(jnp.float32) /
            (self.num_q_blocks * self.num_kv_blocks))

  def materialize(self, num_heads: int | None = None) -> jax.Array:
    """bool [Bm, Hm, T, S] (or [Bm, N, T, S] given num_heads): the dense mask.

    O(T * S): for tests and the reference implementation only.
    """
    blocks = self.block_matrix()  # [Bm, Hm, nq, nk]
    heads = self.num_heads
    if num_heads is not None:
      blocks = blocks[:, self.head_rows(num_heads)]
      heads = num_heads
    dense = jnp.repeat(jnp.repeat(blocks, self.block_q, axis=2), self.block_kv,
                       axis=3)[:, :, :self.q_len, :self.kv_len]
    if self.inner is not None:
      inner = self.inner.materialize()
      if inner.ndim == 3:
        if inner.shape[0] != heads:
          raise ValueError(
              'num_heads must be given (the query heads) to materialize a '
              f'DynamicBlockMask whose inner mask has {inner.shape[0]} heads.')
        inner = inner[None]
      dense = dense & jnp.asarray(inner)
    return dense


def _check_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  return int(value)


def _check_budget(name: str, value: Any, num_blocks: int) -> int:
  value = _check_int(name, value)
  if not 1 <= value <= num_blocks:
    raise ValueError(
        f'{name} must be in [1, {num_blocks}] (the number of kv blocks), got {value}.')
  return value


def _check_geometry(q_len, kv_len, block_q, block_kv, inner):
  q_len, kv_len = _check_int('q_len', q_len), _check_int('kv_len', kv_len)
  for name, v in (('q_len', q_len), ('kv_len', kv_len)):
    if v < 1:
      raise ValueError(f'{name} must be >= 1, got {v}.')
  block_q = block_lib._check_block('block_q', block_q)  # pylint: disable=protected-access
  block_kv = block_lib._check_block('block_kv', block_kv)  # pylint: disable=protected-access
  if inner is not None:
    if not isinstance(inner, base.Mask):
      raise TypeError(f'inner must be a Mask or None, got {type(inner).__name__}.')
    if tuple(inner.shape) != (q_len, kv_len):
      raise ValueError(f'inner must have shape (q_len, kv_len) = {(q_len, kv_len)}, '
                       f'got {tuple(inner.shape)}.')
  return q_len, kv_len, block_q, block_kv


def _check_blocks_arg(name: str, x: Any, nq: int, nk: int, *, floating: bool) -> jax.Array:
  """A rank-4 [Bm, Hm, nq, nk] array (bool or floating)."""
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'{name} must be an array [B, H, nq, nk], got {type(x).__name__}.')
  x = jnp.asarray(x)
  if x.ndim != 4 or tuple(x.shape[2:]) != (nq, nk):
    raise ValueError(
        f'{name} must have shape [B, H, nq, nk] = [B, H, {nq}, {nk}] (nq = ceil(q_len / '
        f'block_q), nk = ceil(kv_len / block_kv)), got {list(x.shape)}.')
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{name} must be floating, got {x.dtype}.')
  if not floating and x.dtype != jnp.bool_:
    raise TypeError(f'{name} must have dtype bool, got {x.dtype}.')
  return x


def _scatter_blocks(indices: jax.Array, counts: jax.Array, nk: int) -> jax.Array:
  """bool [..., nk] from index lists [..., A] and counts [...]."""
  valid = jnp.arange(indices.shape[-1]) < counts[..., None]  # [..., A]
  hot = jax.nn.one_hot(indices, nk, dtype=jnp.int32) * valid[..., None]
  return jnp.sum(hot, axis=-2) > 0


def _compact(active: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
  """Ascending lists of the True columns of [..., n], at most `budget` (the lowest)."""
  n = active.shape[-1]
  col = jnp.arange(n, dtype=jnp.int32)
  key = jnp.where(active, col, n + col)  # active first, each group ascending
  neg, _ = jax.lax.top_k(-key, budget)  # the `budget` smallest keys, ascending
  idx = -neg
  counts = jnp.minimum(jnp.sum(active, -1), budget).astype(jnp.int32)
  last = jnp.take_along_axis(idx, jnp.maximum(counts - 1, 0)[..., None], -1)
  last = jnp.where(counts[..., None] > 0, last, 0)
  pos = jnp.arange(budget)
  idx = jnp.where(pos < counts[..., None], idx, last)
  return idx.astype(jnp.int32), counts


def _static_blocks(mask: base.Mask, block_q: int, block_kv: int) -> np.ndarray:
  """bool [1 or H, nq, nk]: the non-empty blocks of a static mask."""
  bm = block_lib.compile_mask(mask, block_q, block_kv)
  active = bm.block_state != block_lib.EMPTY
  return active[bm.head_map]


def from_block_matrix(blocks: jax.Array, *, q_len: int, kv_len: int, block_q: int,
                      block_kv: int, budget: int | None = None,
                      inner: base.Mask | None = None) -> DynamicBlockMask:
  """A DynamicBlockMask listing the True blocks of blocks [Bm, Hm, nq, nk] (bool).

  `budget` (default nk, always exact) is the static list width. With a smaller
  budget, a row with more active blocks keeps its `budget` lowest-indexed ones; when
  `blocks` is concrete (not traced) that raises a ValueError instead.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q,
                                                     block_kv, inner)
  nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
  blocks = _check_blocks_arg('blocks', blocks, nq, nk, floating=False)
  budget = nk if budget is None else _check_budget('budget', budget, nk)
  if budget < nk and _is_concrete(blocks):
    most = int(jnp.max(jnp.sum(blocks, -1)))
    if most > budget:
      raise ValueError(
          f'budget must be at least the largest number of active blocks in a q block '
          f'({most}), got {budget}.')
  idx, counts = _compact(blocks, budget)
  return DynamicBlockMask(idx, counts, q_len, kv_len, block_q, block_kv, inner)


def _with_always(scores: jax.Array, always: Any) -> tuple[jax.Array, Any]:
  """scores with +inf where `always` (bool, broadcastable) holds."""
  if always is None:
    return scores, None
  if isinstance(always, base.Mask):
    raise TypeError('always must be a bool block array [.., nq, nk]; use '
                    'union(dynamic_mask, mask) for a token-level Mask.')
  always = jnp.asarray(always)
  if always.dtype != jnp.bool_:
    raise TypeError(f'always must have dtype bool, got {always.dtype}.')
  try:
    jnp.broadcast_shapes(always.shape, scores.shape)
  except ValueError as e:
    raise ValueError(f'always must broadcast to the scores {list(scores.shape)}, got '
                     f'{list(always.shape)}.') from e
  return jnp.where(always, jnp.inf, scores), always


def top_k_blocks(scores: jax.Array, k: int, *, q_len: int, kv_len: int,
                 block_q: int, block_kv: int, always: Any = None,
                 inner: base.Mask | None = None) -> DynamicBlockMask:
  """The k highest-scoring kv blocks of each q block (MoBA's gate; SeerAttention's top-k).

  Args:
    scores: floating [Bm, Hm, nq, nk]; -inf (or NaN) marks blocks that may not be
      chosen (e.g. future blocks); they are never listed, so a row may list fewer than
      k. Ties go to the lower block index (`jax.lax.top_k`'s order).
    k: the budget, in [1, nk]; blocks in `always` count toward it.
    always: optional bool array broadcastable to scores: blocks always kept (MoBA's
      current block), before any scored block.
    q_len, kv_len, block_q, block_kv, inner: as `DynamicBlockMask`.
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q,
                                                     block_kv, inner)
  nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
  scores = _check_blocks_arg('scores', scores, nq, nk, floating=True)
  k = _check_budget('k', k, nk)
  scores = jnp.where(jnp.isnan(scores), -jnp.inf, scores)
  scores, _ = _with_always(scores, always)
  values, idx = jax.lax.top_k(scores, k)  # [Bm, Hm, nq, k], descending
  chosen = values > -jnp.inf
  picked = jax.nn.one_hot(idx, nk, dtype=jnp.int32) * chosen[..., None]
  blocks = jnp.sum(picked, axis=-2) > 0  # [Bm, Hm, nq, nk]
  out_idx, counts = _compact(blocks, k)
  return DynamicBlockMask(out_idx, counts, q_len, kv_len, block_q, block_kv, inner)


def cumulative_threshold_blocks(mass: jax.Array, threshold: float, budget: int, *,
                                q_len: int, kv_len: int, block_q: int, block_kv: int,
                                always: Any = None,
                                inner: base.Mask | None = None) -> DynamicBlockMask:
  """The fewest blocks whose mass reaches `threshold` of each row's total (VMoBA).

  Blocks are taken in descending mass (ties: lower index first), `always` blocks
  first (their mass counts), until the running sum reaches threshold * total, and at
  most `budget` of them.

  Args:
    mass: floating [Bm, Hm, nq, nk], >= 0 (0 or -inf: not eligible).
    threshold: in (0, 1].
    budget: the static list width in [1, nk].
  """
  q_len, kv_len, block_q, block_kv = _check_geometry(q_len, kv_len, block_q,
                                                     block_kv, inner)
  nq, nk = _ceil_div(q_len, block_q), _ceil_div(kv_len, block_kv)
  mass = _check_blocks_arg('mass', mass, nq, nk, floating=True)
  budget = _check_budget('budget', budget, nk)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise TypeError(f'threshold must be a float in (0, 1], got {type(threshold).__name__}.')
  if not 0.0 < float(threshold) <= 1.0:
    raise ValueError(f'threshold must be in (0, 1], got {threshold}.')
  mass = jnp.where(jnp.isfinite(mass) & (mass > 0), mass, 0.0)
  if _is_concrete(mass) and bool(jnp.any(mass < 0)):
    raise ValueError('mass must be non-negative.')
  total = jnp.sum(mass, -1, keepdims=True)
  order_key, always_b = _with_always(mass, always)
  values, idx = jax.lax.top_k(order_key, budget)  # descending; always first
  real = jnp.take_along_axis(mass, idx, -1)
  before = jnp.cumsum(real, -1) - real  # mass taken before each candidate
  eligible = (values > 0) | (values == jnp.inf)
  take = eligible & (before < threshold * total)
  if always_b is not None:
    take = take | (values == jnp.inf)
  picked = jax.nn.one_hot(idx, nk, dtype=jnp.int32) * take[..., None]
  blocks = jnp.sum(picked, axis=-2) > 0
  out_idx, counts = _compact(blocks, budget)
  return DynamicBlockMask(out_idx, counts, q_len, kv_len, block_q, block_kv, inner)


def union(dynamic: DynamicBlockMask, mask: base.Mask | Any,
          budget: int | None = None) -> DynamicBlockMask:
  """Adds the blocks of a static pattern (attention sinks, a local window, ...).

  `mask` is a static `Mask` of shape (T, S), whose non-empty blocks (at the dynamic
  mask's block sizes) are added, or a bool block array broadcastable to
  [Bm, Hm, nq, nk]. The union is at block granularity: tokens inside a listed block
  are still filtered by `dynamic.inner` only. The new budget defaults to the old
  budget plus the most blocks the pattern adds to a row (at most nk).
  """
  if not isinstance(dynamic, DynamicBlockMask):
    raise TypeError(f'dynamic must be a DynamicBlockMask, got {type(dynamic).__name__}.')
  nq, nk = dynamic.num_q_blocks, dynamic.num_kv_blocks
  if isinstance(mask, base.Mask):
    if tuple(mask.shape) != (dynamic.q_len, dynamic.kv_len):
      raise ValueError(f'mask must have shape {(dynamic.q_len, dynamic.kv_len)}, got '
                       f'{tuple(mask.shape)}.')
    extra = _static_blocks(mask, dynamic.block_q, dynamic.block_kv)[None]
    if extra.shape[1] not in (1, dynamic.num_heads):
      raise ValueError(f'mask heads ({extra.shape[1]}) must be 1 or the dynamic mask '
                       f'heads ({dynamic.num_heads}).')
    added = int(extra.sum(-1).max(initial=0))
  else:
    extra = jnp.asarray(mask)
    if extra.dtype != jnp.bool_:
      raise TypeError(f'mask must be a Mask or a bool block array, got {extra.dtype}.')
    try:
      jnp.broadcast_shapes(extra.shape, (dynamic.batch, dynamic.num_heads, nq, nk))
    except ValueError as e:
      raise ValueError(
          f'mask must broadcast to [Bm, Hm, nq, nk] = '
          f'{[dynamic.batch, dynamic.num_heads, nq, nk]}, got {list(extra.shape)}.') from e
    added = nk
  blocks = dynamic.block_matrix() | extra
  width = (min(nk, dynamic.budget + added) if budget is None else
           _check_budget('budget', budget, nk))
  idx, counts = _compact(blocks, width)
  return dynamic.replace(kv_indices=idx, kv_counts=counts)


def from_mask(mask: base.Mask, block_q: int, block_kv: int,
              num_heads: int | None = None) -> DynamicBlockMask:
  """The DynamicBlockMask of a static mask (its non-empty blocks; `inner` = mask).

  Equal in meaning to the static mask; used to compare the traced and static paths.
  """
  if not isinstance(mask, base.Mask):
    raise TypeError(f'mask must be a Mask, got {type(mask).__name__}.')
  t, s = mask.shape
  blocks = _static_blocks(mask, block_q, block_kv)[None]
  if num_heads is not None and blocks.shape[1] == 1:
    blocks = np.broadcast_to(blocks, (1, num_heads) + blocks.shape[2:])
  budget = max(int(blocks.sum(-1).max(initial=0)), 1)
  idx, counts = _compact(jnp.asarray(blocks), budget)
  return DynamicBlockMask(idx, counts, t, s, block_q, block_kv, mask)
