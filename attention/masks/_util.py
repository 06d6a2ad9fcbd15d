"""Argument validation shared by the mask generators."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def check_int(name: str, value: Any, minimum: int | None = None) -> int:
  """`value` as an int, raising TypeError / ValueError naming `name`."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if minimum is not None and value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def check_optional_int(name: str, value: Any, minimum: int) -> int | None:
  return None if value is None else check_int(name, value, minimum)


def check_lengths(q_len: Any, kv_len: Any = None) -> tuple[int, int]:
  """(q_len, kv_len) with kv_len defaulting to q_len."""
  q_len = check_int('q_len', q_len, 1)
  kv_len = q_len if kv_len is None else check_int('kv_len', kv_len, 1)
  return q_len, kv_len


def check_ids(name: str, ids: Any, length: int | None = None) -> np.ndarray:
  """A read-only int64 copy of a 1-D integer array."""
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {arr.shape}.')
  if arr.size == 0:
    raise ValueError(f'{name} must be non-empty.')
  if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
    raise TypeError(f'{name} must have an integer dtype, got {arr.dtype}.')
  if length is not None and arr.shape[0] != length:
    raise ValueError(f'{name} must have length {length}, got {arr.shape[0]}.')
  arr = np.array(arr, dtype=np.int64)
  arr.setflags(write=False)
  return arr


def per_axis(name: str, value: Any, rank: int, minimum: int) -> tuple[int, ...]:
  """An int or a sequence of `rank` ints, as a tuple of `rank` ints."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    values: Sequence[Any] = (value,) * rank
  elif isinstance(value, (tuple, list)):
    values = value
  else:
    raise TypeError(
        f'{name} must be an int or a sequence of {rank} ints, got '
        f'{type(value).__name__}.')
  if len(values) != rank:
    raise ValueError(
        f'{name} must have one entry per grid axis ({rank}), got {len(values)}.')
  return tuple(check_int(f'{name}[{i}]', v, minimum) for i, v in enumerate(values))


def check_grid(grid: Any, seq_len: Any = None,
               max_rank: int = 3) -> tuple[int, ...]:
  """A grid shape (n_1, ..., n_r), 1 <= r <= max_rank, optionally matching seq_len."""
  if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= max_rank:
    raise ValueError(
        f'grid must be a tuple of 1 to {max_rank} positive ints, got {grid!r}.')
  grid = tuple(check_int(f'grid[{i}]', n, 1) for i, n in enumerate(grid))
  if seq_len is not None:
    seq_len = check_int('seq_len', seq_len, 1)
    if int(np.prod(grid)) != seq_len:
      raise ValueError(
          f'grid {grid} must multiply to seq_len (the sequence length, '
          f'{seq_len}), got {int(np.prod(grid))}.')
  return grid
