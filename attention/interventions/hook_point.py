"""`attend`: one attention call with per-(layer, head) interventions and a recorder.

The hook point a model calls in place of `attention.dot_product_attention` when an
intervention applies to its layer or the layer is recorded. Dense path:

    logits = scale q k^T                      [B, N, T, S]
    logits = -inf where not visible (site)    rows that see nothing give zeros
    logits = edit_logits(...) in order        (interventions with stage 'logits')
    probs  = softmax(logits)
    probs  = edit_probs(...) in order         (stage 'probs')
    out    = probs v                          [B, T, N, Hv]
    out    = edit_output(...) in order        (stage 'output')

Blocked path (`attention.interventions.blocked`): the same result without any
[T, S] array, for the interventions with an exact blocked form.

Einsum letters: b batch, t query position, s key position, k kv head, g query heads
per kv head (N = K * G), h head dim, v value dim.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import api
from attention.interventions import base
from attention.interventions import blocked as blocked_lib

__all__ = ['attend', 'blocked_unsupported', 'dense_logits', 'masked_softmax']

DENSE_LIMIT = 2 ** 20  # 'auto': dense when T * S is at most this (per head).
_METHODS = ('auto', 'dense', 'blocked')
_PRECISION = jax.lax.Precision.HIGHEST


dense_logits = blocked_lib.scaled_logits  # scale q k^T [B, N, T, S], the one copy


def masked_softmax(logits: jax.Array) -> jax.Array:
  """softmax over the last axis; rows that are all -inf give zeros (and zero grads)."""
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.exp(logits - m)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


def _probs_times_v(probs: jax.Array, v: jax.Array) -> jax.Array:
  """[B, N, T, S] x [B, S, K, Hv] -> [B, T, N, Hv]."""
  b, n, t, s = probs.shape
  kh = v.shape[2]
  pg = probs.reshape(b, kh, n // kh, t, s)  # [B, K, G, T, S]
  out = jnp.einsum('bkgts,bskv->btkgv', pg, v, precision=_PRECISION)  # [B, T, K, G, Hv]
  return out.reshape(b, t, n, v.shape[-1])


def _stage(ivs, stage):
  return [iv for iv in ivs if iv.stage == stage]


def blocked_unsupported(interventions: Sequence[base.Intervention],
                        record: base.Record | None) -> str | None:
  """Why these edits / this record need the dense map (None: blocked is exact)."""
  if record is not None and record.needs_dense:
    return 'record.probs / record.logits need the [T, S] map'
  scaled = [iv.name for iv in interventions if iv.blocked == 'query_scale']
  unmasked = [iv.name for iv in interventions if iv.stage == 'logits' and
              iv.blocked == 'logit_mod' and not iv.logit_mask]
  if scaled and unmasked:
    return (f'the logit scale of {scaled[0]} does not commute with {unmasked[0]} '
            '(not a mask)')
  seen_probs = None
  for iv in interventions:
    if iv.blocked is None:
      return f'{iv.name} has no blocked form'
    if iv.stage == 'probs':
      if iv.blocked == 'probs':
        if seen_probs is not None:
          return (f'two probability edits ({seen_probs}, {iv.name}) do not compose '
                  'blocked')
        seen_probs = iv.name
      elif iv.blocked == 'logit_mod' and seen_probs is not None:
        return (f'{iv.name} after {seen_probs} is not a logit edit of the original '
                'probabilities')
  return None


def _check_inputs(q, k, v, site):
  for name, x in (('q', q), ('k', k), ('v', v)):
    if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or len(x.shape) != 4:
      raise ValueError(f'{name} must be an array of rank 4, got '
                       f'{getattr(x, "shape", type(x).__name__)}.')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f'{name} must have a floating dtype, got {x.dtype}.')
  b, t, n, h = q.shape
  if k.shape[0] != b or v.shape[0] != b:
    raise ValueError(f'k and v batch must equal q batch ({b}), got {k.shape[0]}, '
                     f'{v.shape[0]}.')
  if k.shape[3] != h:
    raise ValueError(f'k head_dim must equal q head_dim ({h}), got {k.shape[3]}.')
  if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
    raise ValueError(f'v [B, S, K, Hv] must match k in S and K, got v '
                     f'{tuple(v.shape)}, k {tuple(k.shape)}.')
  if n % k.shape[2]:
    raise ValueError(f'q heads ({n}) must be a multiple of k heads ({k.shape[2]}).')
  if not isinstance(site, base.AttentionSite):
    raise TypeError(f'site must be an AttentionSite, got {type(site).__name__}.')
  site.check(b, t, k.shape[1])


def attend(q: jax.Array, k: jax.Array, v: jax.Array, site: base.AttentionSite,
           interventions: Sequence[base.Intervention] = (),
           record: base.Record | None = None, *, method: str = 'auto',
           implementation: str | None = 'xla', block: int = 256
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Softmax attention of one site with interventions; optionally records.

  Args:
    q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, Hv] (N a multiple of K).
    site: the `AttentionSite` (visibility, layer, scale, hidden state).
    interventions: applied in order within each stage (logits, probs, output); those
      whose `layers` exclude `site.layer` are skipped.
    record: what to capture at this layer, or None.
    method: 'dense', 'blocked' (no [T, S] array; ValueError when an edit or the
      record needs the dense map), or 'auto' (dense when T * S <= 2**20 or when
      blocked cannot do it).
    implementation: the `attention.dot_product_attention` implementation of the
      blocked path ('xla' by default: its score_mod reads the site's positions by
      gathers).
    block: query rows per block of the blocked path's second passes (<= 256).

  Returns:
    (out [B, T, N, Hv] in q's dtype, records): records has 'probs' / 'logits'
    [B, N, T, S], 'head_outputs' [B, T, N, Hv] (after all edits) and 'hidden' as
    asked by `record` for this layer (empty otherwise).
  """
  _check_inputs(q, k, v, site)
  if method not in _METHODS:
    raise ValueError(f'method must be one of {_METHODS}, got {method!r}.')
  if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= 256:
    raise ValueError(f'block must be an int in [1, 256], got {block!r}.')
  interventions = base.as_interventions(interventions)
  if record is not None and not isinstance(record, base.Record):
    raise TypeError(f'record must be a Record or None, got {type(record).__name__}.')
  b, t, n, _ = q.shape
  s, hv = k.shape[1], v.shape[3]
  shapes = dict(B=b, T=t, S=s, N=n, K=k.shape[2], Hv=hv)
  for iv in interventions:
    iv.check_layers(site.num_layers)
  active = [iv for iv in interventions if iv.applies_to(site.layer)]
  for iv in active:
    iv.head_mask(n)
    iv.check_shapes(site, shapes)
  rec = record if record is not None and record.applies_to(site.layer) else None
  if rec is not None and rec.hidden and site.hidden is None:
    raise ValueError('record.hidden needs site.hidden (the layer input), got None.')
  reason = blocked_unsupported(active, rec)
  if method == 'blocked' and reason:
    raise ValueError(f"method='blocked' cannot run these edits: {reason}; use "
                     "method='dense' or 'auto'.")
  use_dense = method == 'dense' or (method == 'auto' and (
      reason is not None or t * s <= DENSE_LIMIT))
  if use_dense:
    out, records = _dense(q, k, v, site, tuple(active), rec)
  else:
    out, records = _blocked(q, k, v, site, tuple(active), implementation, block)
  if rec is not None and rec.head_outputs:
    records['head_outputs'] = out
  if rec is not None and rec.hidden:
    records['hidden'] = site.hidden
  return out.astype(q.dtype), records


