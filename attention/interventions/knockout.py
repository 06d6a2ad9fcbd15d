"""Attention knockout between token sets (information-flow studies).

"Cross-modal Information Flow in Multimodal Large Language Models" (Zhang et al.,
2024; after "Dissecting Recall of Factual Associations in Auto-Regressive Language
Models", Geva et al. 2023): in layers [l, l + w) block the edges from a query token
set Q to a key token set K: their logits become -inf before the softmax, which
renormalises over the remaining keys. A row left with no key gives zeros (never
NaN). The effect is the change in the probability of the correct answer; sweeping l
shows where information moves from K to Q.

Blocked form: the edit is elementwise in (b, h, q_idx, kv_idx), so it runs inside
the kernel's tiles as part of its score_mod.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention.interventions import base

__all__ = ['Knockout', 'knockout_layers', 'knockout_logits']


def knockout_logits(logits: jax.Array, queries: jax.Array,
                    keys: jax.Array) -> jax.Array:
  """logits [B, N, T, S] with -inf on the edges queries [B, T] -> keys [B, S]."""
  block = queries[:, None, :, None] & keys[:, None, None, :]  # [B, 1, T, S]
  return jnp.where(block, jnp.asarray(-jnp.inf, logits.dtype), logits)


def knockout_layers(start: int, width: int, num_layers: int) -> tuple[int, ...]:
  """The layer window [start, start + width) clipped to the model's layers."""
  for name, v, lo in (('start', start, 0), ('width', width, 1),
                      ('num_layers', num_layers, 1)):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
      raise ValueError(f'{name} must be an int >= {lo}, got {v!r}.')
  if start >= num_layers:
    raise ValueError(f'start must be < num_layers ({num_layers}), got {start}.')
  return tuple(range(start, min(start + width, num_layers)))


def _check_set(name: str, x, shape) -> None:
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or x.dtype != jnp.bool_:
    raise TypeError(f'{name} must be a bool array, got '
                    f'{getattr(x, "dtype", type(x).__name__)}.')
  if tuple(x.shape) != shape:
    raise ValueError(f'{name} must have shape {shape}, got {tuple(x.shape)}.')


@dataclasses.dataclass(frozen=True, eq=False)
class Knockout(base.Intervention):
  """Blocks query set `queries` [B, T] from key set `keys` [B, S] (bool)."""
  queries: jax.Array | None = base.array_field()
  keys: jax.Array | None = base.array_field()

  stage = 'logits'
  blocked = 'logit_mod'
  logit_mask = True

  def __post_init__(self):
    super().__post_init__()
    if self.queries is None or self.keys is None:
      raise ValueError('queries [B, T] and keys [B, S] (bool token sets) are '
                       'required.')

  def check_shapes(self, site, shapes):
    _check_set('queries', self.queries, (shapes['B'], shapes['T']))
    _check_set('keys', self.keys, (shapes['B'], shapes['S']))

  def edit_logits(self, logits, site):
    return self.select_heads(knockout_logits(logits, self.queries, self.keys),
                             logits, axis=1)

  def logit_mod(self, score, b, h, q_idx, kv_idx, num_heads):
    block = self.queries[b, q_idx] & self.keys[b, kv_idx]
    block = block & self.head_selected(h, num_heads)
    return jnp.where(block, jnp.asarray(-jnp.inf, score.dtype), score)
