"""Static planning of the blocked XLA attention (NumPy, trace time).

From the compiled `BlockMask` (the block-sparse "MaskInfo" idea of JAX's splash
attention) this builds, per set of query heads sharing one block structure, the work
lists of the forward pass (rows = query blocks, optionally `kv_chunk` consecutive kv
blocks per step) and of the backward pass (rows = kv blocks, the transposed lists),
grouped into lanes of similar work. Everything here is NumPy, cached per (mask,
shapes, tiling), so a jitted caller compiles once.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from attention.masks import base as masks_base
from attention.masks import block as masks_block
from attention.masks import static as masks_static

EMPTY, PARTIAL, FULL = masks_base.EMPTY, masks_base.PARTIAL, masks_base.FULL

# Lanes are added while a step holds fewer logits than this (lanes * batch * heads *
# block_q * block_kv); larger tiles run fastest one per step on XLA:CPU.
_STEP_ELEMENTS = 1 << 16
_MAX_LANES = 8

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
