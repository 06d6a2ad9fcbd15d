"""GAAM vs the paper's equations in NumPy float64, gradients to delta and xi."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.variants import gaussian_adaptive_attention as gaam


def _paper(x, delta, xi, axis, causal, normalize, eps=1e-8):
  """The module docstring's equations with loops over the statistics' sets."""
  b, t, n, h = x.shape
  y = np.zeros_like(x)
  g_all = np.zeros_like(x)
  for bi in range(b):
    for ni in range(n):
      for ti in range(t):
        for hi in range(h):
          if axis == 'feature':
            vals = x[bi, ti, ni, :]
          else:
            vals = x[bi, :ti + 1 if causal else t, ni, hi]
          mu = vals.sum() / vals.size
          var = (vals ** 2).sum() / vals.size - mu ** 2
          x_norm = (x[bi, ti, ni, hi] - (mu + delta[ni])) / np.sqrt(var + eps)
          g_all[bi, ti, ni, hi] = np.exp(-x_norm ** 2 / (2 * xi[ni]))
  if normalize:
    red = -1 if axis == 'feature' else 1
    g_all = g_all / g_all.sum(red, keepdims=True)
  y = x * g_all
  return y


@pytest.mark.parametrize('axis,causal,normalize', [
    ('feature', False, False), ('feature', False, True), ('time', False, True),
    ('time', True, False)])
def test_equals_the_paper_equations(axis, causal, normalize):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 4)) * 1.5 + 0.3
  delta = rng.normal(size=3) * 0.5
  xi = rng.uniform(0.5, 3.0, size=3)
  with jax.enable_x64(True):
    got = gaam.gaussian_adaptive_attention(
        jnp.asarray(x), jnp.asarray(delta), jnp.asarray(xi), axis=axis,
        causal=causal, normalize=normalize)
  np.testing.assert_allclose(np.asarray(got), _paper(x, delta, xi, axis, causal,
                                                     normalize), atol=1e-12)


def test_grads_reach_mean_offset_and_variance_scale():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 2, 3))
  delta, xi = np.array([0.2, -0.4]), np.array([1.3, 0.7])
  f = lambda d, s: gaam.gaussian_adaptive_attention(
      jnp.asarray(x), d, s).sum()
  loop = lambda d, s: _paper(x, d, s, 'feature', False, False).sum()
  with jax.enable_x64(True):
    gd, gs = jax.grad(f, argnums=(0, 1))(jnp.asarray(delta), jnp.asarray(xi))
  eps = 1e-6
  for i in range(2):
    e = np.eye(2)[i] * eps
    np.testing.assert_allclose(float(gd[i]), (loop(delta + e, xi) -
                                              loop(delta - e, xi)) / (2 * eps),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(gs[i]), (loop(delta, xi + e) -
                                              loop(delta, xi - e)) / (2 * eps),
                               rtol=1e-6, atol=1e-9)
  # Through the layer: the GAAM parameters of q and k receive gradients.
  layer = gaam.GAAMAttention(8, 2, 4, causal=True, rngs=nnx.Rngs(0))
  xs = jnp.asarray(rng.normal(size=(2, 6, 8)), jnp.float32)
  grads = nnx.jit(lambda m: nnx.grad(lambda m: jnp.sum(m(xs) ** 2))(m))(layer)
  for sub in (grads.gaam_q, grads.gaam_k):
    assert float(jnp.abs(sub.mean_offset[...]).sum()) > 0
    assert float(jnp.abs(sub.c[...]).sum()) > 0
  # Causal: outputs at t < 3 ignore tokens >= 3.
  call = nnx.jit(lambda m, x: m(x))
  y, y2 = call(layer, xs), call(layer, xs.at[:, 3:].set(1.0))
  np.testing.assert_allclose(np.asarray(y[:, :3]), np.asarray(y2[:, :3]),
                             atol=1e-6)


def test_bad_input_names_the_argument():
  x = jnp.zeros((1, 4, 2, 3))
  ok = jnp.ones((2,))
  with pytest.raises(ValueError, match='mean_offset'):
    gaam.gaussian_adaptive_attention(x, jnp.ones((3,)), ok)
  with pytest.raises(ValueError, match='variance_scale'):
    gaam.gaussian_adaptive_attention(x, ok, jnp.ones((2, 1)))
  with pytest.raises(ValueError, match='axis'):
    gaam.gaussian_adaptive_attention(x, ok, ok, axis='channel')
  with pytest.raises(ValueError, match='normalize'):
    gaam.gaussian_adaptive_attention(x, ok, ok, axis='time', causal=True,
                                     normalize=True)
  with pytest.raises(ValueError, match='x'):
    gaam.gaussian_adaptive_attention(jnp.zeros((4, 2, 3)), ok, ok)
  with pytest.raises(ValueError, match='initial_c'):
    gaam.GaussianAdaptiveAttention(2, initial_c=0.0)
