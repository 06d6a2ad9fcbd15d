"""Retention (RetNet: Sun et al., "Retentive Network", 2023), the recurrent core.

    S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t,

a fixed per-head decay gamma_h in (0, 1] and no normalisation by the sum (RetNet's
GroupNorm, xPos and gating live outside). Default gamma_h = 1 - 2^{-5-h} (the paper's
multi-scale decays). The same chunk algorithm as lightning attention.

State [B, N, K, V]. Forms return (out [B, T, N, V], final_state).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.linear import _core
from attention.linear import _dispatch


def retention_gammas(num_heads: int) -> np.ndarray:
  """RetNet's per-head decays gamma_h = 1 - 2^{-5-h}, h = 0..N-1."""
  if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
      or num_heads < 1:
    raise ValueError(f'num_heads must be a positive int, got {num_heads!r}.')
  return 1.0 - 2.0 ** (-5.0 - np.arange(num_heads, dtype=np.float64))


def _prepare(query, key, value, gammas, scale, initial_state, segment_ids):
  if not hasattr(query, 'shape') or len(query.shape) != 4:
    _core.validate(query, key, value)  # Raises the shape error.
  b, t, n, _ = query.shape
  if gammas is None:
    gammas = retention_gammas(n)
  if np.shape(gammas) != (n,):
    raise ValueError(f'gammas must have shape ({n},) [N], got '
                     f'{tuple(np.shape(gammas))}.')
  if _core.is_concrete(gammas):
    gm = np.asarray(gammas, np.float64)
    if not np.all((gm > 0) & (gm <= 1)):
      raise ValueError(
          f'gammas must be decays in (0, 1] (a negative or zero decay has no '
          f'log; above 1 the state grows), got {gm.tolist()}.')
  dtype = _core.compute_dtype(query, key, value, initial_state)
  head_g = jnp.log(jnp.asarray(gammas, dtype))  # [N]
  g = jnp.broadcast_to(head_g, (b, t, n))
  return _core.validate(query, key, value, log_decay=g, log_decay_name='gammas',
                        initial_state=initial_state, segment_ids=segment_ids,
                        scale=scale, head_log_decay=head_g)


def naive_retention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    gammas: Any = None, scale: float | None = None,
                    initial_state: jax.Array | None = None,
                    segment_ids: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """The parallel form (Q K^T * D) V, D_ts = gamma^{t-s} (the oracle).

  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K].
    value: [B, T, N_kv, V].
    gammas: per-head decays in (0, 1] [N] (default `retention_gammas(N)`).
    scale: multiplies q . k (default K ** -0.5, RetNet's key scaling).
    initial_state: [B, N, K, V].
    segment_ids: [B, T] ints; the state resets wherever the id changes.

  Returns:
    (out [B, T, N, V], final state [B, N, K, V]).
  """
  x = _prepare(query, key, value, gammas, scale, initial_state, segment_ids)
  return _core.naive(x)


def recurrent_retention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                        gammas: Any = None, scale: float | None = None,
                        initial_state: jax.Array | None = None,
                        segment_ids: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """The recurrent form (decoding); arguments as `naive_retention`."""
  x = _prepare(query, key, value, gammas, scale, initial_state, segment_ids)
  return _core.recurrent(x)


def chunked_retention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      gammas: Any = None, scale: float | None = None,
                      initial_state: jax.Array | None = None,
                      segment_ids: jax.Array | None = None,
                      chunk_size: int = _core.DEFAULT_CHUNK_SIZE
                     ) -> tuple[jax.Array, jax.Array]:
  """The chunkwise form (training / prefill); arguments as `naive_retention`."""
  chunk_size = _core.check_chunk_size(chunk_size)
  x = _prepare(query, key, value, gammas, scale, initial_state, segment_ids)
  return _core.chunked(x, chunk_size=chunk_size)



def retention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              gammas: Any = None, scale: float | None = None,
              initial_state: jax.Array | None = None,
              segment_ids: jax.Array | None = None,
              chunk_size: int | None = None,
              implementation: str | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Retention by `implementation` (None | 'xla' | 'pallas_tpu' | 'pallas_gpu');
  arguments as `naive_retention`."""
  _dispatch.check_implementation(implementation)
  x = _prepare(query, key, value, gammas, scale, initial_state, segment_ids)
  return _dispatch.run(x, causal=True, chunk_size=chunk_size,
                       implementation=implementation,
                       xla_chunk_size=_core.DEFAULT_CHUNK_SIZE)
