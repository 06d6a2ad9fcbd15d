"""InLine attention against a direct float64 implementation of the paper's equations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import inline_attention as inl


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def numpy_inline(q, k, v, *, causal, phi=lambda x: x, c=None):
  """Loops over the definition: weights InL(Q_i)_j = c/N_i [phi(Q_i).phi(K_j) - mean_s
  phi(Q_i).phi(K_s)] + 1/N_i over the N_i visible keys, O_i = sum_j w_ij V_j."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, d = q.shape
  c = d ** -0.5 if c is None else c
  out = np.zeros(v.shape[:2] + (n, v.shape[-1]))
  for bi in range(b):
    for h in range(n):
      for i in range(t):
        keys = range(i + 1) if causal else range(t)
        m = len(keys)
        dots = [phi(q[bi, i, h]) @ phi(k[bi, j, h]) for j in keys]
        mean = sum(dots) / m
        for j, dot in zip(keys, dots):
          out[bi, i, h] += (c / m * (dot - mean) + 1.0 / m) * v[bi, j, h]
  return out


def jnp_paper_form(q, k, v, *, causal):
  """The spec's closed form written per query (an independent gradient oracle):
  O_i = (c/N_i) q_i^T sum_j k_j v_j^T + (1 - c q_i^T kbar_i) vbar_i."""
  t, d = q.shape[1], q.shape[-1]
  c = d ** -0.5
  rows = []
  for i in range(t):
    kk, vv = (k[:, :i + 1], v[:, :i + 1]) if causal else (k, v)
    m = kk.shape[1]
    kv = jnp.einsum('bsnk,bsnv->bnkv', kk, vv)
    qi = q[:, i]
    rows.append(c / m * jnp.einsum('bnk,bnkv->bnv', qi, kv) +
                (1 - c * jnp.einsum('bnk,bnk->bn', qi, kk.mean(1)))[..., None] *
                vv.mean(1))
  return jnp.stack(rows, 1)


@pytest.mark.parametrize('causal', [False, True])
def test_forms_match_numpy_definition(causal):
  rng = np.random.default_rng(0)
  q, k, v = _rand(rng, 2, 7, 2, 3), _rand(rng, 2, 7, 2, 3), _rand(rng, 2, 7, 2, 4)
  want = numpy_inline(q, k, v, causal=causal)
  np.testing.assert_allclose(jax.jit(functools.partial(
      inl.naive_inline_attention, causal=causal))(q, k, v), want, atol=1e-12)
  np.testing.assert_allclose(jax.jit(functools.partial(
      inl.inline_attention, causal=causal, chunk_size=3))(q, k, v), want,
                             atol=1e-12)


def test_weights_sum_to_one_and_feature_map_and_gqa():
  rng = np.random.default_rng(1)
  q, k = _rand(rng, 1, 6, 4, 3), _rand(rng, 1, 6, 2, 3)
  ones = jnp.ones((1, 6, 2, 1))
  # Constant values: the weights sum to one, so the output is exactly one.
  np.testing.assert_allclose(inl.inline_attention(q, k, ones), 1.0, atol=1e-12)
  v = _rand(rng, 1, 6, 2, 5)
  relu = lambda x: np.maximum(x, 0)
  want = numpy_inline(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2), causal=False,
                      phi=relu, c=0.7)
  got = inl.inline_attention(q, k, v, feature_map='relu', scale=0.7)
  np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize('causal', [False, True])
def test_gradients_match_paper_form(causal):
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 1, 5, 2, 3), _rand(rng, 1, 5, 2, 3), _rand(rng, 1, 5, 2, 2)
  w = _rand(rng, 1, 5, 2, 2)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
  want = jax.jit(jax.grad(loss(lambda *a: jnp_paper_form(*a, causal=causal)),
                          (0, 1, 2)))(q, k, v)
  for fn in (inl.naive_inline_attention, inl.inline_attention):
    got = jax.jit(jax.grad(loss(lambda *a, fn=fn: fn(*a, causal=causal)),
                           (0, 1, 2)))(q, k, v)
    for g, e in zip(got, want):
      np.testing.assert_allclose(g, e, atol=1e-11)


