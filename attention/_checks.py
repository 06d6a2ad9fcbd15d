"""Input validation shared by every public attention function.

Each check raises a `ValueError`/`TypeError` that names the argument and states the
expected versus the received value, so a wrong call fails loudly instead of
broadcasting silently or returning NaN.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np


def shape_of(x: Any) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_array(name: str, x: Any, *, ndim: int | None = None,
                floating: bool = False) -> None:
  """Checks that `x` is an array (of rank `ndim`, of a floating dtype)."""
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'{name} must be an array, got {type(x).__name__}.')
  if ndim is not None and len(x.shape) != ndim:
    raise ValueError(
        f'{name} must have rank {ndim}, got shape {tuple(x.shape)} '
        f'(rank {len(x.shape)}).')
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{name} must have a floating dtype, got {x.dtype}.')


def check_equal(name: str, what: str, got: int, expected: int,
                reference: str) -> None:
  if got != expected:
    raise ValueError(
        f'{name} {what} must equal {reference} ({expected}), got {got}.')


def check_positive(name: str, value: Any, *, allow_none: bool = True) -> None:
  if value is None:
    if allow_none:
      return
    raise ValueError(f'{name} must be a positive number, got None.')
  if isinstance(value, bool) or not isinstance(
      value, (int, float, np.integer, np.floating)):
    raise TypeError(
        f'{name} must be a positive Python/NumPy number, got '
        f'{type(value).__name__}.')
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f'{name} must be positive and finite, got {value}.')


def check_broadcastable(name: str, shape: Sequence[int],
                        target: Sequence[int], target_name: str) -> None:
  """Checks numpy-style broadcastability of `shape` to `target` (same rank)."""
  shape, target = tuple(shape), tuple(target)
  if len(shape) != len(target) or any(
      s not in (1, t) for s, t in zip(shape, target)):
    raise ValueError(
        f'{name} must be broadcastable to {target_name} {target} (same rank, '
        f'each dim 1 or equal), got shape {shape}.')
