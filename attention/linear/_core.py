"""Shared core of the linear-attention family: one decayed recurrence, three forms.

Every causal variant of the family is an instance of

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t,

with a per-step log-decay g_t <= 0 that is absent (linear attention), a constant per
head (lightning attention, retention) or data-dependent, scalar per head or per key
dimension (gated linear attention). Unrolled, o_t = sum_{s<=t} exp(G_t - G_s)
(q_t . k_s) v_s + exp(G_t) q_t S_0 with G_t = sum_{j<=t} g_j, which is the naive
quadratic form. As in flash-linear-attention (Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2024), three forms compute it:

* `naive`: the quadratic form [(Q K^T) * D] V with D_ts = exp(G_t - G_s) (the oracle).
* `recurrent`: a `lax.scan` over time (decoding, one token at a time).
* `chunked`: chunks of C tokens (Lightning Attention-2, Qin et al. 2024): inside a
  chunk the quadratic form with decays relative to the chunk start, between chunks the
  carried state. Every exponent is a difference G_t - G_s with s <= t or a cumulative
  log-decay inside one chunk, so it is <= 0: no overflow however strong the decay.

Packed variable-length batches: `segment_ids` [B, T]; wherever the id changes the
state is reset to zero (exactly: tokens of different segments never interact). The
initial state belongs to the first segment; the final state is the state after the last
token (of the last segment).

Einsum letters: b batch, t / s query / key position, c chunk, n head, k key feature
(H_k), v value feature (H_v).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from attention import _checks

DEFAULT_CHUNK_SIZE = 64
DEFAULT_VECTOR_CHUNK_SIZE = 16


class Inputs(NamedTuple):
  """Validated inputs in the compute dtype; k / v repeated to the query heads."""
  q: jax.Array  # [B, T, N, K], scaled
  k: jax.Array  # [B, T, N, K]
  v: jax.Array  # [B, T, N, V]
  g: jax.Array | None  # [B, T, N] or [B, T, N, K] log-decays, or None
  initial_state: jax.Array | None  # [B, N, K, V]
  runs: jax.Array | None  # [B, T] int32 run index (0 for the first segment)
  out_dtype: Any


def is_concrete(x: Any) -> bool:
  return not isinstance(x, jax.core.Tracer)


def compute_dtype(*arrays: Any) -> Any:
  """float64 if any input is float64, else float32 (bfloat16 accumulates in f32)."""
  for a in arrays:
    if a is not None and jnp.dtype(a.dtype) == jnp.float64:
      return jnp.float64
  return jnp.float32


def check_chunk_size(chunk_size: Any) -> int:
  if isinstance(chunk_size, bool) or not isinstance(chunk_size,
                                                    (int, np.integer)):
    raise TypeError(
        f'chunk_size must be a positive int, got {type(chunk_size).__name__}.')
  if chunk_size <= 0:
    raise ValueError(f'chunk_size must be a positive int, got {chunk_size}.')
  return int(chunk_size)


def runs_from_segments(segment_ids: jax.Array) -> jax.Array:
  """[B, T] segment ids -> [B, T] int32 run index, +1 wherever the id changes."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], jnp.int32),
       jnp.cumsum(change.astype(jnp.int32), axis=1)], axis=1)


