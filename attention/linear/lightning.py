"""Lightning attention (TransNormerLLM, Qin et al. 2023; Lightning Attention-2, 2024).

    O = [(Q K^T) * M] V,   M_ts = lambda_h^{t-s} for t >= s,   lambda_h = exp(-s_h),

no softmax and no denominator. The decay rates s_h are ALiBi's slopes (Press et al.,
"Train Short, Test Long", 2022), s_h = 2^{-8h/N} for N a power of two, optionally
scaled per layer by (1 - l / (L - 1) + 1e-5) so that upper layers decay less
(`lightning_slopes`). Lightning Attention-2 computes it in blocks: intra-block
[(Q_i K_i^T) * D] V_i, inter-block (Q_i * lambda^t) KV, KV <- lambda^B KV +
(K_i * lambda^{B-s})^T V_i: the chunked form here, constant cost per token.

State [B, N, K, V]. Forms `naive_*`, `recurrent_*`, `chunked_*` return
(out [B, T, N, V], final_state).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.linear import _core
from attention.linear import _dispatch


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's per-head slopes [N] (interleaved for N not a power of two)."""
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
      or num_heads < 1:
    raise ValueError(f'num_heads must be a positive int, got {num_heads!r}.')

  def power_of_two(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]

  if math.log2(num_heads).is_integer():
    slopes = power_of_two(num_heads)
  else:
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = (power_of_two(closest) +
              power_of_two(2 * closest)[0::2][:num_heads - closest])
  return np.asarray(slopes, np.float64)


def lightning_slopes(num_heads: int, *, layer_index: int | None = None,
                     num_layers: int | None = None) -> np.ndarray:
  """Decay rates s_h [N] (lambda_h = exp(-s_h)), TransNormerLLM's per-layer option.

  With `layer_index` l and `num_layers` L, s_h * (1 - l / (L - 1) + 1e-5) (for L = 1,
  the factor is 1 + 1e-5).
  """
  slopes = alibi_slopes(num_heads)
  if (layer_index is None) != (num_layers is None):
    raise ValueError(
        f'layer_index and num_layers must be given together, got '
        f'layer_index={layer_index!r}, num_layers={num_layers!r}.')
  if layer_index is None:
    return slopes
  if not isinstance(num_layers, (int, np.integer)) or num_layers < 1:
    raise ValueError(f'num_layers must be a positive int, got {num_layers!r}.')
  if not isinstance(layer_index, (int, np.integer)) or not (
      0 <= layer_index < num_layers):
    raise ValueError(f'layer_index must be an int in [0, {num_layers}), got '
                     f'{layer_index!r}.')
  frac = layer_index / (num_layers - 1) if num_layers > 1 else 0.0
  return slopes * (1.0 - frac + 1e-5)


def check_rates(name: str, rates: Any, num_heads: int, *, what: str) -> None:
  """Per-head decay rates: shape [N]; if concrete, finite and >= 0 (decay <= 1)."""
  if np.shape(rates) != (num_heads,):
    raise ValueError(f'{name} must have shape ({num_heads},) [N], got '
                     f'{tuple(np.shape(rates))}.')
  if _core.is_concrete(rates):
    r = np.asarray(rates, np.float64)
    if not np.all(np.isfinite(r)) or np.any(r < 0):
      raise ValueError(
          f'{name} must be finite and >= 0 ({what}; a negative value would be a '
          f'growing, not decaying, state), got {r.tolist()}.')


def log_decay_from_rates(rates: Any, shape: tuple[int, int, int],
                         dtype: Any) -> jax.Array:
  """[N] rates s_h -> [B, T, N] per-step log-decays -s_h."""
  return jnp.broadcast_to(-jnp.asarray(rates, dtype), shape)


def _prepare(query, key, value, slopes, scale, initial_state, segment_ids):
  if not hasattr(query, 'shape') or len(query.shape) != 4:
    _core.validate(query, key, value)  # Raises the shape error.
  b, t, n, _ = query.shape
  if slopes is None:
    slopes = lightning_slopes(n)
  check_rates('slopes', slopes, n, what='lambda_h = exp(-slopes_h)')
  dtype = _core.compute_dtype(query, key, value, initial_state)
  g = log_decay_from_rates(slopes, (b, t, n), dtype)
  return _core.validate(query, key, value, log_decay=g, log_decay_name='slopes',
                        initial_state=initial_state, segment_ids=segment_ids,
                        scale=scale, head_log_decay=-jnp.asarray(slopes, dtype))


_ARGS_DOC = """
  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K] (N a multiple of N_kv).
    value: [B, T, N_kv, V].
    slopes: per-head decay rates s_h >= 0 [N] (default `lightning_slopes(N)`).
    scale: multiplies q . k (default K ** -0.5).
    initial_state: [B, N, K, V].
    segment_ids: [B, T] ints; the state resets wherever the id changes.

  Returns:
    (out [B, T, N, V] in query's dtype, final state [B, N, K, V]).
"""


def naive_lightning_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    slopes: Any = None, scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  x = _prepare(query, key, value, slopes, scale, initial_state, segment_ids)
  return _core.naive(x)


def recurrent_lightning_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    slopes: Any = None, scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  x = _prepare(query, key, value, slopes, scale, initial_state, segment_ids)
  return _core.recurrent(x)


def chunked_lightning_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    slopes: Any = None, scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = _core.DEFAULT_CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
  chunk_size = _core.check_chunk_size(chunk_size)
  x = _prepare(query, key, value, slopes, scale, initial_state, segment_ids)
  return _core.chunked(x, chunk_size=chunk_size)


naive_lightning_attention.__doc__ = (
    'The quadratic form [(Q K^T) * M] V, M_ts = exp(-s_h (t - s)) (the oracle).\n'
    + _ARGS_DOC)
recurrent_lightning_attention.__doc__ = (
    'The recurrence S_t = exp(-s_h) S_{t-1} + k_t^T v_t (decoding).\n' + _ARGS_DOC)
chunked_lightning_attention.__doc__ = (
    'Lightning Attention-2 blocks (training / prefill); `chunk_size` need not '
    'divide T.\n' + _ARGS_DOC)


def lightning_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    slopes: Any = None, scale: float | None = None,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None, chunk_size: int | None = None,
    implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Lightning attention by `implementation` (None | 'xla' | 'pallas_tpu' |
  'pallas_gpu'); arguments as `naive_lightning_attention`."""
  _dispatch.check_implementation(implementation)
  x = _prepare(query, key, value, slopes, scale, initial_state, segment_ids)
  return _dispatch.run(x, causal=True, chunk_size=chunk_size,
                       implementation=implementation,
                       xla_chunk_size=_core.DEFAULT_CHUNK_SIZE)
