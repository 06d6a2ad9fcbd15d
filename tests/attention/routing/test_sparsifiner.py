"""Sparsifiner's predictor, connectivity mask and distillation vs NumPy loops."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.routing import sparsifiner as sp
from tests import oracles

T, N, H, R, M = 9, 2, 4, 2, 2


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(2, T, N, H))) for _ in range(3))
  w_q, w_k = (jnp.asarray(rng.normal(size=(H, R))) for _ in range(2))
  p, u = (jnp.asarray(rng.normal(size=(T, M)) * 0.1) for _ in range(2))
  return q, k, v, w_q, w_k, p, u


def numpy_approx(q, k, w_q, w_k, p, u, sparse=False):
  q, k, w_q, w_k, p, u = (np.asarray(x) for x in (q, k, w_q, w_k, p, u))
  out = np.zeros((2, N, T, T))
  if sparse:
    u = np.where(np.abs(u) > 0.02, u, 0.0)
  for bi in range(2):
    for ni in range(N):
      qr, kr = q[bi, :, ni] @ w_q, k[bi, :, ni] @ w_k  # [T, R]
      kd = kr.T @ p  # [R, M]
      for i in range(T):
        z = qr[i] @ kd
        c = np.exp(z - z.max())
        c /= c.sum()
        if sparse:  # top-1 of the M = 2 basis weights (ties: lower index)
          c = np.where(np.arange(M) == np.argsort(-c, kind='stable')[0], c, 0.0)
        out[bi, ni, i] = u @ c
  return out


def numpy_mask(approx, keep):
  mask = np.zeros(approx.shape, bool)
  for idx in np.ndindex(approx.shape[:-1]):
    mask[idx + (np.argsort(-approx[idx], kind='stable')[:keep],)] = True
  mask[:, :, 0] = True  # CLS row dense
  return mask


@pytest.mark.parametrize('sparse', [False, True])
def test_predictor_and_mask_match_loops(sparse):
  q, k, v, *pred = _inputs(0)
  approx = sp.connectivity_scores(q, k, *pred, sparse=sparse, basis_top_k=1)
  want = numpy_approx(q, k, *pred, sparse=sparse)
  np.testing.assert_allclose(approx, want, atol=1e-12)
  mask = sp.connectivity_mask(approx, keep_ratio=0.25)  # ceil(0.25 * 9) = 3
  np.testing.assert_array_equal(mask, numpy_mask(want, 3))
  ties = sp.row_top_k_mask(jnp.zeros((1, 5)), 2)
  np.testing.assert_array_equal(ties, [[1, 1, 0, 0, 0]])
  del v


def test_masked_attention_and_distillation_gradient():
  layer = sp.Sparsifiner(8, N, H, num_tokens=T, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, T, 8)))
  proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...])
  q, k, v = proj(layer.wq), proj(layer.wk), proj(layer.wv)
  pred = (layer.pred_q[...], layer.pred_k[...], layer.basis_p[...],
          layer.basis_u[...])
  mask = numpy_mask(numpy_approx(q, k, *pred), 3)
  o, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=mask)
  want_y = np.einsum('btnh,nhd->btd', o, np.asarray(layer.wo[...]))
  # Distillation loss by loops: 0.01 * sum (A^ - softmax(q k^T / sqrt(d)))^2.
  qn, kn = np.asarray(q), np.asarray(k)
  teacher = np.zeros((2, N, T, T))
  for bi in range(2):
    for ni in range(N):
      z = qn[bi, :, ni] @ kn[bi, :, ni].T / 2
      e = np.exp(z - z.max(-1, keepdims=True))
      teacher[bi, ni] = e / e.sum(-1, keepdims=True)
  want_loss = 0.01 * np.sum((numpy_approx(q, k, *pred) - teacher) ** 2)

  def run(m):
    y, loss = m(x, return_loss=True)
    return y, loss, nnx.grad(lambda m: m(x, return_loss=True)[1])(m)

  y, loss, grads = nnx.jit(run)(layer)
  np.testing.assert_allclose(y, want_y, atol=1e-10)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-10)
  for name in ('pred_q', 'pred_k', 'basis_p', 'basis_u'):  # the predictor learns
    g = getattr(grads, name)[...]
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  for name in ('wq', 'wk', 'wv', 'wo'):  # teacher detached: no stage-1 gradient
    assert not np.any(getattr(grads, name)[...]), name
  # A few SGD steps on the distillation loss reduce it (stage 1).
  params = {n: getattr(layer, n)[...] for n in ('pred_q', 'pred_k', 'basis_p',
                                                 'basis_u')}
  qs, ks = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
  obj = jax.jit(jax.value_and_grad(lambda p: sp.connectivity_loss(
      sp.connectivity_scores(qs, ks, p['pred_q'], p['pred_k'], p['basis_p'],
                             p['basis_u']), sp.teacher_attention(qs, ks))))
  first, _ = obj(params)
  for _ in range(20):
    value, g = obj(params)
    params = jax.tree.map(lambda a, b: a - 2.0 * b, params, g)
  assert value < 0.8 * first, (first, value)


def test_bad_input_names_the_argument():
  q, k, _, w_q, w_k, p, u = _inputs(3)
  with pytest.raises(ValueError, match=r'w_q must have shape \[H, rank\]'):
    sp.connectivity_scores(q, k, w_q[:2], w_k, p, u)
  with pytest.raises(ValueError, match=r'p must have shape \[S, M\]'):
    sp.connectivity_scores(q, k, w_q, w_k, p[:4], u)
  with pytest.raises(ValueError, match=r'keep_ratio must be in \(0, 1\]'):
    sp.connectivity_mask(jnp.zeros((1, 1, 3, 3)), keep_ratio=0.0)
  with pytest.raises(ValueError, match=r'k must be in \[1, 3\]'):
    sp.row_top_k_mask(jnp.zeros((1, 3)), 4)
  with pytest.raises(ValueError, match=r'x must have shape \[B, 9, 8\]'):
    sp.Sparsifiner(8, N, H, num_tokens=T, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 8)))
