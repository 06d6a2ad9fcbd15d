"""Blocked online-softmax ("flash") attention in pure JAX: the CPU fast path.

The forward pass is FlashAttention's online softmax (Dao et al., "FlashAttention: Fast
and Memory-Efficient Exact Attention with IO-Awareness", 2022; the loop order of
FlashAttention-2, Dao 2023): for each block of queries, a running row maximum, row sum
and output are updated block by block over keys, so no T x S array ever exists. Which
tiles are visited comes from the compiled `BlockMask` (the block-sparse "MaskInfo" idea
of JAX's splash attention): EMPTY tiles are skipped, FULL tiles are computed without
mask work, and only PARTIAL tiles read a (deduplicated) bitmap. The row sums come out
of the P V dot through a column of ones appended to V.

Two forms of a forward step, both exact: the online-softmax step (two dots), and
`_fused_tile` (three dots), which XLA:CPU runs as two multi-threaded library calls.
The fused form is the default only where a step's dots are too small for XLA:CPU to
spread over cores and the batch is small (`_auto_fused`).

The backward pass is a `jax.custom_vjp` that recomputes the probabilities tile by tile
from the saved log-sum-exp: an outer loop over key blocks (the transposed lists of the
BlockMask) keeps dK / dV for those keys local, and dQ is accumulated in place. Its tiles
are laid out keys-on-rows (K Q^T), which keeps all five dots in the layout XLA:CPU's
fast dot kernels take. Memory is O(T + S) (plus whatever bias or dense mask the caller
passes in full).

Static structure: the BlockMask, the work lists and the lane grouping are NumPy arrays
built at trace time from the static mask object (cached), so a jitted caller compiles
once per (shapes, mask). Query blocks are visited in order of their work; optionally
several of them ("lanes", grouped by similar work, padding steps masked) share each
step. On XLA:CPU one 512 x 256 tile per step was fastest (a 2-core machine), so lanes
are only used by default when tiles are tiny.

KV chunks (forward only): a step may cover `kv_chunk` consecutive kv blocks of one
query block, read as one dynamic slice of the keys, with a [block_q, kv_chunk *
block_kv] bitmap concatenated from the member blocks (FULL: all True, EMPTY: all False)
and deduplicated; chunks made only of FULL blocks skip mask work. A sliding window then
costs one step per query block over about its window + block_q keys instead of several
block-aligned tiles. `tiling_for` picks (block_q, block_kv, kv_chunk) with a small
fitted cost model; causal masks get 512 x 256 tiles one per step. Loops whose trip
count is the same for every query block are static (a single step is inlined).

Einsum letters: c lane, b batch, k kv head, g query heads per kv head, m rows of a lane
(g * block_q), q / j query / key position within a tile, h head dim, v value head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention.masks import base as masks_base
from attention.masks import block as masks_block
from attention.masks import static as masks_static
from kernels._arrays import pad_axis

EMPTY, PARTIAL, FULL = masks_base.EMPTY, masks_base.PARTIAL, masks_base.FULL

_PRECISION = jax.lax.Precision.HIGHEST
# Lanes are added while a step holds fewer logits than this (lanes * batch * heads *
# block_q * block_kv); larger tiles run fastest one per step on XLA:CPU.
_STEP_ELEMENTS = 1 << 16
_MAX_LANES = 8


# ----------------------------------------------------------------------------------------
# Static planning (NumPy, trace time).
# ----------------------------------------------------------------------------------------


_AllVisible = masks_static.Full  # every position visible (no mask object given)


@dataclasses.dataclass(frozen=True, eq=False)
class _Lists:
  """Work lists of one pass for one head structure, rows grouped into lanes.

  A "row" is the block the pass keeps local (q block forward, kv block backward), a
  "column" is the block it iterates over. Group g processes rows `order[g]` side by
  side: `full_trips[g]` steps over FULL tiles, then `part_trips[g]` over PARTIAL ones.

  Attributes:
    order: int32 [G, C] row block of each lane; padding lanes hold `num_rows`.
    full_cols: int32 [G, Af, C] column block of each FULL step.
    full_valid: bool [G, Af, C] whether that step is real (None: always real).
    full_trips: int32 [G].
    part_cols: int32 [G, Ap, C] column block of each PARTIAL step.
    part_bitmap: int32 [G, Ap, C] bitmap index (padding steps: the all-False bitmap).
    part_trips: int32 [G].
  """
  order: np.ndarray
  full_cols: np.ndarray
  full_valid: np.ndarray | None
  full_trips: np.ndarray
  part_cols: np.ndarray
  part_bitmap: np.ndarray
  part_trips: np.ndarray


def _block_work(state: np.ndarray, pidx: np.ndarray):
  """Per-row (full cols, partial cols, partial bitmap ids) of one tile per step."""
  rows = state.shape[0]
  full = [np.nonzero(state[r] == FULL)[0] for r in range(rows)]
  part = [np.nonzero(state[r] == PARTIAL)[0] for r in range(rows)]
  return full, part, [pidx[r][part[r]] for r in range(rows)]


def _chunk_work(state: np.ndarray, pidx: np.ndarray, chunk: int,
                block_bitmaps: np.ndarray, registry: dict[bytes, int],
                chunk_bitmaps: list[np.ndarray]):
  """Per-row work of `chunk` consecutive kv blocks per step (forward pass).

  Each row's active blocks are covered greedily by chunks starting at the first
  uncovered active block a; a chunk that would run past the last kv block starts
  earlier, at max(0, nk - chunk), so that keys need no padding, and the blocks before a
  it then spans (already covered or EMPTY) are masked out. A chunk whose members are all
  FULL needs no mask; any other chunk gets the concatenation of its members' bitmaps
  (FULL: all True, EMPTY, not owned or past the last block: all False), deduplicated
  through `registry` into `chunk_bitmaps`.
  """
  rows, nk = state.shape
  bq, bk = block_bitmaps.shape[1:]
  ones, zeros = np.ones((bq, bk), bool), np.zeros((bq, bk), bool)
  full, part, part_bm = [], [], []
  for r in range(rows):
    f, p, pb = [], [], []
    active = np.nonzero(state[r] != EMPTY)[0]
    i = 0
    while i < len(active):
      a = int(active[i])
      start = max(0, min(a, nk - chunk))
      members = [int(state[r, c]) if a <= c < nk else EMPTY
                 for c in range(start, start + chunk)]
      if all(x == FULL for x in members):
        f.append(start)
      else:
        bitmap = np.concatenate(
            [ones if x == FULL else zeros if x == EMPTY else
             block_bitmaps[pidx[r, start + j]] for j, x in enumerate(members)],
            axis=1)
        key = bitmap.tobytes()
        if key not in registry:
          registry[key] = len(chunk_bitmaps)
          chunk_bitmaps.append(bitmap)
        p.append(start)
        pb.append(registry[key])
      while i < len(active) and active[i] < start + chunk:
        i += 1
    full.append(np.asarray(f, np.int64))
    part.append(np.asarray(p, np.int64))
    part_bm.append(np.asarray(pb, np.int64))
  return full, part, part_bm


def _build_lists(full: list[np.ndarray], part: list[np.ndarray],
                 part_bm: list[np.ndarray], lanes: int, empty_bitmap: int) -> _Lists:
  """Groups rows (per-row FULL / PARTIAL step lists) into lanes of similar work."""
  rows = len(full)
  order = sorted(range(rows), key=lambda r: (len(full[r]), len(part[r]), r))
  lanes = max(1, min(lanes, rows))
  num_groups = -(-rows // lanes)
  order = np.asarray(order + [rows] * (num_groups * lanes - rows),
                     dtype=np.int32).reshape(num_groups, lanes)

  def fill(lists, bitmaps):
    trips = np.zeros((num_groups,), np.int32)
    for g in range(num_groups):
      trips[g] = max(len(lists[r]) if r < rows else 0 for r in order[g])
    width = max(int(trips.max(initial=0)), 1)
    cols = np.zeros((num_groups, width, lanes), np.int32)
    valid = np.zeros((num_groups, width, lanes), bool)
    bms = np.full((num_groups, width, lanes), empty_bitmap, np.int32)
    for g in range(num_groups):
      for c, r in enumerate(order[g]):
        if r >= rows or not len(lists[r]):
          continue
        n = len(lists[r])
        cols[g, :n, c] = lists[r]
        cols[g, n:, c] = lists[r][-1]
        valid[g, :n, c] = True
        if bitmaps is not None:
          bms[g, :n, c] = bitmaps[r]
    return cols, valid, trips, bms

  fcols, fvalid, ftrips, _ = fill(full, None)
  needs_valid = any(
      not fvalid[g, :ftrips[g]].all() for g in range(num_groups))
  pcols, _, ptrips, pbms = fill(part, part_bm)
  arrays = [order, fcols, fvalid, ftrips, pcols, pbms, ptrips]
  for a in arrays:
    a.setflags(write=False)
  return _Lists(order=order, full_cols=fcols,
                full_valid=fvalid if needs_valid else None, full_trips=ftrips,
                part_cols=pcols, part_bitmap=pbms, part_trips=ptrips)


@dataclasses.dataclass(frozen=True, eq=False)
class _HeadGroup:
  """Query heads sharing one block structure, arranged as [Ku, gu] for GQA.

  Attributes:
    heads: int32 [Ku * gu] query heads in processing order.
    kv_heads: int32 [Ku] kv head of each row of the arrangement.
    group_size: gu, query heads per kv head inside this group.
    all_kv: kv_heads == arange(K) (no per-tile head gather needed).
    fwd, bwd: work lists of the forward (rows = q blocks) and backward (rows = kv
      blocks) passes.
  """
  heads: np.ndarray
  kv_heads: np.ndarray
  group_size: int
  all_kv: bool
  fwd: _Lists
  bwd: _Lists


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
  """Everything static about one call: blocks, bitmaps, head groups, lists."""
  block_q: int
  block_kv: int
  kv_chunk: int  # kv blocks per forward step (1: one tile per step).
  num_q_blocks: int
  num_kv_blocks: int
  bitmaps: np.ndarray  # bool [P + 1, block_q, block_kv]; the last is all False.
  # bool [Pc + 1, block_q, kv_chunk * block_kv] of the forward chunks (the last all
  # False); `bitmaps` itself when kv_chunk == 1.
  chunk_bitmaps: np.ndarray
  groups: tuple[_HeadGroup, ...]
  head_order: np.ndarray | None  # int32 [N]: concat(groups.heads); None if identity.
  visited_tiles: int  # active tiles summed over unique structures (for reporting).


def _arrange(heads: list[int], group: int, num_kv: int):
  """GQA arrangement of `heads`: (order, kv_heads, gu, all_kv)."""
  per_kv: dict[int, list[int]] = {}
  for h in heads:
    per_kv.setdefault(h // group, []).append(h)
  sizes = {len(v) for v in per_kv.values()}
  if len(sizes) == 1:
    gu = sizes.pop()
    kvs = sorted(per_kv)
    order = [h for kk in kvs for h in per_kv[kk]]
  else:  # Irregular: one query head per row, kv tiles gathered per head.
    gu = 1
    order = list(heads)
    kvs = [h // group for h in heads]
  all_kv = list(kvs) == list(range(num_kv))
  return (np.asarray(order, np.int32), np.asarray(kvs, np.int32), gu, all_kv)


def _lanes_for(rows: int, tile_elements: int) -> int:
  """Default lanes: 1 unless a tile is tiny (batching then amortises loop steps)."""
  return int(max(1, min(_MAX_LANES, rows, _STEP_ELEMENTS // max(tile_elements, 1))))


@functools.lru_cache(maxsize=128)
def _make_plan(mask_obj: masks_base.Mask, num_heads: int, num_kv_heads: int,
               block_q: int, block_kv: int, batch_heads: int,
               lanes: int | None, kv_chunk: int = 1) -> _Plan:
  """Compiles the mask and builds the lane-grouped work lists (cached)."""
  bm = masks_block.compile_mask(
      mask_obj, block_q, block_kv,
      num_heads=num_heads if mask_obj.head_dependent else None)
  nq, nk = bm.num_q_blocks, bm.num_kv_blocks
  head_map = (np.asarray(bm.head_map) if mask_obj.head_dependent else
              np.zeros((num_heads,), np.int32))
  num_bitmaps = bm.partial_masks.shape[0]
  bitmaps = np.concatenate(
      [bm.partial_masks, np.zeros((1, block_q, block_kv), bool)])
  bitmaps.setflags(write=False)
  registry: dict[bytes, int] = {}
  chunk_list: list[np.ndarray] = []
  group = num_heads // num_kv_heads
  groups = []
  for u in sorted(set(head_map.tolist())):
    heads = [h for h in range(num_heads) if head_map[h] == u]
    order, kvs, gu, all_kv = _arrange(heads, group, num_kv_heads)
    tile = batch_heads * len(heads) // num_heads * block_q * block_kv
    fwd_lanes = (lanes if lanes is not None else
                 _lanes_for(nq, tile * kv_chunk))
    bwd_lanes = lanes if lanes is not None else _lanes_for(nk, tile)
    state, pidx = bm.block_state[u], bm.partial_index[u]
    fwd = (_block_work(state, pidx) if kv_chunk == 1 else
           _chunk_work(state, pidx, kv_chunk, bitmaps, registry, chunk_list))
    groups.append(_HeadGroup(
        heads=order, kv_heads=kvs, group_size=gu, all_kv=all_kv,
        fwd=_build_lists(*fwd, fwd_lanes, -1),
        bwd=_build_lists(*_block_work(state.T, pidx.T), bwd_lanes, num_bitmaps)))
  if kv_chunk == 1:
    chunk_bitmaps = bitmaps
  else:
    chunk_bitmaps = np.stack(
        chunk_list + [np.zeros((block_q, kv_chunk * block_kv), bool)])
    chunk_bitmaps.setflags(write=False)
  # Padding steps of the forward lists read the last (all-False) bitmap.
  empty_fwd = chunk_bitmaps.shape[0] - 1
  groups = [dataclasses.replace(g, fwd=_with_empty_bitmap(g.fwd, empty_fwd))
            for g in groups]
  head_order = np.concatenate([g.heads for g in groups]).astype(np.int32)
  if np.array_equal(head_order, np.arange(num_heads)):
    head_order = None
  visited = int((bm.block_state != EMPTY).sum())
  return _Plan(block_q=block_q, block_kv=block_kv, kv_chunk=kv_chunk,
               num_q_blocks=nq, num_kv_blocks=nk, bitmaps=bitmaps,
               chunk_bitmaps=chunk_bitmaps, groups=tuple(groups),
               head_order=head_order, visited_tiles=visited)


def _with_empty_bitmap(lists: _Lists, empty: int) -> _Lists:
  """Points the padding steps (bitmap id -1) at the all-False bitmap `empty`."""
  bms = np.where(lists.part_bitmap < 0, empty, lists.part_bitmap).astype(np.int32)
  bms.setflags(write=False)
  return dataclasses.replace(lists, part_bitmap=bms)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def default_block_sizes(q_len: int, kv_len: int) -> tuple[int, int]:
  """Automatic (block_q, block_kv) without a mask: 512 x 256, shrunk to the lengths.

  512 x 256 was the fastest forward tile among 128..1024 rows and 128..512 keys on a
  2-core CPU for head_dim 64, batch * heads = 8 (each tile dot is large enough for
  XLA:CPU to run it on both cores; see `_THREADED_DOT` and
  experiments/benchmarks/xla_attention.py); blocks never exceed the 8-aligned lengths.
  """
  _check_length('q_len', q_len)
  _check_length('kv_len', kv_len)
  return (min(512, _round_up(q_len, 8)), min(256, _round_up(kv_len, 8)))


def _check_length(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value}.')


def _check_mask_obj(mask_obj: Any, q_len: int, kv_len: int) -> None:
  if mask_obj is None:
    return
  if not isinstance(mask_obj, masks_base.Mask):
    raise TypeError(f'mask_obj must be a Mask or None, got {type(mask_obj).__name__}.')
  if tuple(mask_obj.shape) != (q_len, kv_len):
    raise ValueError(f'mask_obj must have shape (T, S) = {(q_len, kv_len)}, got '
                     f'{tuple(mask_obj.shape)}.')


# Cost model of one forward step on XLA:CPU, in units of one logit (per head) of a
# multi-threaded FULL step of 256 or more rows, fitted (log least squares, 31
# tilings) to side-by-side timings of causal and dense masks at T = 2048 / 4096 and
# sliding windows of 128 / 512 keys at T = 4096 / 16384, N = 8, H = 64, on the 2-core
# machine (the dataset rows of experiments/benchmarks/xla_attention.py). Per logit: a
# factor by tile rows (small matmuls and row-wise softmax work are less efficient)
# times one by how the step runs -- dots on both cores (`_THREADED_DOT`), the fused
# step (`_fused_tile`), or a plain step on one core; plus the mask work of partial
# steps, a fixed cost per step and a fixed cost per row for each loop whose trip count
# varies between rows (a static single step is inlined); tiles of more than 2^17
# logits per head pay a surcharge. The fit's per-logit unit was 1.6 ns at N = 8.
_ROW_RATE = ((64, 1.02), (128, 1.09))  # (rows up to, factor); 1.0 above 128 rows
_FUSED_RATE = 1.18
_ONE_CORE_RATE = 1.53
_BIG_TILE = 1 << 17  # logits per head; larger tiles fall out of cache
_BIG_TILE_RATE = 0.13  # per doubling above _BIG_TILE
_MASK_RATE = 0.66
_STEP_COST = 15000.0
_LOOP_COST = 14000.0
_MAX_CHUNK_KEYS = 1024
_Q_CANDIDATES = (64, 128, 192, 256, 512)
_KV_CANDIDATES = (64, 128, 256)
_CHUNK_CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 11, 12, 16)

# XLA:CPU (jax 0.10, 2-core machine) ran a batched tile dot on both cores once one
# batch item held about 2^23 multiply-adds (block_q * width * head_dim; measured: 256
# x 64 x 256 ran at one core's speed, 512 x 64 x 256 at 1.7x it) and on one core
# below that.
_THREADED_DOT = 1 << 23
_FUSED_MAX_BATCH = 8


def _auto_fused(block_q: int, block_kv: int, kv_chunk: int, head_dim: int,
                group: int = 1, batch_items: int = 1) -> bool:
  """Default forward step: `_fused_tile` where the plain step's dots run on one core.

  The fused step spends a third logits dot to turn the step into two calls XLA:CPU
  runs multi-threaded. That paid off only for one-block steps whose dots stay under
  `_THREADED_DOT` (per batch item: group * block_q rows of block_kv keys) and have at
  most `_FUSED_MAX_BATCH` batch items (batch * kv heads). Causal T = 4096, B * N = 8,
  H = 64: 256 x 256 tiles 0.18 s fused vs 0.22 s plain; 512 x 256 tiles 0.20 s fused vs
  0.14 s plain. With 16-256 batch items (T = 64..512, automatic tiles) the plain step
  was 1.3-1.7x faster, and sliding-window chunks were slower fused at every tiling
  tried.
  """
  return (kv_chunk == 1 and batch_items <= _FUSED_MAX_BATCH and
          group * block_q * block_kv * head_dim < _THREADED_DOT)


def _step_rate(block_q: int, block_kv: int, kv_chunk: int, head_dim: int) -> float:
  width = kv_chunk * block_kv
  rate = next((r for rows, r in _ROW_RATE if block_q <= rows), 1.0)
  if block_q * width > _BIG_TILE:
    rate *= 1.0 + _BIG_TILE_RATE * float(np.log2(block_q * width / _BIG_TILE))
  if _auto_fused(block_q, block_kv, kv_chunk, head_dim):
    return rate * _FUSED_RATE
  if block_q * width * head_dim < _THREADED_DOT:
    return rate * _ONE_CORE_RATE
  return rate


def _chunk_counts(state: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
  """Per row of state [R, C]: (#all-FULL chunks, #other chunks) of the greedy cover."""
  rows, cols = state.shape
  if chunk == 1:
    return (state == FULL).sum(axis=1), (state == PARTIAL).sum(axis=1)
  full_prefix = np.concatenate(
      [np.zeros((rows, 1), np.int64), np.cumsum(state == FULL, axis=1)], axis=1)
  n_full = np.zeros((rows,), np.int64)
  n_part = np.zeros((rows,), np.int64)
  for r in range(rows):
    active = np.nonzero(state[r] != EMPTY)[0]
    if not len(active):
      continue
    if active[-1] - active[0] + 1 == len(active):  # contiguous: starts every chunk
      starts = np.arange(active[0], active[-1] + 1, chunk)
    else:
      starts, i = [], 0
      while i < len(active):
        starts.append(int(active[i]))
        i = int(np.searchsorted(active, starts[-1] + chunk))
      starts = np.asarray(starts)
    ends = starts + chunk
    inside = ends <= cols
    full = np.zeros(starts.shape, bool)
    full[inside] = (full_prefix[r, ends[inside]] -
                    full_prefix[r, starts[inside]]) == chunk
    n_full[r] = int(full.sum())
    n_part[r] = len(starts) - n_full[r]
  return n_full, n_part


def _structures(mask_obj: masks_base.Mask, block_q: int, block_kv: int):
  """(block_state [U, nq, nk], heads per structure [U]) of the compiled mask."""
  bm = masks_block.compile_mask(mask_obj, block_q, block_kv)
  weights = np.bincount(np.asarray(bm.head_map), minlength=bm.block_state.shape[0])
  return bm.block_state, weights


def _tiling_cost(mask_obj: masks_base.Mask, block_q: int, block_kv: int,
                 kv_chunk: int, head_dim: int = 64) -> float:
  """Modelled forward time of a tiling (relative units; see `_ROW_RATE`)."""
  states, weights = _structures(mask_obj, block_q, block_kv)
  width = kv_chunk * block_kv
  elements = block_q * width
  per_step = elements * _step_rate(block_q, block_kv, kv_chunk, head_dim) + _STEP_COST
  total = 0.0
  for state, weight in zip(states, weights):
    if not weight:
      continue
    n_full, n_part = _chunk_counts(state, kv_chunk)
    loops = sum(int(not (n == n[0]).all()) for n in (n_full, n_part))
    total += weight * (per_step * float(n_full.sum() + n_part.sum()) +
                       _MASK_RATE * elements * float(n_part.sum()) +
                       _LOOP_COST * loops * state.shape[0])
  return total / float(weights.sum())


@functools.lru_cache(maxsize=256)
def _auto_tiling(q_len: int, kv_len: int, mask_obj: masks_base.Mask | None,
                 block_q: int | None, block_kv: int | None,
                 kv_chunk: int | None, head_dim: int = 64) -> tuple[int, int, int]:
  big_q, big_kv = default_block_sizes(q_len, kv_len)
  if mask_obj is None:  # Everything visible: the large tile, one per step.
    return block_q or big_q, block_kv or big_kv, kv_chunk or 1
  qs = [block_q] if block_q else sorted(
      {min(c, big_q) for c in _Q_CANDIDATES}, reverse=True)
  ks = [block_kv] if block_kv else sorted(
      {min(c, big_kv) for c in _KV_CANDIDATES}, reverse=True)
  best, best_cost = None, float('inf')
  for bq in qs:
    for bk in ks:
      nk = -(-kv_len // bk)
      if kv_chunk:
        chunks = [kv_chunk]
      else:
        chunks = [m for m in _CHUNK_CANDIDATES
                  if m == 1 or (m * bk <= _MAX_CHUNK_KEYS and m <= nk)]
      for m in chunks:
        cost = _tiling_cost(mask_obj, bq, bk, m, head_dim)
        if cost < best_cost * (1 - 1e-9):  # ties keep the earlier (larger, m=1)
          best, best_cost = (bq, bk, m), cost
  return best


def tiling_for(q_len: int, kv_len: int, mask_obj: masks_base.Mask | None, *,
               block_q: int | None = None, block_kv: int | None = None,
               kv_chunk: int | None = None,
               head_dim: int = 64) -> tuple[int, int, int]:
  """Automatic (block_q, block_kv, kv_chunk): the cheapest tiling by the cost model.

  Candidates are tiles of 64..512 rows and 64..256 keys (capped at the 8-aligned
  lengths) and chunks of 1..16 consecutive kv blocks (at most 1024 keys per step);
  `_tiling_cost` prices the steps each would run on this mask at this head_dim.
  Without a mask the 512 x 256 tile is used; causal masks get it too, while sliding
  windows and other bands get a chunk that covers a query block's keys in one step.
  Given arguments are kept.
  """
  _check_length('q_len', q_len)
  _check_length('kv_len', kv_len)
  _check_mask_obj(mask_obj, q_len, kv_len)
  block_q = _check_block_arg('block_q', block_q)
  block_kv = _check_block_arg('block_kv', block_kv)
  kv_chunk = _check_block_arg('kv_chunk', kv_chunk)
  _check_length('head_dim', head_dim)
  return _auto_tiling(q_len, kv_len, mask_obj, block_q, block_kv, kv_chunk,
                      int(head_dim))


# Backward tiles where the forward takes large tiles one per step (dense and causal
# structures): 256 query rows by 512 keys. In the backward's transposed layout the kv
# block is the row dim of four of its five dots, and wider kv blocks ran faster
# (causal T = 4096, N = 8, H = 64, side by side on the 2-core machine, fwd+bwd: 0.45 s
# with 256 x 512 backward tiles, 0.57 s with 256 x 256; 512 x 256, 512 x 512,
# 128 x 512 and 256 x 1024 were 5-16% slower; see kernels/README.md). Banded (chunked)
# plans get square tiles of the largest power of two up to the forward's block_q
# (fwd+bwd, T = 16384, window 512: 128 x 128 0.86 s against 0.99 s with the forward's
# 192 x 64; T = 8192, windows 128 / 64: 64 x 64 as good as or better than 128 x 128).
_BWD_DENSE_TILE = (256, 512)


def _auto_bwd_tiling(q_len: int, kv_len: int, fwd_tiling: tuple[int, int, int],
                     block_q: int | None,
                     block_kv: int | None) -> tuple[int, int]:
  """Backward (block_q, block_kv): given values, else see `_BWD_DENSE_TILE`."""
  fq, fk, chunk = fwd_tiling
  big_q, big_kv = min(256, _round_up(q_len, 8)), min(256, _round_up(kv_len, 8))
  if chunk == 1 and fq >= big_q and fk >= big_kv:  # not a banded / small-tile plan
    auto = (min(_BWD_DENSE_TILE[0], _round_up(q_len, 8)),
            min(_BWD_DENSE_TILE[1], _round_up(kv_len, 8)))
  elif chunk > 1:  # banded: square tiles on the scale of the forward's query block
    side = min(1 << (fq.bit_length() - 1), 256)
    auto = (min(side, _round_up(q_len, 8)), min(side, _round_up(kv_len, 8)))
  else:
    auto = (fq, fk)
  return (block_q or auto[0], block_kv or auto[1])


def bwd_tiling_for(q_len: int, kv_len: int, mask_obj: masks_base.Mask | None, *,
                   block_q: int | None = None, block_kv: int | None = None,
                   kv_chunk: int | None = None, bwd_block_q: int | None = None,
                   bwd_block_kv: int | None = None,
                   head_dim: int = 64) -> tuple[int, int]:
  """Automatic backward (block_q, block_kv) for the forward tiling of `tiling_for`.

  Dense and causal structures (forward tiles of at least 256 x 256, one per step) get
  256 x 512 tiles (`_BWD_DENSE_TILE`); banded plans (kv chunks) square tiles of the
  largest power of two up to the forward's block_q, at most 256; other plans the
  forward's tiles. Given arguments are kept.
  """
  fwd = tiling_for(q_len, kv_len, mask_obj, block_q=block_q, block_kv=block_kv,
                   kv_chunk=kv_chunk, head_dim=head_dim)
  bwd_block_q = _check_block_arg('bwd_block_q', bwd_block_q)
  bwd_block_kv = _check_block_arg('bwd_block_kv', bwd_block_kv)
  return _auto_bwd_tiling(q_len, kv_len, fwd, bwd_block_q, bwd_block_kv)


def block_sizes_for(q_len: int, kv_len: int,
                    mask_obj: masks_base.Mask | None) -> tuple[int, int]:
  """Automatic (block_q, block_kv) of `tiling_for` (kv_chunk is its third value)."""
  return tiling_for(q_len, kv_len, mask_obj)[:2]


# ----------------------------------------------------------------------------------------
# The blocked computation.
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: plan by identity)."""
  plan: _Plan
  scale: float
  soft_cap: float | None
  bwd_plan: _Plan | None = None  # tiles of the backward pass (None: `plan`'s).
  fused: bool = True  # forward steps as `_fused_tile` (else one online-softmax step)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
  """Which gradients the caller needs (from custom_vjp symbolic zeros)."""
  bias: bool
  sinks: bool


def _bdot(spec: str, x: jax.Array, y: jax.Array, precision=None) -> jax.Array:
  """An einsum whose three leading batch dims ('cbk') are flattened into one.

  XLA:CPU runs a dot with a single batch dimension several times faster than the
  same dot with three.
  """
  lead = x.shape[:3]
  out = jnp.einsum(spec.replace('cbk', 'x'), x.reshape((-1,) + x.shape[3:]),
                   y.reshape((-1,) + y.shape[3:]), precision=precision)
  return out.reshape(lead + out.shape[1:])


def _blocks(x: jax.Array, block: int, num: int, value=0) -> jax.Array:
  """[B, L, heads, D] -> [num + 1, B, heads, block, D] (one extra all-`value` block)."""
  b, _, n, d = x.shape
  x = pad_axis(x, 1, (num + 1) * block, value)
  return x.reshape(b, num + 1, block, n, d).transpose(1, 0, 3, 2, 4)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
  """[num, B, heads, block, D] -> [B, length, heads, D]."""
  num, b, n, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, num * block, n, d)[:, :length]


def _row_blocks(x: jax.Array, block: int, num: int, value) -> jax.Array:
  """[B, heads, L] -> [num + 1, B, heads, block]."""
  b, n, _ = x.shape
  x = pad_axis(x, 2, (num + 1) * block, value)
  return x.reshape(b, n, num + 1, block).transpose(2, 0, 1, 3)


def _pad_tiled(x: jax.Array | None, t_pad: int, s_pad: int, value):
  """Pads dims 2 / 3 of a [B?, N?, T?, S?] array to the padded lengths (if not 1)."""
  if x is None:
    return None
  if x.shape[2] != 1:
    x = pad_axis(x, 2, t_pad, value)
  if x.shape[3] != 1:
    x = pad_axis(x, 3, s_pad, value)
  return x


class _Tiles:
  """Per-call arrays in blocked layout and the tile-level logit computation.

  A step's tile is block_q rows by `chunk` consecutive kv blocks (width chunk *
  block_kv). With chunk == 1, keys / values are blocks [nk + 1, B, K, bk, D] and kv
  segments [nk + 1, B, bk], gathered per step; with chunk > 1 they are [B, K, S', D]
  and [B, S'] (see `_prepare`) and each step takes one dynamic slice.
  """

  def __init__(self, cfg: _Config, grp: _HeadGroup, *, k_src, v_src, bias,
               mask, q_seg, kv_seg, batch: int, chunk: int, bitmaps: np.ndarray):
    plan = cfg.plan
    self.cfg, self.grp = cfg, grp
    self.bq, self.bk = plan.block_q, plan.block_kv
    self.chunk = chunk
    self.width = chunk * plan.block_kv
    self.ku = len(grp.kv_heads)
    self.gu = grp.group_size
    self.batch = batch
    self.k_src, self.v_src = k_src, v_src
    self.bitmaps = jnp.asarray(bitmaps)
    self.bias = self._heads(bias)
    self.mask = self._heads(mask)
    self.q_seg, self.kv_seg = q_seg, kv_seg

  def _span(self, src, cols, axis: int):
    """[C] chunk starts -> [C, ...] slices of `width` keys of src along `axis`."""

    def one(c):
      return jax.lax.dynamic_slice_in_dim(src, c.astype(jnp.int32) * self.bk,
                                          self.width, axis=axis)

    if cols.shape[0] == 1:
      return one(cols[0])[None]
    return jax.vmap(one)(cols)

  def _heads(self, x):
    """Selects this group's heads of a [B?, N?, T?, S?] array."""
    if x is None or x.shape[1] == 1:
      return x
    if len(self.grp.heads) == x.shape[1] and np.array_equal(
        self.grp.heads, np.arange(x.shape[1])):
      return x
    return jnp.take(x, jnp.asarray(self.grp.heads), axis=1)

  def kv(self, src, cols):
    """Key or value tiles [C, B, Ku, width, D] of the steps starting at `cols`."""
    if self.chunk == 1:
      x = src[cols]
    else:
      x = self._span(src, cols, 2)  # [C, B, K, W, D]
    if not self.grp.all_kv:
      x = jnp.take(x, jnp.asarray(self.grp.kv_heads), axis=2)
    return x

  def tile_slices(self, x, rows, cols):
    """Lane tiles [C, B?, Ku?, gu?, bq?, width?] of a [B?, Nu?, Tp?, Sp?] array."""
    tq = self.bq if x.shape[2] != 1 else 1
    tk = self.width if x.shape[3] != 1 else 1

    def one(r, c):
      return jax.lax.dynamic_slice(
          x, _tile_start(r, c, self.bq if tq > 1 else 0,
                         self.bk if tk > 1 else 0),
          (x.shape[0], x.shape[1], tq, tk))

    t = jax.vmap(one)(rows, cols)  # [C, B?, Nu?, bq?, bk?]
    heads = (self.ku, self.gu) if x.shape[1] != 1 else (1, 1)
    return t.reshape(t.shape[:2] + heads + t.shape[3:])

  def scores(self, qt, kt, rows, cols, bitmap_ids, valid, transposed=False,
             fill=-jnp.inf, additive=False):
    """Masked logits and tanh(z) (None without soft-cap) of the lane tiles.

    qt: [C, B, Ku, gu * bq, H] (pre-scaled); kt: [C, B, Ku, W, H] (W = width).
    Returns [C, B, Ku, gu, bq, W], or with `transposed` [C, B, Ku, W, gu, bq]: keys
    on rows, which lets every backward dot keep its contracted dim in the layout
    XLA:CPU's fast dot kernels take (a dot contracting the leading dim of its
    left operand ran at half the speed). Masked logits are `fill`; with
    `additive`, the mask is applied as an added [.., bq, W] tile of 0 / `fill`
    (XLA:CPU fuses an add into the surrounding dot fusion, a select it does not).
    """
    c = qt.shape[0]
    if transposed:
      z = _bdot('cbkjh,cbkmh->cbkjm', kt, qt,
                precision=_PRECISION)  # [C, B, Ku, W, gu * bq]
      z = z.reshape(c, self.batch, self.ku, self.width, self.gu, self.bq)
    else:
      z = _bdot('cbkmh,cbkjh->cbkmj', qt, kt,
                precision=_PRECISION)  # [C, B, Ku, gu * bq, W]
      z = z.reshape(c, self.batch, self.ku, self.gu, self.bq, self.width)

    def layout(x):  # [C, B?, Ku?, gu?, bq?, W?] -> the logits' layout
      return jnp.moveaxis(x, -1, 3) if transposed else x

    cap = self.cfg.soft_cap
    tanh = None
    if cap is not None:
      tanh = jnp.tanh(z)
      s = cap * tanh
    else:
      s = z
    if self.bias is not None:
      s = s + layout(self.tile_slices(self.bias, rows, cols))
    visible = None

    def conj(a, b):
      return b if a is None else a & b

    if bitmap_ids is not None:
      visible = layout(
          self.bitmaps[bitmap_ids][:, None, None, None])  # [C, 1, 1, 1, bq, W]
    if valid is not None:
      visible = conj(visible, valid[:, None, None, None, None, None])
    if self.mask is not None:
      visible = conj(visible, layout(self.tile_slices(self.mask, rows, cols)))
    if self.q_seg is not None:
      qs = self.q_seg[rows]  # [C, B, bq]
      ks = (self.kv_seg[cols] if self.chunk == 1 else
            self._span(self.kv_seg, cols, 1))  # [C, B, W]
      same = qs[:, :, :, None] == ks[:, :, None, :]  # [C, B, bq, W]
      visible = conj(visible, layout(same[:, :, None, None]))
    if visible is not None:
      fill = jnp.asarray(fill, s.dtype)
      if additive:
        s = s + jnp.where(visible, jnp.zeros((), s.dtype), fill)
      else:
        s = jnp.where(visible, s, fill)
    return s, tanh


def _scan_steps(lists: _Lists, x, body, carry):
  """Runs the FULL then the PARTIAL steps of one lane group."""

  def full_step(a, carry):
    valid = None if lists.full_valid is None else x['full_valid'][a]
    return body(carry, x['full_cols'][a], None, valid)

  def part_step(a, carry):
    return body(carry, x['part_cols'][a], x['part_bitmap'][a], None)

  for trips, xs_trips, step in ((lists.full_trips, x['full_trips'], full_step),
                                (lists.part_trips, x['part_trips'], part_step)):
    if trips.size and (trips == trips[0]).all():
      # Every group runs the same number of steps (e.g. one chunk per row of a
      # sliding window): a static loop, unrolled when it is a single step.
      if int(trips[0]) == 1:
        carry = step(0, carry)
      elif int(trips[0]) > 1:
        carry = jax.lax.fori_loop(0, int(trips[0]), step, carry)
    else:
      carry = jax.lax.fori_loop(0, xs_trips, step, carry)
  return carry


def _lists_xs(lists: _Lists) -> dict[str, jax.Array]:
  xs = dict(rows=lists.order, full_cols=lists.full_cols,
            full_trips=lists.full_trips, part_cols=lists.part_cols,
            part_bitmap=lists.part_bitmap, part_trips=lists.part_trips)
  if lists.full_valid is not None:
    xs['full_valid'] = lists.full_valid
  return {k: jnp.asarray(v) for k, v in xs.items()}


def _regroup(blocks: jax.Array, order: np.ndarray) -> jax.Array:
  """[R + 1, ...] -> [G, C, ...] in lane order (static gather)."""
  return jnp.take(blocks, jnp.asarray(order.reshape(-1)), axis=0).reshape(
      order.shape + blocks.shape[1:])


def _ungroup(ys: jax.Array, order: np.ndarray, rows: int) -> jax.Array:
  """[G, C, ...] in lane order -> [rows, ...] in row order."""
  flat = ys.reshape((-1,) + ys.shape[2:])
  inverse = np.argsort(order.reshape(-1), kind='stable')[:rows]
  return jnp.take(flat, jnp.asarray(inverse), axis=0)


def _group_q(q_blocks, grp: _HeadGroup):
  """[nq + 1, B, N, bq, H] -> [nq + 1, B, Ku, gu * bq, H] for this group."""
  n = q_blocks.shape[2]
  x = q_blocks
  if not np.array_equal(grp.heads, np.arange(n)):
    x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
  r, b, _, bq, d = x.shape
  return x.reshape(r, b, len(grp.kv_heads), grp.group_size * bq, d)


def _q_tiles(q: jax.Array, rows: jax.Array, grp: _HeadGroup, bq: int) -> jax.Array:
  """[B, T', N, H] -> this group's query tiles [C, B, Ku, gu * bq, H] of `rows`.

  Padding lanes (row nq) read a clamped slice; their results are discarded.
  """
  b, _, n, h = q.shape

  def one(r):
    x = jax.lax.dynamic_slice_in_dim(q, r.astype(jnp.int32) * bq, bq,
                                     axis=1)  # [B, bq, N, H]
    if not np.array_equal(grp.heads, np.arange(n)):
      x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
    x = x.transpose(0, 2, 1, 3)  # [B, Nu, bq, H]
    return x.reshape(b, len(grp.kv_heads), grp.group_size * bq, h)

  if rows.shape[0] == 1:
    return one(rows[0])[None]
  return jax.vmap(one)(rows)


def _group_kv(blocks, grp: _HeadGroup):
  """[nk + 1, B, K, bk, D] -> [nk + 1, B, Ku, bk, D] for this group."""
  if grp.all_kv:
    return blocks
  return jnp.take(blocks, jnp.asarray(grp.kv_heads), axis=2)


def _group_rows(x, grp: _HeadGroup):
  """[R, B, N, bq] -> [R, B, Ku, gu, bq] for this group."""
  n = x.shape[2]
  if not np.array_equal(grp.heads, np.arange(n)):
    x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
  r, b, _, bq = x.shape
  return x.reshape(r, b, len(grp.kv_heads), grp.group_size, bq)


def _ungroup_heads(parts: list[jax.Array], plan: _Plan, axis: int) -> jax.Array:
  """Concatenates per-group head slices and restores the query head order."""
  x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
  if plan.head_order is None:
    return x
  inverse = np.argsort(plan.head_order)
  return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _prepare(cfg: _Config, q, k, v, bias, mask, q_seg, kv_seg, chunk: int = 1):
  """Casts, scales and lays out the inputs (shared by forward and backward).

  With chunk == 1, k / v come back as blocks [nk + 1, B, K, bk, D] and kv segments as
  [nk + 1, B, bk]; with chunk > 1 as [B, K, S', D] and [B, S'] with S' = max(nk,
  chunk) * bk, which holds every chunk (`_chunk_work` never starts one past nk - chunk).
  """
  plan = cfg.plan
  cdt = _compute_dtype(q, k, v, bias)
  alpha = cfg.scale / cfg.soft_cap if cfg.soft_cap is not None else cfg.scale
  nq, nk = plan.num_q_blocks, plan.num_kv_blocks
  bq, bk = plan.block_q, plan.block_kv
  t_pad, s_pad = nq * bq, max(nk, chunk) * bk
  q_blocks = _blocks(q.astype(cdt) * jnp.asarray(alpha, cdt), bq, nq)
  if chunk == 1:
    k_src = _blocks(k.astype(cdt), bk, nk)
    v_src = _blocks(v.astype(cdt), bk, nk)
  else:  # Chunks lie inside [0, s_pad): no copy when S is already s_pad long.
    # Heads before keys, so that a step's slice needs no transpose.
    k_src = pad_axis(k.astype(cdt), 1, s_pad).transpose(0, 2, 1, 3)  # [B, K, S', H]
    v_src = pad_axis(v.astype(cdt), 1, s_pad).transpose(0, 2, 1, 3)  # [B, K, S', Hv]
  bias = _pad_tiled(None if bias is None else bias.astype(cdt), t_pad, s_pad, 0)
  mask = _pad_tiled(mask, t_pad, s_pad, False)
  if q_seg is not None:
    q_seg = pad_axis(q_seg, 1, (nq + 1) * bq, -1).reshape(
        q_seg.shape[0], nq + 1, bq).transpose(1, 0, 2)  # [nq + 1, B, bq]
    kv_seg = pad_axis(kv_seg, 1, s_pad + (bk if chunk == 1 else 0), -2)
    if chunk == 1:
      kv_seg = kv_seg.reshape(kv_seg.shape[0], nk + 1, bk).transpose(
          1, 0, 2)  # [nk + 1, B, bk]
  return cdt, alpha, q_blocks, k_src, v_src, bias, mask, q_seg, kv_seg


def _compute_dtype(*arrays) -> jnp.dtype:
  dtypes = [a.dtype for a in arrays if a is not None]
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _rowwise(x: jax.Array) -> jax.Array:
  """Per-row values [C, B, Ku, gu, bq] -> [C, B, Ku, gu * bq, 1] (the output rows)."""
  return x.reshape(x.shape[:3] + (-1, 1))


def _fused_tile(tiles: _Tiles, qt, kt, vt, rows, cols, bitmap_ids, valid):
  """One forward tile as two single-output computations XLA:CPU fuses whole.

  Returns the tile's row maxima m_t [C, B, Ku, gu, bq] (-inf where the tile hides
  the entire row) and A = exp(S - rowmax(S)) [V, 1] [C, B, Ku, gu * bq, Hv + 1],
  whose last column holds the row sums. The caller rescales A by exp(m_t - m).

  Why not the textbook online-softmax step: XLA:CPU (jax 0.10) lowers
  `exp(S - rowmax(S)) @ V` -- dot, max, exp and dot -- to one multi-threaded
  YNNPACK fusion that keeps the logits in cache, but any further input or output
  (the running max, the row sum) splits the step into single-threaded library calls
  and loop fusions that stream the [gu * bq, W] logits through memory several times.
  m_t comes from a second logits dot (fused with its max reduction): three tile dots
  instead of two, in fewer, faster calls (see kernels/README.md for the timings).
  """
  # The barrier keeps common-subexpression elimination from merging the two logits
  # dots, which would give the shared logits two users and break both fusions.
  s_max, _ = tiles.scores(qt, jax.lax.optimization_barrier(kt), rows, cols,
                          bitmap_ids, valid, additive=True)
  m_t = s_max.max(-1)  # [C, B, Ku, gu, bq]
  # Masked logits are the dtype's finite minimum here: a row the tile hides then
  # gives exp(0) = 1 terms (finite, discarded by the caller's scale of 0), not NaN.
  s, _ = tiles.scores(qt, kt, rows, cols, bitmap_ids, valid,
                      fill=jnp.finfo(qt.dtype).min, additive=True)
  p = jnp.exp(s - s.max(-1, keepdims=True))  # [C, B, Ku, gu, bq, W]
  a = _bdot('cbkmj,cbkjv->cbkmv', p.reshape(p.shape[:3] + (-1,) + p.shape[-1:]), vt,
            precision=_PRECISION)  # [C, B, Ku, gu * bq, Hv + 1]
  return m_t, a


def _forward(cfg: _Config, q, k, v, bias, sinks, mask, q_seg, kv_seg):
  """Blocked forward: out [B, T, N, Hv] (query dtype), lse [B, N, T]."""
  plan = cfg.plan
  b, t, n, _ = q.shape
  hv = v.shape[-1]
  (cdt, alpha, _, k_src, v_src, bias_p, mask_p, q_seg_b,
   kv_seg_b) = _prepare(cfg, q, k, v, bias, mask, q_seg, kv_seg, plan.kv_chunk)
  # A column of ones makes each tile's P V also return P's row sums (one output).
  v_src = jnp.concatenate([v_src, jnp.ones(v_src.shape[:-1] + (1,), cdt)], axis=-1)
  bq = plan.block_q
  # Query tiles are sliced per step from [B, T', N, H] (no blocked copy of q).
  q_src = pad_axis(q, 1, plan.num_q_blocks * bq)
  outs, lses = [], []
  for grp in plan.groups:
    tiles = _Tiles(cfg, grp, k_src=k_src, v_src=v_src, bias=bias_p, mask=mask_p,
                   q_seg=q_seg_b, kv_seg=kv_seg_b, batch=b, chunk=plan.kv_chunk,
                   bitmaps=plan.chunk_bitmaps)
    lists = grp.fwd
    ku, gu = tiles.ku, tiles.gu
    lanes = lists.order.shape[1]
    xs = _lists_xs(lists)
    row_shape = (lanes, b, ku, gu, bq)
    if sinks is not None:
      sink = sinks.astype(cdt)[jnp.asarray(grp.heads)].reshape(ku, gu)
      m0 = jnp.broadcast_to(sink[None, None, :, :, None], row_shape)
      l0 = jnp.ones(row_shape, cdt)
    else:
      m0 = jnp.full(row_shape, -jnp.inf, cdt)
      l0 = jnp.zeros(row_shape, cdt)
    o0 = jnp.concatenate([jnp.zeros((lanes, b, ku, gu * bq, hv), cdt),
                          l0.reshape(lanes, b, ku, gu * bq, 1)], axis=-1)

    def group_step(_, x, tiles=tiles, m0=m0, o0=o0, lists=lists, grp=grp):
      rows = x['rows']
      qt = _q_tiles(q_src, rows, grp, bq).astype(cdt) * jnp.asarray(
          alpha, cdt)  # [C, B, Ku, gu * bq, H]

      def body(carry, cols, bitmap_ids, valid):
        m, o = carry  # o: [C, B, Ku, gu * bq, Hv + 1], row sums in the last column
        kt = tiles.kv(tiles.k_src, cols)  # [C, B, Ku, W, H]
        vt = tiles.kv(tiles.v_src, cols)  # [C, B, Ku, W, Hv + 1]
        if cfg.fused:
          m_t, a = _fused_tile(tiles, qt, kt, vt, rows, cols, bitmap_ids, valid)
        else:
          s, _ = tiles.scores(qt, kt, rows, cols, bitmap_ids, valid)
          m_t = s.max(-1)  # [C, B, Ku, gu, bq]
        m_new = jnp.maximum(m, m_t)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        o = o * _rowwise(jnp.exp(m - m_safe))  # rescales what was accumulated so far
        if cfg.fused:  # a is relative to m_t: exp(m_t - m_safe) is 0 for hidden rows
          return m_new, o + a * _rowwise(jnp.exp(m_t - m_safe))
        p = jnp.exp(s - m_safe[..., None])  # [C, B, Ku, gu, bq, W]
        pv = _bdot('cbkmj,cbkjv->cbkmv', p.reshape(p.shape[:3] + (-1,) +
                                                    p.shape[-1:]), vt,
                   precision=_PRECISION)  # [C, B, Ku, gu * bq, Hv + 1]
        return m_new, o + pv

      m, o = _scan_steps(lists, x, body, (m0, o0))
      o, l = o[..., :-1], o[..., -1].reshape(m.shape)
      safe = jnp.where(l > 0, l, 1.0)
      o = o / _rowwise(safe)
      lse = jnp.where(l > 0, m + jnp.log(safe), -jnp.inf)
      return None, (o, lse)

    _, (o, lse) = jax.lax.scan(group_step, None, xs)
    o = _ungroup(o, lists.order, plan.num_q_blocks)  # [nq, B, Ku, gu * bq, Hv]
    lse = _ungroup(lse, lists.order, plan.num_q_blocks)  # [nq, B, Ku, gu, bq]
    nq = plan.num_q_blocks
    outs.append(o.reshape(nq, b, ku * gu, bq, hv))
    lses.append(lse.reshape(nq, b, ku * gu, bq))
  out = _unblocks(_ungroup_heads(outs, plan, 2), t).astype(q.dtype)  # [B, T, N, Hv]
  lse = _ungroup_heads(lses, plan, 2)  # [nq, B, N, bq]
  lse = lse.transpose(1, 2, 0, 3).reshape(b, n, -1)[:, :, :t]  # [B, N, T]
  lse_dtype = jnp.float64 if cdt == jnp.float64 else jnp.float32
  return out, lse.astype(lse_dtype)


def _backward(cfg: _Config, needs: _Needs, q, k, v, bias, sinks, mask, q_seg,
              kv_seg, out, lse, d_out, d_lse):
  """Blocked backward: (dq, dk, dv, dbias, dsinks), recomputing tile by tile."""
  if cfg.bwd_plan is not None:
    cfg = dataclasses.replace(cfg, plan=cfg.bwd_plan, bwd_plan=None)
  plan = cfg.plan
  b, t, n, h = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  hv = v.shape[-1]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = plan.num_q_blocks, plan.num_kv_blocks
  (cdt, alpha, q_blocks, k_blocks, v_blocks, bias_p, mask_p, q_seg_b,
   kv_seg_b) = _prepare(cfg, q, k, v, bias, mask, q_seg, kv_seg)
  d_out = d_out.astype(cdt)
  delta = jnp.einsum('btnv,btnv->bnt', d_out, out.astype(cdt),
                     precision=_PRECISION)  # [B, N, T]
  if d_lse is not None:
    delta = delta - d_lse.astype(cdt)
  lse = lse.astype(cdt)
  lse_safe = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # rows that see nothing: p = 0
  do_blocks = _blocks(d_out, bq, nq)  # [nq + 1, B, N, bq, Hv]
  lse_blocks = _row_blocks(lse_safe, bq, nq, jnp.inf)  # [nq + 1, B, N, bq]
  delta_blocks = _row_blocks(delta, bq, nq, 0)  # [nq + 1, B, N, bq]
  dqs, dk, dv = [], jnp.zeros((b, s_len, kh, h), cdt), jnp.zeros((b, s_len, kh, hv),
                                                                  cdt)
  dbias_parts = []
  for grp in plan.groups:
    tiles = _Tiles(cfg, grp, k_src=k_blocks, v_src=v_blocks, bias=bias_p,
                   mask=mask_p, q_seg=q_seg_b, kv_seg=kv_seg_b, batch=b, chunk=1,
                   bitmaps=plan.bitmaps)
    lists = grp.bwd
    ku, gu = tiles.ku, tiles.gu
    qg = _group_q(q_blocks, grp)  # [nq + 1, B, Ku, gu * bq, H]
    dog = _group_q(do_blocks, grp)  # [nq + 1, B, Ku, gu * bq, Hv]
    lseg = _group_rows(lse_blocks, grp)  # [nq + 1, B, Ku, gu, bq]
    deltag = _group_rows(delta_blocks, grp)
    xs = _lists_xs(lists)
    xs['k'] = _regroup(_group_kv(k_blocks, grp), lists.order)  # [G, C, B, Ku, bk, H]
    xs['v'] = _regroup(_group_kv(v_blocks, grp), lists.order)
    with_bias = bias_p is not None and needs.bias
    dbias0 = jnp.zeros(tiles.bias.shape, cdt) if with_bias else None
    # dq is accumulated transposed, [nq + 1, B, Ku, H, gu * bq], so that its dot
    # (like every other one below) reads both operands in the fast layout.
    dq0 = jnp.zeros(qg.shape[:3] + (h, qg.shape[3]), cdt)

    def group_step(carry, x, tiles=tiles, lists=lists, qg=qg, dog=dog,
                   lseg=lseg, deltag=deltag, with_bias=with_bias):
      dq, dbias = carry
      cols_fixed, kt, vt = x['rows'], x['k'], x['v']
      kt_t = jnp.swapaxes(kt, -1, -2)  # [C, B, Ku, H, bk]

      def body(inner, rows, bitmap_ids, valid):
        dk_acc, dv_acc, dq, dbias = inner
        qt, dot = qg[rows], dog[rows]  # [C, B, Ku, gu * bq, H / Hv]
        s, tanh = tiles.scores(qt, kt, rows, cols_fixed, bitmap_ids, valid,
                               transposed=True)  # [C, B, Ku, bk, gu, bq]
        p = jnp.exp(s - lseg[rows][:, :, :, None])
        flat = p.shape[:4] + (-1,)  # [C, B, Ku, bk, gu * bq]
        dv_acc = dv_acc + _bdot('cbkjm,cbkmv->cbkjv', p.reshape(flat), dot,
                                precision=_PRECISION)  # [C, B, Ku, bk, Hv]
        dp = _bdot('cbkjv,cbkmv->cbkjm', vt, dot,
                   precision=_PRECISION).reshape(p.shape)
        ds = p * (dp - deltag[rows][:, :, :, None])  # d logits (after cap, + bias)
        if with_bias:
          dbias = _add_tiles(dbias, _reduce_to(jnp.moveaxis(ds, 3, -1),
                                               tiles.bias),
                             rows, cols_fixed, bq, bk)
        dz = ds if tanh is None else ds * (cfg.soft_cap * (1.0 - tanh * tanh))
        dz = dz.reshape(flat)
        dk_acc = dk_acc + _bdot('cbkjm,cbkmh->cbkjh', dz, qt,
                                precision=_PRECISION)  # [C, B, Ku, bk, H]
        dq_t = _bdot('cbkhj,cbkjm->cbkhm', kt_t, dz,
                     precision=_PRECISION)  # [C, B, Ku, H, gu * bq]
        for c in range(dq_t.shape[0]):
          cur = jax.lax.dynamic_index_in_dim(dq, rows[c], 0, keepdims=False)
          dq = jax.lax.dynamic_update_index_in_dim(dq, cur + dq_t[c], rows[c], 0)
        return dk_acc, dv_acc, dq, dbias

      dk0 = jnp.zeros(kt.shape, cdt)
      dv0 = jnp.zeros(vt.shape, cdt)
      dk_acc, dv_acc, dq, dbias = _scan_steps(lists, x, body,
                                              (dk0, dv0, dq, dbias))
      return (dq, dbias), (dk_acc, dv_acc)

    (dq_g, dbias_g), (dk_g, dv_g) = jax.lax.scan(group_step, (dq0, dbias0), xs)
    dq_g = jnp.swapaxes(dq_g, -1, -2)  # [nq + 1, B, Ku, gu * bq, H]
    dqs.append(dq_g[:nq].reshape(nq, b, ku * gu, bq, h))
    dk_g = _ungroup(dk_g, lists.order, nk)  # [nk, B, Ku, bk, H]
    dv_g = _ungroup(dv_g, lists.order, nk)
    dk_g = _unblocks(dk_g, s_len)  # [B, S, Ku, H]
    dv_g = _unblocks(dv_g, s_len)
    if grp.all_kv:
      dk, dv = dk + dk_g, dv + dv_g
    else:
      idx = jnp.asarray(grp.kv_heads)
      dk = dk.at[:, :, idx].add(dk_g)
      dv = dv.at[:, :, idx].add(dv_g)
    if with_bias:
      dbias_parts.append(dbias_g)
  dq = _unblocks(_ungroup_heads(dqs, plan, 2), t) * jnp.asarray(alpha, cdt)
  dbias = None
  if bias is not None and needs.bias:
    if bias.shape[1] == 1:
      dbias = functools.reduce(jnp.add, dbias_parts)
    else:
      dbias = _ungroup_heads(dbias_parts, plan, 1)
    dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
  dsinks = None
  if sinks is not None and needs.sinks:
    p_sink = jnp.exp(sinks.astype(cdt)[None, :, None] - lse)  # [B, N, T]
    dsinks = jnp.sum(-p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias,
          dsinks)


def _reduce_to(ds: jax.Array, bias: jax.Array) -> jax.Array:
  """Sums ds [C, B, Ku, gu, bq, bk] over the broadcast dims of the bias tiles.

  Returns [C, B?, Nu?, bq?, bk?] matching `_Tiles.tile_slices` before the head split.
  """
  c = ds.shape[0]
  bb, nb, tb, sb = bias.shape
  axes = []
  if bb == 1:
    axes.append(1)
  if nb == 1:
    axes += [2, 3]
  if tb == 1:
    axes.append(4)
  if sb == 1:
    axes.append(5)
  red = jnp.sum(ds, axis=tuple(axes), keepdims=True) if axes else ds
  return red.reshape(c, bb, nb, red.shape[4], red.shape[5])


def _tile_start(row, col, step_q: int, step_kv: int):
  """int32 start indices (0, 0, row * step_q, col * step_kv) of a tile."""
  zero = jnp.zeros((), jnp.int32)
  return (zero, zero, row.astype(jnp.int32) * step_q,
          col.astype(jnp.int32) * step_kv)


def _add_tiles(acc: jax.Array, tiles: jax.Array, rows, cols, bq: int,
               bk: int) -> jax.Array:
  """acc[:, :, tile(r, c)] += tiles[lane] for every lane (read-modify-write)."""
  tq, tk = tiles.shape[-2], tiles.shape[-1]
  for c in range(tiles.shape[0]):
    start = _tile_start(rows[c], cols[c], bq if tq > 1 else 0,
                        bk if tk > 1 else 0)
    cur = jax.lax.dynamic_slice(acc, start, tiles.shape[1:])
    acc = jax.lax.dynamic_update_slice(acc, cur + tiles[c], start)
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, bias, sinks, mask, q_seg, kv_seg):
  return _forward(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg)


def _flash_fwd(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg):
  def unwrap(a):
    return a if a is None else a.value

  def perturbed(a):
    return a is not None and a.perturbed

  needs = _Needs(bias=perturbed(bias), sinks=perturbed(sinks))
  args = [unwrap(a) for a in (q, k, v, bias, sinks, mask, q_seg, kv_seg)]
  out, lse = _forward(cfg, *args)
  return (out, lse), (needs, args, out, lse)


def _flash_bwd(cfg, res, cts):
  needs, args, out, lse = res
  q, k, v, bias, sinks, mask, q_seg, kv_seg = args
  d_out, d_lse = cts
  zero = jax.custom_derivatives.SymbolicZero
  if isinstance(d_lse, zero):
    d_lse = None
  if isinstance(d_out, zero):
    d_out = jnp.zeros(out.shape, out.dtype)
  dq, dk, dv, dbias, dsinks = _backward(cfg, needs, q, k, v, bias, sinks, mask,
                                        q_seg, kv_seg, out, lse, d_out, d_lse)
  return dq, dk, dv, dbias, dsinks, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg):
  return _flash(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg)


