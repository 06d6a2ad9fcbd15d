"""Analytic block classification helpers shared by the mask generators.

Every helper returns int8 [nq, nk] with EMPTY / PARTIAL / FULL on the padded tile grid
(positions at or beyond the real lengths count as masked). EMPTY and FULL claims are
exact; PARTIAL may be conservative (`block.compile_mask` evaluates those tiles).
"""

from __future__ import annotations

import numpy as np

from attention.masks.base import block_ranges
from attention.masks.base import EMPTY
from attention.masks.base import FULL
from attention.masks.base import PARTIAL


def classify(full: np.ndarray, empty: np.ndarray) -> np.ndarray:
  """int8 classes from boolean FULL / EMPTY claims (neither: PARTIAL)."""
  return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


def and_classes(*classes: np.ndarray) -> np.ndarray:
  """Classes of the AND of masks (exact claims stay exact)."""
  out = classes[0]
  for c in classes[1:]:
    out = np.where((out == EMPTY) | (c == EMPTY), EMPTY,
                   np.where((out == FULL) & (c == FULL), FULL, PARTIAL))
  return np.asarray(out, dtype=np.int8)


def or_classes(*classes: np.ndarray) -> np.ndarray:
  """Classes of the OR of masks (exact claims stay exact)."""
  out = classes[0]
  for c in classes[1:]:
    out = np.where((out == FULL) | (c == FULL), FULL,
                   np.where((out == EMPTY) & (c == EMPTY), EMPTY, PARTIAL))
  return np.asarray(out, dtype=np.int8)


def band(shape, block_q, block_kv, nq, nk, lo=None, hi=None) -> np.ndarray:
  """Exact classes of lo <= k - q <= hi (None: unbounded side).

  Inside a tile k - q takes every integer in [k0 - q1, k1 - q0], so the tile is
  empty iff that range misses [lo, hi] and full iff it lies inside it.
  """
  q0, q1, k0, k1, real = block_ranges(shape, block_q, block_kv, nq, nk)
  dmin, dmax = k0 - q1, k1 - q0
  nothing = (q0 > q1) | (k0 > k1)
  empty = nothing.copy()
  full = real.copy()
  if lo is not None:
    empty |= dmax < lo
    full &= dmin >= lo
  if hi is not None:
    empty |= dmin > hi
    full &= dmax <= hi
  return classify(full & ~nothing, empty)


def _block_reduce(values: np.ndarray, block: int, n: int, fill) -> tuple:
  """Per-block (min, max) of a 1-D array padded to n blocks with `fill`."""
  padded = np.full((n * block,), fill, dtype=values.dtype)
  padded[:len(values)] = values
  tiles = padded.reshape(n, block)
  return tiles.min(axis=1), tiles.max(axis=1)


def token_any_all(flags: np.ndarray, block: int, n: int):
  """Per block: whether any / all real tokens have the flag (padding: False)."""
  lo, hi = _block_reduce(np.asarray(flags, dtype=np.int8), block, n, 0)
  return hi.astype(bool), lo.astype(bool)


def columns_below(shape, block_q, block_kv, nq, nk, limit: int) -> np.ndarray:
  """Exact classes of k < limit."""
  q0, q1, k0, k1, real = block_ranges(shape, block_q, block_kv, nq, nk)
  nothing = (q0 > q1) | (k0 > k1)
  return classify(real & (k1 < limit) & ~nothing, nothing | (k0 >= limit))


def coarse(matrix: np.ndarray, unit_q: int, unit_kv: int, shape, block_q,
           block_kv, nq, nk) -> np.ndarray:
  """Exact classes of a mask constant on (unit_q x unit_kv) cells.

  `matrix[i, j]` is the mask value on cell (i, j) (rows q // unit_q, columns
  k // unit_kv). A 2-D prefix sum counts the True cells each tile touches.
  """
  q0, q1, k0, k1, real = block_ranges(shape, block_q, block_kv, nq, nk)
  nothing = (q0 > q1) | (k0 > k1)
  q1c, k1c = np.maximum(q1, q0), np.maximum(k1, k0)
  r0, r1 = q0 // unit_q, q1c // unit_q
  c0, c1 = k0 // unit_kv, k1c // unit_kv
  r0, r1 = np.minimum(r0, matrix.shape[0] - 1), np.minimum(r1,
                                                           matrix.shape[0] - 1)
  c0, c1 = np.minimum(c0, matrix.shape[1] - 1), np.minimum(c1,
                                                           matrix.shape[1] - 1)
  pre = np.zeros((matrix.shape[0] + 1, matrix.shape[1] + 1), dtype=np.int64)
  pre[1:, 1:] = np.cumsum(np.cumsum(matrix.astype(np.int64), 0), 1)
  count = (pre[r1 + 1, c1 + 1] - pre[r0, c1 + 1] - pre[r1 + 1, c0] +
           pre[r0, c0])
  area = (r1 - r0 + 1) * (c1 - c0 + 1)
  return classify(real & (count == area) & ~nothing, nothing | (count == 0))