def validate(query, key, value, *, log_decay=None, log_decay_name='log_decay',
             initial_state=None, segment_ids=None, scale=None, causal=True,
             state_value_dim=None) -> Inputs:
  """Checks shapes, repeats k / v to the query heads (GQA), scales q.

  Args:
    query, key, value: [B, T, N, K], [B, T, N_kv, K], [B, T, N_kv, V].
    log_decay: None or [B, T, N] / [B, T, N, K] per-step log-decays.
    log_decay_name: the argument name used in error messages.
    initial_state: None or [B, N, K, V'] with V' = `state_value_dim` (default V).
    segment_ids: None or [B, T] integer ids.
    scale: multiplies q . k (default K ** -0.5).
    causal: False forbids an initial state and decays.
    state_value_dim: the value width of the state (V + 1 for normalised forms).
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, hk = query.shape
  if key.shape[:2] != (b, t) or value.shape[:2] != (b, t):
    raise ValueError(
        f'key and value must share the batch and length of query {(b, t)} '
        f'[B, T], got key {tuple(key.shape)} and value {tuple(value.shape)}.')
  if key.shape[-1] != hk:
    raise ValueError(f'key head_dim must equal query head_dim ({hk}), got '
                     f'{key.shape[-1]}.')
  if value.shape[2] != key.shape[2]:
    raise ValueError(f'value heads must equal key heads ({key.shape[2]}), got '
                     f'{value.shape[2]}.')
  kh = key.shape[2]
  if kh == 0 or n % kh:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads '
                     f'({kh}).')
  hv = value.shape[-1]
  if scale is None:
    scale = 1.0 / math.sqrt(hk) if hk else 1.0
  elif is_concrete(scale):
    _checks.check_positive('scale', scale, allow_none=False)
  dtype = compute_dtype(query, key, value, log_decay, initial_state)
  q = query.astype(dtype) * jnp.asarray(scale, dtype)
  k = jnp.repeat(key.astype(dtype), n // kh, axis=2)
  v = jnp.repeat(value.astype(dtype), n // kh, axis=2)
  g = None
  if log_decay is not None:
    if not causal:
      raise ValueError(f'{log_decay_name} requires causal=True.')
    _checks.check_array(log_decay_name, log_decay, floating=True)
    if tuple(log_decay.shape) not in ((b, t, n), (b, t, n, hk)):
      raise ValueError(
          f'{log_decay_name} must have shape {(b, t, n)} [B, T, N] (one decay per '
          f'head) or {(b, t, n, hk)} [B, T, N, K] (per key dimension), got '
          f'{tuple(log_decay.shape)}.')
    g = log_decay.astype(dtype)
  s0 = None
  sv = hv if state_value_dim is None else state_value_dim
  if initial_state is not None:
    if not causal:
      raise ValueError('initial_state requires causal=True.')
    _checks.check_array('initial_state', initial_state, floating=True)
    if tuple(initial_state.shape) != (b, n, hk, sv):
      raise ValueError(
          f'initial_state must have shape {(b, n, hk, sv)} [B, N, K, V'
          f'{"+1" if sv != hv else ""}], got {tuple(initial_state.shape)}.')
    s0 = initial_state.astype(dtype)
  runs = None
  if segment_ids is not None:
    _checks.check_array('segment_ids', segment_ids)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise TypeError(
          f'segment_ids must have an integer dtype, got {segment_ids.dtype}.')
    if tuple(segment_ids.shape) != (b, t):
      raise ValueError(f'segment_ids must have shape {(b, t)} [B, T], got '
                       f'{tuple(segment_ids.shape)}.')
    runs = runs_from_segments(segment_ids)
  return Inputs(q, k, v, g, s0, runs, query.dtype)


def zero_state(x: Inputs) -> jax.Array:
  b, _, n, hk = x.q.shape
  return jnp.zeros((b, n, hk, x.v.shape[-1]), x.q.dtype)


def _decay_shape(g: jax.Array, like: jax.Array) -> jax.Array:
  """[..., N] -> [..., N, 1, 1] or [..., N, K] -> [..., N, K, 1] against a state."""
  return g[..., None, None] if g.ndim == like.ndim - 2 else g[..., None]


# ----------------------------------------------------------------------------
# Naive quadratic form (the oracle).


def naive(x: Inputs, *, causal: bool = True
         ) -> tuple[jax.Array, jax.Array | None]:
  """[(Q K^T) * D] V, plus the initial state's term and the final state."""
  q, k, v, g = x.q, x.k, x.v, x.g
  b, t, n, hk = q.shape
  pos = jnp.arange(t)
  vis = jnp.ones((b, t, t), bool)
  if causal:
    vis = vis & (pos[:, None] >= pos[None, :])[None]
  if x.runs is not None:
    vis = vis & (x.runs[:, :, None] == x.runs[:, None, :])
  if g is None:
    scores = jnp.einsum('btnk,bsnk->bnts', q, k)  # [B, N, T, S]
    scores = jnp.where(vis[:, None], scores, 0.0)
    big_g = None
  else:
    big_g = jnp.cumsum(g, axis=1)  # [B, T, N(, K)]
    if g.ndim == 3:
      diff = (jnp.moveaxis(big_g, 1, 2)[:, :, :, None] -
              jnp.moveaxis(big_g, 1, 2)[:, :, None, :])  # [B, N, T, S]
      decay = jnp.exp(jnp.where(vis[:, None], diff, -jnp.inf))
      scores = jnp.einsum('btnk,bsnk->bnts', q, k) * decay  # [B, N, T, S]
    else:
      gt = jnp.moveaxis(big_g, 1, 2)  # [B, N, T, K]
      diff = gt[:, :, :, None, :] - gt[:, :, None, :, :]  # [B, N, T, S, K]
      decay = jnp.exp(jnp.where(vis[:, None, :, :, None], diff, -jnp.inf))
      scores = jnp.einsum('btnk,bsnk,bntsk->bnts', q, k, decay)  # [B, N, T, S]
  out = jnp.einsum('bnts,bsnv->btnv', scores, v)  # [B, T, N, V]
  if not causal:
    return out.astype(x.out_dtype), None
  first = (jnp.ones((b, t), bool) if x.runs is None else x.runs == 0)
  last = (jnp.ones((b, t), bool) if x.runs is None else
          x.runs == x.runs[:, -1:])
  s0 = zero_state(x) if x.initial_state is None else x.initial_state
  if big_g is None:
    q_in = q
    k_w = k
    s0_decayed = s0
  else:
    q_in = q * (jnp.exp(big_g)[..., None] if g.ndim == 3 else jnp.exp(big_g))
    w = jnp.exp(big_g[:, -1:] - big_g)  # [B, T, N(, K)]
    k_w = k * (w[..., None] if g.ndim == 3 else w)
    s0_decayed = s0 * _decay_shape(jnp.exp(big_g[:, -1]), s0)
  q_in = jnp.where(first[:, :, None, None], q_in, 0.0)
  out = out + jnp.einsum('btnk,bnkv->btnv', q_in, s0)  # [B, T, N, V]
  k_w = jnp.where(last[:, :, None, None], k_w, 0.0)
  final = jnp.einsum('btnk,btnv->bnkv', k_w, v)  # [B, N, K, V]
  keep_s0 = (jnp.ones((b,), bool) if x.runs is None else x.runs[:, -1] == 0)
  final = final + jnp.where(keep_s0[:, None, None, None], s0_decayed, 0.0)
  return out.astype(x.out_dtype), final


