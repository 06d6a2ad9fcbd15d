"""Brute-force mask oracles: plain Python loops over (q, k), written from the spec text.

Independent of the vectorised implementations in attention/masks (no NumPy tricks,
no shared helpers): each returns a nested-list-built bool array [T, S].
"""

import math

import numpy as np


def loop(t, s, pred):
  out = np.zeros((t, s), dtype=bool)
  for q in range(t):
    for k in range(s):
      out[q, k] = bool(pred(q, k))
  return out


def causal(t, s, offset=0):
  return loop(t, s, lambda q, k: k <= q + offset)


def sliding_window(t, s, left, right, offset=0):
  def pred(q, k):
    ok = True
    if left is not None:
      ok = ok and q + offset - left <= k
    if right is not None:
      ok = ok and k <= q + offset + right
    return ok
  return loop(t, s, pred)


def chunked_causal(t, s, chunk):
  return loop(t, s, lambda q, k: q // chunk == k // chunk and k <= q)


def sink_window(t, s, num_sinks, window):
  return loop(t, s, lambda q, k: (k < num_sinks or q - window < k) and k <= q)


def prefix_lm(t, s, prefix):
  return loop(t, s, lambda q, k: k <= q or k < prefix)


def segments(seg_q, seg_kv):
  return loop(len(seg_q), len(seg_kv), lambda q, k: seg_q[q] == seg_kv[k])


def modality_mutual(is_image, sample):
  t = len(is_image)

  def pred(q, k):
    if k <= q:
      return True
    return bool(is_image[q]) and not is_image[k] and sample[q] == sample[k]
  return loop(t, t, pred)


def pine(seg):
  t = len(seg)

  def pred(q, k):
    if k <= q:
      return True
    return seg[q] >= 0 and seg[k] >= 0 and seg[q] != seg[k]
  return loop(t, t, pred)


def _unravel(index, grid):
  coords = []
  for n in reversed(grid):
    coords.append(index % n)
    index //= n
  return list(reversed(coords))


def nb_axis(n, w, s, d, causal_, q, k):
  """One axis of the GNA rule, as written in the spec."""
  if q % d != k % d:
    return False
  qp, kp = q // d, k // d
  n_group = len(range(q % d, n, d))
  if causal_:
    leader = min((qp // s) * s + s - 1, n_group - 1)
    return kp <= qp and leader - kp < w
  w_left = w // 2
  w_right = w // 2 + (w % 2) - 1
  leader = min((qp // s) * s + s // 2, n_group - 1)
  centre = min(max(leader, w_left), n_group - 1 - w_right)
  return centre - w_left <= kp <= centre + w_right


def neighborhood(grid, window, stride, dilation, causal_):
  t = math.prod(grid)

  def pred(q, k):
    qc, kc = _unravel(q, grid), _unravel(k, grid)
    return all(nb_axis(grid[i], window[i], stride[i], dilation[i], causal_[i],
                       qc[i], kc[i]) for i in range(len(grid)))
  return loop(t, t, pred)


def halo(grid, block, halo_):
  t = math.prod(grid)

  def pred(q, k):
    qc, kc = _unravel(q, grid), _unravel(k, grid)
    for i in range(len(grid)):
      start = (qc[i] // block[i]) * block[i]
      if not start - halo_[i] <= kc[i] < start + block[i] + halo_[i]:
        return False
    return True
  return loop(t, t, pred)


def crossformer(grid, size, long_distance):
  t = math.prod(grid)

  def pred(q, k):
    qc, kc = _unravel(q, grid), _unravel(k, grid)
    if long_distance:
      return all(qc[i] % size[i] == kc[i] % size[i] for i in range(len(grid)))
    return all(qc[i] // size[i] == kc[i] // size[i] for i in range(len(grid)))
  return loop(t, t, pred)


def power(t, block, sinks, local, token_causal):
  def pred(q, k):
    qb, kb = q // block, k // block
    if kb > qb:
      return False
    d = qb - kb
    is_pow = d == 0 or (d & (d - 1)) == 0
    ok = is_pow or kb < sinks or d < local
    return ok and (k <= q or not token_causal)
  return loop(t, t, pred)


def s2(t, heads, block, local, vert_stride, offset, dense_heads, token_causal):
  step = max(1, vert_stride // heads)
  out = []
  for h in range(heads):
    def pred(q, k, h=h):
      qb, kb = q // block, k // block
      if kb > qb:
        return False
      if token_causal and k > q:
        return False
      if h in dense_heads:
        return True
      return (qb - kb) < local or (kb + h * step + offset) % vert_stride == 0
    out.append(loop(t, t, pred))
  return np.stack(out)


def radial(frames, s):
  def pred(q, k):
    i, kk = divmod(q, s)
    j, ll = divmod(k, s)
    if j == 0:
      return True
    dist = abs(i - j)
    r = max(dist, 1).bit_length() - 1  # floor(log2(max(|i - j|, 1)))
    p = 2 ** r
    if p <= s and (abs(kk - ll) + 1) * p <= s:
      return True
    return dist % (-(-p // s)) == 0 and kk == ll
  return loop(frames * s, frames * s, pred)


def moa(t, s, plan, num_sinks):
  out = []
  for alpha, beta in plan:
    span = math.floor(alpha + beta * s)
    out.append(sink_window(t, s, num_sinks, span))
  return np.stack(out)
