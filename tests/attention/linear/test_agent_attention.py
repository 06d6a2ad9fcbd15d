"""Agent attention against a direct float64 implementation of the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import agent_attention as ag


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def numpy_pool(q, grid, agent_grid):
  """Adaptive average pooling by explicit bins (PyTorch's AdaptiveAvgPool2d)."""
  q = np.asarray(q)
  b, t, n, d = q.shape
  qg = q.reshape(b, *grid, n, d)
  out = []
  if len(grid) == 1:
    for i in range(agent_grid[0]):
      lo, hi = int(np.floor(i * grid[0] / agent_grid[0])), int(
          np.ceil((i + 1) * grid[0] / agent_grid[0]))
      out.append(qg[:, lo:hi].mean(1))
    return np.stack(out, 1)
  for i in range(agent_grid[0]):
    for j in range(agent_grid[1]):
      y0, y1 = int(np.floor(i * grid[0] / agent_grid[0])), int(
          np.ceil((i + 1) * grid[0] / agent_grid[0]))
      x0, x1 = int(np.floor(j * grid[1] / agent_grid[1])), int(
          np.ceil((j + 1) * grid[1] / agent_grid[1]))
      out.append(qg[:, y0:y1, x0:x1].mean((1, 2)))
  return np.stack(out, 1)


def _softmax(z):
  z = z - z.max()
  return np.exp(z) / np.exp(z).sum()


def numpy_agent(q, k, v, a, b1=None, b2=None):
  """Loops: V_A[a] = sum_s softmax_s(A_a.K_s c + B1[a, s]) V_s, then
  O_t = sum_a softmax_a(Q_t.A_a c + B2[t, a]) V_A[a]."""
  q, k, v, a = (np.asarray(x) for x in (q, k, v, a))
  b, t, n, d = q.shape
  na = a.shape[1]
  c = d ** -0.5
  out = np.zeros(v.shape)
  for bi in range(b):
    for h in range(n):
      va = np.zeros((na, v.shape[-1]))
      for ai in range(na):
        z = np.array([a[bi, ai, h] @ k[bi, s, h] * c +
                      (0 if b1 is None else b1[h, ai, s]) for s in range(t)])
        va[ai] = _softmax(z) @ v[bi, :, h]
      for ti in range(t):
        z = np.array([q[bi, ti, h] @ a[bi, ai, h] * c +
                      (0 if b2 is None else b2[h, ti, ai]) for ai in range(na)])
        out[bi, ti, h] = _softmax(z) @ va
  return out


@pytest.mark.parametrize('grid,agent_grid', [((5, 4), (2, 3)), ((7,), (3,)),
                                             ((4, 4), (4, 4))])
def test_pooling_matches_adaptive_avg_pool(grid, agent_grid):
  rng = np.random.default_rng(0)
  q = _rand(rng, 2, int(np.prod(grid)), 2, 3)
  np.testing.assert_allclose(ag.pool_agents(q, agent_grid, grid),
                             numpy_pool(q, grid, agent_grid), atol=1e-12)


def test_forward_and_gradients_match_definition():
  rng = np.random.default_rng(1)
  grid, agent_grid = (4, 3), (2, 2)
  q, k, v = (_rand(rng, 2, 12, 2, 3), _rand(rng, 2, 12, 1, 3),
             _rand(rng, 2, 12, 1, 4))
  b1, b2 = _rand(rng, 2, 4, 12), _rand(rng, 2, 12, 4)
  kr, vr = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
  a = numpy_pool(q, grid, agent_grid)
  got = ag.agent_attention(q, k, v, agent_grid=agent_grid, grid=grid,
                           agent_bias=b1, query_bias=b2)
  np.testing.assert_allclose(got, numpy_agent(q, kr, vr, a, np.asarray(b1),
                                              np.asarray(b2)), atol=1e-12)

  # Gradients against the same equations written directly in jnp (dense pooling).
  pool = jnp.asarray(ag._grid.grid_pool_matrix(grid, agent_grid))
  def direct(q, k, v, b1, b2):
    k, v = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
    a = jnp.einsum('at,btnk->bank', pool, q)
    p1 = jax.nn.softmax(jnp.einsum('bank,bsnk->bnas', a, k) / jnp.sqrt(3.) + b1)
    p2 = jax.nn.softmax(jnp.einsum('btnk,bank->bnta', q, a) / jnp.sqrt(3.) + b2)
    return jnp.einsum('bnta,bnas,bsnv->btnv', p2, p1, v)
  w = _rand(rng, *got.shape)
  f = lambda *x: jnp.sum(ag.agent_attention(
      x[0], x[1], x[2], agent_grid=agent_grid, grid=grid, agent_bias=x[3],
      query_bias=x[4]) * w)
  want = jax.jit(jax.grad(lambda *x: jnp.sum(direct(*x) * w), tuple(range(5))))(
      q, k, v, b1, b2)
  for g, e in zip(jax.jit(jax.grad(f, tuple(range(5))))(q, k, v, b1, b2), want):
    np.testing.assert_allclose(g, e, atol=1e-11)


def test_given_agents_and_1d_sequence():
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 1, 9, 2, 3), _rand(rng, 1, 9, 2, 3), _rand(rng, 1, 9, 2, 2)
  a = _rand(rng, 1, 4, 2, 3)
  np.testing.assert_allclose(ag.agent_attention(q, k, v, agents=a),
                             numpy_agent(q, k, v, a), atol=1e-12)
  np.testing.assert_allclose(
      ag.agent_attention(q, k, v, agent_grid=(3,)),
      numpy_agent(q, k, v, numpy_pool(q, (9,), (3,))), atol=1e-12)


