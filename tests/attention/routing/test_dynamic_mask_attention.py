"""Dynamic Mask Attention vs the paper's equations written with NumPy loops."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.routing import dynamic_mask_attention as dma
from tests import oracles


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed, b=2, t=12, n=4, kh=2, h=4):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, m, h))) for m in (n, kh, kh))
  w_d = jnp.asarray(rng.normal(size=(kh * h, kh)))
  a = jnp.asarray(rng.normal(size=(kh,)))
  return q, k, v, w_d, a


def numpy_bias(v, w_d, a, use_exp):
  v, w_d, a = (np.asarray(x) for x in (v, w_d, a))
  b, s, kh, h = v.shape
  out = np.zeros((b, kh, 1, s))
  for bi in range(b):
    for j in range(s):
      z = v[bi, j].reshape(-1) @ w_d  # [K]
      delta = a * np.log1p(np.exp(z))
      out[bi, :, 0, j] = np.exp(delta) if use_exp else delta
  return out


def numpy_keep(bias, window, t, causal):
  """Per query, the top-w visible keys by a stable descending sort of the bias."""
  bias = np.asarray(bias)
  b, kh, _, s = bias.shape
  keep = np.zeros((b, kh, t, s), bool)
  for bi in range(b):
    for hi in range(kh):
      for i in range(t):
        cand = np.arange(s) if not causal else np.arange(min(i + 1, s))
        order = cand[np.argsort(-bias[bi, hi, 0, cand], kind='stable')]
        keep[bi, hi, i, order[:window]] = True
  return keep


@pytest.mark.parametrize('use_exp', [True, False])
def test_bias_and_keep_mask_match_loops(use_exp):
  q, k, v, w_d, a = _inputs(0)
  bias = dma.dma_bias(v, w_d, a, use_exp=use_exp)
  want = numpy_bias(v, w_d, a, use_exp)
  np.testing.assert_allclose(bias, want, rtol=1e-12)
  for window, causal in ((3, True), (5, False), (12, True), (20, True)):
    np.testing.assert_array_equal(
        dma.dma_keep_mask(bias, window, q_len=12, causal=causal),
        numpy_keep(want, window, 12, causal), err_msg=f'{window} {causal}')
  # Ties (A = 0 gives a constant bias): the lowest key indices win.
  flat = jnp.ones((1, 1, 1, 6))
  keep = dma.dma_keep_mask(flat, 2, q_len=6)
  np.testing.assert_array_equal(keep[0, 0, 5], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(keep[0, 0, 1], [1, 1, 0, 0, 0, 0])
  del q, k


def test_attention_and_parameter_gradients_equal_the_dense_reference():
  block_size = 4  # the kept tiles as block lists too (None: covered by the layer)
  q, k, v, w_d, a = _inputs(1)
  window = 4
  bias_np = numpy_bias(v, w_d, a, True)
  keep = numpy_keep(bias_np, window, 12, True)
  mask = np.repeat(keep, 2, axis=1)
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5,
                                    bias=np.repeat(bias_np, 2, axis=1), mask=mask)

  def run(q, k, v, w_d, a, impl='reference'):
    bias = dma.dma_bias(v, w_d, a)
    return dma.dynamic_mask_attention(q, k, v, bias, window=window,
                                      block_size=block_size, implementation=impl)

  for impl in ('reference', None):
    np.testing.assert_allclose(run(q, k, v, w_d, a, impl), want, atol=1e-10)
  dout = jnp.asarray(np.random.default_rng(2).normal(size=want.shape))
  # Oracle gradients: the same equations with the kept set frozen (it is detached).
  frozen = jnp.asarray(mask)

  def dense(q, k, v, w_d, a):
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    z = jnp.einsum('btnh,bsnh->bnts', q, kr) * 0.5
    z = z + jnp.repeat(dma.dma_bias(v, w_d, a), 2, axis=1)
    p = jax.nn.softmax(jnp.where(frozen, z, -jnp.inf), axis=-1)
    return jnp.einsum('bnts,bsnh->btnh', p, vr)

  got = jax.jit(jax.grad(lambda *x: jnp.sum(run(*x) * dout),
                         argnums=tuple(range(5))))(q, k, v, w_d, a)
  ref = jax.jit(jax.grad(lambda *x: jnp.sum(dense(*x) * dout),
                         argnums=tuple(range(5))))(q, k, v, w_d, a)
  for g, r, name in zip(got, ref, ('q', 'k', 'v', 'w_d', 'a')):
    np.testing.assert_allclose(g, r, atol=1e-10, err_msg=name)
  assert np.all(np.abs(got[3]) > 0) and np.all(np.abs(got[4]) > 0)  # W_D, A learn


def test_layer_trains_w_d_and_a():
  layer = dma.DynamicMaskAttention(8, 4, 4, num_kv_heads=2, window=3,
                                   rngs=nnx.Rngs(0))
  layer.a[...] = jnp.asarray([0.3, -0.2], jnp.float32)  # A = 0: no W_D gradient.
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 10, 8)), jnp.float32)
  changed = x.at[:, 6:].add(1.0)
  y, y2, grads = nnx.jit(lambda m: (m(x), m(changed), nnx.grad(
      lambda m: jnp.sum(m(x) ** 2))(m)))(layer)
  for name in ('wq', 'wk', 'wv', 'wo', 'w_d', 'a'):
    g = getattr(grads, name)[...]
    assert np.all(np.isfinite(g)) and np.any(g != 0), name
  np.testing.assert_allclose(y[:, :6], y2[:, :6], atol=1e-6)  # causal
  assert not np.allclose(y[:, 6:], y2[:, 6:])


def test_bad_input_names_the_argument():
  q, k, v, w_d, a = _inputs(4)
  bias = dma.dma_bias(v, w_d, a)
  with pytest.raises(ValueError, match='window must be a positive int'):
    dma.dynamic_mask_attention(q, k, v, bias, window=0)
  with pytest.raises(ValueError, match=r'bias must have shape \[B, K, 1, S\]'):
    dma.dynamic_mask_attention(q, k, v, bias[:, :1], window=2)
  with pytest.raises(ValueError, match=r'w_d must have shape \[K \* H, K\]'):
    dma.dma_bias(v, w_d[:4], a)
  with pytest.raises(ValueError, match=r'a must have shape \[K\]'):
    dma.dma_bias(v, w_d, a[:1])
  with pytest.raises(ValueError, match='num_heads \\(4\\) must be a multiple'):
    dma.DynamicMaskAttention(8, 4, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
