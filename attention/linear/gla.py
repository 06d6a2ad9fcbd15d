"""Gated linear attention (GLA: Yang, Wang, Shen, Panda, Kim, ICML 2024).

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t,

with a data-dependent decay alpha_t in (0, 1], one per head ([B, T, N]) or one per key
dimension ([B, T, N, K]), given as log-gates log(alpha_t) <= 0. The paper's gate is
alpha_t = sigmoid(x_t W_a)^(1/tau) (`gla_log_gates`, tau = 16). The chunk algorithm is
lightning's with cumulative log-decays inside each chunk; per-key-dimension gates
build the intra-chunk [C, C, K] decay tensor from differences of cumulative log-gates
(never exp of a positive number), one chunk at a time (default chunk 16).

State [B, N, K, V]. Forms return (out [B, T, N, V], final_state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention.linear import _core
from attention.linear import _dispatch


def gla_log_gates(logits: jax.Array, tau: float = 16.0) -> jax.Array:
  """log alpha = log(sigmoid(logits)^(1/tau)) = log_sigmoid(logits) / tau."""
  if not tau > 0:
    raise ValueError(f'tau must be positive, got {tau}.')
  return jax.nn.log_sigmoid(logits) / tau


def _prepare(query, key, value, log_gates, scale, initial_state, segment_ids):
  if log_gates is None or not hasattr(log_gates, 'shape'):
    raise TypeError(f'log_gates must be an array, got '
                    f'{type(log_gates).__name__}.')
  if _core.is_concrete(log_gates):
    lg = np.asarray(log_gates, np.float64)
    if np.any(lg > 0) or np.any(np.isposinf(lg)):
      raise ValueError(
          f'log_gates must be <= 0 (decays alpha = exp(log_gates) in (0, 1]; a '
          f'positive log-gate grows the state), got max {float(lg.max())}.')
  return _core.validate(query, key, value, log_decay=log_gates,
                        log_decay_name='log_gates', initial_state=initial_state,
                        segment_ids=segment_ids, scale=scale)


def naive_gated_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, log_gates: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The quadratic form o_t = sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s v_s (oracle).

  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K].
    value: [B, T, N_kv, V].
    log_gates: log(alpha_t) <= 0, [B, T, N] (per head) or [B, T, N, K] (per key dim).
    scale: multiplies q . k (default K ** -0.5).
    initial_state: [B, N, K, V].
    segment_ids: [B, T] ints; the state resets wherever the id changes.

  Returns:
    (out [B, T, N, V], final state [B, N, K, V]).
  """
  x = _prepare(query, key, value, log_gates, scale, initial_state, segment_ids)
  return _core.naive(x)


def recurrent_gated_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, log_gates: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The recurrent form (decoding); arguments as the naive form."""
  x = _prepare(query, key, value, log_gates, scale, initial_state, segment_ids)
  return _core.recurrent(x)


def chunked_gated_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, log_gates: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """The chunked form; `chunk_size` default 64 (per-head gates) or 16 (per key dim)."""
  if chunk_size is None:
    vector = hasattr(log_gates, 'shape') and len(log_gates.shape) == 4
    chunk_size = (_core.DEFAULT_VECTOR_CHUNK_SIZE if vector else
                  _core.DEFAULT_CHUNK_SIZE)
  chunk_size = _core.check_chunk_size(chunk_size)
  x = _prepare(query, key, value, log_gates, scale, initial_state, segment_ids)
  return _core.chunked(x, chunk_size=chunk_size)


def gated_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, log_gates: jax.Array, *,
    scale: float | None = None, initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None, chunk_size: int | None = None,
    implementation: str | None = None) -> tuple[jax.Array, jax.Array]:
  """GLA by `implementation` (None | 'xla' | 'pallas_tpu' | 'pallas_gpu'; the Pallas
  kernel takes per-head gates only); arguments as the naive form."""
  _dispatch.check_implementation(implementation)
  x = _prepare(query, key, value, log_gates, scale, initial_state, segment_ids)
  vector = x.g is not None and x.g.ndim == 4
  return _dispatch.run(
      x, causal=True, chunk_size=chunk_size, implementation=implementation,
      xla_chunk_size=(_core.DEFAULT_VECTOR_CHUNK_SIZE if vector else
                      _core.DEFAULT_CHUNK_SIZE))