def test_decomposed_bias():
  rng = np.random.default_rng(3)
  ah, aw = _rand(rng, 2, 3, 4), _rand(rng, 2, 3, 5)
  got = np.asarray(ag.decomposed_bias([ah, aw])).reshape(2, 3, 4, 5)
  for y in range(4):
    for x in range(5):
      np.testing.assert_allclose(got[:, :, y, x], ah[:, :, y] + aw[:, :, x])


def test_layer_composes_pure_functions_and_trains():
  grid = (4, 4)
  layer = ag.AgentAttention(8, 2, 4, grid=grid, agent_grid=(2, 2),
                            rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(4), 2, 16, 8)
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  q, k, v = (jnp.einsum('btd,dnh->btnh', x, w[...]) for w in
             (layer.wq, layer.wk, layer.wv))
  b1 = ag.decomposed_bias([p[...] for p in layer.agent_bias])
  b2 = np.swapaxes(ag.decomposed_bias([p[...] for p in layer.query_bias]), 1, 2)
  o = numpy_agent(q, k, v, numpy_pool(q, grid, (2, 2)), np.asarray(b1), b2)
  # DWC: direct 3x3 'same' cross-correlation.
  vg = np.pad(np.asarray(v).reshape(2, 4, 4, 8), ((0, 0), (1, 1), (1, 1), (0, 0)))
  kern = np.asarray(layer.dwc_kernel[...])
  dwc = sum(kern[dy, dx] * vg[:, dy:dy + 4, dx:dx + 4]
            for dy in range(3) for dx in range(3))
  o = o + (dwc + np.asarray(layer.dwc_bias[...])).reshape(2, 16, 2, 4)
  np.testing.assert_allclose(y, np.einsum('btnh,nhd->btd', o, layer.wo[...]),
                             atol=1e-10)
  graphdef, params = nnx.split(layer, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(
      params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)


def test_bad_inputs():
  rng = np.random.default_rng(5)
  q = _rand(rng, 1, 6, 2, 3)
  with pytest.raises(ValueError, match='agent_grid is required'):
    ag.agent_attention(q, q, q)
  with pytest.raises(ValueError, match='agent_grid'):
    ag.agent_attention(q, q, q, agent_grid=(0,))
  with pytest.raises(ValueError, match='must not exceed'):
    ag.agent_attention(q, q, q, agent_grid=(7,))
  with pytest.raises(ValueError, match='grid'):
    ag.agent_attention(q, q, q, agent_grid=(2, 2), grid=(2, 2))
  with pytest.raises(ValueError, match='as many axes'):
    ag.agent_attention(q, q, q, agent_grid=(2, 2), grid=(6,))
  with pytest.raises(ValueError, match='agents'):
    ag.agent_attention(q, q, q, agents=_rand(rng, 1, 2, 2, 4))
  with pytest.raises(ValueError, match='agent_bias'):
    ag.agent_attention(q, q, q, agent_grid=(2,), agent_bias=_rand(rng, 2, 3, 6))
  with pytest.raises(ValueError, match='query_bias'):
    ag.agent_attention(q, q, q, agent_grid=(2,),
                       query_bias=_rand(rng, 3, 1, 6, 2))
  with pytest.raises(ValueError, match='key length'):
    ag.agent_attention(q, q[:, :5], q[:, :5], agent_grid=(2,))
  with pytest.raises(ValueError, match='kernel_size'):
    ag.AgentAttention(8, 2, 4, grid=(4, 4), agent_grid=(2, 2), kernel_size=2,
                      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='grid'):
    ag.AgentAttention(8, 2, 4, grid=(4, 4), agent_grid=(2, 2), rngs=nnx.Rngs(0))(
        _rand(rng, 1, 15, 8))
