"""Dense einsum attention: the oracle every other implementation is tested against.

Builds the full [B, N, T, S] logits, so it is O(T * S) in memory; it is exact in
float64 (inputs in float64 under `jax.enable_x64`) and computes in at least float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention.masks import base as masks_base
from kernels import problem as problem_lib

# Einsum letters: b batch, t query position, s key position, k kv head,
# g query heads per kv head (N = K * G), h head dim, v value head dim.


def _compute_dtype(*arrays) -> jnp.dtype:
  dtypes = [a.dtype for a in arrays if a is not None]
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def combined_mask(*, mask: jax.Array | None = None,
                  mask_obj: masks_base.Mask | None = None,
                  q_segment_ids: jax.Array | None = None,
                  kv_segment_ids: jax.Array | None = None,
                  block_mask=None, num_heads: int | None = None) -> jax.Array | None:
  """The boolean visibility, broadcastable to [B, N, T, S], or None (all visible).

  `block_mask` (a DynamicBlockMask) needs `num_heads`, the query heads N.
  """
  result = None

  def conj(a, b):
    return b if a is None else a & b

  if mask is not None:
    result = conj(result, jnp.asarray(mask, dtype=bool))
  if mask_obj is not None:
    dense = mask_obj.materialize()
    dense = dense[None] if dense.ndim == 3 else dense[None, None]
    result = conj(result, jnp.asarray(dense))
  if q_segment_ids is not None:
    seg = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
    result = conj(result, seg)
  if block_mask is not None:
    result = conj(result, block_mask.materialize(num_heads))
  return result


@jax.custom_jvp
def _softmax(logits: jax.Array, row_max: jax.Array, sink: jax.Array):
  """(probs [..., S], denominator [...]) with an extra exp(sink) term.

  `row_max` [...] is the (stop-gradient, finite) shift; `sink` broadcasts to it
  (-inf: no sink). Rows with a zero denominator get zero probabilities. The JVP is
  the closed form dp = p * (dz - sum(p dz) - p_sink dsink): autodiff of the division
  builds several more [B, N, T, S] arrays, which dominates small problems on CPU.
  """
  e = jnp.exp(logits - row_max[..., None])  # masked (-inf) -> 0
  denom = jnp.sum(e, axis=-1) + jnp.exp(sink - row_max)
  return e / jnp.where(denom > 0, denom, 1.0)[..., None], denom


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
  logits, row_max, sink = primals
  d_logits, _, d_sink = tangents
  probs, denom = _softmax(logits, row_max, sink)
  p_sink = jnp.exp(sink - row_max) / jnp.where(denom > 0, denom, 1.0)
  d_logits = jnp.where(probs > 0, d_logits, 0.0)  # masked entries carry no tangent
  mean = jnp.sum(probs * d_logits, axis=-1) + p_sink * d_sink  # [...]
  return (probs, denom), (probs * (d_logits - mean[..., None]), denom * mean)


def attention(query: jax.Array, key: jax.Array, value: jax.Array,
              problem: problem_lib.AttentionProblem):
  """Dense softmax attention of a validated problem (see `kernels.problem`).

  Returns out [B, T, N, H_v] in query's dtype, and with `problem.return_residuals`
  also the log-sum-exp [B, N, T] (float32 or float64; -inf for rows with no visible
  key and no sink).
  """
  b, t, n, h = query.shape
  _, s, kh, _ = key.shape
  g = n // kh
  bias, sinks = problem.bias, problem.sinks
  cdt = _compute_dtype(query, key, value, bias, sinks)
  q = query.astype(cdt).reshape(b, t, kh, g, h)
  k = key.astype(cdt)
  v = value.astype(cdt)
  # One flattened batch dim (B * K) per dot: XLA:CPU runs a dot with several batch
  # dims several times slower.
  qx = q.transpose(0, 2, 3, 1, 4).reshape(b * kh, g * t, h)  # [B*K, G*T, H]
  kx = k.transpose(0, 2, 1, 3).reshape(b * kh, s, h)  # [B*K, S, H]
  logits = jnp.einsum('xmh,xsh->xms', qx, kx,
                      precision=jax.lax.Precision.HIGHEST)  # [B*K, G*T, S]
  logits = logits.reshape(b, n, t, s) * jnp.asarray(problem.scale, cdt)  # [B, N, T, S]
  if problem.logits_soft_cap is not None:
    cap = jnp.asarray(problem.logits_soft_cap, cdt)
    logits = cap * jnp.tanh(logits / cap)
  grids = problem_lib.index_grids(b, n, t, s)
  logits = problem_lib.apply_score_mod(problem.score_mod, logits, *grids)
  if bias is not None:
    logits = logits + bias.astype(cdt)
  visible = combined_mask(mask=problem.mask, mask_obj=problem.mask_obj,
                          q_segment_ids=problem.q_segment_ids,
                          kv_segment_ids=problem.kv_segment_ids,
                          block_mask=problem.block_mask, num_heads=n)
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)  # [B, N, T]
  if sinks is not None:
    row_max = jnp.maximum(row_max, sinks.astype(cdt)[None, :, None])
  row_max = jax.lax.stop_gradient(
      jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  sink = (jnp.full((), -jnp.inf, cdt) if sinks is None else
          sinks.astype(cdt)[None, :, None])  # [1, N, 1]
  probs, denom = _softmax(logits, row_max, sink)  # [B, N, T, S], [B, N, T]
  safe = jnp.where(denom == 0, 1.0, denom)  # NaN stays NaN
  if problem.has_dropout:
    probs = probs * problem_lib.dropout_multiplier(
        problem.dropout_seed, problem.dropout_rate, *grids, cdt)
  hv = v.shape[-1]
  vx = v.transpose(0, 2, 1, 3).reshape(b * kh, s, hv)  # [B*K, S, H_v]
  out = jnp.einsum('xms,xsv->xmv', probs.reshape(b * kh, g * t, s), vx,
                   precision=jax.lax.Precision.HIGHEST)  # [B*K, G*T, H_v]
  out = out.reshape(b, kh, g, t, hv).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H_v]
  out = out.reshape(b, t, n, hv).astype(query.dtype)
  if not problem.return_residuals:
    return out
  lse = jnp.where(denom == 0, -jnp.inf, row_max + jnp.log(safe))
  return out, lse
