"""Linear attention with feature maps (Katharopoulos et al., "Transformers are RNNs", 2020).

    o_t = phi(q_t) sum_s phi(k_s)^T v_s / (phi(q_t) . sum_s phi(k_s) + eps)

over s <= t (causal, a prefix sum) or all s (non-causal, where the key length S may
differ from the query length T; the chunked form then takes the cheaper association,
(phi(Q) phi(K)^T) V for few queries, phi(Q) (phi(K)^T V) otherwise); `normalize=False`
drops the denominator. phi is 'elu+1' (the paper's), 'relu', 'identity', 'exp' or any callable
applied elementwise to the [B, T, N, K] query and key.

State: [B, N, K, V] unnormalised; normalised, [B, N, K, V + 1] whose last column is the
running key sum sum_s phi(k_s) (the value is extended by a ones column, so one
recurrence carries numerator and denominator).

Three forms that agree (`naive_*`, `recurrent_*`, `chunked_*`), each returning
(out [B, T, N, V], final_state or None when non-causal); `linear_attention` dispatches
to an implementation (the chunked XLA form on CPU, the Pallas chunk kernel on TPU /
GPU).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from attention.linear import _core
from attention.linear import _dispatch

FeatureMap = str | Callable[[jax.Array], jax.Array]

FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'elu+1': lambda x: jax.nn.elu(x) + 1.0,
    'relu': jax.nn.relu,
    'identity': lambda x: x,
    'exp': jnp.exp,
}


def feature_map_fn(feature_map: FeatureMap) -> Callable[[jax.Array], jax.Array]:
  """The feature map named `feature_map` (or the callable itself)."""
  if callable(feature_map):
    return feature_map
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f'feature_map must be one of {tuple(FEATURE_MAPS)} or a '
                     f'callable, got {feature_map!r}.')
  return FEATURE_MAPS[feature_map]


def _prepare(query, key, value, feature_map, normalize, causal, scale,
             initial_state, segment_ids, eps=1e-6):
  if not isinstance(normalize, bool):
    raise TypeError(f'normalize must be a bool, got {type(normalize).__name__}.')
  if not isinstance(causal, bool):
    raise TypeError(f'causal must be a bool, got {type(causal).__name__}.')
  phi = feature_map_fn(feature_map)
  for name, x in (('query', query), ('key', key)):
    if not hasattr(x, 'shape'):
      raise TypeError(f'{name} must be an array, got {type(x).__name__}.')
  fq, fk = phi(query), phi(key)
  if fq.shape != query.shape or fk.shape != key.shape:
    raise ValueError(
        f'feature_map must preserve shapes, got {tuple(fq.shape)} from query '
        f'{tuple(query.shape)} and {tuple(fk.shape)} from key {tuple(key.shape)}.')
  v = value
  if normalize and hasattr(value, 'shape') and value.ndim == 4:
    v = jnp.concatenate([value, jnp.ones(value.shape[:-1] + (1,), value.dtype)],
                        axis=-1)
  x = _core.validate(fq, fk, v, initial_state=initial_state,
                     segment_ids=segment_ids, scale=scale, causal=causal)
  # For the chunked form: the raw arrays and the map (applied per block, see
  # `_core._scan_causal`) and the eps it normalises with.
  return x._replace(raw=(query, key, value), feature_map=phi,
                    normalize_eps=eps if normalize else None)


def _finish(out, state, normalize, eps, dtype):
  if normalize:
    out32 = out.astype(jnp.promote_types(out.dtype, jnp.float32))
    out = (out32[..., :-1] / (out32[..., -1:] + eps)).astype(dtype)
  return out, state


def naive_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    feature_map: FeatureMap = 'elu+1', normalize: bool = True,
    causal: bool = True, scale: float | None = None, eps: float = 1e-6,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
  """The quadratic form [(phi(Q) phi(K)^T) * M] V (the oracle).

  Args:
    query: [B, T, N, K].
    key: [B, S, N_kv, K] (N a multiple of N_kv; S = T unless causal=False, e.g. one
      query over S context tokens).
    value: [B, S, N_kv, V].
    feature_map: a name in `FEATURE_MAPS` or a shape-preserving callable.
    normalize: divide by phi(q_t) . sum_s phi(k_s) (+ eps).
    causal: prefix sums (s <= t) or all positions.
    scale: multiplies phi(q) . phi(k) (default K ** -0.5).
    eps: added to the denominator.
    initial_state: [B, N, K, V (+1 if normalize)] (causal only).
    segment_ids: [B, T] ints; the state resets wherever the id changes.

  Returns:
    (out [B, T, N, V] in query's dtype, final state or None if non-causal).
  """
  x = _prepare(query, key, value, feature_map, normalize, causal, scale,
               initial_state, segment_ids)
  out, state = _core.naive(x, causal=causal)
  return _finish(out, state, normalize, eps, query.dtype)


def recurrent_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    feature_map: FeatureMap = 'elu+1', normalize: bool = True,
    causal: bool = True, scale: float | None = None, eps: float = 1e-6,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None
) -> tuple[jax.Array, jax.Array | None]:
  """The recurrence S_t = S_{t-1} + phi(k_t)^T v_t (decoding); see the naive form."""
  x = _prepare(query, key, value, feature_map, normalize, causal, scale,
               initial_state, segment_ids)
  out, state = _core.recurrent(x, causal=causal)
  return _finish(out, state, normalize, eps, query.dtype)


def chunked_linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    feature_map: FeatureMap = 'elu+1', normalize: bool = True,
    causal: bool = True, scale: float | None = None, eps: float = 1e-6,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int = _core.DEFAULT_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array | None]:
  """Chunked parallel form (training / prefill); `chunk_size` need not divide T."""
  chunk_size = _core.check_chunk_size(chunk_size)
  x = _prepare(query, key, value, feature_map, normalize, causal, scale,
               initial_state, segment_ids, eps)
  return _core.chunked(x, chunk_size=chunk_size, causal=causal)  # Normalised.


def linear_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    feature_map: FeatureMap = 'elu+1', normalize: bool = True,
    causal: bool = True, scale: float | None = None, eps: float = 1e-6,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None, chunk_size: int | None = None,
    implementation: str | None = None) -> tuple[jax.Array, jax.Array | None]:
  """Linear attention by `implementation` (None | 'xla' | 'pallas_tpu' | 'pallas_gpu').

  Arguments as `naive_linear_attention`; `chunk_size` defaults to the
  implementation's (32 for XLA).
  """
  _dispatch.check_implementation(implementation)
  x = _prepare(query, key, value, feature_map, normalize, causal, scale,
               initial_state, segment_ids, eps)
  return _dispatch.run(x, causal=causal, chunk_size=chunk_size,
                       implementation=implementation,
                       xla_chunk_size=_core.DEFAULT_CHUNK_SIZE)  # Normalised.
