"""Shared helpers for the linear-family tests: a NumPy oracle, variants, tolerances."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention import linear

# Three-way check (FlexAttention's): error(impl vs float64 golden) <= FUDGE[dtype] *
# max(error(naive same-dtype vs golden), FLOOR[dtype] * scale of the golden).
FUDGE = {jnp.float32: 4.0, jnp.bfloat16: 2.0}
FLOOR = {jnp.float32: 1e-6, jnp.bfloat16: 1e-2}


def numpy_recurrence(q, k, v, log_decay=None, *, scale, initial_state=None,
                     segment_ids=None, causal=True):
  """Float64 NumPy loop over the definition S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,
  o_t = scale q_t S_t (no JAX); the non-causal form sums every key of the segment.

  q [B, T, N, K], k [B, T, N, K], v [B, T, N, V] (heads already repeated),
  log_decay None / [B, T, N] / [B, T, N, K]. Returns (out, final_state or None).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, hk = q.shape
  hv = v.shape[-1]
  seg = (np.zeros((b, t), int) if segment_ids is None else
         np.asarray(segment_ids))
  out = np.zeros((b, t, n, hv))
  if not causal:
    for bi in range(b):
      for ti in range(t):
        for si in range(t):
          same = all(seg[bi, j] == seg[bi, ti]
                     for j in range(min(si, ti), max(si, ti) + 1))
          if same:
            out[bi, ti] += scale * np.einsum('nk,nk->n', q[bi, ti],
                                             k[bi, si])[:, None] * v[bi, si]
    return out, None
  g = None if log_decay is None else np.asarray(log_decay, np.float64)
  finals = np.zeros((b, n, hk, hv))
  for bi in range(b):
    s = (np.zeros((n, hk, hv)) if initial_state is None else
         np.array(initial_state[bi], np.float64))
    for ti in range(t):
      if ti > 0 and seg[bi, ti] != seg[bi, ti - 1]:
        s = np.zeros_like(s)
      if g is not None:
        a = np.exp(g[bi, ti])
        s = s * (a[:, None, None] if a.ndim == 1 else a[:, :, None])
      s = s + np.einsum('nk,nv->nkv', k[bi, ti], v[bi, ti])
      out[bi, ti] = scale * np.einsum('nk,nkv->nv', q[bi, ti], s)
    finals[bi] = s
  return out, finals


def rand(rng, *shape, dtype=np.float64):
  return jnp.asarray(rng.normal(size=shape), dtype)


# Keyword arguments of the forms that are Python values (static under jit).
STATIC_ARGNAMES = ('chunk_size', 'feature_map', 'normalize', 'causal')


def forms(name, *, jit=False):
  """(naive, recurrent, chunked) callables f(q, k, v, extra, **kw) of a variant.

  With `jit`, each is `jax.jit`ted (`STATIC_ARGNAMES` static): one compile per form
  and input shape instead of one per eager op, the way models call them.
  """
  fns = _forms(name)
  if jit:
    fns = tuple(jax.jit(f, static_argnames=STATIC_ARGNAMES) for f in fns)
  return fns


def _forms(name):
  if name == 'linear':
    fns = (linear.naive_linear_attention, linear.recurrent_linear_attention,
           linear.chunked_linear_attention)
    return tuple(functools.partial(lambda f, q, k, v, e, **kw: f(q, k, v, **kw),
                                   f) for f in fns)
  if name == 'lightning':
    fns = (linear.naive_lightning_attention, linear.recurrent_lightning_attention,
           linear.chunked_lightning_attention)
    return tuple(functools.partial(
        lambda f, q, k, v, e, **kw: f(q, k, v, slopes=e, **kw), f) for f in fns)
  if name == 'retention':
    fns = (linear.naive_retention, linear.recurrent_retention,
           linear.chunked_retention)
    return tuple(functools.partial(
        lambda f, q, k, v, e, **kw: f(q, k, v, gammas=e, **kw), f) for f in fns)
  if name in ('gla_head', 'gla_key'):
    fns = (linear.naive_gated_linear_attention,
           linear.recurrent_gated_linear_attention,
           linear.chunked_gated_linear_attention)
    return tuple(functools.partial(
        lambda f, q, k, v, e, **kw: f(q, k, v, e, **kw), f) for f in fns)
  raise ValueError(name)


def extra_for(name, rng, b, t, n, hk, dtype=np.float64):
  """The variant's decay argument (a differentiable array) and its log-decays."""
  if name == 'lightning':
    e = jnp.asarray(linear.lightning_slopes(n) * 4.0, dtype)
    return e, jnp.broadcast_to(-e, (b, t, n))
  if name == 'retention':
    e = jnp.asarray(rng.uniform(0.6, 0.99, size=n), dtype)
    return e, jnp.broadcast_to(jnp.log(e), (b, t, n))
  if name == 'gla_head':
    e = linear.gla_log_gates(rand(rng, b, t, n, dtype=dtype), tau=2.0)
    return e, e
  if name == 'gla_key':
    e = linear.gla_log_gates(rand(rng, b, t, n, hk, dtype=dtype), tau=2.0)
    return e, e
  return None, None