# ----------------------------------------------------------------------------
# Recurrent form (decoding).


def _recurrent_causal(x: Inputs) -> tuple[jax.Array, jax.Array]:
  q, k, v, g = x.q, x.k, x.v, x.g
  b, t, _, _ = q.shape
  s0 = zero_state(x) if x.initial_state is None else x.initial_state
  if x.runs is None:
    reset = jnp.zeros((b, t), bool)
  else:
    reset = jnp.concatenate(
        [jnp.zeros((b, 1), bool), x.runs[:, 1:] != x.runs[:, :-1]], axis=1)
  tm = lambda a: jnp.moveaxis(a, 1, 0)
  xs = (tm(q), tm(k), tm(v), tm(reset)) + (() if g is None else (tm(g),))

  def step(state, inp):
    qt, kt, vt, rt = inp[:4]  # [B, N, K], [B, N, K], [B, N, V], [B]
    state = jnp.where(rt[:, None, None, None], 0.0, state)
    if g is not None:
      state = state * _decay_shape(jnp.exp(inp[4]), state)
    state = state + jnp.einsum('bnk,bnv->bnkv', kt, vt)  # [B, N, K, V]
    return state, jnp.einsum('bnk,bnkv->bnv', qt, state)  # [B, N, V]

  final, out = lax.scan(step, s0, xs)
  return jnp.moveaxis(out, 0, 1), final


