"""Token permutations of (F, H, W) grids that make attention block-sparse.

"PAROAttention: Pattern-Aware ReOrdering for Efficient Sparse and Quantized Attention
in Visual Generation Models" (Zhao et al., 2025): visual attention patterns (local in
one axis, strided in another) become block-diagonal once the tokens are reordered by a
suitable axis order. We enumerate the axis orders of the token grid, measure the block
sparsity of the permuted pattern and keep the sparsest order.

Convention: `perm[p]` is the original index of the token placed at position p, so
`x_perm = x[:, perm]` and `x = x_perm[:, inverse(perm)]`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.masks import _util
from attention.masks import base
from attention.masks import block

AXIS_NAMES = 'FHW'


def _check_order(order: Any, rank: int) -> tuple[int, ...]:
  if isinstance(order, str):
    names = AXIS_NAMES[-rank:] if rank < 3 else AXIS_NAMES
    if sorted(order) != sorted(names):
      raise ValueError(
          f'order must be a permutation of {names!r}, got {order!r}.')
    return tuple(names.index(c) for c in order)
  if (not isinstance(order, (tuple, list)) or
      sorted(order) != list(range(rank))):
    raise ValueError(
        f'order must be a permutation of range({rank}) or of axis letters, got '
        f'{order!r}.')
  return tuple(int(i) for i in order)


def grid_permutation(grid: tuple[int, ...], order: Any) -> np.ndarray:
  """int64 [T]: token order that iterates the grid axes in `order` (outermost first).

  Args:
    grid: (F, H, W) (or (H, W)), tokens flattened row-major in the original order.
    order: axis letters such as 'HWF', or a permutation of axis indices.
  """
  grid = _util.check_grid(grid)
  axes = _check_order(order, len(grid))
  t = int(np.prod(grid))
  return np.arange(t).reshape(grid).transpose(axes).reshape(-1)


def inverse(perm: Any) -> np.ndarray:
  """The inverse permutation: inverse(perm)[perm[p]] = p."""
  perm = _check_perm(perm)
  inv = np.empty_like(perm)
  inv[perm] = np.arange(len(perm))
  return inv


def _check_perm(perm: Any, length: int | None = None) -> np.ndarray:
  perm = np.asarray(perm)
  if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer):
    raise ValueError(f'perm must be a 1-D integer array, got {perm.shape} '
                     f'{perm.dtype}.')
  if not np.array_equal(np.sort(perm), np.arange(len(perm))):
    raise ValueError('perm must be a permutation of range(len(perm)).')
  if length is not None and len(perm) != length:
    raise ValueError(
        f'perm length must equal the sequence length {length}, got {len(perm)}.')
  return perm.astype(np.int64)


def apply_permutation(x: jax.Array, perm: Any) -> jax.Array:
  """Reorders the tokens of x [B, T, N, H] (axis 1): out[:, p] = x[:, perm[p]]."""
  if x.ndim != 4:
    raise ValueError(f'x must have shape [B, T, N, H], got {x.shape}.')
  perm = _check_perm(perm, x.shape[1])
  return jnp.take(x, jnp.asarray(perm), axis=1)  # [B, T, N, H]


def invert_permutation(x: jax.Array, perm: Any) -> jax.Array:
  """Undoes `apply_permutation(., perm)` on x [B, T, N, H]."""
  if x.ndim != 4:
    raise ValueError(f'x must have shape [B, T, N, H], got {x.shape}.')
  return jnp.take(x, jnp.asarray(inverse(_check_perm(perm, x.shape[1]))),
                  axis=1)  # [B, T, N, H]


@dataclasses.dataclass(frozen=True, eq=False)
class Permuted(base.Mask):
  """A mask seen through token permutations: visible(q, k) = mask(q_perm[q], kv_perm[k]).

  Attention on permuted q / k / v with this mask, un-permuted, equals attention with
  the original mask (PAROAttention token reordering).
  """
  mask: base.Mask
  q_perm: np.ndarray
  kv_perm: np.ndarray

  @property
  def shape(self):
    return self.mask.shape

  @property
  def num_heads(self):
    return self.mask.num_heads

  def _predicate(self, q, k, h):
    inner = self.mask._predicate  # pylint: disable=protected-access
    return inner(self.q_perm[q], self.kv_perm[k], h)

  def _head(self, h):
    return Permuted(self.mask.head(h), self.q_perm, self.kv_perm)


def permute_mask(mask: base.Mask, perm: Any,
                 kv_perm: Any = None) -> Permuted:
  """The mask in permuted token order (kv_perm defaults to perm)."""
  if not isinstance(mask, base.Mask):
    raise TypeError(f'mask must be a Mask, got {type(mask).__name__}.')
  q_perm = _check_perm(perm, mask.shape[0])
  kv_perm = q_perm if kv_perm is None else _check_perm(kv_perm, mask.shape[1])
  for p in (q_perm, kv_perm):
    p.setflags(write=False)
  return Permuted(mask, q_perm, kv_perm)


def _sparsity(pattern: Any, perm: np.ndarray, block_q: int, block_kv: int,
              threshold: float) -> float:
  """Fraction of tiles that can be skipped in the permuted pattern."""
  if isinstance(pattern, base.Mask):
    bm = block.compile_mask(permute_mask(pattern, perm), block_q, block_kv)
    return 1.0 - bm.stats()['tile_fraction']
  arr = np.asarray(pattern)
  arr = arr[..., perm, :][..., perm]
  if arr.dtype == np.bool_:
    bm = block.from_dense(arr, block_q, block_kv)
    return 1.0 - bm.stats()['tile_fraction']
  # Attention probabilities: a tile is negligible if the average attention mass
  # it carries per query row is below the threshold.
  t, s = arr.shape[-2:]
  nq, nk = -(-t // block_q), -(-s // block_kv)
  padded = np.zeros(arr.shape[:-2] + (nq * block_q, nk * block_kv))
  padded[..., :t, :s] = arr
  mass = padded.reshape(arr.shape[:-2] + (nq, block_q, nk, block_kv)).sum(
      axis=(-3, -1)) / block_q
  return float((mass < threshold).mean())


def best_order(grid: tuple[int, ...], pattern: Any, block_q: int,
               block_kv: int | None = None, threshold: float = 1e-3):
  """The axis order whose permutation makes `pattern` most block-sparse.

  Args:
    grid: token grid (F, H, W) (or (H, W)).
    pattern: a `Mask`, a boolean array [T, T] / [H, T, T], or attention probabilities
      [T, T] / [H, T, T] (float; a tile counts as skippable when its mean per-row
      mass is below `threshold`).
    block_q, block_kv: tile sizes of the kernel that will consume the pattern.
  Returns:
    (best order string, {order: skippable tile fraction}); ties keep the earlier
    order of the enumeration, which starts with the identity.
  """
  grid = _util.check_grid(grid)
  block_q = _util.check_int('block_q', block_q, 1)
  block_kv = block_q if block_kv is None else _util.check_int(
      'block_kv', block_kv, 1)
  t = int(np.prod(grid))
  shape = pattern.shape if isinstance(pattern, base.Mask) else np.shape(
      pattern)[-2:]
  if tuple(shape) != (t, t):
    raise ValueError(
        f'pattern must have shape ({t}, {t}) for grid {grid}, got {tuple(shape)}.')
  if not isinstance(pattern, base.Mask):
    arr = np.asarray(pattern)
    if arr.ndim not in (2, 3):
      raise ValueError(
          f'pattern must have shape [T, T] or [H, T, T], got {arr.shape}.')
    if arr.dtype != np.bool_ and not np.issubdtype(arr.dtype, np.floating):
      raise TypeError(f'pattern must be bool or float, got {arr.dtype}.')
  if not threshold > 0:
    raise ValueError(f'threshold must be > 0, got {threshold}.')
  names = AXIS_NAMES[-len(grid):]
  scores = {}
  for axes in itertools.permutations(range(len(grid))):
    order = ''.join(names[i] for i in axes)
    scores[order] = _sparsity(pattern, grid_permutation(grid, axes), block_q,
                              block_kv, threshold)
  best = max(scores, key=lambda o: (scores[o], -list(scores).index(o)))
  return best, scores