def numpy_local(v, kern, grid):
  """Direct 'same' cross-correlation with zero padding over a 2D grid."""
  v, kern = np.asarray(v), np.asarray(kern)
  b, t, n, hv = v.shape
  hh, ww = grid
  kh, kw = kern.shape[1:3]
  vg = v.reshape(b, hh, ww, n, hv)
  out = np.zeros_like(vg)
  for y in range(hh):
    for x in range(ww):
      for dy in range(kh):
        for dx in range(kw):
          yy, xx = y + dy - kh // 2, x + dx - kw // 2
          if 0 <= yy < hh and 0 <= xx < ww:
            out[:, y, x] += kern[:, dy, dx] * vg[:, yy, xx]
  return out.reshape(v.shape)


def test_local_term_matches_direct_conv_and_gradients():
  rng = np.random.default_rng(3)
  grid = (3, 4)
  v, kern = _rand(rng, 2, 12, 2, 3), _rand(rng, 2, 3, 3, 2, 3)
  np.testing.assert_allclose(inl.inline_local_term(v, kern, grid),
                             numpy_local(v, kern, grid), atol=1e-12)
  w = _rand(rng, 2, 12, 2, 3)
  f = jax.jit(lambda vv, kk: jnp.sum(inl.inline_local_term(vv, kk, grid) * w))
  gv, gk = jax.jit(jax.grad(f, (0, 1)))(v, kern)
  # The map is bilinear: grads are the conv with w / the correlation of w and v.
  eps = 1e-6
  dv, dk = _rand(rng, *v.shape), _rand(rng, *kern.shape)
  fd = (f(v + eps * dv, kern + eps * dk) - f(v - eps * dv, kern - eps * dk)) / (
      2 * eps)
  np.testing.assert_allclose(jnp.sum(gv * dv) + jnp.sum(gk * dk), fd, rtol=1e-7)


def test_layer_composes_pure_functions_and_trains():
  grid = (3, 3)
  layer = inl.InLineAttention(8, 2, 4, grid=grid, rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(4), 2, 9, 8)
  y = nnx.jit(lambda m, x: m(x))(layer, x)
  assert y.shape == (2, 9, 8)
  q, k, v = (jnp.einsum('btd,dnh->btnh', x, w[...]) for w in
             (layer.wq, layer.wk, layer.wv))
  hid = jax.nn.gelu(jnp.einsum('bd,dnh->bnh', x.mean(1), layer.w_local1[...]))
  r = jnp.einsum('bnh,nhe->bne', hid, layer.w_local2[...]).reshape(2, 2, 3, 3, 4)
  o = numpy_inline(q, k, v, causal=False) + numpy_local(
      v, np.moveaxis(np.asarray(r), 1, -2), grid)
  np.testing.assert_allclose(y, np.einsum('btnh,nhd->btd', o, layer.wo[...]),
                             atol=1e-10)
  graphdef, params = nnx.split(layer, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(
      params)
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf)) and np.any(leaf != 0)
  causal = inl.InLineAttention(8, 2, 4, causal=True, local=False,
                               rngs=nnx.Rngs(1))
  assert nnx.jit(lambda m, x: m(x))(causal, x).shape == (2, 9, 8)


def test_bad_inputs():
  rng = np.random.default_rng(5)
  q, v = _rand(rng, 1, 4, 2, 3), _rand(rng, 1, 4, 2, 3)
  with pytest.raises(ValueError, match='key length'):
    inl.inline_attention(q, _rand(rng, 1, 5, 2, 3), _rand(rng, 1, 5, 2, 3))
  with pytest.raises(ValueError, match='query heads'):
    inl.inline_attention(_rand(rng, 1, 4, 3, 3), q, v)
  with pytest.raises(ValueError, match='scale'):
    inl.inline_attention(q, q, v, scale=-1.0)
  with pytest.raises(ValueError, match='feature_map'):
    inl.inline_attention(q, q, v, feature_map='nope')
  with pytest.raises(ValueError, match='grid'):
    inl.inline_local_term(v, _rand(rng, 1, 3, 3, 2, 3), (3, 3))
  with pytest.raises(ValueError, match='kernels'):
    inl.inline_local_term(v, _rand(rng, 1, 3, 2, 3), (2, 2))
  with pytest.raises(ValueError, match='kernels axis'):
    inl.inline_local_term(v, _rand(rng, 1, 2, 2, 2, 3), (2, 2))
  with pytest.raises(ValueError, match='causal'):
    inl.InLineAttention(8, 2, 4, grid=(2, 2), causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='grid'):
    inl.InLineAttention(8, 2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='grid'):
    inl.InLineAttention(8, 2, 4, grid=(3, 3), rngs=nnx.Rngs(0))(
        _rand(rng, 1, 8, 8))