# ----------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------


def _check_inputs(query, key, value, bias, mask, mask_obj, sinks, q_segment_ids,
                  kv_segment_ids, scale, logits_soft_cap) -> None:
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, h = query.shape
  s, kh = key.shape[1], key.shape[2]
  _checks.check_equal('key', 'shape[0, 3]', (key.shape[0], key.shape[3]), (b, h),
                      'query (batch, head_dim)')
  _checks.check_equal('value', 'shape[:3]', tuple(value.shape[:3]),
                      tuple(key.shape[:3]), 'key shape[:3]')
  if n % kh:
    raise ValueError(
        f'query heads ({n}) must be a multiple of key/value heads ({kh}).')
  _checks.check_positive('scale', scale, allow_none=False)
  _checks.check_positive('logits_soft_cap', logits_soft_cap)
  target = (b, n, t, s)
  if bias is not None:
    _checks.check_array('bias', bias, floating=True)
    _checks.check_broadcastable('bias', bias.shape, target, '[B, N, T, S]')
  if mask is not None:
    _checks.check_array('mask', mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f'mask must have dtype bool, got {mask.dtype}.')
    _checks.check_broadcastable('mask', mask.shape, target, '[B, N, T, S]')
  _check_mask_obj(mask_obj, t, s)
  if mask_obj is not None:
    if mask_obj.head_dependent and mask_obj.num_heads != n:
      raise ValueError(
          f'mask_obj num_heads must equal query heads ({n}), got '
          f'{mask_obj.num_heads}.')
  if sinks is not None:
    _checks.check_array('sinks', sinks, ndim=1, floating=True)
    _checks.check_equal('sinks', 'length', sinks.shape[0], n, 'query heads')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('q_segment_ids and kv_segment_ids must be given together, got '
                     f'q_segment_ids={"None" if q_segment_ids is None else "array"}, '
                     f'kv_segment_ids={"None" if kv_segment_ids is None else "array"}.')
  for name, seg, length in (('q_segment_ids', q_segment_ids, t),
                            ('kv_segment_ids', kv_segment_ids, s)):
    if seg is None:
      continue
    _checks.check_array(name, seg, ndim=2)
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise TypeError(f'{name} must have an integer dtype, got {seg.dtype}.')
    if tuple(seg.shape) != (b, length):
      raise ValueError(f'{name} must have shape {(b, length)}, got {tuple(seg.shape)}.')


