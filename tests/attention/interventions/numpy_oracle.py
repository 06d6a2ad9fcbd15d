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


# ----------------------------------------------------------------------------------
# The methods' equations, written directly (loops over batch, head, query).
# ----------------------------------------------------------------------------------


def _heads(heads, n):
  return range(n) if heads is None else heads


def act(probs, vis, kv_pos, tau, beta, heads=None):
  """ACT steps 1-4 (sinks per batch row and head; the first visible key kept)."""
  probs = np.asarray(probs, np.float64)
  out = probs.copy()
  b_, n_, t_, s_ = probs.shape
  vis = np.broadcast_to(vis, (b_, 1, t_, s_))
  for b in range(b_):
    count = vis[b, 0].sum(0)  # queries that see key j
    seen = np.nonzero(count > 0)[0]
    first = seen[np.argmin(np.asarray(kv_pos)[b, seen])] if seen.size else -1
    for n in _heads(heads, n_):
      score = np.array([probs[b, n, :, j].sum() / count[j] if count[j] else 0.0
                        for j in range(s_)])
      sinks = [j for j in range(s_) if score[j] > tau and j != first]
      for i in range(t_):
        row = probs[b, n, i]
        rest = sum(row[j] for j in range(s_) if j not in sinks)
        if rest == 0:
          continue
        freed = (1 - beta) * sum(row[j] for j in sinks)
        for j in range(s_):
          out[b, n, i, j] = (beta * row[j] if j in sinks else
                             row[j] + freed * row[j] / rest)
  return out


def phi(hidden, dims):
  x = np.asarray(hidden, np.float64)
  return np.abs(x[..., list(dims)]).max(-1) / np.sqrt((x ** 2).mean(-1))


def var(probs, sinks, targets, p, rho, min_mass, heads=None):
  """VAR steps 2-3 (the paper's reading: sinks scaled by 1 - p, Omega moves)."""
  probs = np.asarray(probs, np.float64)
  out = probs.copy()
  b_, n_, t_, s_ = probs.shape
  for b in range(b_):
    sk = np.asarray(sinks)[b]
    tg = np.asarray(targets)[b]
    for n in _heads(heads, n_):
      for i in range(t_):
        row = probs[b, n, i]
        m_t = row[tg].sum()
        m_ts = row[tg & sk].sum()
        m_rest = row[tg & ~sk].sum()
        if not (m_t >= min_mass and m_ts / m_t <= rho and m_rest > 0):
          continue
        omega = p * row[sk].sum()
        for j in range(s_):
          if sk[j]:
            out[b, n, i, j] = (1 - p) * row[j]
          elif tg[j]:
            out[b, n, i, j] = row[j] + omega * row[j] / m_rest
  return out


def softpag(probs, q_pos, kv_pos, vis, s, heads=None):
  """(1 - s) A + s I, I on the visible key at the query's own position."""
  probs = np.asarray(probs, np.float64)
  out = probs.copy()
  b_, n_, t_, s_ = probs.shape
  vis = np.broadcast_to(vis, (b_, 1, t_, s_))
  for b in range(b_):
    for i in range(t_):
      eye = np.array([vis[b, 0, i, j] and kv_pos[b, j] == q_pos[b, i]
                      for j in range(s_)], np.float64)
      if eye.sum() == 0:
        continue
      eye /= eye.sum()
      for n in _heads(heads, n_):
        out[b, n, i] = (1 - s) * probs[b, n, i] + s * eye
  return out
