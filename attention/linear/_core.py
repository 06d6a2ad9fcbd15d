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

import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from attention import _checks

DEFAULT_CHUNK_SIZE = 32  # Fastest scan-layout chunk on XLA:CPU (H = 64; see kernels/README.md).
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
  # A log-decay that is the same at every step, [N] (lightning attention, retention):
  # `g` is its broadcast; the chunked form builds its [C, C] decay once from it.
  head_g: jax.Array | None = None
  # q before scaling and `scale` (the chunked form scales inside its loop, so no
  # scaled copy of q is materialised; under jit the unused `q` is dead code).
  q_unscaled: jax.Array | None = None
  scale: Any = None
  # Linear attention: the arrays before the feature map, head repetition and ones
  # column, and the map (the chunked form applies them per block, so no mapped copy
  # is materialised), and the denominator's eps (the chunked form then returns the
  # normalised [.., V] output; None: unnormalised).
  raw: tuple[jax.Array, jax.Array, jax.Array] | None = None
  feature_map: Any = None
  normalize_eps: float | None = None


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
             state_value_dim=None, head_log_decay=None) -> Inputs:
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
    head_log_decay: None or [N], the constant per-step log-decay `log_decay` is the
      broadcast of (kept for the chunked form's once-per-head decay matrix).
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, hk = query.shape
  src = key.shape[1]
  if key.shape[0] != b or value.shape[:2] != key.shape[:2]:
    raise ValueError(
        f'key and value must share the batch of query ({b}) and one length [B, S], '
        f'got key {tuple(key.shape)} and value {tuple(value.shape)}.')
  if src != t and (causal or segment_ids is not None):
    raise ValueError(
        f'key length ({src}) may differ from the query length ({t}) only with '
        f'causal=False and no segment_ids (got causal={causal}, segment_ids '
        f'{"given" if segment_ids is not None else "None"}).')
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
  q_unscaled = query.astype(dtype)
  q = q_unscaled * jnp.asarray(scale, dtype)
  k, v = key.astype(dtype), value.astype(dtype)
  if n != kh:
    k, v = jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)
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
  head_g = None
  if head_log_decay is not None and g is not None:
    head_g = jnp.asarray(head_log_decay).astype(dtype)
  return Inputs(q, k, v, g, s0, runs, query.dtype, head_g, q_unscaled, scale)


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
  vis = jnp.ones((b, t, k.shape[1]), bool)
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
  if x.k.shape[1] != x.q.shape[1]:  # Cross lengths: the total state, then q S.
    kv = lax.scan(lambda s, kv: (s + jnp.einsum('bnk,bnv->bnkv', *kv), None),
                  zero_state(x), (jnp.moveaxis(x.k, 1, 0),
                                  jnp.moveaxis(x.v, 1, 0)))[0]  # [B, N, K, V]
    out = jnp.einsum('btnk,bnkv->btnv', x.q, kv)  # [B, T, N, V]
  else:
    out = _bidirectional(_recurrent_causal, x)
  return out.astype(x.out_dtype), None


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


# ----------------------------------------------------------------------------
# Chunked form, scan layout (no segments; no decay, a per-head or a per-step
# scalar decay). XLA:CPU runs these small dots on one core near its peak, but only
# when nothing around them touches fresh memory: the loop slices [B, L, N, *] blocks
# straight out of the inputs (no transposed or scaled copies; a fresh buffer costs a
# page fault per 4 KiB), flattens (batch, head, chunk) into one batch dim for every
# einsum (several batch dims run several times slower) and keeps every [C, C]
# intermediate of one block in cache. The backward is a reverse scan over the same
# blocks (custom_vjp) that recomputes each block from the state entering it, the only
# residual besides the inputs ([T / L, B, N, K, V]).

SCAN_CHUNKS_PER_STEP = 128  # tokens per scan step = chunk * max(1, this // chunk)


