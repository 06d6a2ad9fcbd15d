"""Float64 NumPy implementations of the attention hook and the interventions' equations.

Independent of JAX and of attention.interventions: visibility from positions,
softmax, and each method's equations written directly (loops where clearer).
"""

import numpy as np


def visible(q_pos, kv_pos, kv_valid, window=None, q_valid=None):
  """bool [B, 1, T, S]."""
  q_pos = np.asarray(q_pos)
  kv_pos = np.asarray(kv_pos)
  vis = (kv_pos[:, None, None, :] <= q_pos[:, None, :, None]) & np.asarray(
      kv_valid, bool)[:, None, None, :]
  if window is not None:
    vis &= (q_pos[:, None, :, None] - kv_pos[:, None, None, :]) < window
  if q_valid is not None:
    vis &= np.asarray(q_valid, bool)[:, None, :, None]
  return vis


def logits(q, k, scale):
  """[B, N, T, S] float64 (GQA: query head n uses kv head n // (N // K))."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  rep = q.shape[2] // k.shape[2]
  k = np.repeat(k, rep, axis=2)
  return np.einsum('btnh,bsnh->bnts', q, k) * scale


def softmax(z, vis):
  """Row softmax over visible entries; rows seeing nothing are zero."""
  z = np.where(vis, z, -np.inf)
  out = np.zeros(z.shape)
  flat_z = z.reshape(-1, z.shape[-1])
  flat_o = out.reshape(-1, z.shape[-1])
  for r in range(flat_z.shape[0]):
    row = flat_z[r]
    fin = np.isfinite(row)
    if not fin.any():
      continue
    e = np.exp(row[fin] - row[fin].max())
    flat_o[r, fin] = e / e.sum()
  return out


def apply(probs, v):
  """[B, N, T, S] x [B, S, K, Hv] -> [B, T, N, Hv]."""
  v = np.asarray(v, np.float64)
  rep = probs.shape[1] // v.shape[2]
  v = np.repeat(v, rep, axis=2)
  return np.einsum('bnts,bsnv->btnv', probs, v)


def attention(q, k, v, vis, scale):
  """(out, probs, logits with -inf where hidden)."""
  z = logits(q, k, scale)
  p = softmax(z, np.broadcast_to(vis, z.shape))
  return apply(p, v), p, np.where(np.broadcast_to(vis, z.shape), z, -np.inf)