def from_row_counts(count_fn, shape, block_q, block_kv, nq, nk,
                    chunk_rows: int = 4096) -> np.ndarray:
  """Exact classes from per-row prefix counts.

  Args:
    count_fn: (rows int64 [m], bounds int64 [nb]) -> int64 [m, nb], the number of
      visible keys k <= bound in each row (bounds are >= 0 and < S).
  Tile (i, j) holds sum over its rows of count(row, k1) - count(row, k0 - 1).
  """
  t, s = shape
  bounds = np.minimum(np.arange(1, nk + 1, dtype=np.int64) * block_kv, s) - 1
  counts = np.zeros((nq, nk), dtype=np.int64)
  rows_per_chunk = max(block_q, (chunk_rows // block_q) * block_q)
  for start in range(0, t, rows_per_chunk):
    stop = min(start + rows_per_chunk, t)
    cum = np.asarray(count_fn(np.arange(start, stop, dtype=np.int64), bounds),
                     dtype=np.int64)
    per_tile = np.diff(cum, axis=1, prepend=0)  # [rows, nk]
    nb = -(-(stop - start) // block_q)
    padded = np.zeros((nb * block_q, nk), dtype=np.int64)
    padded[:stop - start] = per_tile
    first = start // block_q
    counts[first:first + nb] += padded.reshape(nb, block_q, nk).sum(1)
  q0, q1, k0, k1, real = block_ranges(shape, block_q, block_kv, nq, nk)
  nothing = (q0 > q1) | (k0 > k1)
  area = (q1 - q0 + 1) * (k1 - k0 + 1)
  return classify(real & (counts == area) & ~nothing, nothing | (counts == 0))


def row_intervals(lo: np.ndarray, hi: np.ndarray, shape, block_q, block_kv,
                  nq, nk) -> np.ndarray:
  """Exact classes of a mask given per row as disjoint key intervals.

  Args:
    lo, hi: int64 [T, m]: row q sees keys in the union of [lo[q, j], hi[q, j]]
      (empty where lo > hi). Intervals of one row must be disjoint.
  """
  lo = np.maximum(lo, 0)
  hi = np.minimum(hi, shape[1] - 1)

  def count(rows, bounds):
    l, h = lo[rows][:, None, :], hi[rows][:, None, :]
    upto = np.clip(np.minimum(h, bounds[None, :, None]) - l + 1, 0, None)
    return upto.sum(-1)

  return from_row_counts(count, shape, block_q, block_kv, nq, nk)


def coarse_structure(matrix: np.ndarray, unit: int, shape, block_q, block_kv,
                     nq, nk):
  """Exact block structure of a mask constant on unit x unit cells, or None.

  Applies when the tiles are whole cells and the lengths are whole tiles: a tile's
  bitmap is then its (block_q / unit) x (block_kv / unit) cell pattern scaled up,
  so patterns are deduplicated before any bitmap is built.
  Returns (state [nq, nk], partial_index [nq, nk], bitmaps [P, block_q, block_kv]).
  """
  t, s = shape
  if block_q % unit or block_kv % unit or t % block_q or s % block_kv:
    return None
  a, b = block_q // unit, block_kv // unit
  cells = np.asarray(matrix, dtype=bool)[:nq * a, :nk * b]
  pidx = np.full((nq, nk), -1, dtype=np.int32)
  if a * b <= 62:
    # Each tile's cell pattern as one int64 key (bit u * b + v = cell (u, v)).
    key = np.zeros((nq, nk), dtype=np.int64)
    for u in range(a):
      for v in range(b):
        key |= cells[u::a, v::b].astype(np.int64) << (u * b + v)
    state = classify(key == (1 << (a * b)) - 1, key == 0)
    qb, kb = np.nonzero(state == PARTIAL)
    if not len(qb):
      return state, pidx, np.zeros((0, block_q, block_kv), dtype=bool)
    uniq, inverse = np.unique(key[qb, kb], return_inverse=True)
    bits = (uniq[:, None] >> np.arange(a * b)[None, :]) & 1
    patterns = bits.astype(bool).reshape(-1, a, b)
  else:
    tiles = cells.reshape(nq, a, nk, b).transpose(0, 2, 1, 3)  # [nq, nk, a, b]
    anyv, allv = tiles.any(axis=(2, 3)), tiles.all(axis=(2, 3))
    state = classify(allv, ~anyv)
    qb, kb = np.nonzero(state == PARTIAL)
    if not len(qb):
      return state, pidx, np.zeros((0, block_q, block_kv), dtype=bool)
    packed = np.packbits(tiles[qb, kb].reshape(len(qb), a * b), axis=1)
    _, first, inverse = np.unique(packed, axis=0, return_index=True,
                                  return_inverse=True)
    patterns = tiles[qb[first], kb[first]]  # [P, a, b]
  pidx[qb, kb] = inverse.reshape(-1)
  bitmaps = np.repeat(np.repeat(patterns, unit, axis=1), unit, axis=2)
  return state, pidx, bitmaps


def tile_table(matrix: np.ndarray, block_q: int, block_kv: int,
               ids: dict[bytes, int], bitmaps: list[np.ndarray]):
  """Exact (state [iq, ik], partial_index [iq, ik]) of a dense bool matrix.

  The matrix's sides must be multiples of the block sizes. New partial bitmaps are
  appended to `bitmaps` (deduplicated through `ids`, shared across calls).
  """
  iq, ik = matrix.shape[0] // block_q, matrix.shape[1] // block_kv
  tiles = matrix.reshape(iq, block_q, ik, block_kv).transpose(0, 2, 1, 3)
  anyv, allv = tiles.any(axis=(2, 3)), tiles.all(axis=(2, 3))
  state = classify(allv, ~anyv)
  pidx = np.full((iq, ik), -1, dtype=np.int32)
  for a, b in zip(*np.nonzero(state == PARTIAL)):
    key = np.packbits(tiles[a, b]).tobytes()
    if key not in ids:
      ids[key] = len(bitmaps)
      bitmaps.append(tiles[a, b])
    pidx[a, b] = ids[key]
  return state, pidx


def stack_bitmaps(bitmaps: list[np.ndarray], block_q: int,
                  block_kv: int) -> np.ndarray:
  """bool [P, block_q, block_kv] (P may be 0)."""
  if not bitmaps:
    return np.zeros((0, block_q, block_kv), dtype=bool)
  return np.stack(bitmaps).astype(bool)


def compose(fine, fine_q: int, fine_kv: int, block_q: int, block_kv: int, nq,
            nk, max_fine_tiles: int = 1 << 24):
  """Exact structure for (block_q, block_kv) tiles from a finer exact structure.

  Args:
    fine: (state, partial_index, bitmaps) on (fine_q, fine_kv) tiles, where fine_q
      divides block_q and fine_kv divides block_kv; fine tiles beyond its grid are
      padding (EMPTY).
  A coarse tile is FULL / EMPTY iff all its fine tiles are; a partial tile's bitmap
  is assembled from its fine tiles, so tiles with the same fine codes share one
  bitmap (codes index [zeros, ones, fine bitmaps...], distinct by construction).
  Returns None when the padded fine grid would exceed `max_fine_tiles`.
  """
  a, b = block_q // fine_q, block_kv // fine_kv
  if nq * a * nk * b > max_fine_tiles:
    return None
  f_state, f_pidx, f_bitmaps = fine
  code = np.zeros((nq * a, nk * b), dtype=np.int32)  # 0: empty
  fq, fk = f_state.shape
  code[:fq, :fk] = np.where(f_state == FULL, 1,
                            np.where(f_state == PARTIAL, f_pidx + 2, 0))
  code = code.reshape(nq, a, nk, b).transpose(0, 2, 1, 3).reshape(nq, nk, a * b)
  state = classify((code == 1).all(-1), (code == 0).all(-1))
  pidx = np.full((nq, nk), -1, dtype=np.int32)
  qb, kb = np.nonzero(state == PARTIAL)
  if not len(qb):
    return state, pidx, np.zeros((0, block_q, block_kv), dtype=bool)
  uniq, inverse = np.unique(code[qb, kb], axis=0, return_inverse=True)
  pidx[qb, kb] = inverse.reshape(-1)
  library = np.concatenate([np.zeros((1, fine_q, fine_kv), bool),
                            np.ones((1, fine_q, fine_kv), bool),
                            np.asarray(f_bitmaps, dtype=bool)])
  bitmaps = library[uniq].reshape(len(uniq), a, b, fine_q, fine_kv)
  bitmaps = bitmaps.transpose(0, 1, 3, 2, 4).reshape(len(uniq), block_q,
                                                     block_kv)
  return state, pidx, bitmaps
