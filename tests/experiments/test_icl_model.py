"""Tests of the ICL data sampler and the one-layer attention model (NumPy oracles)."""

import math

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.icl import data
from experiments.icl import model


def _np_softmax_model(params, ctx, q, heads, linear=False, normalize=False):
  """f = sum_h O_h V_h Z softmax(Z^T K_h^T Q_h z_q / sqrt(D)), by loops (float64)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  ctx, q = np.asarray(ctx, np.float64), np.asarray(q, np.float64)
  b, l, dd = ctx.shape
  t = p['O'].shape[1]
  out = np.zeros((b, len(heads), t))
  n = 0
  for m, h in enumerate(heads):
    for _ in range(h):
      for i in range(b):
        z = ctx[i].T  # [D, L]
        logits = z.T @ p['K'][n].T @ p['Q'][n] @ q[i] / math.sqrt(dd)
        if linear:
          w = logits / (l if normalize else 1.0)
        else:
          w = np.exp(logits - logits.max())
          w = w / w.sum()
        out[i, m] += p['O'][n] @ p['V'][n] @ z @ w
      n += 1
  return out


def _rand_params(seed, heads, dd, t=1):
  return model.init_params(jax.random.key(seed), heads, dd, t)


@hypothesis.settings(max_examples=3)
@hypothesis.given(b=st.integers(1, 3), l=st.integers(1, 7), d=st.integers(1, 4),
                  t=st.integers(1, 2),
                  heads=st.lists(st.integers(1, 3), min_size=1, max_size=3))
def test_softmax_forward_matches_loop_oracle(b, l, d, t, heads):
  heads = tuple(heads)
  dd = d + t
  rng = np.random.default_rng(b * 100 + l * 10 + d)
  params = _rand_params(l, heads, dd, t)
  # Larger weights than init so the softmax is far from uniform.
  params = jax.tree.map(lambda a: 3 * a, params)
  ctx = rng.standard_normal((b, l, dd)).astype(np.float32)
  q = rng.standard_normal((b, dd)).astype(np.float32)
  want = _np_softmax_model(params, ctx, q, heads)
  softmax = jax.jit(model.softmax_forward,
                    static_argnames=('heads', 'projection'))
  linear = jax.jit(model.linear_forward, static_argnames=('heads', 'normalize'))
  for projection in model.PROJECTIONS:
    got = softmax(params, jnp.asarray(ctx), jnp.asarray(q), heads=heads,
                  projection=projection)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  for normalize in (False, True):
    got = linear(params, jnp.asarray(ctx), jnp.asarray(q), heads=heads,
                 normalize=normalize)
    np.testing.assert_allclose(
        got, _np_softmax_model(params, ctx, q, heads, True, normalize),
        rtol=2e-4, atol=2e-5)


def test_mask_equals_truncated_context():
  heads = (1, 2)
  params = jax.tree.map(lambda a: 3 * a, _rand_params(0, heads, 6))
  rng = np.random.default_rng(0)
  ctx = jnp.asarray(rng.standard_normal((4, 9, 6)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  mask = jnp.broadcast_to(jnp.arange(9) < 5, (4, 9))
  for fn in (model.softmax_forward, model.linear_forward):
    np.testing.assert_allclose(fn(params, ctx, q, heads, mask=mask),
                               fn(params, ctx[:, :5], q, heads), rtol=1e-5,
                               atol=1e-6)


def test_gradients_match_between_projections_and_finite_differences():
  heads = (2, 1)
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: 2 * a.astype(jnp.float64),
                          _rand_params(3, heads, 4))
    ctx = jnp.asarray(rng.standard_normal((3, 6, 4)))
    q = jnp.asarray(rng.standard_normal((3, 4)))
    target = jnp.asarray(rng.standard_normal((3, 2, 1)))

    def loss(p, projection):
      out = model.softmax_forward(p, ctx, q, heads, projection=projection)
      return jnp.sum((out - target) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_f = grad(params, 'folded')
    g_t = grad(params, 'tokens')
    for k in params:
      np.testing.assert_allclose(g_f[k], g_t[k], rtol=1e-10, atol=1e-12)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape)),
                             params)
    eps = 1e-6
    plus = jax.tree.map(lambda a, v: a + eps * v, params, direction)
    minus = jax.tree.map(lambda a, v: a - eps * v, params, direction)
    value = jax.jit(loss, static_argnums=1)
    fd = (value(plus, 'folded') - value(minus, 'folded')) / (2 * eps)
    analytic = sum(jnp.sum(g_f[k] * direction[k]) for k in params)
    np.testing.assert_allclose(fd, analytic, rtol=1e-6)


def test_init_is_pytorch_uniform():
  heads = (1, 4)
  p = _rand_params(0, heads, 6)
  for k in ('Q', 'K', 'V'):
    assert p[k].shape == (5, 6, 6)
    assert float(jnp.max(jnp.abs(p[k]))) <= 1 / math.sqrt(6)
    assert float(jnp.max(jnp.abs(p[k]))) > 0.9 / math.sqrt(6)
  assert p['O'].shape == (5, 1, 6)
  assert float(jnp.max(jnp.abs(p['O'][0]))) <= 1 / math.sqrt(6)
  assert float(jnp.max(jnp.abs(p['O'][1:]))) <= 1 / math.sqrt(24)


def test_readouts_match_definitions():
  p = _rand_params(2, (3,), 6)
  kq = np.asarray(model.kq_matrices(p))
  ov = np.asarray(model.ov_matrices(p))
  for h in range(3):
    np.testing.assert_allclose(kq[h], np.asarray(p['Q'][h]).T @ np.asarray(
        p['K'][h]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ov[h], np.asarray(p['O'][h]) @ np.asarray(
        p['V'][h]), rtol=1e-5, atol=1e-7)
  omega, mu = model.omega_mu(p, 5)
  np.testing.assert_allclose(
      omega, [np.mean(np.diag(kq[h])[:5]) / math.sqrt(6) for h in range(3)],
      rtol=1e-5)
  np.testing.assert_allclose(mu, ov[:, 0, -1], rtol=1e-6)


def test_group_helpers_and_bad_inputs():
  np.testing.assert_array_equal(model.group_matrix((1, 2)),
                                [[1, 0], [0, 1], [0, 1]])
  assert model.head_slices((1, 2)) == [slice(0, 1), slice(1, 3)]
  for bad in ((), (0,), (2, -1), (True,)):
    with pytest.raises(ValueError, match='heads'):
      model.group_matrix(bad)
  p = _rand_params(0, (2,), 6)
  ctx, q = jnp.zeros((2, 3, 6)), jnp.zeros((2, 6))
  with pytest.raises(ValueError, match='sum to the number'):
    model.softmax_forward(p, ctx, q, (3,))
  with pytest.raises(ValueError, match='context'):
    model.softmax_forward(p, jnp.zeros((2, 3, 5)), q, (2,))
  with pytest.raises(ValueError, match='query'):
    model.softmax_forward(p, ctx, jnp.zeros((3, 6)), (2,))
  with pytest.raises(ValueError, match='mask'):
    model.softmax_forward(p, ctx, q, (2,), mask=jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match='projection'):
    model.softmax_forward(p, ctx, q, (2,), projection='fast')


def test_sampler_distribution():
  task = data.Task(d=4, sigma2=0.25)
  b = data.sample(task, jax.random.key(0), 4000, 10)
  assert b.x.shape == (4000, 10, 4) and b.y.shape == (4000, 10, 1)
  assert b.context.shape == (4000, 10, 5) and b.query.shape == (4000, 5)
  np.testing.assert_allclose(np.var(b.x), 1.0, atol=0.02)
  np.testing.assert_allclose(np.var(b.beta), 1 / 4, atol=0.01)
  resid = b.y[..., 0] - jnp.einsum('bli,bi->bl', b.x, b.beta[:, 0])
  np.testing.assert_allclose(np.var(resid), 0.25, atol=0.01)
  assert np.all(np.asarray(b.query[:, -1]) == 0)
  # x, beta and eps come from one draw: no correlation between the parts.
  eps = np.asarray(resid).ravel()
  xs = np.asarray(b.x[..., 0]).ravel()
  assert abs(np.corrcoef(eps, xs)[0, 1]) < 0.02
  assert abs(np.mean(np.asarray(b.x) ** 4) - 3) < 0.1  # Gaussian kurtosis


def test_noniso_and_multitask_sampler():
  task = data.Task(d=4, sigma2=0.0, rho=0.5)
  x = np.asarray(data.sample_numpy(task, 0, 20000, 3).x).reshape(-1, 4)
  np.testing.assert_allclose(np.cov(x.T), task.covariance(), atol=0.03)
  mt = data.Task(d=6, sigma2=0.0, windows=((0, 4), (2, 6)))
  assert mt.token_dim == 8 and mt.num_tasks == 2
  b = data.sample(mt, jax.random.key(2), 8, 5)
  beta = np.asarray(b.beta)
  assert np.all(beta[:, 0, 4:] == 0) and np.all(beta[:, 1, :2] == 0)
  np.testing.assert_allclose(
      b.y, np.einsum('bli,bti->blt', b.x, beta), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(d=0, sigma2=0.1), 'd must'),
    (dict(d=2.5, sigma2=0.1), 'd must'),
    (dict(d=3, sigma2=-1.0), 'sigma2'),
    (dict(d=3, sigma2=0.1, rho=1.0), 'rho'),
    (dict(d=3, sigma2=0.1, windows=((0, 4),)), 'window'),
    (dict(d=3, sigma2=0.1, windows=()), 'windows'),
])
def test_bad_task(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    data.Task(**kwargs)


def test_bad_sample_sizes():
  with pytest.raises(ValueError, match='batch'):
    data.sample_numpy(data.Task(d=2, sigma2=0.1), 0, 0, 3)
  with pytest.raises(ValueError, match='length'):
    data.sample(data.Task(d=2, sigma2=0.1), jax.random.key(0), 2, -1)


def _old_linear_forward(params, context, query, heads, mask=None, normalize=False):
  """The study's own formula before it used `attention.linear` (kept as a check)."""
  dd = context.shape[-1]
  kq = jnp.einsum('nji,njk->nik', params['K'], params['Q'])
  q_fold = jnp.einsum('nik,bk->bni', kq, query)  # [B, N, D]
  scores = jnp.einsum('bni,bli->bnl', q_fold, context) / math.sqrt(dd)
  if mask is not None:
    scores = scores * mask[:, None, :].astype(scores.dtype)
  out = jnp.einsum('bnl,bli->bni', scores, context)
  if normalize:
    count = (jnp.full(context.shape[:1], context.shape[1], scores.dtype)
             if mask is None else jnp.sum(mask, axis=1).astype(scores.dtype))
    out = out / count[:, None, None]
  ov = jnp.einsum('nti,nij->ntj', params['O'], params['V'])
  per_head = jnp.einsum('ntj,bnj->bnt', ov, out)
  return jnp.einsum('bnt,nm->bmt', per_head,
                    jnp.asarray(model.group_matrix(heads), per_head.dtype))