class _Cfg(NamedTuple):
  """Static configuration of one scan (hashable: a custom_vjp nondiff argument)."""
  c: int  # chunk
  nchunks: int  # chunks per step
  steps: int
  kind: str  # 'none' | 'head' | 'step'
  scale: float | None  # None: a traced scale in consts
  feature_map: Any = None  # applied to raw q / k blocks (then cast to `dtype`)
  dtype: Any = None
  repeat: int = 1  # query heads per key head (raw k / v blocks)
  ones: bool = False  # append a ones column to the value (normalised forms)
  eps: float | None = None  # normalise the output in the step


def normalise(out: jax.Array, eps: float) -> jax.Array:
  """[.., V + 1] numerator | denominator -> [.., V], in at least float32."""
  out32 = out.astype(jnp.promote_types(out.dtype, jnp.float32))
  return (out32[..., :-1] / (out32[..., -1:] + eps)).astype(out.dtype)


def _block_weights(cfg: _Cfg, consts, g_blk, dtype):
  """Decays of one block: D [.., C, C] (with the scale), wq [.., C, 1] (with the
  scale), wk [.., 1, C] and per-chunk state decay cd, each broadcasting against
  [B, N, G, ...]; None where a factor is 1."""
  c = cfg.c
  scale = consts['scale'] if cfg.scale is None else cfg.scale
  pos = jnp.arange(c)
  tril = pos[:, None] >= pos[None, :]
  if cfg.kind == 'none':
    return jnp.where(tril, scale, 0.0).astype(dtype), scale, None, None
  if cfg.kind == 'head':
    d, wq, wk, cd = consts['d'], consts['wq'], consts['wk'], consts['cd']
    return (d[None, :, None] * scale, wq[None, :, None, :, None] * scale,
            wk[None, :, None, None, :], cd[None, :, None])
  b, l, n = g_blk.shape
  gc = jnp.moveaxis(g_blk.reshape(b, cfg.nchunks, c, n), 3, 1)  # [B, N, G, C]
  big = jnp.cumsum(gc, axis=-1)  # within-chunk cumulative log-decay, <= 0
  diff = jnp.where(tril, big[..., :, None] - big[..., None, :], -jnp.inf)
  d = jnp.exp(diff) * scale  # [B, N, G, C, C]
  wq = jnp.exp(big)[..., None] * scale  # [B, N, G, C, 1]
  wk = jnp.exp(big[..., -1:] - big)[..., None, :]  # [B, N, G, 1, C]
  return d, wq, wk, jnp.exp(big[..., -1])  # cd [B, N, G]


def _scan_step(cfg: _Cfg, consts, state, blk):
  """One block of L = G * C tokens: (state entering it, [B, L, N, *] inputs) ->
  (state leaving it, out [B, L, N, V])."""
  q, k, v = blk[:3]  # [B, L, N, K], [B, L, N(_kv), K], [B, L, N(_kv), V]
  if cfg.feature_map is not None:
    q, k = cfg.feature_map(q), cfg.feature_map(k)
  if cfg.dtype is not None:
    q, k, v = (a.astype(cfg.dtype) for a in (q, k, v))
  if cfg.repeat > 1:
    k, v = (jnp.repeat(a, cfg.repeat, axis=2) for a in (k, v))
  if cfg.ones:
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  b, l, n, hk = q.shape
  hv = v.shape[-1]
  c, nch = cfg.c, cfg.nchunks
  x = b * n * nch
  to_chunks = lambda a: jnp.moveaxis(a.reshape(b, nch, c, n, a.shape[-1]), 3, 1)
  qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)  # [B, N, G, C, *]
  flat = lambda a: a.reshape(x, *a.shape[-2:])
  d, wq, wk, cd = _block_weights(cfg, consts, blk[3] if len(blk) > 3 else None,
                                 q.dtype)
  scores = jnp.einsum('xtk,xsk->xts', flat(qc), flat(kc))  # [B*N*G, C, C]
  scores = scores.reshape(b, n, nch, c, c) * d
  out = jnp.einsum('xts,xsv->xtv', flat(scores), flat(vc))  # [B*N*G, C, V]
  k_t = jnp.swapaxes(kc, -1, -2)  # [B, N, G, K, C]
  if wk is not None:
    k_t = k_t * wk
  delta = jnp.einsum('xks,xsv->xkv', flat(k_t), flat(vc)).reshape(
      b, n, nch, hk, hv)  # [B, N, G, K, V]
  prev = []
  for j in range(nch):
    prev.append(state)
    decay = 1.0 if cd is None else jnp.broadcast_to(cd, (b, n, nch))[:, :, j,
                                                                        None, None]
    state = state * decay + delta[:, :, j]
  prev = jnp.stack(prev, axis=2)  # [B, N, G, K, V] state entering each chunk
  out = out + jnp.einsum('xtk,xkv->xtv', flat(qc * wq), flat(prev))  # [B*N*G, C, V]
  out = jnp.moveaxis(out.reshape(b, n, nch, c, hv), 1, 3).reshape(b, l, n, hv)
  if cfg.eps is not None:
    out = normalise(out, cfg.eps)
  return state, out