def _check_block_arg(name: str, value: Any) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int or None, got '
                    f'{type(value).__name__}.')
  if value <= 0:
    raise ValueError(f'{name} must be a positive int or None, got {value}.')
  return int(value)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              scale: float, bias: jax.Array | None = None,
              mask: jax.Array | None = None,
              mask_obj: masks_base.Mask | None = None,
              logits_soft_cap: float | None = None,
              sinks: jax.Array | None = None,
              q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              return_residuals: bool = False,
              block_q: int | None = None, block_kv: int | None = None,
              kv_chunk: int | None = None, lanes: int | None = None,
              bwd_block_q: int | None = None, bwd_block_kv: int | None = None,
              fused: bool | None = None):
  """Blocked flash attention on the inputs of `attention.dot_product_attention`.

  Same semantics as `attention.reference.attention` (FlashAttention's online softmax,
  Dao et al. 2022, over the active tiles of the compiled BlockMask).

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    scale, bias, mask, mask_obj, logits_soft_cap, sinks, q_segment_ids,
      kv_segment_ids, return_residuals: as in `attention.reference.attention`.
    block_q, block_kv: tile sizes (None: chosen by `tiling_for`); lengths are padded
      to multiples of them. Use `functools.partial(attention, block_q=..)` to
      override.
    kv_chunk: consecutive kv blocks per forward step (None: chosen by `tiling_for`);
      1 visits one block_q x block_kv tile per step.
    lanes: query (forward) / key (backward) blocks processed side by side per step
      (None: as many as keep a step near 2M logits, at most 8).
    bwd_block_q, bwd_block_kv: tile sizes of the backward pass (None: chosen by
      `bwd_tiling_for`).
    fused: forward step form: True runs each tile as `_fused_tile` (three dots in
      two multi-threaded XLA:CPU calls), False as one online-softmax step (two
      dots); None picks by `_auto_fused`. Both are exact.

  Returns:
    out [B, T, N, Hv] in query's dtype, and with `return_residuals` the log-sum-exp
    [B, N, T] (float32, float64 for float64 inputs; -inf where a row sees nothing).
  """
  _check_inputs(query, key, value, bias, mask, mask_obj, sinks, q_segment_ids,
                kv_segment_ids, scale, logits_soft_cap)
  block_q = _check_block_arg('block_q', block_q)
  block_kv = _check_block_arg('block_kv', block_kv)
  kv_chunk = _check_block_arg('kv_chunk', kv_chunk)
  lanes = _check_block_arg('lanes', lanes)
  bwd_block_q = _check_block_arg('bwd_block_q', bwd_block_q)
  bwd_block_kv = _check_block_arg('bwd_block_kv', bwd_block_kv)
  if fused is not None and not isinstance(fused, bool):
    raise TypeError(f'fused must be a bool or None, got {type(fused).__name__}.')
  b, t, n, _ = query.shape
  s, kh = key.shape[1], key.shape[2]
  block_q, block_kv, kv_chunk = _auto_tiling(t, s, mask_obj, block_q, block_kv,
                                             kv_chunk, query.shape[-1])
  bwd_q, bwd_kv = _auto_bwd_tiling(t, s, (block_q, block_kv, kv_chunk),
                                   bwd_block_q, bwd_block_kv)
  structure = mask_obj if mask_obj is not None else _AllVisible((t, s))
  plan = _make_plan(structure, n, kh, block_q, block_kv, b * n, lanes, kv_chunk)
  bwd_plan = None
  if (bwd_q, bwd_kv) != (block_q, block_kv) or kv_chunk != 1:
    bwd_plan = _make_plan(structure, n, kh, bwd_q, bwd_kv, b * n, lanes, 1)
  cfg = _Config(plan=plan, scale=float(scale),
                soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                bwd_plan=bwd_plan,
                fused=(_auto_fused(block_q, block_kv, kv_chunk, query.shape[-1],
                                   group=n // kh, batch_items=b * kh)
                       if fused is None else fused))
  out, lse = _flash_jit(cfg, query, key, value, bias, sinks, mask, q_segment_ids,
                        kv_segment_ids)
  if return_residuals:
    return out, lse
  return out


def visited_fraction(q_len: int, kv_len: int, mask_obj: masks_base.Mask | None,
                     num_heads: int = 1, block_q: int | None = None,
                     block_kv: int | None = None,
                     kv_chunk: int | None = None) -> float:
  """Logits the forward pass computes over the padded T x S area (per head).

  With chunks of kv blocks this counts whole chunks (including their EMPTY members),
  so it can exceed the fraction of active tiles; unset tiling arguments are chosen by
  `tiling_for`.
  """
  _check_length('q_len', q_len)
  _check_length('kv_len', kv_len)
  _check_mask_obj(mask_obj, q_len, kv_len)
  _check_length('num_heads', num_heads)
  block_q = _check_block_arg('block_q', block_q)
  block_kv = _check_block_arg('block_kv', block_kv)
  kv_chunk = _check_block_arg('kv_chunk', kv_chunk)
  block_q, block_kv, kv_chunk = _auto_tiling(q_len, kv_len, mask_obj, block_q,
                                             block_kv, kv_chunk)
  structure = mask_obj if mask_obj is not None else _AllVisible((q_len, kv_len))
  bm = masks_block.compile_mask(
      structure, block_q, block_kv,
      num_heads=num_heads if structure.head_dependent else None)
  steps = 0
  for u in np.asarray(bm.head_map):
    n_full, n_part = _chunk_counts(bm.block_state[u], kv_chunk)
    steps += int(n_full.sum() + n_part.sum())
  return float(steps * kv_chunk) / (
      len(bm.head_map) * bm.num_q_blocks * bm.num_kv_blocks)
