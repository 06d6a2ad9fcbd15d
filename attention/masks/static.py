"""Static, content-independent masks over 1-D sequences (spec: masks.md).

Each generator is a frozen-dataclass `Mask` with an exact vectorised predicate and an
analytic block classification, plus a lowercase factory that validates its inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from attention.masks import _classes
from attention.masks import _util
from attention.masks import base
from attention.masks.base import block_ranges


def _block_minmax(values: np.ndarray, valid: np.ndarray, block: int, n: int):
  """Per-block (min, max) over valid real tokens (min > max if none)."""
  big = np.iinfo(np.int64).max
  lo = np.where(valid, values, big)
  hi = np.where(valid, values, -big)
  lo_min, _ = _classes._block_reduce(lo, block, n, big)  # pylint: disable=protected-access
  _, hi_max = _classes._block_reduce(hi, block, n, -big)  # pylint: disable=protected-access
  return lo_min, hi_max


@dataclasses.dataclass(frozen=True, eq=False)
class Full(base.Mask):
  """Every query sees every key (dense bidirectional attention)."""
  shape: tuple[int, int]

  def _predicate(self, q, k, h):
    return np.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), dtype=bool)

  def _block_classes(self, block_q, block_kv, nq, nk):
    return _classes.band(self.shape, block_q, block_kv, nq, nk)


def full(q_len: int, kv_len: int | None = None) -> Full:
  """The all-visible mask of shape (q_len, kv_len)."""
  return Full(_util.check_lengths(q_len, kv_len))


@dataclasses.dataclass(frozen=True, eq=False)
class SlidingWindow(base.Mask):
  """q + offset - left <= k <= q + offset + right (None: unbounded side).

  Local attention of "Longformer: The Long-Document Transformer" (Beltagy et al.,
  2020) and Mistral 7B; `offset` aligns q with kv as in splash attention's LocalMask.
  """
  shape: tuple[int, int]
  left: int | None
  right: int | None
  offset: int = 0

  def _predicate(self, q, k, h):
    out = np.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), dtype=bool)
    if self.left is not None:
      out = out & (k >= q + self.offset - self.left)
    if self.right is not None:
      out = out & (k <= q + self.offset + self.right)
    return out

  def _block_classes(self, block_q, block_kv, nq, nk):
    lo = None if self.left is None else self.offset - self.left
    hi = None if self.right is None else self.offset + self.right
    return _classes.band(self.shape, block_q, block_kv, nq, nk, lo, hi)


def sliding_window(q_len: int, left: int | None, right: int | None = 0, *,
                   kv_len: int | None = None, offset: int = 0) -> SlidingWindow:
  """Sliding window q - left <= k <= q + right; see `SlidingWindow`.

  right=0 is the causal sliding window (each query sees itself and `left` keys back).
  """
  shape = _util.check_lengths(q_len, kv_len)
  left = _util.check_optional_int('left', left, 0)
  right = _util.check_optional_int('right', right, 0)
  return SlidingWindow(shape, left, right, _util.check_int('offset', offset))


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkedCausal(base.Mask):
  """Causal attention inside fixed chunks: q // chunk == k // chunk and k <= q.

  Chunked attention of Llama 4 and "Efficient Streaming Language Models" baselines
  (splash attention's ChunkedCausalMask).
  """
  shape: tuple[int, int]
  chunk: int

  def _predicate(self, q, k, h):
    return (q // self.chunk == k // self.chunk) & (k <= q)

  def _block_classes(self, block_q, block_kv, nq, nk):
    q0, q1, k0, k1, real = block_ranges(self.shape, block_q, block_kv, nq, nk)
    c = self.chunk
    same = _classes.classify(
        real & (q0 // c == q1 // c) & (k0 // c == k1 // c) &
        (q0 // c == k0 // c),
        (q0 > q1) | (k0 > k1) | (q1 // c < k0 // c) | (k1 // c < q0 // c))
    return _classes.and_classes(
        same, _classes.band(self.shape, block_q, block_kv, nq, nk, hi=0))


def chunked_causal(q_len: int, chunk: int,
                   kv_len: int | None = None) -> ChunkedCausal:
  """Chunked causal mask; see `ChunkedCausal`."""
  return ChunkedCausal(_util.check_lengths(q_len, kv_len),
                       _util.check_int('chunk', chunk, 1))


@dataclasses.dataclass(frozen=True, eq=False)
class SinkWindow(base.Mask):
  """(k < num_sinks or q - window < k) and k <= q.

  Attention sinks plus a causal window: "Efficient Streaming Language Models with
  Attention Sinks" (StreamingLLM, Xiao et al., 2023); SinkLoRA (Zhang, 2024).
  """
  shape: tuple[int, int]
  num_sinks: int
  window: int

  def _predicate(self, q, k, h):
    return ((k < self.num_sinks) | (k > q - self.window)) & (k <= q)

  def _block_classes(self, block_q, block_kv, nq, nk):
    grid = (self.shape, block_q, block_kv, nq, nk)
    return _classes.and_classes(
        _classes.or_classes(
            _classes.columns_below(*grid, self.num_sinks),
            _classes.band(*grid, lo=1 - self.window)),
        _classes.band(*grid, hi=0))


def sink_window(q_len: int, num_sinks: int, window: int,
                kv_len: int | None = None) -> SinkWindow:
  """StreamingLLM sinks + causal window; see `SinkWindow`."""
  return SinkWindow(_util.check_lengths(q_len, kv_len),
                    _util.check_int('num_sinks', num_sinks, 0),
                    _util.check_int('window', window, 0))


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixLM(base.Mask):
  """k <= q or k < prefix_len: a bidirectional prefix, causal afterwards.

  "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
  (T5, Raffel et al., 2020), prefix language model.
  """
  shape: tuple[int, int]
  prefix_len: int

  def _predicate(self, q, k, h):
    return (k <= q) | (k < self.prefix_len)

  def _block_classes(self, block_q, block_kv, nq, nk):
    grid = (self.shape, block_q, block_kv, nq, nk)
    return _classes.or_classes(_classes.band(*grid, hi=0),
                               _classes.columns_below(*grid, self.prefix_len))


def prefix_lm(q_len: int, prefix_len: int,
              kv_len: int | None = None) -> PrefixLM:
  """Prefix-LM mask; see `PrefixLM`."""
  return PrefixLM(_util.check_lengths(q_len, kv_len),
                  _util.check_int('prefix_len', prefix_len, 0))


@dataclasses.dataclass(frozen=True, eq=False)
class Segments(base.Mask):
  """seg_q[q] == seg_kv[k]: packed sequences attend only within their segment.

  Sequence packing as in "Efficient Sequence Packing without Cross-contamination"
  (Krell et al., 2021); combine with `causal` for packed causal LMs.
  """
  q_ids: np.ndarray
  kv_ids: np.ndarray

  @property
  def shape(self):
    return (len(self.q_ids), len(self.kv_ids))

  def _predicate(self, q, k, h):
    return self.q_ids[q] == self.kv_ids[k]

  def _block_classes(self, block_q, block_kv, nq, nk):
    qmin, qmax = _block_minmax(self.q_ids, np.ones(len(self.q_ids), bool),
                               block_q, nq)
    kmin, kmax = _block_minmax(self.kv_ids, np.ones(len(self.kv_ids), bool),
                               block_kv, nk)
    _, _, _, _, real = block_ranges(self.shape, block_q, block_kv, nq, nk)
    qmin, qmax = qmin[:, None], qmax[:, None]
    kmin, kmax = kmin[None, :], kmax[None, :]
    full_ = real & (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
    empty = (qmin > qmax) | (kmin > kmax) | (qmax < kmin) | (qmin > kmax)
    return _classes.classify(full_, empty)


def segments(q_segment_ids: Any, kv_segment_ids: Any = None) -> Segments:
  """Segment mask from integer ids [T] (and [S] for cross-attention)."""
  q_ids = _util.check_ids('q_segment_ids', q_segment_ids)
  kv_ids = (q_ids if kv_segment_ids is None else
            _util.check_ids('kv_segment_ids', kv_segment_ids))
  return Segments(q_ids, kv_ids)


def documents(lengths: Sequence[int], causal: bool = True) -> base.Mask:
  """Packed documents of the given lengths (segments, AND causal by default)."""
  if not isinstance(lengths, (tuple, list, np.ndarray)) or not len(lengths):
    raise ValueError(f'lengths must be a non-empty sequence, got {lengths!r}.')
  lengths = [_util.check_int(f'lengths[{i}]', n, 1)
             for i, n in enumerate(lengths)]
  if not isinstance(causal, (bool, np.bool_)):
    raise TypeError(f'causal must be a bool, got {type(causal).__name__}.')
  ids = np.repeat(np.arange(len(lengths)), lengths)
  mask = segments(ids)
  return mask & base.causal(len(ids)) if causal else mask


@dataclasses.dataclass(frozen=True, eq=False)
class ModalityMutual(base.Mask):
  """Causal, plus image tokens attend to the text tokens that follow them.

  Modality-mutual attention of AKI, "Seeing is Understanding: Unlocking Causal
  Attention into Modality-Mutual Attention for Multimodal LLMs" (2025):
  k <= q, or (q is an image token, k a later text token of the same sample).
  """
  is_image: np.ndarray
  sample_ids: np.ndarray

  @property
  def shape(self):
    return (len(self.is_image), len(self.is_image))

  def _predicate(self, q, k, h):
    img = self.is_image.astype(bool)
    extra = (img[q] & ~img[k] & (k > q) &
             (self.sample_ids[q] == self.sample_ids[k]))
    return (k <= q) | extra

  def _block_classes(self, block_q, block_kv, nq, nk):
    grid = (self.shape, block_q, block_kv, nq, nk)
    q0, q1, k0, k1, real = block_ranges(*grid)
    img = self.is_image.astype(bool)
    q_any_img, q_all_img = _classes.token_any_all(img, block_q, nq)
    k_any_txt, k_all_txt = _classes.token_any_all(~img, block_kv, nk)
    ones = np.ones(len(img), bool)
    qs0, qs1 = _block_minmax(self.sample_ids, ones, block_q, nq)
    ks0, ks1 = _block_minmax(self.sample_ids, ones, block_kv, nk)
    qs0, qs1, ks0, ks1 = qs0[:, None], qs1[:, None], ks0[None], ks1[None]
    full_ = (real & q_all_img[:, None] & k_all_txt[None] & (k0 > q1) &
             (qs0 == qs1) & (ks0 == ks1) & (qs0 == ks0))
    empty = (~q_any_img[:, None] | ~k_any_txt[None] | (k1 <= q0) |
             (qs1 < ks0) | (qs0 > ks1))
    return _classes.or_classes(_classes.band(*grid, hi=0),
                               _classes.classify(full_, empty))


def modality_mutual(is_image: Any, sample_ids: Any = None) -> ModalityMutual:
  """AKI modality-mutual mask from a per-token image flag [T] (bool or 0/1)."""
  flags = np.asarray(is_image)
  if flags.dtype != np.bool_ and not np.issubdtype(flags.dtype, np.integer):
    raise TypeError(f'is_image must be bool or integer, got {flags.dtype}.')
  flags = _util.check_ids('is_image', flags)
  if not np.isin(flags, (0, 1)).all():
    raise ValueError('is_image must contain only 0/1 (False/True) values.')
  t = len(flags)
  samples = (np.zeros((t,), np.int64) if sample_ids is None else
             _util.check_ids('sample_ids', sample_ids, t))
  return ModalityMutual(flags, _util.check_ids('sample_ids', samples, t))


@dataclasses.dataclass(frozen=True, eq=False)
class BidirectionalSegments(base.Mask):
  """Causal, plus full attention between different designated segments.

  PINE, "Eliminating Position Bias of Language Models: A Mechanistic Approach"
  (Wang et al., 2024): documents (segment ids >= 0) see each other bidirectionally;
  inside a segment and for undesignated tokens (id -1) attention stays causal.
  Predicate: k <= q or (seg[q] >= 0 and seg[k] >= 0 and seg[q] != seg[k]).
  """
  segment_ids: np.ndarray

  @property
  def shape(self):
    return (len(self.segment_ids), len(self.segment_ids))

  def _predicate(self, q, k, h):
    sq, sk = self.segment_ids[q], self.segment_ids[k]
    return (k <= q) | ((sq >= 0) & (sk >= 0) & (sq != sk))

  def _block_classes(self, block_q, block_kv, nq, nk):
    grid = (self.shape, block_q, block_kv, nq, nk)
    _, _, _, _, real = block_ranges(*grid)
    seg = self.segment_ids
    designated = seg >= 0
    q_any, q_all = _classes.token_any_all(designated, block_q, nq)
    k_any, k_all = _classes.token_any_all(designated, block_kv, nk)
    qmin, qmax = _block_minmax(seg, designated, block_q, nq)
    kmin, kmax = _block_minmax(seg, designated, block_kv, nk)
    qmin, qmax, kmin, kmax = qmin[:, None], qmax[:, None], kmin[None], kmax[None]
    full_ = (real & q_all[:, None] & k_all[None] &
             ((qmax < kmin) | (qmin > kmax)))
    empty = (~q_any[:, None] | ~k_any[None] |
             ((qmin == qmax) & (kmin == kmax) & (qmin == kmin)))
    return _classes.or_classes(_classes.band(*grid, hi=0),
                               _classes.classify(full_, empty))


def bidirectional_segments(segment_ids: Any) -> BidirectionalSegments:
  """PINE mask from per-token segment ids [T] (-1: not a designated segment)."""
  ids = _util.check_ids('segment_ids', segment_ids)
  if (ids < -1).any():
    raise ValueError(
        f'segment_ids must be >= -1 (-1 = undesignated), got {int(ids.min())}.')
  return BidirectionalSegments(ids)


@dataclasses.dataclass(frozen=True, eq=False)
class PerHead(base.Mask):
  """A different head-independent mask per query head: head h uses masks[h].

  Heterogeneous per-head patterns as in "MoA: Mixture of Sparse Attention" (Fu et
  al., 2024) and "S2-Attention" (Lin et al., 2024).
  """
  masks: tuple[base.Mask, ...]

  @property
  def shape(self):
    return self.masks[0].shape

  @property
  def num_heads(self):
    return len(self.masks)

  def _predicate(self, q, k, h):
    h = np.asarray(h)
    shape = np.broadcast_shapes(np.shape(q), np.shape(k), h.shape)
    out = np.zeros(shape, dtype=bool)
    for i, m in enumerate(self.masks):
      sel = np.broadcast_to(h == i, shape)
      if sel.any():
        out = np.where(sel, m._predicate(q, k, None), out)  # pylint: disable=protected-access
    return out

  def _head(self, h: int) -> base.Mask:
    return self.masks[h]

  def _block_classes(self, *grid):
    per = [m._block_classes(*grid) for m in self.masks]  # pylint: disable=protected-access
    if any(c is None for c in per):
      return None
    return np.stack(per)


def per_head(masks: Sequence[base.Mask], num_heads: int | None = None) -> PerHead:
  """Head h uses masks[h]; all masks head-independent and of one shape."""
  if not isinstance(masks, (tuple, list)) or not masks:
    raise ValueError(f'masks must be a non-empty sequence of Masks, got {masks!r}.')
  for i, m in enumerate(masks):
    if not isinstance(m, base.Mask):
      raise TypeError(f'masks[{i}] must be a Mask, got {type(m).__name__}.')
    if m.head_dependent:
      raise ValueError(
          f'masks[{i}] must be head-independent, got num_heads={m.num_heads}.')
    if tuple(m.shape) != tuple(masks[0].shape):
      raise ValueError(
          f'masks[{i}] must have shape {masks[0].shape}, got {m.shape}.')
  if num_heads is not None and _util.check_int('num_heads', num_heads,
                                                1) != len(masks):
    raise ValueError(
        f'num_heads must equal len(masks) ({len(masks)}), got {num_heads}.')
  return PerHead(tuple(masks))