def _blocks(arrays, i, l):
  return tuple(lax.dynamic_slice_in_dim(a, i * l, l, axis=1) for a in arrays)


def _unstack(ys, b):
  """[steps, B, L, ...] -> [B, steps * L, ...] (a free reshape when B == 1)."""
  steps, _, l = ys.shape[:3]
  if b != 1:
    ys = jnp.moveaxis(ys, 0, 1)
  return ys.reshape(b, steps * l, *ys.shape[3:])


def _scan_forward(cfg, s0, arrays, consts, keep_states):
  l = cfg.c * cfg.nchunks

  def body(state, i):
    new, out = _scan_step(cfg, consts, state, _blocks(arrays, i, l))
    return new, (out, state) if keep_states else out

  final, ys = lax.scan(body, s0, jnp.arange(cfg.steps))
  if keep_states:
    out, states = ys
    return _unstack(out, s0.shape[0]), final, states
  return _unstack(ys, s0.shape[0]), final, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan_chunked(cfg: _Cfg, s0, arrays, consts):
  out, final, _ = _scan_forward(cfg, s0, arrays, consts, keep_states=False)
  return out, final


def _scan_chunked_fwd(cfg, s0, arrays, consts):
  out, final, states = _scan_forward(cfg, s0, arrays, consts, keep_states=True)
  return (out, final), (arrays, consts, states)


def _scan_chunked_bwd(cfg, res, cts):
  arrays, consts, states = res
  d_out, d_final = cts
  l = cfg.c * cfg.nchunks
  zero_consts = jax.tree_util.tree_map(jnp.zeros_like, consts)

  def body(carry, i):
    d_state, d_consts = carry
    _, pull = jax.vjp(lambda st, blk, cs: _scan_step(cfg, cs, st, blk),
                      states[i], _blocks(arrays, i, l), consts)
    d_prev, d_blk, d_cs = pull((d_state, _blocks((d_out,), i, l)[0]))
    d_consts = jax.tree_util.tree_map(jnp.add, d_consts, d_cs)
    return (d_prev, d_consts), d_blk

  (d_s0, d_consts), d_blks = lax.scan(body, (d_final, zero_consts),
                                      jnp.arange(cfg.steps), reverse=True)
  b = d_s0.shape[0]
  return d_s0, tuple(_unstack(a, b) for a in d_blks), d_consts


_scan_chunked.defvjp(_scan_chunked_fwd, _scan_chunked_bwd)


def scan_supported(x: Inputs) -> bool:
  """Whether `chunked` takes the scan layout (else the all-chunks form below)."""
  return x.runs is None and (x.g is None or x.g.ndim == 3)