def _flip(x: Inputs) -> Inputs:
  f = lambda a: None if a is None else jnp.flip(a, axis=1)
  return x._replace(q=f(x.q), k=f(x.k), v=f(x.v), runs=f(x.runs),
                    initial_state=None, g=None)


def _bidirectional(causal_fn, x: Inputs) -> jax.Array:
  """Non-causal out = causal + time-reversed causal - the diagonal term."""
  fwd, _ = causal_fn(x)
  bwd, _ = causal_fn(_flip(x))
  diag = jnp.einsum('btnk,btnk->btn', x.q, x.k)[..., None] * x.v
  return fwd + jnp.flip(bwd, axis=1) - diag


def recurrent(x: Inputs, *, causal: bool = True
             ) -> tuple[jax.Array, jax.Array | None]:
  """A `lax.scan` over time: S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t."""
  if causal:
    out, final = _recurrent_causal(x)
    return out.astype(x.out_dtype), final
  return _bidirectional(_recurrent_causal, x).astype(x.out_dtype), None


# ----------------------------------------------------------------------------
# Chunked parallel form (training, prefill).


def _to_chunks(a: jax.Array, nc: int, c: int) -> jax.Array:
  """[B, T', N, ...] -> [B, N, nC, C, ...] (T' = nC * C)."""
  a = a.reshape(a.shape[0], nc, c, *a.shape[2:])
  return jnp.moveaxis(a, 3, 1)


def _intra_vector(q, k, big_g, vis):
  """Per-key-dimension decayed scores, one chunk at a time (bounded memory).

  q, k, big_g: [B, N, nC, C, K]; vis [B, nC, C, C]. Returns [B, N, nC, C, C].
  """
  def one(args):
    qc, kc, gc, vc = args  # [B, N, C, K] x3, [B, C, C]
    diff = gc[:, :, :, None, :] - gc[:, :, None, :, :]  # [B, N, C, C, K]
    decay = jnp.exp(jnp.where(vc[:, None, :, :, None], diff, -jnp.inf))
    return jnp.einsum('bntk,bnsk,bntsk->bnts', qc, kc, decay)  # [B, N, C, C]

  first = lambda a: jnp.moveaxis(a, 2, 0)
  out = lax.map(one, (first(q), first(k), first(big_g), jnp.moveaxis(vis, 1, 0)),
                batch_size=min(8, q.shape[2]))
  return jnp.moveaxis(out, 0, 2)


