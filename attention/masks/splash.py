"""Interop with JAX splash-attention mask objects (Pallas TPU ops).

`to_splash` maps our masks onto `splash_attention_mask` classes (CausalMask, LocalMask,
ChunkedCausalMask, FullMask, LogicalAnd / LogicalOr, MultiHeadMask), falling back to a
dense NumpyMask for patterns splash has no lazy form for; `from_splash` maps back.
`splash_equal` checks equality by materialising both sides.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from attention.masks import base
from attention.masks import static


def _splash():
  # Imported lazily: Pallas TPU ops are only needed for interop.
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_mask)
  return splash_attention_mask


def to_splash(mask: base.Mask, allow_dense: bool = True) -> Any:
  """A splash-attention mask equivalent to `mask`.

  Args:
    mask: any Mask; head-dependent masks become a MultiHeadMask.
    allow_dense: permit a dense NumpyMask for masks without a lazy splash form
      (else such masks raise ValueError).
  """
  sm = _splash()
  if not isinstance(mask, base.Mask):
    raise TypeError(f'mask must be a Mask, got {type(mask).__name__}.')
  if mask.head_dependent:
    return sm.MultiHeadMask(
        [to_splash(mask.head(h), allow_dense) for h in range(mask.num_heads)])
  shape = tuple(int(n) for n in mask.shape)
  if isinstance(mask, base.Causal):
    return sm.CausalMask(shape, offset=mask.offset)
  if isinstance(mask, static.SlidingWindow):
    return sm.LocalMask(shape, (mask.left, mask.right), mask.offset)
  if isinstance(mask, static.ChunkedCausal):
    return sm.ChunkedCausalMask(shape, mask.chunk)
  if isinstance(mask, static.Full):
    return sm.FullMask(shape)
  if isinstance(mask, base.And):
    return sm.LogicalAnd(to_splash(mask.a, allow_dense),
                         to_splash(mask.b, allow_dense))
  if isinstance(mask, base.Or):
    return sm.LogicalOr(to_splash(mask.a, allow_dense),
                        to_splash(mask.b, allow_dense))
  if isinstance(mask, base.Dense):
    return sm.NumpyMask(np.array(mask.array))
  if not allow_dense:
    raise ValueError(
        f'{type(mask).__name__} has no lazy splash form; pass allow_dense=True '
        'to use a dense NumpyMask.')
  return sm.NumpyMask(np.array(mask.materialize()))


def from_splash(obj: Any) -> base.Mask:
  """Our Mask equivalent to a splash-attention mask object."""
  sm = _splash()
  if not isinstance(obj, sm.Mask):
    raise TypeError(
        f'obj must be a splash_attention_mask.Mask, got {type(obj).__name__}.')
  if isinstance(obj, sm.MultiHeadMask):
    return static.per_head([from_splash(m) for m in obj.masks])
  shape = tuple(int(n) for n in obj.shape)
  if len(shape) != 2:
    raise ValueError(f'obj must be a 2-D splash mask, got shape {shape}.')
  if isinstance(obj, sm.CausalMask):
    return base.Causal(shape, int(obj.offset))
  if isinstance(obj, sm.LocalMask):
    left, right = obj.window_size
    return static.sliding_window(shape[0], left, right, kv_len=shape[1],
                                 offset=int(obj.offset))
  if isinstance(obj, sm.ChunkedCausalMask):
    return static.chunked_causal(shape[0], int(obj.chunk_size), shape[1])
  if isinstance(obj, sm.FullMask):
    return static.full(*shape)
  if isinstance(obj, sm.LogicalAnd):
    return from_splash(obj.left) & from_splash(obj.right)
  if isinstance(obj, sm.LogicalOr):
    return from_splash(obj.left) | from_splash(obj.right)
  if isinstance(obj, sm.NumpyMask):
    return base.from_array(np.asarray(obj.array, dtype=bool))
  return base.from_array(np.asarray(obj[0:shape[0], 0:shape[1]], dtype=bool))


def materialize_splash(obj: Any) -> np.ndarray:
  """Dense bool array of a splash mask: [T, S] or [H, T, S] for MultiHeadMask."""
  sm = _splash()
  if isinstance(obj, sm.MultiHeadMask):
    return np.stack([materialize_splash(m) for m in obj.masks])
  t, s = obj.shape
  return np.asarray(obj[0:t, 0:s], dtype=bool)


def splash_equal(mask: base.Mask, obj: Any) -> bool:
  """Whether `mask` and the splash mask `obj` are the same (materialised) pattern."""
  ours = mask.materialize()
  theirs = materialize_splash(obj)
  return ours.shape == theirs.shape and bool(np.array_equal(ours, theirs))
