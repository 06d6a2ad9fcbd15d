"""BlockMask: the compiled block-sparse form every implementation consumes.

For block sizes (block_q, block_kv) the (padded) T x S mask is cut into tiles. Each tile
is EMPTY (skipped), FULL (computed without mask work) or PARTIAL (computed with a
boolean bitmap). Bitmaps are deduplicated, identical heads are stored once, and the
active tiles are listed per q block (forward, dq) and per kv block (dk, dv), as in JAX's
splash attention `MaskInfo` (Pallas TPU ops).

Padding: positions at or beyond the real lengths are masked; the tile grid covers
ceil(T / block_q) x ceil(S / block_kv) blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np

from attention.masks import base

EMPTY, PARTIAL, FULL = base.EMPTY, base.PARTIAL, base.FULL


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """A compiled block-sparse mask (NumPy arrays; static under `jit`).

  Attributes:
    q_len, kv_len: real (unpadded) lengths.
    block_q, block_kv: tile sizes.
    num_heads: number of query heads covered (1 for a head-independent mask).
    head_map: int32 [num_heads], query head -> row of the per-unique-head arrays.
    block_state: int8 [U, nq, nk], EMPTY / PARTIAL / FULL.
    partial_index: int32 [U, nq, nk], index into `partial_masks` or -1.
    partial_masks: bool [P, block_q, block_kv], deduplicated bitmaps.
    kv_indices: int32 [U, nq, A], active kv blocks of each q block in ascending
      order, padded by repeating the last active block (0 if none).
    kv_counts: int32 [U, nq], number of active kv blocks.
    kv_partial: int32 [U, nq, A], bitmap index of each listed block, -1 if FULL.
    q_indices, q_counts, q_partial: the transposed lists [U, nk, Aq] for dk / dv.
  """
  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  num_heads: int
  head_map: np.ndarray
  block_state: np.ndarray
  partial_index: np.ndarray
  partial_masks: np.ndarray
  kv_indices: np.ndarray
  kv_counts: np.ndarray
  kv_partial: np.ndarray
  q_indices: np.ndarray
  q_counts: np.ndarray
  q_partial: np.ndarray

  @property
  def num_q_blocks(self) -> int:
    return self.block_state.shape[1]

  @property
  def num_kv_blocks(self) -> int:
    return self.block_state.shape[2]

  @property
  def num_unique_heads(self) -> int:
    return self.block_state.shape[0]

  @property
  def padded_q_len(self) -> int:
    return self.num_q_blocks * self.block_q

  @property
  def padded_kv_len(self) -> int:
    return self.num_kv_blocks * self.block_kv

  @property
  def padded(self) -> bool:
    """Whether the lengths were padded up to block multiples (padding is masked)."""
    return (self.padded_q_len != self.q_len or
            self.padded_kv_len != self.kv_len)

  def _head_weights(self) -> np.ndarray:
    """How many query heads use each unique head row."""
    return np.bincount(self.head_map, minlength=self.num_unique_heads)

  def tile_density(self) -> np.ndarray:
    """float64 [U, nq, nk]: fraction of each tile's real area that is visible."""
    bq, bk = self.block_q, self.block_kv
    popcount = self.partial_masks.reshape(-1, bq * bk).sum(1)
    visible = np.where(self.block_state == FULL, bq * bk, 0).astype(np.float64)
    sel = self.block_state == PARTIAL
    visible[sel] = popcount[self.partial_index[sel]]
    qs = np.minimum(np.arange(1, self.num_q_blocks + 1) * bq, self.q_len)
    ks = np.minimum(np.arange(1, self.num_kv_blocks + 1) * bk, self.kv_len)
    rows = np.diff(qs, prepend=0)[:, None]
    cols = np.diff(ks, prepend=0)[None, :]
    return visible / np.maximum(rows * cols, 1)

  def stats(self) -> dict[str, Any]:
    """Sparsity summary, before running anything.

    Returns a flat dict: density (visible fraction of the real T x S x heads),
    flop_fraction (computed tiles' area over the dense T x S x heads),
    tile_fraction (computed tiles over all tiles), speedup_bound (1 / tile_fraction:
    the most a block-sparse kernel can gain over dense), full / partial / empty
    block counts over all heads, unique heads and bitmaps, and the padding.
    """
    w = self._head_weights()
    per_head = lambda cond: int((cond.sum(axis=(1, 2)) * w).sum())
    full_ = per_head(self.block_state == FULL)
    partial = per_head(self.block_state == PARTIAL)
    empty = per_head(self.block_state == EMPTY)
    total = full_ + partial + empty
    bq, bk = self.block_q, self.block_kv
    popcount = self.partial_masks.reshape(-1, bq * bk).sum(1)
    sel = self.block_state == PARTIAL
    part_visible = np.zeros(self.block_state.shape, dtype=np.int64)
    part_visible[sel] = popcount[self.partial_index[sel]]
    visible = full_ * bq * bk + int((part_visible.sum(axis=(1, 2)) * w).sum())
    dense = self.num_heads * self.q_len * self.kv_len
    computed = full_ + partial
    tile_fraction = computed / total
    note = (f'lengths ({self.q_len}, {self.kv_len}) padded to '
            f'({self.padded_q_len}, {self.padded_kv_len}) for blocks ({bq}, {bk}); '
            'padding is masked' if self.padded else 'no padding')
    return dict(
        q_len=self.q_len, kv_len=self.kv_len, block_q=bq, block_kv=bk,
        num_heads=self.num_heads, num_unique_heads=self.num_unique_heads,
        num_q_blocks=self.num_q_blocks, num_kv_blocks=self.num_kv_blocks,
        full_blocks=full_, partial_blocks=partial, empty_blocks=empty,
        total_blocks=total, unique_bitmaps=len(self.partial_masks),
        density=visible / dense, flop_fraction=computed * bq * bk / dense,
        tile_fraction=tile_fraction,
        speedup_bound=(1.0 / tile_fraction if computed else float('inf')),
        padded=self.padded, padded_q_len=self.padded_q_len,
        padded_kv_len=self.padded_kv_len, padding=note)

  def plot(self, path: str, head: int = 0, max_pixels: int = 1 << 22) -> str:
    """Writes a PNG: the mask of one head and its block structure.

    Left: the token-level mask (tile densities when T x S > max_pixels). Right:
    EMPTY (white) / PARTIAL (orange) / FULL (blue) tiles. Returns `path`.
    """
    from matplotlib import colors  # pylint: disable=g-import-not-at-top
    from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top
    from matplotlib import figure  # pylint: disable=g-import-not-at-top
    if not 0 <= head < self.num_heads:
      raise ValueError(f'head must be in [0, {self.num_heads}), got {head}.')
    u = int(self.head_map[head])
    fig = figure.Figure(figsize=(11, 5.2))
    backend_agg.FigureCanvasAgg(fig)
    ax0, ax1 = fig.subplots(1, 2)
    if self.q_len * self.kv_len <= max_pixels:
      ax0.imshow(self.materialize_head(head), cmap='Greys', vmin=0, vmax=1,
                 interpolation='nearest', aspect='auto')
      ax0.set_title(f'mask (head {head}), {self.q_len} x {self.kv_len}')
    else:
      ax0.imshow(self.tile_density()[u], cmap='Greys', vmin=0, vmax=1,
                 interpolation='nearest', aspect='auto')
      ax0.set_title(f'visible fraction per tile (head {head})')
    cmap = colors.ListedColormap(['white', 'tab:orange', 'tab:blue'])
    ax1.imshow(self.block_state[u], cmap=cmap, vmin=0, vmax=2,
               interpolation='nearest', aspect='auto')
    st = self.stats()
    ax1.set_title(
        f'blocks {self.block_q}x{self.block_kv}: full {st["full_blocks"]}, '
        f'partial {st["partial_blocks"]}, empty {st["empty_blocks"]}')
    ax0.set_xlabel('key')
    ax0.set_ylabel('query')
    ax1.set_xlabel('kv block')
    ax1.set_ylabel('q block')
    fig.suptitle(
        f'density {st["density"]:.4f}, FLOP fraction {st["flop_fraction"]:.4f}, '
        f'speedup bound {st["speedup_bound"]:.2f}x; {st["padding"]}', fontsize=9)
    fig.savefig(path, dpi=100)
    return path

  def materialize_head(self, head: int) -> np.ndarray:
    """The dense [q_len, kv_len] mask of one query head."""
    u = int(self.head_map[head])
    state, pidx = self.block_state[u], self.partial_index[u]
    nq, nk = state.shape
    tiles = np.zeros((nq, nk, self.block_q, self.block_kv), dtype=bool)
    tiles[state == FULL] = True
    sel = state == PARTIAL
    tiles[sel] = self.partial_masks[pidx[sel]]
    dense = tiles.transpose(0, 2, 1, 3).reshape(nq * self.block_q,
                                                nk * self.block_kv)
    return dense[:self.q_len, :self.kv_len]

  def materialize(self) -> np.ndarray:
    """The dense boolean mask [num_heads, q_len, kv_len] this BlockMask encodes."""
    u, nq, nk = self.block_state.shape
    tiles = np.zeros((u, nq, nk, self.block_q, self.block_kv), dtype=bool)
    tiles[self.block_state == FULL] = True
    sel = self.block_state == PARTIAL
    tiles[sel] = self.partial_masks[self.partial_index[sel]]
    dense = tiles.transpose(0, 1, 3, 2, 4).reshape(
        u, nq * self.block_q, nk * self.block_kv)
    return dense[self.head_map, :self.q_len, :self.kv_len]


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _check_block(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def _tile_grid(block_q: int, block_kv: int, qb: np.ndarray, kb: np.ndarray):
  """Index arrays [n, bq, 1] and [n, 1, bk] for tiles (qb[i], kb[i])."""
  q = qb[:, None, None] * block_q + np.arange(block_q)[None, :, None]
  k = kb[:, None, None] * block_kv + np.arange(block_kv)[None, None, :]
  return q, k


def _eval_tiles(mask: base.Mask, block_q: int, block_kv: int, qb: np.ndarray,
                kb: np.ndarray) -> np.ndarray:
  """Exact bitmaps [n, bq, bk] of a head-independent mask (padding masked)."""
  t, s = mask.shape
  q, k = _tile_grid(block_q, block_kv, qb, kb)
  valid = (q < t) & (k < s)
  return mask(np.minimum(q, t - 1), np.minimum(k, s - 1)) & valid


def _classes_by_strips(mask: base.Mask, block_q: int, block_kv: int, nq: int,
                       nk: int) -> np.ndarray:
  """Exact classification by evaluating the predicate one q-block strip at a time."""
  t, s = mask.shape
  state = np.zeros((nq, nk), dtype=np.int8)
  k = np.arange(nk * block_kv)
  kvalid = k < s
  for i in range(nq):
    q = np.arange(i * block_q, (i + 1) * block_q)
    vals = mask(np.minimum(q, t - 1)[:, None], np.minimum(k, s - 1)[None, :])
    vals = vals & (q < t)[:, None] & kvalid[None, :]
    tiles = vals.reshape(block_q, nk, block_kv)
    anyv = tiles.any(axis=(0, 2))
    allv = tiles.all(axis=(0, 2))
    state[i] = np.where(allv, FULL, np.where(anyv, PARTIAL, EMPTY))
  return state


def _dedup(packed: np.ndarray, block_q: int, block_kv: int):
  """Unique bitmaps of packed tiles [n, bytes] -> (inverse [n], bitmaps [P, bq, bk])."""
  if not len(packed):
    return (np.zeros((0,), np.int32),
            np.zeros((0, block_q, block_kv), dtype=bool))
  ids: dict[bytes, int] = {}
  first: list[int] = []
  inverse = np.empty((len(packed),), dtype=np.int32)
  for i, row in enumerate(packed):
    key = row.tobytes()
    j = ids.setdefault(key, len(ids))
    if j == len(first):
      first.append(i)
    inverse[i] = j
  bitmaps = np.unpackbits(packed[first], axis=1, count=block_q * block_kv)
  return inverse, bitmaps.astype(bool).reshape(-1, block_q, block_kv)


def _refine(mask: base.Mask, classes: np.ndarray, block_q: int, block_kv: int,
            tiles_per_chunk: int = 256):
  """Evaluates PARTIAL tiles exactly: (state, partial_index, bitmaps)."""
  state = np.array(classes, dtype=np.int8, copy=True)
  qb, kb = np.nonzero(state == PARTIAL)
  area = block_q * block_kv
  packed = np.zeros((len(qb), -(-area // 8)), dtype=np.uint8)
  anyv = np.zeros((len(qb),), dtype=bool)
  allv = np.zeros((len(qb),), dtype=bool)
  for i in range(0, len(qb), tiles_per_chunk):
    sl = slice(i, i + tiles_per_chunk)
    tiles = _eval_tiles(mask, block_q, block_kv, qb[sl], kb[sl])
    flat = tiles.reshape(len(tiles), area)
    anyv[sl] = flat.any(1)
    allv[sl] = flat.all(1)
    packed[sl] = np.packbits(flat, axis=1)
  state[qb[~anyv], kb[~anyv]] = EMPTY
  state[qb[allv], kb[allv]] = FULL
  keep = anyv & ~allv
  inverse, bitmaps = _dedup(packed[keep], block_q, block_kv)
  pidx = np.full(state.shape, -1, dtype=np.int32)
  pidx[qb[keep], kb[keep]] = inverse
  return state, pidx, bitmaps


def patch_tiles(mask: base.Mask, structure, qb: np.ndarray, kb: np.ndarray,
                block_q: int, block_kv: int, tiles: Any = None):
  """Replaces tiles (qb[i], kb[i]) of a structure by their exact bitmaps.

  Used by masks whose fast structure is exact except on a few tiles (for example a
  block-level pattern AND the token-level causal diagonal). `tiles` (an iterable of
  [block_q, block_kv] bitmaps) defaults to evaluating the mask's predicate.
  """
  state, pidx, bitmaps = structure
  state, pidx = state.copy(), pidx.copy()
  ids = {np.packbits(b).tobytes(): i for i, b in enumerate(bitmaps)}
  extra: list[np.ndarray] = []
  if tiles is None:
    tiles = _eval_tiles(mask, block_q, block_kv, np.asarray(qb),
                        np.asarray(kb))
  area = block_q * block_kv
  for a, b, tile in zip(qb, kb, tiles):
    count = np.count_nonzero(tile)
    if not count:
      state[a, b], pidx[a, b] = EMPTY, -1
    elif count == area:
      state[a, b], pidx[a, b] = FULL, -1
    else:
      key = np.packbits(tile).tobytes()
      if key not in ids:
        ids[key] = len(bitmaps) + len(extra)
        extra.append(tile)
      state[a, b], pidx[a, b] = PARTIAL, ids[key]
  if extra:
    bitmaps = np.concatenate([bitmaps, np.stack(extra)])
  return state, pidx, bitmaps


@functools.lru_cache(maxsize=512)
def _head_structure(mask: base.Mask, block_q: int, block_kv: int):
  """(state [nq, nk], partial_index [nq, nk], bitmaps [P, bq, bk]) of one head."""
  t, s = mask.shape
  nq, nk = _ceil_div(t, block_q), _ceil_div(s, block_kv)
  structure = mask._block_structure(block_q, block_kv, nq, nk)  # pylint: disable=protected-access
  if structure is not None:
    return structure
  classes = mask._block_classes(block_q, block_kv, nq, nk)  # pylint: disable=protected-access
  if classes is None:
    classes = _classes_by_strips(mask, block_q, block_kv, nq, nk)
  classes = np.asarray(classes, dtype=np.int8)
  if classes.shape != (nq, nk):
    raise ValueError(
        f'{type(mask).__name__}._block_classes must return shape {(nq, nk)}, '
        f'got {classes.shape}.')
  return _refine(mask, classes, block_q, block_kv)


def _lists(state: np.ndarray, pidx: np.ndarray):
  """Active-block lists along the last axis of [U, R, C] arrays."""
  active = state != EMPTY
  counts = active.sum(-1).astype(np.int32)
  width = max(int(counts.max(initial=0)), 1)
  # Stable argsort puts active columns first, in ascending column order.
  order = np.argsort(~active, axis=-1, kind='stable')[..., :width]
  pos = np.arange(width)
  last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
  idx = np.where(pos < counts[..., None], order, last)
  idx = np.where(counts[..., None] > 0, idx, 0).astype(np.int32)
  part = np.take_along_axis(pidx, idx, -1)
  part = np.where(pos < counts[..., None], part, -1).astype(np.int32)
  return idx, counts, part


def _assemble(q_len, kv_len, block_q, block_kv, structures,
              num_heads) -> BlockMask:
  """Merges per-head bitmaps, deduplicates heads, builds the lists."""
  bitmap_ids: dict[bytes, int] = {}
  bitmaps: list[np.ndarray] = []
  head_keys: dict[bytes, int] = {}
  states, pindices, head_map = [], [], []
  for state, local_pidx, local_bitmaps in structures:
    remap = np.full((len(local_bitmaps) + 1,), -1, dtype=np.int32)
    for j in np.unique(local_pidx[local_pidx >= 0]):  # referenced bitmaps only
      tile = local_bitmaps[j]
      key = np.packbits(tile).tobytes()
      if key not in bitmap_ids:
        bitmap_ids[key] = len(bitmaps)
        bitmaps.append(tile)
      remap[j] = bitmap_ids[key]
    pidx = remap[local_pidx]  # -1 indexes the trailing -1 entry.
    hkey = state.tobytes() + pidx.tobytes()
    if hkey not in head_keys:
      head_keys[hkey] = len(states)
      states.append(state)
      pindices.append(pidx)
    head_map.append(head_keys[hkey])
  head_map = np.asarray(head_map, dtype=np.int32)
  if len(head_map) == 1 and num_heads > 1:
    head_map = np.zeros((num_heads,), dtype=np.int32)
  state = np.stack(states).astype(np.int8)
  pidx = np.stack(pindices).astype(np.int32)
  partial = (np.stack(bitmaps).astype(bool) if bitmaps else
             np.zeros((0, block_q, block_kv), dtype=bool))
  kv_idx, kv_cnt, kv_part = _lists(state, pidx)
  q_idx, q_cnt, q_part = _lists(state.transpose(0, 2, 1),
                                pidx.transpose(0, 2, 1))
  arrays = dict(head_map=head_map, block_state=state, partial_index=pidx,
                partial_masks=partial, kv_indices=kv_idx, kv_counts=kv_cnt,
                kv_partial=kv_part, q_indices=q_idx, q_counts=q_cnt,
                q_partial=q_part)
  for a in arrays.values():
    a.setflags(write=False)
  return BlockMask(q_len=q_len, kv_len=kv_len, block_q=block_q,
                   block_kv=block_kv, num_heads=len(head_map), **arrays)


def compile_mask(mask: base.Mask, block_q: int, block_kv: int,
                 num_heads: int | None = None) -> BlockMask:
  """Compiles a mask to a BlockMask (cached: the same mask compiles once).

  Never builds the dense T x S array: tiles are classified analytically (the mask's
  `_block_classes` / `_block_structure`) and only PARTIAL tiles are evaluated. Masks
  without an analytic rule (Dense, Permuted, user subclasses) are classified one
  q-block strip at a time, which evaluates the predicate T x S times (no dense
  storage, but slow for very long sequences). Identical heads are compiled and
  stored once.

  Args:
    mask: a `Mask` object (use `base.from_array` for a dense array).
    block_q, block_kv: tile sizes; lengths are padded up to multiples of them and
      the padding is masked (`BlockMask.padded` / `stats()` report it).
    num_heads: query heads the result must cover (head-independent masks are shared
      by all of them; head-dependent masks must have exactly this many heads).
  """
  if not isinstance(mask, base.Mask):
    raise TypeError(f'mask must be a Mask, got {type(mask).__name__}.')
  block_q = _check_block('block_q', block_q)
  block_kv = _check_block('block_kv', block_kv)
  if num_heads is not None:
    num_heads = _check_block('num_heads', num_heads)
    if mask.head_dependent and mask.num_heads != num_heads:
      raise ValueError(
          f'num_heads must equal the mask head count ({mask.num_heads}), got '
          f'{num_heads}.')
  return _compile_cached(mask, block_q, block_kv, num_heads)


@functools.lru_cache(maxsize=256)
def _compile_cached(mask, block_q, block_kv, num_heads) -> BlockMask:
  t, s = mask.shape
  if t % block_q or s % block_kv:
    logging.info(
        'compile_mask: lengths (%d, %d) padded to (%d, %d) for blocks (%d, %d); '
        'the padding is masked.', t, s, _ceil_div(t, block_q) * block_q,
        _ceil_div(s, block_kv) * block_kv, block_q, block_kv)
  if mask.head_dependent:
    heads = [mask.head(h) for h in range(mask.num_heads)]
  else:
    heads = [mask]
  structures = [_head_structure(m, block_q, block_kv) for m in heads]
  total_heads = mask.num_heads or num_heads or 1
  return _assemble(t, s, block_q, block_kv, structures, total_heads)


def clear_cache() -> None:
  """Forgets every cached compilation (for benchmarks measuring cold compiles)."""
  _compile_cached.cache_clear()
  _head_structure.cache_clear()


def from_dense(array: Any, block_q: int, block_kv: int) -> BlockMask:
  """Compiles a dense boolean array [T, S] or [H, T, S]."""
  return compile_mask(base.from_array(array), block_q, block_kv)
