"""Head analysis on recorded attention probabilities and hidden states.

Pure functions (JAX, jit-compatible; NumPy inputs accepted). Shapes: probabilities
`probs` [B, N, T, S] of one layer (rows sum to 1 over the visible keys, 0 elsewhere),
`visible` bool broadcastable to [B, N, T, S] (key s visible to query t), hidden
states [B, T, D].

* ACT sink scores ("Unveiling and Harnessing Hidden Attention Sinks", Yu et al. 2024):
  s_j = sum_i A_ij / |{i : i sees j}|, computed by `attention.interventions.act`'s
  `act_sink_scores` (the very function ACT uses); `sink_statistics` summarises them
  per head.
* Massive activations ("Massive Activations in Large Language Models", Sun et al.
  2024; used for sinks by VAR, "See What You Are Told", Kang et al. 2025): the
  dimensions with the largest |activation| over real tokens (`massive_dims`), and
  phi(x) = max_{d in D} |x_d| / RMS(x) per token (`massive_ratio`).
* Attention entropy per head: -sum_j A_ij log A_ij over the visible keys, averaged
  over the real queries (`attention_entropy`).
* Retrieval-head score ("Retrieval Head Mechanistically Explains Long-Context
  Factuality", Wu et al. 2024): the fraction of copied tokens for which the head's
  most-attended key, read at the position that emits the copy, is the source token
  being copied (`retrieval_hits`, `retrieval_scores`). Reading taken: teacher forcing
  (the emitted token is the true next token), and the source is matched by position,
  which is the paper's token match "x_j = w, j in the needle" when the copied token
  occurs once in the context (the tasks guarantee that for needle copying).

Einsum letters: b batch, n head, t query, s key, d model dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.interventions import act as act_lib

# Wu et al. 2024 call heads with retrieval score above 0.1 retrieval heads.
RETRIEVAL_THRESHOLD = 0.1
# ACT's sink threshold tau (Yu et al. 2024).
SINK_THRESHOLD = 0.1
# VAR's sink-token threshold on phi (Kang et al. 2025).
MASSIVE_THRESHOLD = 20.0


def _check_probs(probs: Any) -> jax.Array:
  probs = jnp.asarray(probs)
  if probs.ndim != 4 or not jnp.issubdtype(probs.dtype, jnp.floating):
    raise ValueError(f'probs must be a float array [B, N, T, S], got '
                     f'{probs.dtype} {probs.shape}.')
  return probs


def _check_visible(visible: Any, probs: jax.Array) -> jax.Array:
  visible = jnp.asarray(visible)
  if visible.dtype != jnp.bool_ or visible.ndim != 4:
    raise ValueError(f'visible must be a bool array broadcastable to [B, N, T, S]'
                     f' = {probs.shape}, got {visible.dtype} {visible.shape}.')
  try:
    return jnp.broadcast_to(visible, probs.shape)
  except ValueError:
    raise ValueError(f'visible {visible.shape} does not broadcast to probs '
                     f'{probs.shape}.') from None


def causal_visible(attention_mask: Any) -> jax.Array:
  """bool [B, 1, T, T]: key s visible to query t iff s <= t and both are real.

  Padding queries see nothing (their rows are excluded from every statistic).
  """
  mask = jnp.asarray(attention_mask).astype(bool)
  if mask.ndim != 2:
    raise ValueError(f'attention_mask must be [B, T], got {mask.shape}.')
  t = mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None, None] & mask[:, None, :, None] & mask[:, None, None, :]


def sink_scores(probs: Any, visible: Any) -> jax.Array:
  """ACT sink scores [B, N, S]: mean attention key j receives from the queries
  that can see it (0 for a key no query sees); `act.act_sink_scores`."""
  probs = _check_probs(probs)
  scores, _ = act_lib.act_sink_scores(probs, _check_visible(visible, probs))
  return scores


def sink_statistics(scores: Any, key_valid: Any, *,
                    threshold: float = SINK_THRESHOLD) -> dict[str, jax.Array]:
  """Per-head summaries of ACT sink scores `scores` [B, N, S] of one layer.

  Args:
    scores: [B, N, S] sink scores.
    key_valid: [B, S] bool, real keys.
    threshold: ACT's tau.

  Returns (means over the batch):
    'first': [N] the first token's score (the initial sink ACT keeps).
    'max_other': [N] the largest score of any other real key.
    'num_sinks': [N] keys other than the first with score > threshold (the sinks
      ACT calibrates).
    'is_sink': [B, N, S] bool, score > threshold at a real key other than the
      first (positions of the sinks ACT calibrates).
  """
  scores = jnp.asarray(scores)
  valid = jnp.asarray(key_valid).astype(bool)
  if scores.ndim != 3 or valid.shape != (scores.shape[0], scores.shape[2]):
    raise ValueError(f'scores must be [B, N, S] and key_valid [B, S], got '
                     f'{scores.shape} and {valid.shape}.')
  other = valid.at[:, 0].set(False)[:, None, :]  # [B, 1, S]
  is_sink = (scores > threshold) & other
  return {
      'first': jnp.mean(scores[:, :, 0], 0),
      'max_other': jnp.mean(jnp.max(jnp.where(other, scores, 0.0), -1), 0),
      'num_sinks': jnp.mean(jnp.sum(is_sink, -1).astype(jnp.float32), 0),
      'is_sink': is_sink,
  }


def attention_entropy(probs: Any, visible: Any) -> dict[str, jax.Array]:
  """Attention entropy per head (nats), over real query rows.

  H_i = -sum_{j visible} A_ij log A_ij (invisible keys are ignored; 0 log 0 = 0).
  Returns sums so batches can be accumulated exactly:
    'entropy_sum': [N] sum of H_i over the query rows that see at least one key;
    'normalized_sum': [N] sum of H_i / log(n_i) over the rows with n_i >= 2 visible
      keys (1 = uniform attention, 0 = one key);
    'rows': [] rows counted in entropy_sum; 'normalized_rows': [] rows counted in
      normalized_sum (the same for every head).
  """
  probs = _check_probs(probs)
  visible = _check_visible(visible, probs)
  p = jnp.where(visible, probs, 0.0).astype(jnp.float32)
  plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
  h = -jnp.sum(plogp, -1)  # [B, N, T]
  n = jnp.sum(visible, -1)  # [B, N, T]
  rows = n >= 1
  many = n >= 2
  norm = jnp.where(many, h / jnp.log(jnp.maximum(n, 2).astype(jnp.float32)), 0.0)
  return {
      'entropy_sum': jnp.sum(jnp.where(rows, h, 0.0), (0, 2)),
      'normalized_sum': jnp.sum(norm, (0, 2)),
      'rows': jnp.sum(rows[:, 0]).astype(jnp.float32),
      'normalized_rows': jnp.sum(many[:, 0]).astype(jnp.float32),
  }


def retrieval_hits(probs: Any, answer_positions: Any,
                   sources: Any) -> dict[str, jax.Array]:
  """Counts for retrieval scores of one layer's heads.

  Args:
    probs: [B, N, T, S] probabilities.
    answer_positions: [B, A] int, the positions whose outputs are the copies.
    sources: [B, A] int, the key position of the token being copied (-1: the
      answer is not a copy and is not counted).

  Returns:
    'hits': [N] copies whose most-attended key (argmax over S at the answer
      position; the first on ties) is the source.
    'copies': [] number of counted copies (sources >= 0).
  """
  probs = _check_probs(probs)
  pos = jnp.asarray(answer_positions)
  src = jnp.asarray(sources)
  b, _, t, s = probs.shape
  if pos.ndim != 2 or pos.shape[0] != b or src.shape != pos.shape:
    raise ValueError(f'answer_positions and sources must be [B={b}, A], got '
                     f'{pos.shape} and {src.shape}.')
  rows = jnp.take_along_axis(probs, pos[:, None, :, None], axis=2)  # [B, N, A, S]
  top = jnp.argmax(rows, -1)  # [B, N, A]
  counted = (src >= 0)[:, None, :]  # [B, 1, A]
  hits = jnp.sum((top == src[:, None, :]) & counted, (0, 2))
  del t, s
  return {'hits': hits.astype(jnp.float32),
          'copies': jnp.sum(src >= 0).astype(jnp.float32)}


def retrieval_scores(hits: Any, copies: Any) -> np.ndarray:
  """hits [..., N] / copies (0 where there are no copies)."""
  hits = np.asarray(hits, np.float64)
  copies = np.asarray(copies, np.float64)
  return np.where(copies > 0, hits / np.maximum(copies, 1.0), 0.0)


def retrieval_heads(scores: Any, *, threshold: float = RETRIEVAL_THRESHOLD
                   ) -> list[tuple[int, int]]:
  """(layer, head) pairs of `scores` [L, N] above `threshold`, best first."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f'scores must be [L, N], got {scores.shape}.')
  pairs = [(int(l), int(h)) for l, h in zip(*np.nonzero(scores > threshold))]
  return sorted(pairs, key=lambda lh: (-scores[lh], lh))