@pytest.mark.parametrize('normalize', [False, True])
@pytest.mark.parametrize('masked', [False, True])
def test_linear_forward_equals_the_old_formula(normalize, masked):
  heads = (1, 2, 4)
  params = _rand_params(3, heads, 7, t=2)
  rng = np.random.default_rng(1)
  ctx = jnp.asarray(rng.standard_normal((5, 23, 7)), jnp.float32)
  q = jnp.asarray(rng.standard_normal((5, 7)), jnp.float32)
  mask = (jnp.asarray(rng.uniform(size=(5, 23)) < 0.7) if masked else None)
  new = lambda p: model.linear_forward(p, ctx, q, heads, mask=mask,
                                       normalize=normalize)
  old = lambda p: _old_linear_forward(p, ctx, q, heads, mask=mask,
                                      normalize=normalize)
  np.testing.assert_allclose(jax.jit(new)(params), jax.jit(old)(params),
                             rtol=1e-5, atol=1e-6)
  g_new = jax.jit(jax.grad(lambda p: jnp.sum(new(p) ** 2)))(params)
  g_old = jax.jit(jax.grad(lambda p: jnp.sum(old(p) ** 2)))(params)
  for name in params:
    np.testing.assert_allclose(g_new[name], g_old[name], rtol=1e-4, atol=1e-5)