# Jitted (one compilation instead of op-by-op dispatch when called eagerly; inlined
# under an outer jit). Interventions and the site are pytrees, `rec` is static.
@functools.partial(jax.jit, static_argnames=('rec',))
def _dense(q, k, v, site, active, rec):
  cdt = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
  logits = dense_logits(q.astype(cdt), k.astype(cdt), site.scale)  # [B, N, T, S]
  logits = jnp.where(site.visible(), logits, jnp.asarray(-jnp.inf, cdt))
  for iv in _stage(active, 'logits'):
    logits = iv.edit_logits(logits, site)
  probs = masked_softmax(logits)
  for iv in _stage(active, 'probs'):
    probs = iv.edit_probs(probs, site)
  out = _probs_times_v(probs, v.astype(cdt))  # [B, T, N, Hv]
  for iv in _stage(active, 'output'):
    out = iv.edit_output(out, site)
  records = {}
  if rec is not None and rec.probs:
    records['probs'] = probs
  if rec is not None and rec.logits:
    records['logits'] = logits
  return out, records


@functools.partial(jax.jit, static_argnames=('implementation', 'block'))
def _blocked(q, k, v, site, active, implementation, block):
  n = q.shape[2]
  scale = np.ones((n,), np.float32)
  for iv in active:
    if iv.blocked == 'query_scale':
      scale = scale * iv.query_scale(n)
  if not np.all(scale == 1.0):
    q = q * jnp.asarray(scale, q.dtype)[:, None]
  logit_ivs = [iv for iv in _stage(active, 'logits') if iv.blocked == 'logit_mod'] + [
      iv for iv in _stage(active, 'probs') if iv.blocked == 'logit_mod']
  mod = blocked_lib.make_score_mod(site, logit_ivs, n)
  out, lse = api.dot_product_attention(
      q, k, v, scale=site.scale, score_mod=mod, return_residuals=True,
      implementation=implementation)
  cdt = jnp.promote_types(jnp.result_type(q, k, v), jnp.float32)
  out = out.astype(cdt)
  prob_ivs = [iv for iv in _stage(active, 'probs') if iv.blocked == 'probs']
  if prob_ivs:
    ctx = blocked_lib.BlockedContext(q=q, k=k, v=v, site=site, mod=mod, out=out,
                                     lse=lse, block=block,
                                     implementation=implementation)
    out = prob_ivs[0].blocked_probs(ctx).astype(cdt)
  for iv in _stage(active, 'output'):
    out = iv.edit_output(out, site)
  return out, {}
