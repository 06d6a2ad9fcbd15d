"""The mask language: predicates over (query index, key index, head).

A `Mask` says, for every query position q and key position k (and optionally head h),
whether q may attend k. Masks are immutable, hashable (so they can be static under
`jax.jit` and cache keys for block compilation) and compose with `&`, `|` and `~`.
`bool(mask)` raises, to catch `mask_a and mask_b`.

Subclasses implement `_predicate(q, k, h)` on broadcastable NumPy integer arrays. They
may also override `_block_classes` to classify blocks analytically (see `block.py`),
which is how large masks compile without building the dense T x S array.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any

import numpy as np


# Block classes (see `block.py`): EMPTY tiles are skipped, FULL tiles need no mask.
EMPTY, PARTIAL, FULL = 0, 1, 2


def block_ranges(shape: tuple[int, int], block_q: int, block_kv: int, nq: int,
                 nk: int):
  """Real index ranges of every tile of the padded grid, as [nq, 1] / [1, nk].

  Returns (q_first, q_last, k_first, k_last, real): inclusive ranges clipped to the
  real lengths (first > last for an all-padding tile) and whether the tile has no
  padding at all.
  """
  t, s = shape
  qb = np.arange(nq, dtype=np.int64)[:, None]
  kb = np.arange(nk, dtype=np.int64)[None, :]
  q0, q1 = qb * block_q, np.minimum((qb + 1) * block_q, t) - 1
  k0, k1 = kb * block_kv, np.minimum((kb + 1) * block_kv, s) - 1
  real = ((qb + 1) * block_q <= t) & ((kb + 1) * block_kv <= s)
  return q0, q1, k0, k1, real


def _fingerprint(value: Any) -> Any:
  """A hashable stand-in for a field value (arrays hashed by content)."""
  if isinstance(value, np.ndarray):
    digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    return ('ndarray', value.shape, str(value.dtype), digest)
  if isinstance(value, (list, tuple)):
    return tuple(_fingerprint(v) for v in value)
  return value


class Mask(abc.ABC):
  """Base class of every mask. Subclasses are frozen dataclasses.

  Attributes (provided by subclasses):
    shape: (q_len, kv_len).
    num_heads: None for a head-independent mask, else the number of query heads.
  """

  shape: tuple[int, int]
  num_heads: int | None = None

  @abc.abstractmethod
  def _predicate(self, q: np.ndarray, k: np.ndarray,
                 h: np.ndarray | None) -> np.ndarray:
    """The predicate on broadcastable int64 index arrays (h is None if unused)."""

  def _block_classes(self, block_q: int, block_kv: int, num_q_blocks: int,
                     num_kv_blocks: int) -> np.ndarray | None:
    """Optional analytic block classification (see `block.compile`).

    Returns int8 [nq, nk] (or [H, nq, nk] if head-dependent) with EMPTY=0,
    PARTIAL=1, FULL=2 on the padded grid (positions >= the real lengths count as
    masked). PARTIAL may be conservative (the tile is then evaluated exactly);
    EMPTY and FULL must be exact. None: no analytic rule, evaluate tiles.
    """
    del block_q, block_kv, num_q_blocks, num_kv_blocks
    return None

  def _block_structure(self, block_q: int, block_kv: int, num_q_blocks: int,
                       num_kv_blocks: int):
    """Optional exact block structure of a head-independent mask.

    Returns None (use `_block_classes` and evaluate PARTIAL tiles) or a triple
    (state int8 [nq, nk] exact, partial_index int32 [nq, nk] (-1 where not
    PARTIAL), bitmaps bool [P, block_q, block_kv]) for masks that can produce their
    partial bitmaps faster than tile-by-tile evaluation.
    """
    del block_q, block_kv, num_q_blocks, num_kv_blocks
    return None

  # ----- public API -----
  @property
  def q_len(self) -> int:
    return self.shape[0]

  @property
  def kv_len(self) -> int:
    return self.shape[1]

  @property
  def head_dependent(self) -> bool:
    return self.num_heads is not None

  def __call__(self, q: Any, k: Any, h: Any = None) -> np.ndarray:
    """Evaluates the predicate on (broadcastable) index arrays."""
    q = np.asarray(q, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    if h is not None:
      h = np.asarray(h, dtype=np.int64)
    elif self.head_dependent:
      raise ValueError(
          f'{type(self).__name__} depends on the head; pass h (0 <= h < '
          f'{self.num_heads}).')
    out = self._predicate(q, k, h)
    shape = np.broadcast_shapes(q.shape, k.shape,
                                () if h is None else h.shape)
    return np.broadcast_to(np.asarray(out, dtype=bool), shape)

  def materialize(self, num_heads: int | None = None) -> np.ndarray:
    """The dense boolean mask: [T, S], or [H, T, S] for head-dependent masks.

    Args:
      num_heads: if given, always return [num_heads, T, S] (a head-independent mask is
        broadcast; a head-dependent one must have exactly this many heads).
    """
    t, s = self.shape
    q = np.arange(t)[:, None]
    k = np.arange(s)[None, :]
    if self.head_dependent:
      if num_heads is not None and num_heads != self.num_heads:
        raise ValueError(
            f'num_heads must equal the mask head count ({self.num_heads}), '
            f'got {num_heads}.')
      h = np.arange(self.num_heads)[:, None, None]
      return np.ascontiguousarray(self(q[None], k[None], h))
    dense = np.ascontiguousarray(self(q, k))
    if num_heads is not None:
      return np.broadcast_to(dense, (num_heads, t, s))
    return dense

  def head(self, h: int) -> 'Mask':
    """The [T, S] mask seen by query head `h` (head-independent masks: self)."""
    if not self.head_dependent:
      return self
    if isinstance(h, bool) or not isinstance(h, (int, np.integer)):
      raise TypeError(f'h must be an int, got {type(h).__name__}.')
    if not 0 <= h < self.num_heads:
      raise ValueError(f'h must be in [0, {self.num_heads}), got {h}.')
    return self._head(int(h))

  def _head(self, h: int) -> 'Mask':
    """Head `h` as a head-independent mask (override for analytic forms)."""
    return HeadSlice(self, h)

  def __and__(self, other: 'Mask') -> 'Mask':
    return And(self, _check_compatible(self, other, '&'))

  def __or__(self, other: 'Mask') -> 'Mask':
    return Or(self, _check_compatible(self, other, '|'))

  def __invert__(self) -> 'Mask':
    return Not(self)

  def __bool__(self):
    raise TypeError(
        'A Mask has no truth value; combine masks with &, | and ~, not with '
        '`and`, `or`, `not`.')

  def _key(self) -> tuple[Any, ...]:
    # Computed once per (immutable) instance: array fields are hashed by content.
    key = self.__dict__.get('_mask_key')
    if key is None:
      key = (type(self),) + tuple(
          _fingerprint(getattr(self, f.name)) for f in dataclasses.fields(self))
      self.__dict__['_mask_key'] = key
    return key

  def __hash__(self) -> int:
    return hash(self._key())

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, Mask) and self._key() == other._key()


def _check_compatible(a: Mask, b: Any, op: str) -> Mask:
  if not isinstance(b, Mask):
    raise TypeError(f'cannot combine a Mask with {type(b).__name__} using {op}.')
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(
        f'masks combined with {op} must have the same shape, got {a.shape} and '
        f'{b.shape}.')
  if a.head_dependent and b.head_dependent and a.num_heads != b.num_heads:
    raise ValueError(
        f'head-dependent masks combined with {op} must have the same num_heads, '
        f'got {a.num_heads} and {b.num_heads}.')
  return b


def _combined_heads(a: Mask, b: Mask) -> int | None:
  return a.num_heads if a.num_heads is not None else b.num_heads


@dataclasses.dataclass(frozen=True, eq=False)
class And(Mask):
  """Logical AND of two masks."""
  a: Mask
  b: Mask

  @property
  def shape(self):
    return self.a.shape

  @property
  def num_heads(self):
    return _combined_heads(self.a, self.b)

  def _predicate(self, q, k, h):
    return self.a._predicate(q, k, h) & self.b._predicate(q, k, h)

  def _head(self, h: int) -> Mask:
    return And(self.a.head(h), self.b.head(h))

  def _block_classes(self, *grid):
    a, b = self.a._block_classes(*grid), self.b._block_classes(*grid)
    if a is None or b is None:
      return None
    return np.where((a == EMPTY) | (b == EMPTY), EMPTY,
                    np.where((a == FULL) & (b == FULL), FULL, PARTIAL)
                   ).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class Or(Mask):
  """Logical OR of two masks."""
  a: Mask
  b: Mask

  @property
  def shape(self):
    return self.a.shape

  @property
  def num_heads(self):
    return _combined_heads(self.a, self.b)

  def _predicate(self, q, k, h):
    return self.a._predicate(q, k, h) | self.b._predicate(q, k, h)

  def _head(self, h: int) -> Mask:
    return Or(self.a.head(h), self.b.head(h))

  def _block_classes(self, *grid):
    a, b = self.a._block_classes(*grid), self.b._block_classes(*grid)
    if a is None or b is None:
      return None
    return np.where((a == FULL) | (b == FULL), FULL,
                    np.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL)
                   ).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class Not(Mask):
  """Logical NOT of a mask."""
  a: Mask

  @property
  def shape(self):
    return self.a.shape

  @property
  def num_heads(self):
    return self.a.num_heads

  def _predicate(self, q, k, h):
    return ~np.asarray(self.a._predicate(q, k, h), dtype=bool)

  def _head(self, h: int) -> Mask:
    return Not(self.a.head(h))

  def _block_classes(self, block_q, block_kv, nq, nk):
    a = self.a._block_classes(block_q, block_kv, nq, nk)
    if a is None:
      return None
    _, _, _, _, real = block_ranges(self.shape, block_q, block_kv, nq, nk)
    return np.where(a == FULL, EMPTY,
                    np.where((a == EMPTY) & real, FULL, PARTIAL)).astype(np.int8)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadSlice(Mask):
  """One head of a head-dependent mask, as a head-independent mask."""
  mask: Mask
  index: int

  @property
  def shape(self):
    return self.mask.shape

  num_heads = None

  def _predicate(self, q, k, h):
    return self.mask._predicate(q, k, np.asarray(self.index))

  def _block_classes(self, *grid):
    classes = self.mask._block_classes(*grid)
    return None if classes is None else classes[self.index]


@dataclasses.dataclass(frozen=True, eq=False)
class Dense(Mask):
  """A mask given as a dense boolean array [T, S] or [H, T, S]."""
  array: np.ndarray

  def __post_init__(self):
    arr = np.asarray(self.array)
    if arr.dtype != np.bool_:
      raise TypeError(f'array must have dtype bool, got {arr.dtype}.')
    if arr.ndim not in (2, 3):
      raise ValueError(
          f'array must have shape [T, S] or [H, T, S], got {arr.shape}.')
    arr = np.ascontiguousarray(arr)
    arr.setflags(write=False)
    object.__setattr__(self, 'array', arr)

  @property
  def shape(self):
    return tuple(self.array.shape[-2:])

  @property
  def num_heads(self):
    return self.array.shape[0] if self.array.ndim == 3 else None

  def _predicate(self, q, k, h):
    if self.array.ndim == 3:
      return self.array[h, q, k]
    return self.array[q, k]

  def _head(self, h: int) -> Mask:
    return Dense(self.array[h])


@dataclasses.dataclass(frozen=True, eq=False)
class Causal(Mask):
  """Causal mask: k <= q + offset (offset = kv_len - q_len aligns bottom-right).

  "Attention Is All You Need" (Vaswani et al., 2017), decoder self-attention.
  """
  shape: tuple[int, int]
  offset: int = 0

  def __post_init__(self):
    _check_shape(self.shape)
    if not isinstance(self.offset, (int, np.integer)):
      raise TypeError(f'offset must be an int, got {type(self.offset).__name__}.')

  def _predicate(self, q, k, h):
    return k <= q + self.offset

  def _block_classes(self, block_q, block_kv, nq, nk):
    q0, q1, k0, k1, real = block_ranges(self.shape, block_q, block_kv, nq, nk)
    full = real & (k1 <= q0 + self.offset)
    empty = (q0 > q1) | (k0 > k1) | (k0 > q1 + self.offset)
    return np.where(full, FULL, np.where(empty, EMPTY, PARTIAL)).astype(np.int8)


def _check_shape(shape: Any) -> None:
  if (not isinstance(shape, tuple) or len(shape) != 2 or
      not all(isinstance(s, (int, np.integer)) and s > 0 for s in shape)):
    raise ValueError(
        f'shape must be a tuple (q_len, kv_len) of positive ints, got {shape!r}.')


def causal(q_len: int, kv_len: int | None = None, offset: int = 0) -> Causal:
  """Causal mask of shape (q_len, kv_len); see `Causal`."""
  return Causal((int(q_len), int(q_len if kv_len is None else kv_len)),
                int(offset))


def from_array(array: Any) -> Dense:
  """A mask from a dense boolean array [T, S] or [H, T, S]."""
  return Dense(np.asarray(array))
