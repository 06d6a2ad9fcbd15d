"""Long-context static patterns: PowerAttention, S2, radial, MoA (spec: masks.md)."""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from attention.masks import _classes
from attention.masks import _util
from attention.masks import base
from attention.masks import block
from attention.masks import static

# Largest block-level table (cells) the coarse classification builds.
_MAX_CELLS = 1 << 25


def _coarse_structure(mask, cell_fn, unit: int, token_causal: bool, block_q,
                      block_kv, nq, nk):
  """Exact structure of a block-level pattern (AND token causal), or None."""
  n_cells = -(-max(mask.shape) // unit)
  if n_cells * n_cells > _MAX_CELLS:
    return None
  i = np.arange(n_cells)
  out = _classes.coarse_structure(cell_fn(i[:, None], i[None, :]), unit,
                                  mask.shape, block_q, block_kv, nq, nk)
  if out is None or not token_causal:
    return out
  diag = _classes.band(mask.shape, block_q, block_kv, nq, nk, hi=0)
  qb, kb = np.nonzero((diag == base.PARTIAL) & (out[0] != base.EMPTY))
  state, pidx, bitmaps = out
  causal_tiles = {}
  ones = np.ones((block_q, block_kv), dtype=bool)

  def tiles():
    # Bitmap = scaled-up cell pattern AND the causal triangle at this offset.
    for a, b in zip(qb, kb):
      off = int(a) * block_q - int(b) * block_kv
      if off not in causal_tiles:
        causal_tiles[off] = (np.arange(block_kv)[None, :] <=
                             np.arange(block_q)[:, None] + off)
      cells = ones if state[a, b] == base.FULL else bitmaps[pidx[a, b]]
      yield cells & causal_tiles[off]

  patched = block.patch_tiles(mask, out, qb, kb, block_q, block_kv, tiles())
  state, pidx, bitmaps = patched
  state = np.where(diag == base.EMPTY, base.EMPTY, state).astype(np.int8)
  pidx = np.where(diag == base.EMPTY, -1, pidx).astype(np.int32)
  return state, pidx, bitmaps


def _coarse_or_none(cell_fn, n_cells: int, unit: int, shape, block_q, block_kv,
                    nq, nk):
  """Exact classes of a mask constant on unit x unit cells, if the table is small."""
  if n_cells * n_cells > _MAX_CELLS:
    return None
  i = np.arange(n_cells)
  table = cell_fn(i[:, None], i[None, :])
  return _classes.coarse(table, unit, unit, shape, block_q, block_kv, nq, nk)


class BlockLevelPattern(base.Mask):
  """A pattern on (block_size x block_size) cells, optionally AND token causal.

  Subclasses define `_cells(qb, kb)`, the visibility of cell (qb, kb), and the
  fields `shape`, `block_size` and `token_causal`.
  """

  shape: tuple[int, int]
  block_size: int
  token_causal: bool

  @abc.abstractmethod
  def _cells(self, qb: np.ndarray, kb: np.ndarray) -> np.ndarray:
    """Visibility of cells (qb, kb) on broadcastable block-index arrays."""

  def _predicate(self, q, k, h):
    out = self._cells(q // self.block_size, k // self.block_size)
    return out & (k <= q) if self.token_causal else out

  def _block_classes(self, block_q, block_kv, nq, nk):
    grid = (self.shape, block_q, block_kv, nq, nk)
    n_cells = -(-max(self.shape) // self.block_size)
    out = _coarse_or_none(self._cells, n_cells, self.block_size, *grid)
    if out is None:
      return None
    if self.token_causal:
      out = _classes.and_classes(out, _classes.band(*grid, hi=0))
    return out

  def _block_structure(self, block_q, block_kv, nq, nk):
    return _coarse_structure(self, self._cells, self.block_size,
                             self.token_causal, block_q, block_kv, nq, nk)


@dataclasses.dataclass(frozen=True, eq=False)
class PowerAttention(BlockLevelPattern):
  """PowerAttention: block qb attends kb <= qb at power-of-two block distances.

  "PowerAttention: Exponentially Scaling of Receptive Fields for Effective Sparse
  Attention" (Chen et al., 2025). With D = qb - kb (blocks of `block_size` tokens):
  kb <= qb and (D & (D - 1) == 0 or kb < num_sink_blocks or D < local_blocks). This
  is the block-level predicate of the spec (the diagonal block is fully visible);
  `token_causal=True` additionally requires k <= q.
  """
  shape: tuple[int, int]
  block_size: int
  num_sink_blocks: int
  local_blocks: int
  token_causal: bool

  def _cells(self, qb, kb):
    d = qb - kb
    return (kb <= qb) & (((d & (d - 1)) == 0) | (kb < self.num_sink_blocks) |
                         (d < self.local_blocks))


def power_attention(seq_len: int, block_size: int, num_sink_blocks: int = 1,
                    local_blocks: int = 1, token_causal: bool = False
                    ) -> PowerAttention:
  """PowerAttention mask of shape (seq_len, seq_len); see `PowerAttention`."""
  seq_len = _util.check_int('seq_len', seq_len, 1)
  if not isinstance(token_causal, (bool, np.bool_)):
    raise TypeError(
        f'token_causal must be a bool, got {type(token_causal).__name__}.')
  return PowerAttention((seq_len, seq_len),
                        _util.check_int('block_size', block_size, 1),
                        _util.check_int('num_sink_blocks', num_sink_blocks, 0),
                        _util.check_int('local_blocks', local_blocks, 0),
                        bool(token_causal))


def _s2_cells(qb, kb, local_blocks, vert_stride, shift, dense):
  return (kb <= qb) & (((qb - kb) < local_blocks) |
                       ((kb + shift) % vert_stride == 0) | dense)


@dataclasses.dataclass(frozen=True, eq=False)
class StridedHead(BlockLevelPattern):
  """One head of `S2Attention`: local blocks plus every vert_stride-th block."""
  shape: tuple[int, int]
  block_size: int
  local_blocks: int
  vert_stride: int
  shift: int
  dense: bool
  token_causal: bool

  def _cells(self, qb, kb):
    return _s2_cells(qb, kb, self.local_blocks, self.vert_stride, self.shift,
                     self.dense)


@dataclasses.dataclass(frozen=True, eq=False)
class S2Attention(base.Mask):
  """S2-Attention: heterogeneous strided context sharding among heads.

  "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads" (Lin et al.,
  2024). At block granularity head h attends kb from qb iff kb <= qb and
  ((qb - kb) < local_blocks or (kb + h * step + offset) mod vert_stride == 0), with
  step = max(1, vert_stride // H); heads in `dense_heads` see every kb <= qb.
  `token_causal=True` additionally requires k <= q.
  """
  shape: tuple[int, int]
  heads: int
  block_size: int
  local_blocks: int
  vert_stride: int
  offset: int
  dense_heads: tuple[int, ...]
  token_causal: bool

  @property
  def num_heads(self):
    return self.heads

  @property
  def step(self) -> int:
    return max(1, self.vert_stride // self.heads)

  def _predicate(self, q, k, h):
    h = np.asarray(h)
    dense = np.isin(h, np.asarray(self.dense_heads, dtype=np.int64))
    out = _s2_cells(q // self.block_size, k // self.block_size,
                    self.local_blocks, self.vert_stride,
                    h * self.step + self.offset, dense)
    return out & (k <= q) if self.token_causal else out

  def _head(self, h):
    return StridedHead(self.shape, self.block_size, self.local_blocks,
                       self.vert_stride,
                       (h * self.step + self.offset) % self.vert_stride,
                       h in self.dense_heads, self.token_causal)


def s2_attention(seq_len: int, num_heads: int, block_size: int,
                 local_blocks: int, vert_stride: int, offset: int = 0,
                 dense_heads: Sequence[int] = (),
                 token_causal: bool = False) -> S2Attention:
  """S2-Attention heterogeneous strided heads; see `S2Attention`."""
  seq_len = _util.check_int('seq_len', seq_len, 1)
  num_heads = _util.check_int('num_heads', num_heads, 1)
  dense = tuple(_util.check_int(f'dense_heads[{i}]', h, 0)
                for i, h in enumerate(dense_heads))
  for i, h in enumerate(dense):
    if h >= num_heads:
      raise ValueError(
          f'dense_heads[{i}] must be < num_heads ({num_heads}), got {h}.')
  if not isinstance(token_causal, (bool, np.bool_)):
    raise TypeError(
        f'token_causal must be a bool, got {type(token_causal).__name__}.')
  return S2Attention((seq_len, seq_len), num_heads,
                     _util.check_int('block_size', block_size, 1),
                     _util.check_int('local_blocks', local_blocks, 0),
                     _util.check_int('vert_stride', vert_stride, 1),
                     _util.check_int('offset', offset, 0),
                     tuple(sorted(set(dense))), bool(token_causal))


def _radial_hw(d: np.ndarray, s: int):
  """(band half-width or -1, diagonal flag) for frame distances d >= 0."""
  d = np.asarray(d, dtype=np.int64)
  r = np.floor(np.log2(np.maximum(d, 1))).astype(np.int64)
  p = np.left_shift(np.int64(1), r)
  band = p <= s
  hw = np.where(band, s // p - 1, -1)
  diag = (d % (-(-p // s))) == 0
  return hw, diag


@dataclasses.dataclass(frozen=True, eq=False)
class Radial(base.Mask):
  """Radial attention for video: density decays with temporal distance.

  "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video
  Generation" (Li et al., 2025). Tokens (frame i, spatial k) and (frame j, spatial l),
  r = floor(log2(max(|i - j|, 1))): attend iff (2^r <= s and |k - l| + 1 <= s / 2^r)
  or (|i - j| mod ceil(2^r / s) == 0 and k == l); every query also attends all of
  frame 0 (the attention sink).
  """
  frames: int
  tokens_per_frame: int

  @property
  def shape(self):
    t = self.frames * self.tokens_per_frame
    return (t, t)

  def _predicate(self, q, k, h):
    s = self.tokens_per_frame
    i, kk = q // s, q % s
    j, ll = k // s, k % s
    hw, diag = _radial_hw(np.abs(i - j), s)
    dist = np.abs(kk - ll)
    return (dist <= hw) | (diag & (dist == 0)) | (j == 0)

  def _intervals(self):
    """Per-row key intervals [T, frames] (one per key frame)."""
    s, f = self.tokens_per_frame, self.frames
    q = np.arange(f * s)
    i, kk = (q // s)[:, None], (q % s)[:, None]
    j = np.arange(f)[None, :]
    hw, diag = _radial_hw(np.abs(i - j), s)
    width = np.where(hw >= 0, hw, np.where(diag, 0, -1))
    lo = np.clip(kk - width, 0, s - 1)
    hi = np.clip(kk + width, 0, s - 1)
    lo = np.where(width < 0, 1, lo)
    hi = np.where(width < 0, 0, hi)
    lo = np.where(j == 0, 0, lo)
    hi = np.where(j == 0, s - 1, hi)
    return j * s + lo, j * s + hi

  def _block_classes(self, block_q, block_kv, nq, nk):
    lo, hi = self._intervals()
    return _classes.row_intervals(lo, hi, self.shape, block_q, block_kv, nq, nk)

  def _block_structure(self, block_q, block_kv, nq, nk):
    s, f = self.tokens_per_frame, self.frames
    if s * s > _MAX_CELLS:
      return None
    if s % block_q or s % block_kv:
      # Compose from gcd-sized fine tiles that do divide the frame.
      fq, fk = math.gcd(block_q, s), math.gcd(block_kv, s)
      if fq * fk < 64:
        return None
      t = self.shape[0]
      fine = self._block_structure(fq, fk, t // fq, t // fk)
      return _classes.compose(fine, fq, fk, block_q, block_kv, nq, nk)
    # Frame pairs share their spatial pattern by type: sink, band(hw), diag, none.
    i = np.arange(f)
    hw, diag = _radial_hw(np.abs(i[:, None] - i[None, :]), s)
    kind = np.where(hw >= 0, hw, np.where(diag, -1, -2))
    kind = np.where(i[None, :] == 0, s, kind)  # s: whole frame (sink).
    pos = np.arange(s)
    dist = np.abs(pos[:, None] - pos[None, :])
    iq, ik = s // block_q, s // block_kv
    state = np.zeros((f, iq, f, ik), dtype=np.int8)
    pidx = np.full((f, iq, f, ik), -1, dtype=np.int32)
    bitmaps: list[np.ndarray] = []
    ids: dict[bytes, int] = {}
    for value in np.unique(kind):
      if value == s:
        spatial = np.ones((s, s), dtype=bool)
      elif value >= 0:
        spatial = dist <= value
      elif value == -1:
        spatial = dist == 0
      else:
        continue
      inner_state, inner_pidx = _classes.tile_table(spatial, block_q, block_kv,
                                                    ids, bitmaps)
      fi, fj = np.nonzero(kind == value)
      state[fi, :, fj, :] = inner_state
      pidx[fi, :, fj, :] = inner_pidx
    return (state.reshape(nq, nk), pidx.reshape(nq, nk),
            _classes.stack_bitmaps(bitmaps, block_q, block_kv))


def radial(frames: int, tokens_per_frame: int,
           seq_len: int | None = None) -> Radial:
  """Radial attention over frames x tokens_per_frame tokens; see `Radial`."""
  frames = _util.check_int('frames', frames, 1)
  tokens_per_frame = _util.check_int('tokens_per_frame', tokens_per_frame, 1)
  if seq_len is not None and _util.check_int(
      'seq_len', seq_len, 1) != frames * tokens_per_frame:
    raise ValueError(
        f'frames * tokens_per_frame must equal seq_len ({seq_len}), got '
        f'{frames} * {tokens_per_frame} = {frames * tokens_per_frame}.')
  return Radial(frames, tokens_per_frame)


@dataclasses.dataclass(frozen=True, eq=False)
class MoA(base.Mask):
  """MoA per-head elastic sliding windows (with optional attention sinks).

  "MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression"
  (Fu et al., 2024): head h keeps a causal window of span
  S_h(N) = alpha_h + beta_h * N keys (N = kv length, floored), i.e.
  k <= q and (q - S_h < k or k < num_sinks).
  """
  shape: tuple[int, int]
  spans: tuple[int, ...]
  num_sinks: int

  @property
  def num_heads(self):
    return len(self.spans)

  def _predicate(self, q, k, h):
    span = np.asarray(self.spans, dtype=np.int64)[h]
    return ((k < self.num_sinks) | (k > q - span)) & (k <= q)

  def _head(self, h):
    return static.SinkWindow(self.shape, self.num_sinks, self.spans[h])


def moa_spans(plan: Any, length: int, layer: int | None = None
              ) -> tuple[int, ...]:
  """Spans floor(alpha_h + beta_h * length) from a plan [H, 2] or [L, H, 2]."""
  arr = np.asarray(plan, dtype=np.float64)
  if arr.ndim == 3:
    if layer is None:
      raise ValueError('layer must be given for a plan of shape [L, H, 2].')
    layer = _util.check_int('layer', layer, 0)
    if layer >= arr.shape[0]:
      raise ValueError(
          f'layer must be < the plan layer count ({arr.shape[0]}), got {layer}.')
    arr = arr[layer]
  if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
    raise ValueError(
        f'plan must have shape [H, 2] or [L, H, 2] (alpha_h, beta_h), got '
        f'{np.shape(plan)}.')
  if not np.isfinite(arr).all():
    raise ValueError('plan must be finite.')
  spans = tuple(int(math.floor(a + b * length)) for a, b in arr)
  for h, span in enumerate(spans):
    if span < 1:
      raise ValueError(
          f'plan head {h} gives span alpha + beta * N = {span} < 1 for N = '
          f'{length}.')
  return spans


def moa(q_len: int, plan: Any, *, kv_len: int | None = None,
        layer: int | None = None, num_sinks: int = 0,
        num_heads: int | None = None) -> MoA:
  """MoA elastic per-head windows from a plan (alpha_h, beta_h); see `MoA`."""
  shape = _util.check_lengths(q_len, kv_len)
  spans = moa_spans(plan, shape[1], layer)
  if num_heads is not None and _util.check_int('num_heads', num_heads,
                                                1) != len(spans):
    raise ValueError(
        f'num_heads must equal the plan head count ({len(spans)}), got '
        f'{num_heads}.')
  return MoA(shape, spans, _util.check_int('num_sinks', num_sinks, 0))
