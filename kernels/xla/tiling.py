"""Tiling choice of the blocked XLA attention: a small cost model fitted on XLA:CPU.

`tiling_for` / `bwd_tiling_for` pick the forward (block_q, block_kv, kv_chunk) and the
backward tiles; `_auto_fused` the forward step form. The constants were fitted to
side-by-side timings on the 2-core machine (experiments/benchmarks/xla_attention.py).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from attention.masks import base as masks_base
from attention.masks import block as masks_block
from kernels.xla.plan import EMPTY, FULL, PARTIAL, _round_up

def _check_block_arg(name: str, value: Any) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int or None, got '
                    f'{type(value).__name__}.')
  if value <= 0:
    raise ValueError(f'{name} must be a positive int or None, got {value}.')
  return int(value)


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