def max_abs_per_dim(hidden: Any, token_valid: Any) -> jax.Array:
  """[D]: max over real tokens of |x_d| (0 when there are none)."""
  x = jnp.asarray(hidden)
  valid = jnp.asarray(token_valid).astype(bool)
  if x.ndim != 3 or valid.shape != x.shape[:2]:
    raise ValueError(f'hidden must be [B, T, D] and token_valid [B, T], got '
                     f'{x.shape} and {valid.shape}.')
  return jnp.max(jnp.where(valid[..., None], jnp.abs(x), 0.0), (0, 1))


def massive_dims(max_abs: Any, *, top_k: int = 2) -> np.ndarray:
  """The `top_k` dimensions with the largest max |activation| (`max_abs` [D]),
  largest first: the massive-activation dimensions, found from the data."""
  m = np.asarray(max_abs, np.float64)
  if m.ndim != 1:
    raise ValueError(f'max_abs must be [D], got {m.shape}.')
  if isinstance(top_k, bool) or not isinstance(top_k, int) or not (
      1 <= top_k <= m.shape[0]):
    raise ValueError(f'top_k must be an int in [1, {m.shape[0]}], got {top_k!r}.')
  return np.argsort(-m, kind='stable')[:top_k]


def massive_ratio(hidden: Any, dims: Any) -> jax.Array:
  """phi(x) = max_{d in dims} |x_d| / RMS(x) per token: [B, T] (0 where x = 0)."""
  x = jnp.asarray(hidden).astype(jnp.float32)
  dims = jnp.asarray(dims)
  if x.ndim != 3 or dims.ndim != 1 or dims.size == 0:
    raise ValueError(f'hidden must be [B, T, D] and dims a non-empty [k], got '
                     f'{x.shape} and {dims.shape}.')
  rms = jnp.sqrt(jnp.mean(x * x, -1))  # [B, T]
  peak = jnp.max(jnp.abs(x[..., dims]), -1)  # [B, T]
  return jnp.where(rms > 0, peak / jnp.where(rms > 0, rms, 1.0), 0.0)
