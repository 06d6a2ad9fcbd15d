"""Analysis functions vs direct NumPy float64 implementations of their equations."""

import math

import numpy as np
import pytest

from experiments.recalibration import analysis

B, N, T = 3, 2, 7


def _mask():
  mask = np.ones((B, T), bool)
  mask[1, 5:] = False  # Right padding.
  mask[2, 3:] = False
  return mask


def _visible_np(mask):
  vis = np.zeros((B, 1, T, T), bool)
  for b in range(B):
    for i in range(T):
      for j in range(T):
        vis[b, 0, i, j] = j <= i and mask[b, i] and mask[b, j]
  return vis


def _probs(seed=0, sharp=1.0):
  """float64 softmax over the visible keys (rows seeing nothing are zeros)."""
  rng = np.random.default_rng(seed)
  logits = sharp * rng.normal(size=(B, N, T, T))
  vis = np.broadcast_to(_visible_np(_mask()), logits.shape)
  p = np.zeros_like(logits)
  for idx in np.ndindex(B, N, T):
    row = vis[idx]
    if row.any():
      e = np.exp(logits[idx][row] - logits[idx][row].max())
      p[idx][row] = e / e.sum()
  return p


def test_causal_visible():
  np.testing.assert_array_equal(analysis.causal_visible(_mask()),
                                _visible_np(_mask()))


def test_sink_scores_and_statistics():
  probs = _probs(sharp=3.0)
  vis = _visible_np(_mask())
  got = np.asarray(analysis.sink_scores(probs.astype(np.float32), vis))
  want = np.zeros((B, N, T))
  for b, n, j in np.ndindex(B, N, T):
    rows = [i for i in range(T) if vis[b, 0, i, j]]
    if rows:
      want[b, n, j] = sum(probs[b, n, i, j] for i in rows) / len(rows)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Without padding s_j's denominator is N - j (the spec's form).
  full = np.ones((B, T), bool)
  p_full = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
  p_full = np.broadcast_to(p_full, (B, N, T, T))
  s = np.asarray(analysis.sink_scores(p_full, analysis.causal_visible(full)))
  np.testing.assert_allclose(
      s[0, 0], [p_full[0, 0, :, j].sum() / (T - j) for j in range(T)],
      rtol=1e-6)

  tau = 0.2
  stats = analysis.sink_statistics(got, _mask(), threshold=tau)
  first, other, count = np.zeros(N), np.zeros(N), np.zeros(N)
  is_sink = np.zeros((B, N, T), bool)
  for b, n in np.ndindex(B, N):
    keys = [j for j in range(1, T) if _mask()[b, j]]
    first[n] += got[b, n, 0] / B
    other[n] += max(got[b, n, j] for j in keys) / B
    sinks = [j for j in keys if got[b, n, j] > tau]
    count[n] += len(sinks) / B
    is_sink[b, n, sinks] = True
  np.testing.assert_allclose(stats['first'], first, rtol=1e-5)
  np.testing.assert_allclose(stats['max_other'], other, rtol=1e-5)
  np.testing.assert_allclose(stats['num_sinks'], count, rtol=1e-6)
  np.testing.assert_array_equal(stats['is_sink'], is_sink)
  with pytest.raises(ValueError, match='probs'):
    analysis.sink_scores(probs[0], vis)
  with pytest.raises(ValueError, match='visible'):
    analysis.sink_scores(probs, vis.astype(np.float32))


