"""Independent float64 NumPy oracles for the tests (no JAX)."""

import numpy as np


def numpy_attention(query, key, value, *, scale, bias=None, mask=None,
                    logits_soft_cap=None, sinks=None):
  """A float64 NumPy oracle (no JAX), mask already combined to [B?, N?, T, S].

  Returns (out [B, T, N, H_v], lse [B, N, T]).
  """
  q = np.asarray(query, np.float64)
  k = np.asarray(key, np.float64)
  v = np.asarray(value, np.float64)
  b, t, n, _ = q.shape
  kh = k.shape[2]
  rep = n // kh
  k = np.repeat(k, rep, axis=2)
  v = np.repeat(v, rep, axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, k) * scale
  if logits_soft_cap is not None:
    logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  vis = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), logits.shape)
  out = np.zeros((b, t, n, v.shape[-1]))
  lse = np.full((b, n, t), -np.inf)
  for bi in range(b):
    for ni in range(n):
      for ti in range(t):
        row = logits[bi, ni, ti][vis[bi, ni, ti]]
        vals = v[bi, vis[bi, ni, ti], ni]
        extra = [] if sinks is None else [float(sinks[ni])]
        allv = np.concatenate([row, extra])
        if allv.size == 0:
          continue
        m = allv.max()
        w = np.exp(row - m)
        z = w.sum() + sum(np.exp(e - m) for e in extra)
        out[bi, ti, ni] = (w[:, None] * vals).sum(0) / z
        lse[bi, ni, ti] = m + np.log(z)
  return out, lse


def numpy_attention_grads(query, key, value, dout, *, scale, bias=None,
                          mask=None, logits_soft_cap=None, sinks=None):
  """Float64 NumPy gradients of sum(out * dout) by the analytic softmax backward.

  Returns dict with dq, dk, dv, dbias (full [B, N, T, S] logits gradient, reduce to
  the bias shape yourself with `reduce_to`) and dsinks [N].
  """
  q = np.asarray(query, np.float64)
  k = np.asarray(key, np.float64)
  v = np.asarray(value, np.float64)
  do = np.asarray(dout, np.float64)
  b, t, n, _ = q.shape
  kh = k.shape[2]
  rep = n // kh
  kr = np.repeat(k, rep, axis=2)
  vr = np.repeat(v, rep, axis=2)
  raw = np.einsum('btnh,bsnh->bnts', q, kr) * scale
  if logits_soft_cap is not None:
    th = np.tanh(raw / logits_soft_cap)
    logits = logits_soft_cap * th
    dcap = 1.0 - th**2
  else:
    logits, dcap = raw, np.ones_like(raw)
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  vis = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(
      np.asarray(mask, bool), logits.shape)
  masked = np.where(vis, logits, -np.inf)
  m = masked.max(-1)
  if sinks is not None:
    m = np.maximum(m, np.asarray(sinks, np.float64)[None, :, None])
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(vis, np.exp(masked - m[..., None]), 0.0)
  z = e.sum(-1)
  if sinks is not None:
    psink_num = np.exp(np.asarray(sinks, np.float64)[None, :, None] - m)
    z = z + psink_num
  zsafe = np.where(z > 0, z, 1.0)
  p = e / zsafe[..., None]  # [B, N, T, S]
  out = np.einsum('bnts,bsnv->btnv', p, vr)
  dv_r = np.einsum('bnts,btnv->bsnv', p, do)
  dp = np.einsum('btnv,bsnv->bnts', do, vr)
  d_row = np.einsum('btnv,btnv->bnt', do, out)
  ds = p * (dp - d_row[..., None])  # gradient wrt logits (after cap, + bias)
  draw = ds * dcap * scale
  dq = np.einsum('bnts,bsnh->btnh', draw, kr)
  dk_r = np.einsum('bnts,btnh->bsnh', draw, q)
  dk = dk_r.reshape(b, -1, kh, rep, k.shape[-1]).sum(3)
  dv = dv_r.reshape(b, -1, kh, rep, v.shape[-1]).sum(3)
  grads = dict(dq=dq, dk=dk, dv=dv, dbias=ds)
  if sinks is not None:
    psink = np.where(z > 0, psink_num / zsafe, 0.0)
    grads['dsinks'] = (-psink * d_row).sum(axis=(0, 2))
  return grads


def reduce_to(grad, shape):
  """Sums a broadcast gradient back to `shape` (same rank)."""
  axes = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape))
               if s == 1 and g != 1)
  return grad.sum(axis=axes, keepdims=True)
