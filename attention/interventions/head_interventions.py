"""Head-level interventions: output scaling (VHR), masking, temperature, SoftPAG.

- Head output scaling, as in vision-aware head reinforcement ("Cracking the Code of
  Hallucination in LVLMs with Vision-aware Head Divergence", VHR): score each head by
  the divergence of its output with vs. without the context segment
  (`head_divergence_scores`, `top_heads`), then scale the outputs of the top heads by
  alpha > 1 (`HeadScaling`).
- Head masking: zero a head's output (ablations, retrieval-head studies).
- Temperature: logits / temperature per head (entropy control).
- SoftPAG ("Fine-Grained Perturbation Guidance via Attention Head Selection"): the
  perturbed run replaces a selected head's map by (1 - s) A + s I, I the identity
  (each query attends to the key at its own position); `guided(out, out_perturbed, w)
  = out + w (out - out_perturbed)` combines the two runs (on any output: head outputs,
  logits, noise predictions).

Blocked forms: scaling / masking act on the O(T) output; temperature scales the
selected heads' queries by 1 / t (the same logits: (q / t) k^T = (q k^T) / t; the
other logit edits are masks, which commute with it); SoftPAG's output is
(1 - s) out_i + s v_{j(i)}, j(i) the key at the query's position (a q-block pass).
A query whose own position is not a visible key keeps its map.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.interventions import base

__all__ = ['HeadMask', 'HeadScaling', 'SoftPAG', 'Temperature', 'guided',
           'head_divergence_scores', 'identity_map', 'softpag_probs', 'top_heads']


def _per_head(name: str, value: Any, heads: tuple[int, ...] | None, *,
              positive: bool) -> float | tuple[float, ...]:
  """A finite float, or a tuple of them (one per selected head)."""
  values = value if isinstance(value, (tuple, list)) else None
  items = values if values is not None else [value]
  out = []
  for x in items:
    if isinstance(x, (bool, np.bool_)) or not isinstance(
        x, (int, float, np.integer, np.floating)):
      raise TypeError(f'{name} must be a float or a sequence of floats, got {x!r}.')
    x = float(x)
    if not np.isfinite(x) or (x <= 0 if positive else x < 0):
      raise ValueError(f'{name} must be {"positive" if positive else ">= 0"} and '
                       f'finite, got {x}.')
    out.append(x)
  if values is None:
    return out[0]
  if heads is None or len(heads) != len(out):
    raise ValueError(f'{name} as a sequence needs one value per head of heads '
                     f'({heads}), got {len(out)} values.')
  return tuple(out)


def _head_values(value: float | tuple[float, ...], heads: tuple[int, ...] | None,
                 num_heads: int, fill: float) -> np.ndarray:
  """[N] float32: value per head (`fill` on unselected heads)."""
  if not isinstance(value, tuple):
    return np.full((num_heads,), value, np.float32)
  out = np.full((num_heads,), fill, np.float32)
  out[list(heads)] = value
  return out


def head_divergence_scores(out_with: jax.Array, out_without: jax.Array) -> jax.Array:
  """VHD-style score per head: mean over tokens of ||o_with - o_without||_2.

  out_with / out_without: per-head outputs [..., B, T, N, Hv] of the runs with and
  without the context segment, at the same query positions (e.g. the last token).
  Returns [..., N]: [N] for one layer's [B, T, N, Hv], [L, N] for [L, B, T, N, Hv].
  """
  a, b = jnp.asarray(out_with), jnp.asarray(out_without)
  if a.shape != b.shape or a.ndim < 4:
    raise ValueError('out_with and out_without must have one shape [..., B, T, N, Hv] '
                     f'of rank >= 4, got {a.shape} and {b.shape}.')
  d = jnp.sqrt(jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)),
                       axis=-1))  # [..., B, T, N]
  return jnp.mean(d, axis=(-3, -2))


def top_heads(scores: Any, k: int) -> tuple[Any, ...]:
  """The k highest-scoring heads: ints for scores [N], (layer, head) for [L, N]."""
  x = np.asarray(scores, np.float64)
  if x.ndim not in (1, 2):
    raise ValueError(f'scores must be [N] or [L, N], got shape {x.shape}.')
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= x.size):
    raise ValueError(f'k must be an int in [1, {x.size}], got {k!r}.')
  order = np.argsort(-x.reshape(-1), kind='stable')[:k]
  if x.ndim == 1:
    return tuple(int(i) for i in order)
  return tuple((int(i) // x.shape[1], int(i) % x.shape[1]) for i in order)


def guided(out: jax.Array, out_perturbed: jax.Array, w: float) -> jax.Array:
  """SoftPAG / PAG guidance: out + w (out - out_perturbed)."""
  if jnp.shape(out) != jnp.shape(out_perturbed):
    raise ValueError(f'out and out_perturbed must have one shape, got '
                     f'{jnp.shape(out)} and {jnp.shape(out_perturbed)}.')
  return out + w * (out - out_perturbed)


def identity_map(site: base.AttentionSite) -> jax.Array:
  """I [B, 1, T, S]: 1 on the visible key at the query's own position (normalised
  over such keys if several); rows without one are zero."""
  match = site.visible() & (site.kv_positions[:, None, None, :] ==
                            site.q_positions[:, None, :, None])
  cnt = jnp.sum(match, axis=-1, keepdims=True)
  return match / jnp.maximum(cnt, 1).astype(jnp.float32)


def softpag_probs(probs: jax.Array, eye: jax.Array, s: float) -> jax.Array:
  """(1 - s) A + s I on rows where I has a key; other rows unchanged."""
  has = jnp.sum(eye, axis=-1, keepdims=True) > 0
  return jnp.where(has, (1.0 - s) * probs + s * eye, probs)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadScaling(base.Intervention):
  """out_h <- alpha_h out_h on the selected heads (VHR's reinforcement, alpha > 1).

  alpha: a float (all selected heads) or one per head of `heads`.
  """
  alpha: float | tuple[float, ...] = 2.0

  stage = 'output'
  blocked = 'output'

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 'alpha', _per_head('alpha', self.alpha, self.heads,
                                                positive=False))

  def edit_output(self, out, site):
    n = out.shape[2]
    a = jnp.asarray(_head_values(self.alpha, self.heads, n, 1.0), out.dtype)
    return self.select_heads(out * a[:, None], out, axis=2)


@dataclasses.dataclass(frozen=True, eq=False)
class HeadMask(base.Intervention):
  """out_h <- 0 on the selected heads (head ablation)."""

  stage = 'output'
  blocked = 'output'

  def edit_output(self, out, site):
    return self.select_heads(jnp.zeros_like(out), out, axis=2)


@dataclasses.dataclass(frozen=True, eq=False)
class Temperature(base.Intervention):
  """logits_h <- logits_h / t_h on the selected heads (t > 1 flattens, < 1 sharpens).

  temperature: a float or one per head of `heads`.
  """
  temperature: float | tuple[float, ...] = 1.0

  stage = 'logits'
  blocked = 'query_scale'

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 'temperature', _per_head(
        'temperature', self.temperature, self.heads, positive=True))

  def _inverse(self, num_heads: int) -> np.ndarray:
    return 1.0 / _head_values(self.temperature, self.heads, num_heads, 1.0)

  def edit_logits(self, logits, site):
    inv = jnp.asarray(self._inverse(logits.shape[1]), logits.dtype)
    return self.select_heads(logits * inv[:, None, None], logits, axis=1)

  def query_scale(self, num_heads: int) -> np.ndarray:
    """[N]: the factor on each head's query (1 / t on the selected heads)."""
    return np.where(self.head_mask(num_heads), self._inverse(num_heads),
                    1.0).astype(np.float32)

  def logit_mod(self, score, b, h, q_idx, kv_idx, num_heads):
    inv = jnp.asarray(self.query_scale(num_heads), score.dtype)[h]
    return score * inv


@dataclasses.dataclass(frozen=True, eq=False)
class SoftPAG(base.Intervention):
  """A_h <- (1 - s) A_h + s I on the selected heads (the perturbed run), s in [0, 1]."""
  s: float = 1.0

  stage = 'probs'
  blocked = 'probs'

  def __post_init__(self):
    super().__post_init__()
    object.__setattr__(self, 's', base.check_fraction('s', self.s))

  def edit_probs(self, probs, site):
    new = softpag_probs(probs, identity_map(site).astype(probs.dtype), self.s)
    return self.select_heads(new, probs, axis=1)

  def blocked_probs(self, ctx):
    v_diag, found = ctx.diagonal_values()  # [B, T, N, Hv], [B, T]
    new = jnp.where(found[:, :, None, None],
                    (1.0 - self.s) * ctx.out + self.s * v_diag.astype(ctx.out.dtype),
                    ctx.out)
    return self.select_heads(new, ctx.out, axis=2)

