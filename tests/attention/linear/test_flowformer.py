"""Flow attention against direct loops over the Flowformer equations (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import flowformer


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def numpy_flow(q, k, v, *, causal):
  """Per head, per position loops over the definitions (no vectorised sums)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, n_q, heads, _ = q.shape
  m_k = k.shape[1]
  out = np.zeros((b, n_q, heads, v.shape[-1]))
  for bi in range(b):
    for h in range(heads):
      fq, fk, vv = _sig(q[bi, :, h]), _sig(k[bi, :, h]), v[bi, :, h]
      if not causal:
        inc = [fq[i] @ sum(fk[j] for j in range(m_k)) for i in range(n_q)]
        og = [fk[j] @ sum(fq[i] for i in range(n_q)) for j in range(m_k)]
        inc_hat = [fq[i] @ sum(fk[j] / og[j] for j in range(m_k))
                   for i in range(n_q)]
        out_hat = np.array([fk[j] @ sum(fq[i] / inc[i] for i in range(n_q))
                            for j in range(m_k)])
        comp = np.exp(out_hat) / np.exp(out_hat).sum() * m_k
        for i in range(n_q):
          agg = sum((fq[i] / inc[i]) @ fk[j] * comp[j] * vv[j]
                    for j in range(m_k))
          out[bi, i, h] = _sig(inc_hat[i] * n_q / m_k) * agg
        continue
      c = np.arange(1, n_q + 1)
      inc = [fq[t] @ sum(fk[j] for j in range(t + 1)) for t in range(n_q)]
      og = [fk[t] @ sum(fq[i] for i in range(t + 1)) for t in range(n_q)]
      inc_hat = [fq[t] @ sum(fk[j] * c[j] / og[j] for j in range(t + 1)) / c[t]
                 for t in range(n_q)]
      out_hat = np.array([fk[t] @ sum(fq[i] * c[i] / inc[i]
                                      for i in range(t + 1)) / c[t]
                          for t in range(n_q)])
      comp = [np.exp(out_hat[t]) / np.exp(out_hat[:t + 1]).sum() * c[t]
              for t in range(n_q)]
      for t in range(n_q):
        agg = sum((fq[t] / inc[t]) @ fk[j] * comp[j] * vv[j]
                  for j in range(t + 1))
        out[bi, t, h] = _sig(inc_hat[t]) * agg
  return out


def jnp_quadratic_flow(q, k, v, *, causal):
  """The equations in dense jnp with explicit [T, S] masks (gradient oracle)."""
  fq, fk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
  n_q, m_k = q.shape[1], k.shape[1]
  mask = jnp.tril(jnp.ones((n_q, m_k))) if causal else jnp.ones((n_q, m_k))
  c = jnp.sum(mask, 1)  # [T] keys seen (= t + 1 when causal)
  a = jnp.einsum('btnk,bsnk->bnts', fq, fk) * mask  # [B, N, T, S]
  inc = a.sum(-1)  # [B, N, T]
  og = jnp.einsum('bnts->bns', a) if not causal else jnp.einsum(
      'btnk,bsnk,ts->bnt', fk, fq, mask)  # [B, N, S]
  if not causal:
    inc_hat = jnp.einsum('bnts,bns->bnt', a, 1 / og)
    out_hat = jnp.einsum('bnts,bnt->bns', a, 1 / inc)
    comp = jax.nn.softmax(out_hat, -1) * m_k
    alloc = jax.nn.sigmoid(inc_hat * n_q / m_k)
  else:
    inc_hat = jnp.einsum('bnts,bns->bnt', a, c / og) / c
    out_hat = jnp.einsum('btnk,bsnk,ts,bns->bnt', fk, fq, mask, c / inc) / c
    z = jnp.where(mask > 0, out_hat[..., None, :], -jnp.inf)  # [B, N, T, S]
    comp = jnp.exp(out_hat - jax.nn.logsumexp(z, -1)) * c
    alloc = jax.nn.sigmoid(inc_hat)
  r = jnp.einsum('bnts,bsnv->btnv', a / inc[..., None],
                 v * jnp.moveaxis(comp, 1, 2)[..., None])
  return r * jnp.moveaxis(alloc, 1, 2)[..., None]


@pytest.mark.parametrize('causal', [False, True])
def test_matches_direct_equations_forward_and_gradients(causal):
  rng = np.random.default_rng(0)
  q, k, v = _rand(rng, 2, 5, 2, 3), _rand(rng, 2, 5, 2, 3), _rand(rng, 2, 5, 2, 4)
  want = numpy_flow(q, k, v, causal=causal)
  np.testing.assert_allclose(jnp_quadratic_flow(q, k, v, causal=causal), want,
                             atol=1e-12)
  got = jax.jit(lambda *a: flowformer.flow_attention(
      *a, causal=causal, chunk_size=4))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-12)
  w = _rand(rng, *got.shape)
  g1 = jax.jit(jax.grad(lambda *a: jnp.sum(flowformer.flow_attention(
      *a, causal=causal, chunk_size=4) * w), (0, 1, 2)))(q, k, v)
  g2 = jax.jit(jax.grad(lambda *a: jnp.sum(jnp_quadratic_flow(
      *a, causal=causal) * w), (0, 1, 2)))(q, k, v)
  for a, e in zip(g1, g2):
    np.testing.assert_allclose(a, e, atol=1e-11)


def test_cross_attention_lengths_and_gqa():
  rng = np.random.default_rng(1)
  q, k, v = _rand(rng, 1, 5, 4, 3), _rand(rng, 1, 8, 2, 3), _rand(rng, 1, 8, 2, 2)
  want = numpy_flow(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), causal=False)
  np.testing.assert_allclose(flowformer.flow_attention(q, k, v), want,
                             atol=1e-12)


def test_causal_prefix_is_independent_of_the_future():
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 1, 9, 2, 3), _rand(rng, 1, 9, 2, 3), _rand(rng, 1, 9, 2, 3)
  full = flowformer.flow_attention(q, k, v, causal=True)
  part = flowformer.flow_attention(q[:, :5], k[:, :5], v[:, :5], causal=True)
  np.testing.assert_allclose(full[:, :5], part, atol=1e-12)


def test_layer_and_bad_inputs():
  x = _rand(np.random.default_rng(3), 2, 7, 8)
  for causal in (False, True):
    layer = flowformer.FlowAttention(8, 2, 4, causal=causal, rngs=nnx.Rngs(0))
    q, k, v = (jnp.einsum('btd,dnh->btnh', x, w[...]) for w in
               (layer.wq, layer.wk, layer.wv))
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(layer, x),
        np.einsum('btnh,nhd->btd', numpy_flow(q, k, v, causal=causal),
                  layer.wo[...]), atol=1e-10)
    graphdef, params = nnx.split(layer, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(
        params)
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
  q = x.reshape(2, 7, 2, 4)
  with pytest.raises(ValueError, match='key length'):
    flowformer.flow_attention(q, q[:, :3], q[:, :3], causal=True)
  with pytest.raises(TypeError, match='causal'):
    flowformer.flow_attention(q, q, q, causal=1)
  with pytest.raises(ValueError, match='value heads'):
    flowformer.flow_attention(q, q, q[:, :, :1])
  with pytest.raises(ValueError, match='x must'):
    flowformer.FlowAttention(8, 2, 4, rngs=nnx.Rngs(0))(q)
