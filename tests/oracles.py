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