def _chunked_causal(x: Inputs, chunk_size: int
                   ) -> tuple[jax.Array, jax.Array]:
  q, k, v, g = x.q, x.k, x.v, x.g
  b, t, n, hk = q.shape
  c = max(1, min(chunk_size, t))
  nc = -(-t // c)
  tp = nc * c
  pad = lambda a, val=0: jnp.pad(
      a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2), constant_values=val)
  qc, kc, vc = (_to_chunks(pad(a), nc, c) for a in (q, k, v))  # [B, N, nC, C, *]
  if x.runs is None:
    runs = jnp.zeros((b, tp), jnp.int32)
  else:  # Padding continues the last segment, so it changes nothing.
    runs = jnp.concatenate(
        [x.runs, jnp.broadcast_to(x.runs[:, -1:], (b, tp - t))], axis=1)
  runs_c = runs.reshape(b, nc, c)  # [B, nC, C]
  prev_last = jnp.concatenate([runs_c[:, :1, 0], runs_c[:, :-1, -1]],
                              axis=1)  # [B, nC] run before each chunk
  this_last = runs_c[:, :, -1]  # [B, nC]
  carry_in = runs_c == prev_last[:, :, None]  # [B, nC, C] sees the carried state
  survives = runs_c == this_last[:, :, None]  # [B, nC, C] reaches the chunk end
  keep_state = this_last == prev_last  # [B, nC] carried state reaches the end
  pos = jnp.arange(c)
  vis = ((pos[:, None] >= pos[None, :])[None, None] &
         (runs_c[:, :, :, None] == runs_c[:, :, None, :]))  # [B, nC, C, C]
  vector = g is not None and g.ndim == 4
  if g is None:
    scores = jnp.einsum('bnctk,bncsk->bncts', qc, kc)  # [B, N, nC, C, C]
    scores = jnp.where(vis[:, None], scores, 0.0)
    q_in, k_w = qc, kc
    chunk_decay = jnp.ones((b, n, nc), q.dtype)
  else:
    gc = _to_chunks(pad(g), nc, c)  # [B, N, nC, C(, K)]
    big_g = jnp.cumsum(gc, axis=3)  # within-chunk cumulative log-decay, <= 0
    g_last = big_g[:, :, :, -1:]  # [B, N, nC, 1(, K)]
    if vector:
      scores = _intra_vector(qc, kc, big_g, vis)
      q_in = qc * jnp.exp(big_g)
      k_w = kc * jnp.exp(g_last - big_g)
    else:
      diff = big_g[..., :, None] - big_g[..., None, :]  # [B, N, nC, C, C]
      decay = jnp.exp(jnp.where(vis[:, None], diff, -jnp.inf))
      scores = jnp.einsum('bnctk,bncsk->bncts', qc, kc) * decay
      q_in = qc * jnp.exp(big_g)[..., None]
      k_w = kc * jnp.exp(g_last - big_g)[..., None]
    chunk_decay = jnp.exp(g_last[:, :, :, 0])  # [B, N, nC(, K)]
  out = jnp.einsum('bncts,bncsv->bnctv', scores, vc)  # [B, N, nC, C, V]
  k_w = jnp.where(survives[:, None, :, :, None], k_w, 0.0)
  delta = jnp.einsum('bncsk,bncsv->bnckv', k_w, vc)  # [B, N, nC, K, V]
  chunk_decay = chunk_decay * jnp.expand_dims(
      keep_state, (1,) + ((3,) if vector else ())).astype(q.dtype)
  s0 = zero_state(x) if x.initial_state is None else x.initial_state

  def step(state, inp):
    decay_c, delta_c = inp  # [B, N(, K)], [B, N, K, V]
    return state * _decay_shape(decay_c, state) + delta_c, state

  final, prev = lax.scan(step, s0, (jnp.moveaxis(chunk_decay, 2, 0),
                                    jnp.moveaxis(delta, 2, 0)))
  prev = jnp.moveaxis(prev, 0, 2)  # [B, N, nC, K, V] state entering each chunk
  q_in = jnp.where(carry_in[:, None, :, :, None], q_in, 0.0)
  out = out + jnp.einsum('bnctk,bnckv->bnctv', q_in, prev)  # [B, N, nC, C, V]
  out = jnp.moveaxis(out, 1, 3).reshape(b, tp, n, -1)[:, :t]  # [B, T, N, V]
  return out, final


def chunked(x: Inputs, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
            causal: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Chunks of `chunk_size` (any positive size; T is padded to a multiple)."""
  chunk_size = check_chunk_size(chunk_size)
  if causal:
    out, final = _chunked_causal(x, chunk_size)
    return out.astype(x.out_dtype), final
  if x.runs is None:
    kv = jnp.einsum('btnk,btnv->bnkv', x.k, x.v)  # [B, N, K, V]
    out = jnp.einsum('btnk,bnkv->btnv', x.q, kv)  # [B, T, N, V]
    return out.astype(x.out_dtype), None
  fn = lambda y: _chunked_causal(y, chunk_size)
  return _bidirectional(fn, x).astype(x.out_dtype), None