def _head_consts(head_g, c):
  """Once per head: D [N, C, C], wq [N, C], wk [N, C], cd [N] of a constant decay."""
  pos = jnp.arange(c, dtype=head_g.dtype)
  diff = pos[:, None] - pos[None, :]
  d = jnp.where(diff >= 0, jnp.exp(head_g[:, None, None] * jnp.maximum(diff, 0)),
                0.0)  # [N, C, C]
  return dict(d=d, wq=jnp.exp(head_g[:, None] * (pos + 1)),
              wk=jnp.exp(head_g[:, None] * (c - 1 - pos)), cd=jnp.exp(head_g * c))


def _scan_causal(x: Inputs, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Causal chunked form in the scan layout (see `scan_supported`)."""
  extra = {}
  if x.raw is not None:
    (q, k, v), scale = x.raw, x.scale
    extra = dict(feature_map=x.feature_map, dtype=x.q.dtype,
                 repeat=q.shape[2] // k.shape[2],
                 ones=v.shape[-1] != x.v.shape[-1], eps=x.normalize_eps)
  elif x.q_unscaled is not None:
    (q, k, v), scale = (x.q_unscaled, x.k, x.v), x.scale
  else:
    (q, k, v), scale = (x.q, x.k, x.v), 1.0
  b, t, n, _ = q.shape
  state = zero_state(x) if x.initial_state is None else x.initial_state
  kind = 'none' if x.g is None else ('head' if x.head_g is not None else 'step')
  static_scale = float(scale) if is_concrete(scale) else None
  c = max(1, min(chunk_size, t))
  nch = max(1, min(SCAN_CHUNKS_PER_STEP // c, t // c))
  outs, start = [], 0
  while start < t:  # Full steps, then at most two shorter tails (fewer chunks, one short chunk).
    rest = t - start
    if rest >= c * nch:
      cfg_c, cfg_g = c, nch
    elif rest >= c:
      cfg_c, cfg_g = c, rest // c
    else:
      cfg_c, cfg_g = rest, 1
    steps = rest // (cfg_c * cfg_g)
    stop = start + steps * cfg_c * cfg_g
    part = lambda a: a if (start, stop) == (0, t) else a[:, start:stop]
    arrays = (part(q), part(k), part(v)) + (
        (part(x.g),) if kind == 'step' else ())
    consts = {} if static_scale is not None else dict(scale=jnp.asarray(scale,
                                                                        q.dtype))
    if kind == 'head':
      consts.update(_head_consts(x.head_g, cfg_c))
    cfg = _Cfg(cfg_c, cfg_g, steps, kind, static_scale, **extra)
    out, state = _scan_chunked(cfg, state, arrays, consts)
    outs.append(out)
    start = stop
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out, state


def chunked(x: Inputs, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
            causal: bool = True) -> tuple[jax.Array, jax.Array | None]:
  """Chunks of `chunk_size` (any positive size; T is padded to a multiple).

  Returns the normalised [.., V] output where `x.normalize_eps` is set.
  """
  chunk_size = check_chunk_size(chunk_size)
  if causal and scan_supported(x):
    out, final = _scan_causal(x, chunk_size)  # Normalised in its loop.
    return out.astype(x.out_dtype), final
  if causal:
    out, final = _chunked_causal(x, chunk_size)
  elif x.runs is None:
    t, src, hk, hv = x.q.shape[1], x.k.shape[1], x.q.shape[-1], x.v.shape[-1]
    if t * src * (hk + hv) < (t + src) * hk * hv:  # Few queries: (q k^T) v.
      scores = jnp.einsum('btnk,bsnk->bnts', x.q, x.k)  # [B, N, T, S]
      out = jnp.einsum('bnts,bsnv->btnv', scores, x.v)  # [B, T, N, V]
    else:  # q (k^T v).
      kv = jnp.einsum('bsnk,bsnv->bnkv', x.k, x.v)  # [B, N, K, V]
      out = jnp.einsum('btnk,bnkv->btnv', x.q, kv)  # [B, T, N, V]
    final = None
  else:
    fn = lambda y: _chunked_causal(y, chunk_size)
    out, final = _bidirectional(fn, x), None
  if x.normalize_eps is not None:
    out = normalise(out, x.normalize_eps)
  return out.astype(x.out_dtype), final
