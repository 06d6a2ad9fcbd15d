"""Validation and pooling shared by MoBA, VMoBA and SeerAttention.

Einsum letters: b batch, t/s positions, j q blocks, i kv blocks, n query heads,
k kv heads, g query heads per kv head, h head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks

HEAD_ROUTING = ('query', 'kv')


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def check_int(name: str, value: Any, minimum: int = 1) -> int:
  """A Python/NumPy int >= minimum (ValueError / TypeError naming `name`)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int >= {minimum}, got '
                    f'{type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def check_fraction(name: str, value: Any, *, low_open: bool = True,
                   high: float = 1.0) -> float:
  """A Python float in (0, high] (or [0, high) when not low_open)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                       np.floating)):
    raise TypeError(f'{name} must be a float, got {type(value).__name__}.')
  value = float(value)
  ok = (0.0 < value <= high) if low_open else (0.0 <= value < high)
  if not ok:
    interval = f'(0, {high}]' if low_open else f'[0, {high})'
    raise ValueError(f'{name} must be in {interval}, got {value}.')
  return value


def check_qk(query: Any, key: Any, value: Any = None, *,
             same_length: bool = True) -> tuple[int, int, int, int, int]:
  """(B, T, N, K, H) of query [B, T, N, H], key [B, S, K, H] (and value)."""
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  b, t, n, h = query.shape
  _checks.check_equal('key', 'batch (dim 0)', key.shape[0], b, 'query batch')
  _checks.check_equal('key', 'head_dim (dim 3)', key.shape[3], h,
                      'query head_dim')
  if same_length:
    _checks.check_equal('key', 'length (dim 1)', key.shape[1], t,
                        'query length (self-attention)')
  kh = key.shape[2]
  if kh < 1 or n % kh:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads ({kh}).')
  if value is not None:
    _checks.check_array('value', value, ndim=4, floating=True)
    _checks.check_equal('value', 'batch (dim 0)', value.shape[0], b,
                        'query batch')
    _checks.check_equal('value', 'length (dim 1)', value.shape[1],
                        key.shape[1], 'key length')
    _checks.check_equal('value', 'heads (dim 2)', value.shape[2], kh,
                        'key heads')
  return b, t, n, kh, h


def check_heads(heads: Any) -> str:
  if heads not in HEAD_ROUTING:
    raise ValueError(f'heads must be one of {HEAD_ROUTING} (route per query head '
                     f'or per kv head), got {heads!r}.')
  return heads


def block_mean(x: jax.Array, block: int) -> jax.Array:
  """[B, n, K, H] (float32 or wider): the mean of x [B, T, K, H] over each block
  of `block` positions (the last block averages only its real positions)."""
  b, t, kh, h = x.shape
  n = ceil_div(t, block)
  x = jnp.pad(x.astype(jnp.promote_types(x.dtype, jnp.float32)), ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  total = jnp.sum(x.reshape(b, n, block, kh, h), axis=2)  # [B, n, K, H]
  counts = np.minimum(block, t - block * np.arange(n)).astype(np.float32)
  return total / counts[None, :, None, None].astype(total.dtype)


def pair_scores(q_blocks: jax.Array, k_blocks: jax.Array, heads: str) -> jax.Array:
  """float32 [B, Hm, nq, nk]: <q_blocks[j], k_blocks[i]> per head.

  q_blocks [B, nq, N, H], k_blocks [B, nk, K, H]; heads 'query' gives Hm = N (query
  head n against kv head n // (N // K)); 'kv' gives Hm = K, the score summed over the
  query heads sharing the kv head (one list per kv head, as GQA kernels share tiles).
  """
  b, nq, n, h = q_blocks.shape
  kh = k_blocks.shape[2]
  qg = q_blocks.reshape(b, nq, kh, n // kh, h)
  s = jnp.einsum('bjkgh,bikh->bkgji', qg, k_blocks)  # [B, K, G, nq, nk]
  if heads == 'kv':
    return jnp.sum(s, axis=2)  # [B, K, nq, nk]
  return s.reshape(b, n, nq, k_blocks.shape[1])  # [B, N, nq, nk]


def lecun_param(rngs: Any, shape: tuple[int, ...], fan_in: int,
                logical_axes: tuple[str | None, ...]) -> Any:
  """An nnx.Param ~ N(0, 1 / fan_in) with logical axis names (as the models use)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  value = jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)
  return nnx.Param(value, logical_axes=logical_axes)