def test_attention_entropy():
  probs = _probs(1)
  vis = _visible_np(_mask())
  got = analysis.attention_entropy(probs.astype(np.float32), vis)
  ent, norm, rows, nrows = np.zeros(N), np.zeros(N), 0, 0
  for b, i in np.ndindex(B, T):
    keys = [j for j in range(T) if vis[b, 0, i, j]]
    if not keys:
      continue
    rows += 1
    nrows += len(keys) >= 2
    for n in range(N):
      h = -sum(probs[b, n, i, j] * math.log(probs[b, n, i, j]) for j in keys
               if probs[b, n, i, j] > 0)
      ent[n] += h
      if len(keys) >= 2:
        norm[n] += h / math.log(len(keys))
  np.testing.assert_allclose(got['entropy_sum'], ent, rtol=1e-5)
  np.testing.assert_allclose(got['normalized_sum'], norm, rtol=1e-5)
  assert float(got['rows']) == rows and float(got['normalized_rows']) == nrows
  # Invisible keys are ignored even if they hold (stray) mass; no NaN at p = 0.
  stray = probs.copy()
  stray[~np.broadcast_to(vis, stray.shape)] = 0.3
  stray[0, 0, 3, 1] = 0.0
  again = analysis.attention_entropy(stray.astype(np.float32), vis)
  assert np.all(np.isfinite(again['entropy_sum']))
  uniform = np.broadcast_to(np.tril(np.ones((T, T))) / np.arange(1, T + 1)[
      :, None], (1, 1, T, T))
  u = analysis.attention_entropy(uniform, analysis.causal_visible(
      np.ones((1, T), bool)))
  np.testing.assert_allclose(float(u['normalized_sum'][0]), T - 1, rtol=1e-5)


def test_retrieval_hits_scores_heads():
  probs = _probs(2, sharp=2.0)
  positions = np.array([[4, 6], [3, 4], [1, 2]])
  sources = np.array([[1, -1], [0, 2], [0, 1]])
  got = analysis.retrieval_hits(probs.astype(np.float32), positions, sources)
  hits = np.zeros(N)
  copies = 0
  for b, a in np.ndindex(2 + 1, 2):
    if sources[b, a] < 0:
      continue
    copies += 1
    for n in range(N):
      row = probs[b, n, positions[b, a]]
      hits[n] += int(np.argmax(row)) == sources[b, a]
  np.testing.assert_array_equal(got['hits'], hits)
  assert float(got['copies']) == copies
  # A head that always attends to the source scores 1.
  exact = np.zeros((1, 1, T, T))
  exact[0, 0, 5, 2] = 1.0
  one = analysis.retrieval_hits(exact, np.array([[5]]), np.array([[2]]))
  assert float(one['hits'][0]) == 1.0
  scores = analysis.retrieval_scores(np.array([[1.0, 6.0], [0.0, 3.0]]), 8.0)
  np.testing.assert_allclose(scores, [[0.125, 0.75], [0.0, 0.375]])
  assert analysis.retrieval_heads(scores) == [(0, 1), (1, 1), (0, 0)]
  assert analysis.retrieval_heads(scores, threshold=0.5) == [(0, 1)]
  np.testing.assert_array_equal(analysis.retrieval_scores(np.ones(2), 0.0), 0)


def test_massive_activations():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(B, T, 16))
  x[0, 0, 5] = 400.0  # A massive activation in dim 5 at the first token.
  x[1, 2, 11] = -90.0
  x[2, 6, 3] = 1e4  # At a padding position: ignored.
  mask = _mask()
  m = np.asarray(analysis.max_abs_per_dim(x, mask))
  want = np.array([max(abs(x[b, t, d]) for b in range(B) for t in range(T)
                       if mask[b, t]) for d in range(16)])
  np.testing.assert_allclose(m, want, rtol=1e-6)
  dims = analysis.massive_dims(m, top_k=2)
  np.testing.assert_array_equal(dims, [5, 11])
  phi = np.asarray(analysis.massive_ratio(x, dims))
  for b, t in np.ndindex(B, T):
    rms = math.sqrt(np.mean(x[b, t] ** 2))
    assert phi[b, t] == pytest.approx(max(abs(x[b, t, 5]), abs(x[b, t, 11])) /
                                      rms, rel=1e-5)
  # One dominating dim: phi -> sqrt(D), its upper bound.
  assert 3.99 < phi[0, 0] <= 4.0 and phi[0, 1] < 3.0
  assert float(analysis.massive_ratio(np.zeros((1, 1, 4)), [0])[0, 0]) == 0.0
  with pytest.raises(ValueError, match='top_k'):
    analysis.massive_dims(m, top_k=17)
