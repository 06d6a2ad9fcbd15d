"""Shared helpers of the vision-style variants (InLine, Agent, Flow, LightNet, FocalNet).

Input checks for [B, T, N, H] query / key / value (GQA: key / value heads repeated to
the query heads), token grids (a flattened row-major [*grid] layout of T tokens),
depthwise convolutions over a grid with static or per-sample kernels, and adaptive
average pooling as an explicit [n, T] matrix (PyTorch's AdaptiveAvgPool bins).

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, a agent, c channel.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from attention import _checks


def compute_dtype(*arrays: Any) -> Any:
  """float64 if any input is float64, else float32 (bfloat16 accumulates in f32)."""
  for a in arrays:
    if a is not None and jnp.dtype(a.dtype) == jnp.float64:
      return jnp.float64
  return jnp.float32


def check_qkv(query: Any, key: Any, value: Any, *, same_length: bool = True
             ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """Validates [B, T, N, K], [B, S, N_kv, K], [B, S, N_kv, V]; returns (q, k, v,
  out_dtype) in the compute dtype with k / v repeated to the N query heads."""
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, hk = query.shape
  if key.shape[0] != b or value.shape[0] != b:
    raise ValueError(f'key and value must have batch {b} (as query), got key '
                     f'{tuple(key.shape)} and value {tuple(value.shape)}.')
  if key.shape[1] != value.shape[1]:
    raise ValueError(f'key and value must have the same length, got key '
                     f'{tuple(key.shape)} and value {tuple(value.shape)}.')
  if same_length and key.shape[1] != t:
    raise ValueError(f'key length must equal query length ({t}), got '
                     f'{key.shape[1]}.')
  if key.shape[-1] != hk:
    raise ValueError(f'key head_dim must equal query head_dim ({hk}), got '
                     f'{key.shape[-1]}.')
  if value.shape[2] != key.shape[2]:
    raise ValueError(f'value heads must equal key heads ({key.shape[2]}), got '
                     f'{value.shape[2]}.')
  kh = key.shape[2]
  if kh == 0 or n % kh:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads ({kh}).')
  dtype = compute_dtype(query, key, value)
  k = jnp.repeat(key.astype(dtype), n // kh, axis=2)
  v = jnp.repeat(value.astype(dtype), n // kh, axis=2)
  return query.astype(dtype), k, v, query.dtype


def check_bool(name: str, value: Any) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {type(value).__name__}.')
  return value


def check_scale(scale: Any, head_dim: int) -> float:
  """The default d^{-1/2} or a validated positive number."""
  if scale is None:
    return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
  _checks.check_positive('scale', scale, allow_none=False)
  return float(scale)


def check_dims(name: str, grid: Any) -> tuple[int, ...]:
  """A non-empty tuple of positive ints (a grid shape)."""
  if (not isinstance(grid, (tuple, list)) or not grid or
      any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0
          for g in grid)):
    raise ValueError(f'{name} must be a non-empty tuple of positive ints, got '
                     f'{grid!r}.')
  return tuple(int(g) for g in grid)


def check_grid(grid: Any, length: int, name: str = 'grid') -> tuple[int, ...]:
  """A tuple of positive ints whose product is the number of tokens `length`."""
  grid = check_dims(name, grid)
  if math.prod(grid) != length:
    raise ValueError(f'{name} {grid} must multiply to the number of tokens '
                     f'({length}), got {math.prod(grid)}.')
  return grid


def check_kernel_size(name: str, size: Any) -> int:
  if (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or
      size <= 0 or size % 2 == 0):
    raise ValueError(f'{name} must be a positive odd int, got {size!r}.')
  return int(size)


def depthwise_conv(x: jax.Array, kernel: jax.Array, grid: Sequence[int], *,
                   per_sample: bool = False) -> jax.Array:
  """Depthwise 'same' convolution (zero padding) of tokens on a grid.

  Args:
    x: [B, T, C] tokens in row-major order over `grid` (prod(grid) == T).
    kernel: [*K, C] (one odd-sized kernel per channel, len(K) == len(grid)), or
      [B, *K, C] with `per_sample` (a kernel per sample and channel).
    grid: the token grid, e.g. (H, W).
    per_sample: whether `kernel` has a leading batch axis.

  Returns:
    [B, T, C]: out[b, p, c] = sum_o kernel[o, c] x[b, p + o - K // 2, c] (cross-
    correlation, as PyTorch's Conv2d), zero outside the grid.
  """
  b, t, c = x.shape
  grid = tuple(grid)
  nd = len(grid)
  ks = tuple(kernel.shape[1:-1] if per_sample else kernel.shape[:-1])
  spatial = 'DHW'[-nd:] if nd <= 3 else None
  if spatial is None:
    raise ValueError(f'grid must have 1 to 3 axes, got {grid}.')
  dn = lax.conv_dimension_numbers(
      (1, *grid, c), (*ks, 1, c),
      ('N' + spatial + 'C', spatial + 'IO', 'N' + spatial + 'C'))

  def conv(xi, ki):  # [1, *grid, C], [*K, C]
    return lax.conv_general_dilated(
        xi, ki.reshape(*ks, 1, c), window_strides=(1,) * nd,
        padding=[(k // 2, k // 2) for k in ks], dimension_numbers=dn,
        feature_group_count=c, precision=lax.Precision.HIGHEST)

  xg = x.reshape(b, *grid, c)
  if per_sample:
    out = jax.vmap(lambda xi, ki: conv(xi[None], ki)[0])(xg, kernel)
  else:
    out = conv(xg, kernel)
  return out.reshape(b, t, c)


def adaptive_pool_matrix(length: int, bins: int) -> np.ndarray:
  """[bins, length] averaging matrix of PyTorch's AdaptiveAvgPool1d: bin i averages
  positions floor(i L / n) .. ceil((i + 1) L / n) - 1."""
  m = np.zeros((bins, length))
  for i in range(bins):
    lo, hi = (i * length) // bins, -((-(i + 1) * length) // bins)
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


def grid_pool_matrix(grid: Sequence[int], pooled: Sequence[int]) -> np.ndarray:
  """[prod(pooled), prod(grid)] adaptive average pooling over a row-major grid (the
  Kronecker product of the per-axis matrices)."""
  if len(pooled) != len(grid):
    raise ValueError(f'agent grid {tuple(pooled)} must have as many axes as the '
                     f'token grid {tuple(grid)}.')
  m = np.ones((1, 1))
  for g, p in zip(grid, pooled):
    if p > g:
      raise ValueError(f'agent grid {tuple(pooled)} must not exceed the token grid '
                       f'{tuple(grid)} on any axis.')
    m = np.kron(m, adaptive_pool_matrix(g, p))
  return m
