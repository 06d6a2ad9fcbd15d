"""`dot_product_attention`: the one softmax-attention entry point.

Validates and normalises the inputs once, then dispatches to a registered
implementation ('reference', 'xla', 'pallas_tpu', 'pallas_gpu', ...). An
implementation is a module exposing

    attention(query, key, value, *, scale, bias, mask, mask_obj, logits_soft_cap,
              sinks, q_segment_ids, kv_segment_ids, return_residuals)

and optionally `unsupported(query, key, value, **same_kwargs) -> str | None` (a reason
it cannot run these inputs, used by automatic selection and to raise clear errors). Adding one is a file
plus one `register_implementation` line (or an entry in `_BUILTIN`).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention.masks import base as masks_base

# name -> module path (imported lazily, so kernels may import `attention`).
_BUILTIN: dict[str, str] = {
    'reference': 'attention.reference',
    'xla': 'kernels.xla',
    'pallas_tpu': 'kernels.pallas.tpu',
    'pallas_gpu': 'kernels.pallas.gpu',
}
_REGISTRY: dict[str, Any] = dict(_BUILTIN)

# Preference order per backend for implementation=None.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    'cpu': ('xla', 'reference'),
    'gpu': ('pallas_gpu', 'xla', 'reference'),
    'tpu': ('pallas_tpu', 'xla', 'reference'),
}


def register_implementation(name: str, module: str | Any) -> None:
  """Registers an implementation: a module path or a module-like object."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'name must be a non-empty str, got {name!r}.')
  _REGISTRY[name] = module


def available_implementations() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _load(name: str):
  target = _REGISTRY[name]
  if isinstance(target, str):
    target = importlib.import_module(target)
    _REGISTRY[name] = target
  return target


