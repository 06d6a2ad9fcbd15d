"""Jitted evaluation of a `CausalDecoder` on task examples, with interventions.

`SelectedHeads(inner, select)` applies an intervention only on the (layer, head)s
where the traced bool array `select` [L, N] is True: one compiled program serves
every head of ACT's head search (and every head set of a masking study), where an
intervention with static `layers` / `heads` would recompile per head.

`ModelRunner` batches examples (the last batch padded with copies of the first
rows, which are dropped), and runs:
  * `correct(examples, interventions)`: bool [E, A], argmax over the candidates;
  * `analyse(examples, dims)`: per layer and example, ACT sink scores, attention
    entropy sums, retrieval hits, max |activation| per hidden dim and phi of the
    layer inputs, from one recorded forward pass (`attention.interventions.Record`).

Einsum letters: b batch, n head, t query, s key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention.interventions import base
from experiments.models import decoder as decoder_lib
from experiments.recalibration import analysis
from experiments.recalibration import tasks as tasks_lib


@dataclasses.dataclass(frozen=True, eq=False)
class SelectedHeads(base.Intervention):
  """`inner` on the heads where `select[layer, head]`; the others are unchanged.

  Attributes:
    inner: an Intervention with layers=None and heads=None (it edits every head;
      the selection is `select`'s).
    select: bool [L, N] (traced under jit: changing it does not recompile).
    layers: the layers that are hooked at all (None: all); keep it to the layers
      `select` can be True on, so the others stay on the fast path.
  """
  inner: base.Intervention | None = base.array_field()
  select: Any = base.array_field()

  blocked = None  # The selection is traced: the dense map is needed.

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.inner, base.Intervention):
      raise TypeError(f'inner must be an Intervention, got '
                      f'{type(self.inner).__name__}.')
    if self.inner.layers is not None or self.inner.heads is not None:
      raise ValueError('inner must have layers=None and heads=None (select '
                       f'chooses), got {self.inner.layers}, {self.inner.heads}.')
    if self.heads is not None:
      raise ValueError('SelectedHeads selects heads by `select`; heads must be '
                       'None.')
    sel = self.select
    if not hasattr(sel, 'dtype') or sel.dtype != jnp.bool_ or sel.ndim != 2:
      raise ValueError(f'select must be a bool array [L, N], got '
                       f'{getattr(sel, "dtype", type(sel).__name__)} '
                       f'{getattr(sel, "shape", "")}.')

  @property
  def stage(self) -> str:  # pytype: disable=signature-mismatch
    return self.inner.stage

  def _where(self, new, old, site, axis):
    mask = self.select[site.layer]  # [N]
    if mask.shape[0] != old.shape[axis]:
      raise ValueError(f'select has {mask.shape[0]} heads, the layer '
                       f'{old.shape[axis]}.')
    shape = [1] * old.ndim
    shape[axis] = old.shape[axis]
    return jnp.where(mask.reshape(shape), new, old)

  def edit_logits(self, logits, site):
    if self.inner.stage != 'logits':
      return logits
    return self._where(self.inner.edit_logits(logits, site), logits, site, 1)

  def edit_probs(self, probs, site):
    if self.inner.stage != 'probs':
      return probs
    return self._where(self.inner.edit_probs(probs, site), probs, site, 1)

  def edit_output(self, out, site):
    if self.inner.stage != 'output':
      return out
    return self._where(self.inner.edit_output(out, site), out, site, 2)


def check_interventions(interventions: Sequence[base.Intervention],
                        config: decoder_lib.DecoderConfig) -> None:
  """ValueError naming the intervention whose layer or head is out of range."""
  for iv in interventions:
    for name, limit in (('layers', config.depth), ('heads', config.num_heads)):
      values = getattr(iv, name)
      if values is not None and max(values) >= limit:
        raise ValueError(
            f'{iv.name}: {name} {tuple(values)} out of range; the model has '
            f'{limit} {name} (0..{limit - 1}).')


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  reps = np.concatenate([np.arange(x.shape[0]),
                         np.arange(rows - x.shape[0]) % x.shape[0]])
  return x[reps]


def _forward(graphdef, state, tokens, mask, interventions, record):
  model = nnx.merge(graphdef, state)
  return model(tokens, attention_mask=mask, interventions=interventions,
               record=record)


# Module-level and keyed on the (hashable) graph definition, so every runner of
# the same architecture shares the compiled programs.
@functools.partial(jax.jit, static_argnums=(0,))
def _correct_fn(graphdef, state, tokens, mask, positions, answers, candidates,
                interventions):
  out = _forward(graphdef, state, tokens, mask, interventions, None)
  logits = jnp.take_along_axis(out.logits, positions[..., None], 1)  # [B, A, V]
  restricted = jnp.take(logits, candidates, axis=-1)  # [B, A, C]
  return candidates[jnp.argmax(restricted, -1)] == answers  # [B, A]


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=('hidden',))
def _analyse_fn(graphdef, state, tokens, mask, positions, sources, dims, *,
                hidden: bool):
  record = base.Record(probs=True, hidden=hidden)
  out = _forward(graphdef, state, tokens, mask, (), record)
  valid = jnp.ones(tokens.shape, bool) if mask is None else mask
  visible = analysis.causal_visible(valid)  # [B, 1, T, T]
  per_layer = []
  for layer in sorted(out.records):
    rec = out.records[layer]
    probs = rec['probs']  # [B, N, T, S]
    # vmap over the batch: per-example sums, so padded rows can be dropped.
    entropy = jax.vmap(lambda p, v: analysis.attention_entropy(
        p[None], v[None]))(probs, visible)
    hits = jax.vmap(lambda p, a, s: analysis.retrieval_hits(
        p[None], a[None], s[None]))(probs, positions, sources)
    row = {'sink_scores': analysis.sink_scores(probs, visible),  # [B, N, S]
           **entropy,  # entropy_sum, normalized_sum [B, N]; rows [B]
           'hits': hits['hits'], 'copies': hits['copies']}  # [B, N], [B]
    if hidden:
      x = rec['hidden']  # [B, T, D]
      row['max_abs'] = jnp.max(jnp.where(valid[..., None], jnp.abs(x), 0.0),
                               1)  # [B, D]
      row['phi'] = jnp.where(valid, analysis.massive_ratio(x, dims), 0.0)
    per_layer.append(row)
  return {k: jnp.stack([r[k] for r in per_layer]) for k in per_layer[0]}


class ModelRunner:
  """Batched, jitted forward passes of one decoder."""

  def __init__(self, model: decoder_lib.CausalDecoder, *, batch_size: int):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
        batch_size < 1):
      raise ValueError(f'batch_size must be an int >= 1, got {batch_size!r}.')
    self.config = model.config
    self.graphdef, self.state = nnx.split(model)
    self.batch_size = batch_size

  # ----- host -----
  def _batches(self, examples: tasks_lib.Examples):
    n = len(examples)
    b = min(self.batch_size, n)
    padded = -(-n // b) * b
    mask_all = bool(examples.attention_mask.all())
    arrays = [_pad_rows(x, padded) for x in (
        examples.tokens, examples.attention_mask, examples.answer_positions,
        examples.answer_tokens, examples.sources)]
    for start in range(0, padded, b):
      tok, mask, pos, ans, src = (a[start:start + b] for a in arrays)
      keep = max(0, min(b, n - start))
      yield keep, (jnp.asarray(tok), None if mask_all else jnp.asarray(mask),
                   jnp.asarray(pos), jnp.asarray(ans), jnp.asarray(src))

  def correct(self, examples: tasks_lib.Examples,
              interventions: Sequence[base.Intervention] = ()) -> np.ndarray:
    """bool [E, A]: argmax over the candidates equals the answer."""
    check_interventions(interventions, self.config)
    if examples.candidates.max() >= self.config.vocab_size:
      raise ValueError(f'the task uses token {examples.candidates.max()}, beyond '
                       f'the model\'s vocab_size={self.config.vocab_size}.')
    candidates = jnp.asarray(examples.candidates)
    out = []
    for keep, (tok, mask, pos, ans, _) in self._batches(examples):
      got = _correct_fn(self.graphdef, self.state, tok, mask, pos, ans, candidates,
                          tuple(interventions))
      out.append(np.asarray(got)[:keep])
    return np.concatenate(out)

  def accuracy(self, examples: tasks_lib.Examples,
               interventions: Sequence[base.Intervention] = ()) -> float:
    return float(np.mean(self.correct(examples, interventions)))

  def analyse(self, examples: tasks_lib.Examples, dims: np.ndarray | None = None,
              *, hidden: bool = True) -> dict[str, np.ndarray]:
    """Per-layer arrays over the examples (leading axes [L, E, ...]).

    Keys: 'sink_scores' [L, E, N, T], 'entropy_sum' / 'normalized_sum' [L, E, N],
    'rows' / 'normalized_rows' [L, E], 'hits' [L, E, N], 'copies' [L, E]; with
    `hidden`:
    'max_abs' [L, E, D] and 'phi' [L, E, T] (phi over `dims`; pass as many dims
    in every call to reuse one compiled program).
    """
    if examples.tokens.max() >= self.config.vocab_size:
      raise ValueError(f'the task uses token {examples.tokens.max()}, beyond '
                       f'the model\'s vocab_size={self.config.vocab_size}.')
    d = jnp.asarray(np.zeros((1,), np.int32) if dims is None else dims,
                    jnp.int32)
    if d.ndim != 1 or not d.size or d.max() >= self.config.dim or d.min() < 0:
      raise ValueError(f'dims must be a non-empty [k] of dims in [0, '
                       f'{self.config.dim}), got {np.asarray(d)}.')
    parts = []
    for keep, (tok, mask, pos, _, src) in self._batches(examples):
      got = _analyse_fn(self.graphdef, self.state, tok, mask, pos, src, d,
                        hidden=hidden)
      parts.append({k: np.asarray(v)[:, :keep] for k, v in got.items()})
    return {k: np.concatenate([p[k] for p in parts], 1) for k in parts[0]}
