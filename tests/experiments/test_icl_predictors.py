"""Closed-form ICL predictors against direct float64 computations."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.icl import analysis
from experiments.icl import predictors


def _problem(seed, b=3, l=7, d=4):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((b, l, d))
  y = rng.standard_normal((b, l))
  xq = rng.standard_normal((b, d))
  return x, y, xq


@hypothesis.settings(max_examples=6)
@hypothesis.given(l=st.integers(1, 9), d=st.integers(1, 5),
                  lam=st.floats(0.05, 3.0), keep=st.integers(1, 9))
def test_ridge_matches_lstsq_and_mask_truncates(l, d, lam, keep):
  keep = min(keep, l)
  x, y, xq = _problem(l * 10 + d, 2, l, d)
  with jax.enable_x64(True):
    ridge = jax.jit(predictors.ridge)  # one compile per shape, not per op
    got = ridge(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), lam, 1.0)
    mask = jnp.broadcast_to(jnp.arange(l) < keep, (2, l))
    got_masked = ridge(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), lam, 1.0,
                       mask)
  for i in range(2):
    for n, out in ((l, got), (keep, got_masked)):
      # Ridge = least squares on the augmented system [X; sqrt(lam) I] b = [y; 0].
      a = np.concatenate([x[i, :n], np.sqrt(lam) * np.eye(d)])
      rhs = np.concatenate([y[i, :n], np.zeros(d)])
      beta = np.linalg.lstsq(a, rhs, rcond=None)[0]
      np.testing.assert_allclose(out[i], beta @ xq[i], rtol=1e-9, atol=1e-10)


def test_ridge_regularizer_is_sigma2_times_d():
  x, y, xq = _problem(0)
  with jax.enable_x64(True):
    a = predictors.ridge(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), 0.1, 5.0)
    b = predictors.ridge(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq), 0.5, 1.0)
  np.testing.assert_allclose(a, b, rtol=1e-12)


def test_gd_and_debiased_gd_match_sums():
  x, y, xq = _problem(1)
  b, l, d = x.shape
  eta = 0.7
  precond = np.random.default_rng(2).standard_normal((d, d))
  with jax.enable_x64(True):
    args = (jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq))
    g = predictors.gd(*args, eta)
    dg = predictors.debiased_gd(*args, eta)
    dgp = predictors.debiased_gd(*args, eta, precond=jnp.asarray(precond))
    mask = jnp.asarray(np.arange(l) < 4)[None].repeat(b, 0)
    dgm = predictors.debiased_gd(*args, eta, mask=mask)
  for i in range(b):
    want_g = sum(y[i, j] * x[i, j] @ xq[i] for j in range(l)) * eta / l
    xbar = x[i].mean(0)
    want_dg = sum(y[i, j] * (x[i, j] - xbar) @ xq[i] for j in range(l)) * eta / l
    want_dgp = sum(y[i, j] * (x[i, j] - xbar) @ precond @ xq[i]
                   for j in range(l)) * eta / l
    xbar4 = x[i, :4].mean(0)
    want_dgm = sum(y[i, j] * (x[i, j] - xbar4) @ xq[i] for j in range(4)) * eta / 4
    np.testing.assert_allclose(g[i], want_g, rtol=1e-12)
    np.testing.assert_allclose(dg[i], want_dg, rtol=1e-12)
    np.testing.assert_allclose(dgp[i], want_dgp, rtol=1e-12)
    np.testing.assert_allclose(dgm[i], want_dgm, rtol=1e-12)


def test_reduced_multihead_matches_loop():
  x, y, xq = _problem(3)
  b, l, _ = x.shape
  omega = np.array([0.3, -0.25, 0.05])
  mu = np.array([2.0, -1.5, 0.1])
  with jax.enable_x64(True):
    got = predictors.reduced_multihead(jnp.asarray(x), jnp.asarray(y),
                                       jnp.asarray(xq), jnp.asarray(omega),
                                       jnp.asarray(mu))
    single = predictors.single_head_features(jnp.asarray(x), jnp.asarray(y),
                                             jnp.asarray(xq), 0.3)
  for i in range(b):
    want = 0.0
    for h in range(3):
      s = np.array([omega[h] * x[i, j] @ xq[i] for j in range(l)])
      w = np.exp(s) / np.exp(s).sum()
      want += mu[h] * np.dot(w, y[i])
      if h == 0:
        np.testing.assert_allclose(single[i], np.dot(w, y[i]), rtol=1e-12)
    np.testing.assert_allclose(got[i], want, rtol=1e-12)


def test_pair_is_debiased_gd_to_first_order():
  """(omega, mu), (-omega, -mu) -> (2 omega mu / L) sum y_i (x_i - xbar)^T x_q."""
  x, y, xq = _problem(4, b=5, l=20, d=3)
  with jax.enable_x64(True):
    omega, mu = 1e-4, 3.0
    pair = predictors.reduced_multihead(
        jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq),
        jnp.asarray([omega, -omega]), jnp.asarray([mu, -mu]))
    dg = predictors.debiased_gd(jnp.asarray(x), jnp.asarray(y), jnp.asarray(xq),
                                2 * omega * mu)
  np.testing.assert_allclose(pair, dg, rtol=1e-3)


def test_optimal_scale_is_least_squares():
  rng = np.random.default_rng(5)
  f, t = rng.standard_normal(50), rng.standard_normal(50)
  with jax.enable_x64(True):
    c = predictors.optimal_scale(jnp.asarray(f), jnp.asarray(t))
  np.testing.assert_allclose(c, np.linalg.lstsq(f[:, None], t, rcond=None)[0][0],
                             rtol=1e-12)


def test_effective_preconditioner_and_pairing():
  rng = np.random.default_rng(6)
  p = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in
       (('Q', (2, 4, 4)), ('K', (2, 4, 4)), ('V', (2, 4, 4)), ('O', (2, 1, 4)))}
  gamma = analysis.effective_preconditioner(p, 3)
  want = sum((np.asarray(p['O'][h]) @ np.asarray(p['V'][h]))[0, -1] *
             (np.asarray(p['Q'][h]).T @ np.asarray(p['K'][h]))[:3, :3] / 2.0
             for h in range(2))
  np.testing.assert_allclose(gamma, want, rtol=1e-4, atol=1e-6)
  r = analysis.pairing([0.2, -0.19], [3.0, -3.3])
  assert r['opposite_omega'] and r['opposite_mu']
  np.testing.assert_allclose(r['omega_mismatch'], 0.01 / 0.39)
  assert analysis.cosine(np.eye(3), 2 * np.eye(3)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='shape'):
    analysis.pairing([1.0], [1.0])


def test_model_summary_active_and_dummy_heads():
  """Active heads by |omega mu|; the KQ off-diagonal ratio pooled over them only."""
  d, dd = 3, 4
  kq = np.zeros((3, dd, dd))
  kq[0, :d, :d] = 0.5 * np.eye(d)
  kq[1, :d, :d] = -0.5 * np.eye(d) + 0.01  # small off-diagonal leak
  kq[2, :d, :d] = 0.3 * (np.ones((d, d)) - np.eye(d))  # a dummy: no diagonal
  ov = np.zeros((3, 1, dd))
  ov[:, 0, -1] = [2.0, -2.0, 1e-3]
  # Q = I, K = KQ gives Q^T K = KQ; O = OV, V = I gives O V = OV.
  p = {'Q': np.broadcast_to(np.eye(dd), (1, 3, dd, dd)),
       'K': kq[None], 'V': np.broadcast_to(np.eye(dd), (1, 3, dd, dd)),
       'O': ov[None]}
  (row,) = analysis.model_summary(p, (3,), d)
  assert row['active_heads'] == [[True, True, False]]
  off = 0.01 ** 2 * (d * d - d)
  diag = 0.25 * d + (0.49 ** 2) * d
  np.testing.assert_allclose(row['offdiag_ratio_active_heads'],
                             [np.sqrt(off / diag)], rtol=1e-5)
  assert row['offdiag_ratio'][0] > 0.5  # pooled over every head: the dummy dominates
  np.testing.assert_allclose(row['sum_mu'], [1e-3], atol=1e-7)


def test_bad_inputs():
  x, y, xq = (jnp.asarray(a) for a in _problem(7))
  with pytest.raises(ValueError, match='x must'):
    predictors.gd(x[0], y, xq, 1.0)
  with pytest.raises(ValueError, match='y must'):
    predictors.gd(x, y[:, :3], xq, 1.0)
  with pytest.raises(ValueError, match='xq must'):
    predictors.ridge(x, y, xq[:, :2], 0.1, 1.0)
  with pytest.raises(ValueError, match='mask'):
    predictors.debiased_gd(x, y, xq, 1.0, mask=jnp.ones((3, 7)))
  with pytest.raises(ValueError, match='omega and mu'):
    predictors.reduced_multihead(x, y, xq, jnp.ones(2), jnp.ones(3))
  with pytest.raises(ValueError, match='features and target'):
    predictors.optimal_scale(jnp.ones(3), jnp.ones(4))
