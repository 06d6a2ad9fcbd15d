"""Carried prefix sums for the causal forms built on running statistics (InLine, Flow).

Their causal outputs are functions of prefix sums (of keys, values, flows, a
log-sum-exp, a position count) and of one linear-attention prefix product. Carrying
those sums as a state gives chunked prefill, token-by-token decoding and packed
variable-length batches, with the conventions of `attention.linear._core`: the
initial state belongs to the first segment, every segment boundary (a change of
`segment_ids`) resets all sums to zero, the final state is the state after the last
token.

Here: segmented cumulative sums / log-sum-exps (an associative scan over (reset flag,
value) pairs, exact, no subtraction of cumulative sums), and validation of the
states (NamedTuples of arrays) and segment ids.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from attention import _checks
from attention.linear import _core


def check_segments(segment_ids: Any, b: int, t: int, causal: bool
                  ) -> jax.Array | None:
  """[B, T] integer segment ids -> [B, T] bool, True where a new segment starts."""
  if segment_ids is None:
    return None
  if not causal:
    raise ValueError('segment_ids requires causal=True.')
  _checks.check_array('segment_ids', segment_ids)
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise TypeError(
        f'segment_ids must have an integer dtype, got {segment_ids.dtype}.')
  if tuple(segment_ids.shape) != (b, t):
    raise ValueError(f'segment_ids must have shape {(b, t)} [B, T], got '
                     f'{tuple(segment_ids.shape)}.')
  runs = _core.runs_from_segments(segment_ids)
  return jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]],
                         axis=1)


def runs_from_resets(reset: jax.Array) -> jax.Array:
  """[B, T] bool starts -> [B, T] int32 run index (0 for the first segment)."""
  return jnp.cumsum(reset.astype(jnp.int32), axis=1)


def check_state(initial_state: Any, cls: type, shapes: dict[str, tuple[int, ...]],
                dtype: Any, causal: bool) -> NamedTuple | None:
  """Validates a state NamedTuple (or a plain tuple in its field order) and casts it.

  `shapes` maps each field of `cls` to its expected shape.
  """
  if initial_state is None:
    return None
  if not causal:
    raise ValueError('initial_state requires causal=True.')
  fields = cls._fields
  if not isinstance(initial_state, tuple) or len(initial_state) != len(fields):
    raise ValueError(
        f'initial_state must be a {cls.__name__} ({", ".join(fields)}) as returned '
        f'by the causal forms, got {type(initial_state).__name__}.')
  out = []
  for name, arr in zip(fields, initial_state):
    _checks.check_array(f'initial_state.{name}', arr, floating=True)
    if tuple(arr.shape) != shapes[name]:
      raise ValueError(f'initial_state.{name} must have shape {shapes[name]}, got '
                       f'{tuple(arr.shape)}.')
    out.append(arr.astype(dtype))
  return cls(*out)


def segment_scan(x: jax.Array, reset: jax.Array | None,
                 init: jax.Array | None = None, *,
                 op: Callable[[jax.Array, jax.Array], jax.Array] = jnp.add
                ) -> jax.Array:
  """Inclusive prefix reduction along axis 1 that restarts where `reset` is True.

  Args:
    x: [B, T, ...].
    reset: None or [B, T] bool (True: this token starts a new segment).
    init: None or [B, ...], combined into the first token (the first segment's
      carried state).
    op: jnp.add (sums) or jnp.logaddexp (log-sum-exps).

  Returns:
    [B, T, ...] with out_t = op-reduction of x_s over s <= t in t's segment.
  """
  if init is not None:
    x = x.at[:, 0].set(op(init, x[:, 0]))
  if reset is None:
    return jnp.cumsum(x, axis=1) if op is jnp.add else lax.cumlogsumexp(x, axis=1)
  flag = jnp.broadcast_to(reset.reshape(reset.shape + (1,) * (x.ndim - 2)),
                          x.shape)

  def combine(a, b):
    (fa, va), (fb, vb) = a, b
    return fa | fb, jnp.where(fb, vb, op(va, vb))

  return lax.associative_scan(combine, (flag, x), axis=1)[1]
