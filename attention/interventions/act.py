"""ACT: the Attention Calibration Technique.

"Unveiling and Harnessing Hidden Attention Sinks: Training-Free Attention Calibration
for Enhancing Large Language Models" (Yu et al., ICML 2024; code GATECH-EIC/ACT).
Post-softmax, per (layer, head), before A V:

  1. sink score of key j: s_j = (sum_i A_ij) / N_j, N_j the number of queries that can
     see key j (N - j for a plain causal map; here the real visibility of the site:
     padding, windows, cache offsets);
  2. sinks S = {j : s_j > tau} without the first visible position (the initial / BOS
     sink is kept);
  3. A'_ij = beta A_ij for j in S;
  4. the freed mass f_i = (1 - beta) sum_{j in S} A_ij goes to the non-sinks in
     proportion to their weights: A'_ij = A_ij + f_i A_ij / sum_{k not in S} A_ik.

A row whose non-sink mass is zero has nowhere to move mass and is left unchanged.
The sinks are per (batch, head). "First visible position": the key with the smallest
position among the keys some query sees (index 0 without padding).

Blocked form (no T x S array): s_j from a q-block pass of column sums; then one
kernel pass on the values [v 1_S, v 1_notS, 1_S, 1_notS] gives outS_i = sum_{j in S}
A_ij v_j, outN_i, m_i = sum_{j in S} A_ij and n_i = sum_{j not in S} A_ij, and
out'_i = beta outS_i + (1 + (1 - beta) m_i / n_i) outN_i, which equals
beta outS_i + (1 - beta m_i) / (1 - m_i) (out_i - outS_i) when m_i + n_i = 1 (the
difference form cancels when m_i -> 1; this one does not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention.interventions import base
from attention.interventions import blocked as blocked_lib

__all__ = ['ACT', 'act_calibrate', 'act_sink_scores', 'act_sinks']


def act_sink_scores(probs: jax.Array, visible: jax.Array) -> tuple[jax.Array,
                                                                  jax.Array]:
  """(s_j [B, N, S], N_j [B, 1, S]) from probs [B, N, T, S] and visibility [B, 1, T, S].

  s_j = sum_i A_ij / N_j (0 for keys no query sees).
  """
  count = jnp.sum(visible, axis=2, dtype=jnp.int32)  # [B, 1, S]
  return scores_from_sums(jnp.sum(probs, axis=2), count), count


def scores_from_sums(col_sums: jax.Array, count: jax.Array) -> jax.Array:
  """sum_i A_ij [B, N, S] / N_j [B, 1, S], 0 where N_j = 0."""
  c = count.astype(col_sums.dtype)
  return jnp.where(count > 0, col_sums / jnp.where(count > 0, c, 1.0), 0.0)


def act_sinks(scores: jax.Array, count: jax.Array, kv_positions: jax.Array,
              tau: float) -> jax.Array:
  """bool [B, N, S]: s_j > tau, without the first visible position of each batch row.

  scores [B, N, S], count [B, 1, S] (queries seeing key j), kv_positions [B, S].
  """
  seen = count[:, 0] > 0  # [B, S]
  big = jnp.iinfo(jnp.int32).max
  pos = jnp.where(seen, kv_positions, big)
  first = seen & (kv_positions == jnp.min(pos, axis=-1, keepdims=True))  # [B, S]
  return (scores > tau) & ~first[:, None, :]


def act_calibrate(probs: jax.Array, sinks: jax.Array, beta: float) -> jax.Array:
  """Steps 3-4: probs [B, N, T, S], sinks [B, N, S] bool -> calibrated probs."""
  is_sink = sinks[:, :, None, :]  # [B, N, 1, S]
  m = jnp.sum(jnp.where(is_sink, probs, 0.0), axis=-1, keepdims=True)  # [B, N, T, 1]
  rest = jnp.sum(jnp.where(is_sink, 0.0, probs), axis=-1, keepdims=True)
  freed = (1.0 - beta) * m
  gain = freed / jnp.where(rest > 0, rest, 1.0)
  new = jnp.where(is_sink, beta * probs, probs + gain * probs)
  return jnp.where(rest > 0, new, probs)


@dataclasses.dataclass(frozen=True, eq=False)
class ACT(base.Intervention):
  """ACT on the selected (layer, head)s: tau (sink threshold), beta (sink scale).

  The authors calibrate layers 2..L-2 and keep, per task, the heads whose calibrated
  accuracy beats the baseline (offline head filtering); pass those as layers/heads.
  """
  tau: float = 0.1
  beta: float = 0.4

  stage = 'probs'
  blocked = 'probs'

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 'tau', base.check_fraction('tau', self.tau))
    object.__setattr__(self, 'beta', base.check_fraction('beta', self.beta))

  def sinks(self, probs: jax.Array, site: base.AttentionSite) -> jax.Array:
    """bool [B, N, S] sink keys per head for these probabilities."""
    scores, count = act_sink_scores(probs, site.visible())
    return act_sinks(scores, count, site.kv_positions, self.tau)

  def edit_probs(self, probs, site):
    new = act_calibrate(probs, self.sinks(probs, site), self.beta)
    return self.select_heads(new, probs, axis=1)

  def blocked_probs(self, ctx):
    col, count = ctx.column_sums()
    sinks = act_sinks(scores_from_sums(col, count), count, ctx.site.kv_positions,
                      self.tau)  # [B, N, S]
    n = ctx.num_heads
    v = blocked_lib.repeat_kv(ctx.v, n).astype(ctx.out.dtype)  # [B, S, N, Hv]
    ind = jnp.swapaxes(sinks, 1, 2)[..., None].astype(v.dtype)  # [B, S, N, 1]
    ext = jnp.concatenate([v * ind, v * (1.0 - ind), ind, 1.0 - ind], axis=-1)
    w = ctx.weighted(ext)  # [B, T, N, 2 Hv + 2]
    hv = v.shape[-1]
    out_s, out_n = w[..., :hv], w[..., hv:2 * hv]
    m, rest = w[..., 2 * hv:2 * hv + 1], w[..., 2 * hv + 1:]
    gain = (1.0 - self.beta) * m / jnp.where(rest > 0, rest, 1.0)
    new = jnp.where(rest > 0, self.beta * out_s + (1.0 + gain) * out_n, ctx.out)
    return self.select_heads(new, ctx.out, axis=2)