def _select(implementation: str | None, backend: str, arrays: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Callable[..., Any]:
  """The implementation function; `arrays` = (query, key, value)."""
  if implementation is not None:
    if implementation not in _REGISTRY:
      raise ValueError(
          f'implementation must be one of {available_implementations()} or None, '
          f'got {implementation!r}.')
    module = _load(implementation)
    check = getattr(module, 'unsupported', None)
    reason = check(*arrays, **kwargs) if check is not None else None
    if reason:
      raise ValueError(
          f'implementation={implementation!r} does not support these inputs: '
          f'{reason}.')
    return module.attention
  for name in _PREFERENCE.get(backend, ('xla', 'reference')):
    if name not in _REGISTRY:
      continue
    module = _load(name)
    check = getattr(module, 'unsupported', None)
    if check is None or not check(*arrays, **kwargs):
      return module.attention
  return _load('reference').attention


def _normalize_segment_ids(segment_ids, b, t, s):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
          'segment_ids must be an array [B, T] or a pair (q_segment_ids [B, T], '
          f'kv_segment_ids [B, S]), got a sequence of length {len(segment_ids)}.')
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
    if t != s:
      raise ValueError(
          'segment_ids must be a pair (q_segment_ids, kv_segment_ids) for '
          f'cross-attention (T={t} != S={s}).')
  for name, seg, length in (('q_segment_ids', q_seg, t),
                            ('kv_segment_ids', kv_seg, s)):
    _checks.check_array(name, seg, ndim=2)
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise TypeError(f'{name} must have an integer dtype, got {seg.dtype}.')
    if tuple(seg.shape) != (b, length):
      raise ValueError(
          f'{name} must have shape {(b, length)}, got {tuple(seg.shape)}.')
  return q_seg, kv_seg


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | masks_base.Mask | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sinks: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    return_residuals: bool = False,
    implementation: str | None = None,
):
  """Scaled dot-product softmax attention ("Attention Is All You Need").

  logits = soft_cap(scale * q k^T) + bias, restricted to the visible keys (mask AND
  causal AND same segment); out = softmax(logits) v. With sinks, each head's softmax
  denominator has one more term exp(sink_h) whose value is zero (the learnable sink of
  "Efficient Streaming Language Models with Attention Sinks" as used in gpt-oss).

  Args:
    query: [B, T, N, H].
    key: [B, S, K, H], N a multiple of K (GQA/MQA: query head n uses kv head
      n // (N // K)).
    value: [B, S, K, H_v].
    bias: additive logits, broadcastable to [B, N, T, S] (rank 4).
    mask: boolean array broadcastable to [B, N, T, S] (True = visible), or a
      `attention.masks.Mask` of shape (T, S) (head-dependent masks: N heads).
    is_causal: also apply k <= q (top-left aligned, as `jax.nn.dot_product_attention`).
    scale: logits scale, default 1 / sqrt(H).
    logits_soft_cap: c > 0 gives c * tanh(logits / c) (Gemma 2), before the bias.
    sinks: [N] per-head sink logits (differentiable).
    segment_ids: [B, T] int (self-attention) or a pair ([B, T], [B, S]); tokens attend
      only within their segment (packed sequences).
    return_residuals: also return the log-sum-exp [B, N, T] (float32; -inf where a row
      sees nothing).
    implementation: 'reference', 'xla', 'pallas_tpu', 'pallas_gpu' or None (best
      available for the default backend).

  Returns:
    out [B, T, N, H_v] in query's dtype (zeros for rows that see nothing), and the
    log-sum-exp if `return_residuals`.
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, h = query.shape
  _checks.check_equal('key', 'batch (dim 0)', key.shape[0], b, 'query batch')
  _checks.check_equal('value', 'batch (dim 0)', value.shape[0], b,
                      'query batch')
  _checks.check_equal('key', 'head_dim (dim 3)', key.shape[3], h,
                      'query head_dim')
  s, kh = key.shape[1], key.shape[2]
  _checks.check_equal('value', 'length (dim 1)', value.shape[1], s,
                      'key length')
  _checks.check_equal('value', 'heads (dim 2)', value.shape[2], kh,
                      'key heads')
  if n % kh:
    raise ValueError(
        f'query heads ({n}) must be a multiple of key/value heads ({kh}).')
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  _checks.check_positive('scale', scale)
  _checks.check_positive('logits_soft_cap', logits_soft_cap)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f'is_causal must be a bool, got {type(is_causal).__name__}.')
  target = (b, n, t, s)
  if bias is not None:
    _checks.check_array('bias', bias, floating=True)
    _checks.check_broadcastable('bias', bias.shape, target, '[B, N, T, S]')
  mask_array, mask_obj = None, None
  if isinstance(mask, masks_base.Mask):
    if tuple(mask.shape) != (t, s):
      raise ValueError(
          f'mask must have shape (T, S) = {(t, s)}, got {tuple(mask.shape)}.')
    if mask.head_dependent and mask.num_heads != n:
      raise ValueError(
          f'mask num_heads must equal query heads ({n}), got {mask.num_heads}.')
    mask_obj = mask
  elif mask is not None:
    _checks.check_array('mask', mask)
    if mask.dtype != jnp.bool_:
      raise TypeError(f'mask must have dtype bool, got {mask.dtype}.')
    _checks.check_broadcastable('mask', mask.shape, target, '[B, N, T, S]')
    mask_array = mask
  if is_causal:
    causal = masks_base.causal(t, s)
    mask_obj = causal if mask_obj is None else mask_obj & causal
  if sinks is not None:
    _checks.check_array('sinks', sinks, ndim=1, floating=True)
    _checks.check_equal('sinks', 'length', sinks.shape[0], n, 'query heads')
  q_seg, kv_seg = _normalize_segment_ids(segment_ids, b, t, s)
  if not isinstance(return_residuals, (bool, np.bool_)):
    raise TypeError('return_residuals must be a bool, got '
                    f'{type(return_residuals).__name__}.')
  kwargs = dict(scale=float(scale), bias=bias, mask=mask_array,
                mask_obj=mask_obj,
                logits_soft_cap=(None if logits_soft_cap is None else
                                 float(logits_soft_cap)),
                sinks=sinks, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                return_residuals=bool(return_residuals))
  if implementation is not None and not isinstance(implementation, str):
    raise TypeError(
        f'implementation must be a str or None, got {type(implementation).__name__}.')
  fn = _select(implementation, jax.default_backend(), (query, key, value),
               kwargs)
  return fn(query, key, value, **kwargs)
