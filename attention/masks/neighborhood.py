"""Masks over 1-D/2-D/3-D token grids that factor over the axes (spec: masks.md).

Tokens of a grid (n_1, ..., n_r) are flattened row-major (last axis fastest). Each mask
here is an AND over the axes of a per-axis rule A_i[q_i, k_i], which gives:
  * the predicate as r gathers from small [n_i, n_i] tables;
  * exact block classes from per-row prefix counts (any block size);
  * when the block sizes divide a trailing product of the grid, the exact block
    structure from one small inner tile table (no per-tile predicate evaluation).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Any

import numpy as np

from attention.masks import _classes
from attention.masks import _util
from attention.masks import base

# Largest inner table (P x P booleans) built by the block-structure fast path.
_MAX_INNER = 1 << 26


def _kron_and(tables: list[np.ndarray]) -> np.ndarray:
  """AND of per-axis tables over the flattened (row-major) sub-grid."""
  out = np.ones((1, 1), dtype=bool)
  for a in tables:
    n = a.shape[0]
    out = (out[:, None, :, None] & a[None, :, None, :]).reshape(
        out.shape[0] * n, out.shape[1] * n)
  return out


class GridMask(base.Mask, abc.ABC):
  """Base of the per-axis factorised grid masks; subclasses define `_axis_rule`."""

  grid: tuple[int, ...]

  @abc.abstractmethod
  def _axis_rule(self, axis: int, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """The per-axis predicate A_axis on broadcastable coordinate arrays."""

  @property
  def shape(self):
    t = int(np.prod(self.grid))
    return (t, t)

  @functools.cached_property
  def _tables(self) -> tuple[np.ndarray, ...]:
    out = []
    for axis, n in enumerate(self.grid):
      i = np.arange(n)
      table = np.asarray(self._axis_rule(axis, i[:, None], i[None, :]), bool)
      table.setflags(write=False)
      out.append(table)
    return tuple(out)

  @functools.cached_property
  def _strides(self) -> tuple[int, ...]:
    return tuple(int(np.prod(self.grid[i + 1:])) for i in range(len(self.grid)))

  def coords(self, index: np.ndarray) -> list[np.ndarray]:
    """Row-major grid coordinates of flat token indices."""
    return [(index // st) % n for st, n in zip(self._strides, self.grid)]

  def _predicate(self, q, k, h):
    out = None
    for table, qi, ki in zip(self._tables, self.coords(q), self.coords(k)):
      v = table[qi, ki]
      out = v if out is None else out & v
    return out

  def _block_classes(self, block_q, block_kv, nq, nk):
    tables = self._tables
    prefix = [np.concatenate([np.zeros((a.shape[0], 1), np.int64),
                              np.cumsum(a, axis=1)], axis=1) for a in tables]
    rowsum = [p[:, -1] for p in prefix]
    r = len(tables)

    def count(rows, bounds):
      qc = [c[:, None] for c in self.coords(rows)]
      xc = [c[None, :] for c in self.coords(bounds)]
      # Visible k <= x: k agrees with x on axes < j and k_j < x_j (any j), or k == x.
      total = np.zeros((len(rows), len(bounds)), dtype=np.int64)
      head = np.ones((len(rows), len(bounds)), dtype=np.int64)
      for j in range(r):
        tail = np.ones((len(rows), 1), dtype=np.int64)
        for i in range(j + 1, r):
          tail = tail * rowsum[i][qc[i]]
        total += head * prefix[j][qc[j], xc[j]] * tail
        head = head * tables[j][qc[j], xc[j]]
      return total + head

    return _classes.from_row_counts(count, self.shape, block_q, block_kv, nq,
                                    nk)

  def _block_structure(self, block_q, block_kv, nq, nk):
    r = len(self.grid)
    split = None
    for j in range(r - 1, -1, -1):
      p = int(np.prod(self.grid[j:]))
      if p % block_q == 0 and p % block_kv == 0:
        split = j
        break
    if split is None or int(np.prod(self.grid[split:]))**2 > _MAX_INNER:
      return self._composed_structure(block_q, block_kv, nq, nk)
    p = int(np.prod(self.grid[split:]))
    inner = _kron_and(list(self._tables[split:]))  # [P, P]
    outer = _kron_and(list(self._tables[:split]))  # [T / P, T / P]
    ids: dict[bytes, int] = {}
    bitmaps: list[np.ndarray] = []
    inner_state, inner_pidx = _classes.tile_table(inner, block_q, block_kv, ids,
                                                  bitmaps)
    on = outer[:, None, :, None]
    state = np.where(on, inner_state[None, :, None, :], base.EMPTY)
    pidx = np.where(on, inner_pidx[None, :, None, :], -1)
    bitmaps = _classes.stack_bitmaps(bitmaps, block_q, block_kv)
    return (state.reshape(nq, nk).astype(np.int8),
            pidx.reshape(nq, nk).astype(np.int32), bitmaps)


  def _composed_structure(self, block_q, block_kv, nq, nk):
    """Blocks that do not divide the grid: compose from gcd-sized fine tiles."""
    for j in range(len(self.grid) - 1, -1, -1):
      p = int(np.prod(self.grid[j:]))
      if p * p > _MAX_INNER:
        break
      fq, fk = math.gcd(block_q, p), math.gcd(block_kv, p)
      if fq * fk < 64 or (fq, fk) == (block_q, block_kv):
        continue
      t = self.shape[0]
      fine = self._block_structure(fq, fk, t // fq, t // fk)
      if fine is not None:
        return _classes.compose(fine, fq, fk, block_q, block_kv, nq, nk)
    return None


def neighborhood_axis(n: int, window: int, stride: int, dilation: int,
                      causal: bool, q: np.ndarray, k: np.ndarray) -> np.ndarray:
  """The GNA per-axis rule (spec: Neighborhood family), vectorised."""
  same = (q % dilation) == (k % dilation)
  qg, kg = q // dilation, k // dilation
  ng = (n - q % dilation + dilation - 1) // dilation
  if causal:
    leader = np.minimum((qg // stride) * stride + stride - 1, ng - 1)
    ok = (kg <= qg) & (leader - kg < window)
  else:
    wl = window // 2
    wr = window // 2 + window % 2 - 1
    leader = np.minimum((qg // stride) * stride + stride // 2, ng - 1)
    centre = np.clip(leader, wl, ng - 1 - wr)
    ok = (centre - wl <= kg) & (kg <= centre + wr)
  return same & ok


@dataclasses.dataclass(frozen=True, eq=False)
class Neighborhood(GridMask):
  """Generalized neighborhood attention on a 1-D/2-D/3-D grid.

  "Neighborhood Attention Transformer" (Hassani et al., 2023), "Dilated Neighborhood
  Attention Transformer" (Hassani & Shi, 2022), "Faster Neighborhood Attention"
  (Hassani et al., 2024) and "Generalized Neighborhood Attention" (GNA, Hassani et
  al., 2025): per axis window w, stride s (s = 1 neighborhood, s = w blocked /
  Swin-style), dilation and causal flag; AND over the axes. This is NATTEN's rule.
  """
  grid: tuple[int, ...]
  window: tuple[int, ...]
  stride: tuple[int, ...]
  dilation: tuple[int, ...]
  causal: tuple[bool, ...]

  def _axis_rule(self, axis, q, k):
    return neighborhood_axis(self.grid[axis], self.window[axis],
                             self.stride[axis], self.dilation[axis],
                             self.causal[axis], q, k)


def _per_axis_bool(name: str, value: Any, rank: int) -> tuple[bool, ...]:
  if isinstance(value, (bool, np.bool_)):
    return (bool(value),) * rank
  if not isinstance(value, (tuple, list)) or len(value) != rank:
    raise ValueError(
        f'{name} must be a bool or a sequence of {rank} bools, got {value!r}.')
  for i, v in enumerate(value):
    if not isinstance(v, (bool, np.bool_)):
      raise TypeError(f'{name}[{i}] must be a bool, got {type(v).__name__}.')
  return tuple(bool(v) for v in value)


def neighborhood(grid: tuple[int, ...], window: int | tuple[int, ...],
                 stride: int | tuple[int, ...] = 1,
                 dilation: int | tuple[int, ...] = 1,
                 causal: bool | tuple[bool, ...] = False,
                 seq_len: int | None = None) -> Neighborhood:
  """GNA neighborhood mask; see `Neighborhood`. Scalars apply to every axis.

  Raises ValueError for stride > window or window * dilation > axis length, and if
  `seq_len` is given and the grid does not multiply to it.
  """
  grid = _util.check_grid(grid, seq_len)
  r = len(grid)
  window = _util.per_axis('window', window, r, 1)
  stride = _util.per_axis('stride', stride, r, 1)
  dilation = _util.per_axis('dilation', dilation, r, 1)
  causal = _per_axis_bool('causal', causal, r)
  for i in range(r):
    if stride[i] > window[i]:
      raise ValueError(
          f'stride[{i}] must be <= window[{i}] ({window[i]}), got {stride[i]}.')
    if window[i] * dilation[i] > grid[i]:
      raise ValueError(
          f'window[{i}] * dilation[{i}] must be <= grid[{i}] ({grid[i]}), got '
          f'{window[i]} * {dilation[i]} = {window[i] * dilation[i]}.')
  return Neighborhood(grid, window, stride, dilation, causal)


@dataclasses.dataclass(frozen=True, eq=False)
class HaloBlocks(GridMask):
  """Blocked local attention with a halo (HaloNet).

  "Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani
  et al., 2021): per axis, query block b = q // block attends keys k with
  b * block - halo <= k < (b + 1) * block + halo.
  """
  grid: tuple[int, ...]
  block: tuple[int, ...]
  halo: tuple[int, ...]

  def _axis_rule(self, axis, q, k):
    b, h = self.block[axis], self.halo[axis]
    start = (q // b) * b
    return (k >= start - h) & (k < start + b + h)


def halo_blocks(grid: tuple[int, ...], block: int | tuple[int, ...],
                halo: int | tuple[int, ...],
                seq_len: int | None = None) -> HaloBlocks:
  """HaloNet blocks plus halo; every axis length must be a multiple of its block."""
  grid = _util.check_grid(grid, seq_len)
  block = _util.per_axis('block', block, len(grid), 1)
  halo = _util.per_axis('halo', halo, len(grid), 0)
  for i, (n, b) in enumerate(zip(grid, block)):
    if n % b:
      raise ValueError(
          f'block[{i}] must divide grid[{i}] ({n}), got {b}.')
  return HaloBlocks(grid, block, halo)


@dataclasses.dataclass(frozen=True, eq=False)
class CrossFormerGroups(GridMask):
  """CrossFormer short- and long-distance attention groups.

  "CrossFormer: A Versatile Vision Transformer Hinging on Cross-scale Attention"
  (Wang et al., 2021): short-distance attention (SDA) groups G x G adjacent tokens
  (q_i // G == k_i // G per axis); long-distance attention (LDA) groups tokens
  sampled with interval I (q_i mod I == k_i mod I per axis).
  """
  grid: tuple[int, ...]
  size: tuple[int, ...]
  long_distance: bool

  def _axis_rule(self, axis, q, k):
    g = self.size[axis]
    if self.long_distance:
      return (q % g) == (k % g)
    return (q // g) == (k // g)


def crossformer(grid: tuple[int, ...], size: int | tuple[int, ...],
                kind: str = 'short', seq_len: int | None = None
                ) -> CrossFormerGroups:
  """CrossFormer groups: kind='short' (group size G) or 'long' (interval I)."""
  grid = _util.check_grid(grid, seq_len)
  size = _util.per_axis('size', size, len(grid), 1)
  if kind not in ('short', 'long'):
    raise ValueError(f"kind must be 'short' or 'long', got {kind!r}.")
  for i, (n, g) in enumerate(zip(grid, size)):
    if n % g:
      raise ValueError(f'size[{i}] must divide grid[{i}] ({n}), got {g}.')
  return CrossFormerGroups(grid, size, kind == 'long')
