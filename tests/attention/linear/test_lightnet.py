"""LightNet: the additive recurrence, MD-LRPE and MD-TPE against direct float64 loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import lightnet


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def numpy_angles(grid, n, k, base=10000.0):
  """theta[t, h, i K/m + f] = coordinate_i(t) * base^{-2 (h K + f) / (N K)}."""
  m = len(grid)
  coords = [np.unravel_index(t, grid) for t in range(int(np.prod(grid)))]
  th = np.zeros((len(coords), n, k))
  for t, c in enumerate(coords):
    for h in range(n):
      for i in range(m):
        for f in range(k // m):
          th[t, h, i * (k // m) + f] = c[i] * base ** (-2.0 * (h * k + f) /
                                                        (n * k))
  return th


def numpy_lightnet(q, k, v, *, causal, grid=None):
  """The additive recurrence, unstabilised: S_t = S_{t-1} + exp(k_t)^T v_t, delta_t =
  delta_{t-1} + exp(k_t), o_t = sum_d q_td S_t[d] / delta_t[d]; with MD-LRPE the
  feature pair of dim d contributes cos(theta_td - theta_sd)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, n, hk = q.shape
  th = np.zeros((t, n, hk)) if grid is None else numpy_angles(grid, n, hk)
  out = np.zeros(v.shape)
  for bi in range(b):
    for h in range(n):
      for ti in range(t):
        keys = range(ti + 1) if causal else range(t)
        delta = sum(np.exp(k[bi, s, h]) for s in keys)
        for s in keys:
          w = q[bi, ti, h] * np.exp(k[bi, s, h]) / delta * np.cos(
              th[ti, h] - th[s, h])
          out[bi, ti, h] += w.sum() * v[bi, s, h]
  return out


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('grid', [None, (2, 3)])
def test_forms_match_additive_recurrence(causal, grid):
  rng = np.random.default_rng(0)
  q, k, v = _rand(rng, 2, 6, 2, 4), _rand(rng, 2, 6, 1, 4), _rand(rng, 2, 6, 1, 3)
  want = numpy_lightnet(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2),
                        causal=causal, grid=grid)
  np.testing.assert_allclose(jax.jit(functools.partial(
      lightnet.naive_lightnet_attention, causal=causal, lrpe_grid=grid))(q, k, v),
                             want, atol=1e-12)
  got, _ = jax.jit(functools.partial(
      lightnet.lightnet_attention, causal=causal, lrpe_grid=grid,
      chunk_size=4))(q, k, v)
  np.testing.assert_allclose(got, want, atol=1e-12)
  if causal:
    rec, _ = jax.jit(functools.partial(lightnet.recurrent_lightnet_attention,
                                       lrpe_grid=grid))(q, k, v)
    np.testing.assert_allclose(rec, want, atol=1e-12)


def test_one_scan_final_state_is_the_noncausal_sum():
  """The point of the paper: the state after one scan over the (any-order) grid is
  the non-causal aggregate, so o = q S_T / delta_T is the bidirectional output."""
  rng = np.random.default_rng(1)
  q, k, v = _rand(rng, 1, 12, 2, 3), _rand(rng, 1, 12, 2, 3), _rand(rng, 1, 12, 2, 2)
  _, (s, _) = lightnet.recurrent_lightnet_attention(q, k, v)
  bidir, _ = lightnet.lightnet_attention(q, k, v, causal=False)
  np.testing.assert_allclose(jnp.einsum('btnk,bnkv->btnv', q, s), bidir,
                             atol=1e-12)
  perm = rng.permutation(12)
  _, (s2, _) = lightnet.recurrent_lightnet_attention(q, k[:, perm], v[:, perm])
  np.testing.assert_allclose(s2, s, atol=1e-12)  # Scan order does not matter.


@pytest.mark.parametrize('lrpe', [False, True])
def test_state_carry_equals_full_sequence_and_gradients(lrpe):
  rng = np.random.default_rng(2)
  q, k, v = _rand(rng, 1, 9, 2, 4), 3 * _rand(rng, 1, 9, 2, 4), _rand(rng, 1, 9, 2, 2)
  grid = (9,) if lrpe else None
  chunked = jax.jit(lightnet.lightnet_attention,
                    static_argnames=('lrpe_grid', 'lrpe_offset', 'chunk_size'))
  full, (s_full, z_full) = chunked(q, k, v, lrpe_grid=grid, chunk_size=4)
  g1 = (5,) if lrpe else None
  g2 = (4,) if lrpe else None
  a, state = chunked(q[:, :5], k[:, :5], v[:, :5], lrpe_grid=g1, chunk_size=2)
  b1, (s1, z1) = chunked(q[:, 5:], k[:, 5:], v[:, 5:], lrpe_grid=g2,
                         lrpe_offset=5, initial_state=state, chunk_size=3)
  b2, _ = jax.jit(lightnet.recurrent_lightnet_attention,
                  static_argnames=('lrpe_grid', 'lrpe_offset'))(
                      q[:, 5:], k[:, 5:], v[:, 5:], lrpe_grid=g2, lrpe_offset=5,
                      initial_state=state)
  np.testing.assert_allclose(jnp.concatenate([a, b1], 1), full, atol=1e-12)
  np.testing.assert_allclose(b2, full[:, 5:], atol=1e-12)
  np.testing.assert_allclose(s1, s_full, atol=1e-12)
  np.testing.assert_allclose(z1, z_full, atol=1e-12)
  w = _rand(rng, *full.shape)
  loss = lambda fn: lambda *x: jnp.sum(fn(*x) * w)
  want = jax.jit(jax.grad(loss(lambda *x: lightnet.naive_lightnet_attention(
      *x, lrpe_grid=grid)), (0, 1, 2)))(q, k, v)
  for fn in (lambda *x: lightnet.lightnet_attention(*x, lrpe_grid=grid,
                                                    chunk_size=4)[0],
             lambda *x: lightnet.recurrent_lightnet_attention(
                 *x, lrpe_grid=grid)[0]):
    for g, e in zip(jax.jit(jax.grad(loss(fn), (0, 1, 2)))(q, k, v), want):
      np.testing.assert_allclose(g, e, atol=1e-10)


def test_md_lrpe_is_relative():
  rng = np.random.default_rng(3)
  grid = (3, 4)
  x = _rand(rng, 1, 12, 2, 4)
  y = lightnet.md_lrpe(x, grid)
  th = numpy_angles(grid, 2, 4)
  np.testing.assert_allclose(
      y, np.concatenate([x * np.cos(th), x * np.sin(th)], -1), atol=1e-12)
  # <lrpe(q)_t, lrpe(k)_s> depends on the coordinate difference only.
  q, k = _rand(rng, 4), _rand(rng, 4)
  qq = lightnet.md_lrpe(jnp.broadcast_to(q, (1, 12, 2, 4)), grid)
  kk = lightnet.md_lrpe(jnp.broadcast_to(k, (1, 12, 2, 4)), grid)
  dots = jnp.einsum('btnk,bsnk->nts', qq, kk).reshape(2, 3, 4, 3, 4)
  np.testing.assert_allclose(dots[:, 1, 1, 0, 0], dots[:, 2, 3, 1, 2], atol=1e-12)


def numpy_tpe(x, grid, log_decay, gain, causal):
  x, log_decay, gain = (np.asarray(a) for a in (x, log_decay, gain))
  b, t, n, h = x.shape
  out = np.zeros_like(x)
  coords = [np.unravel_index(i, grid) for i in range(t)]
  for ti, ct in enumerate(coords):
    for si, cs in enumerate(coords):
      for a in range(len(grid)):
        if all(ct[j] == cs[j] for j in range(len(grid)) if j != a):
          dist = ct[a] - cs[a]
          if causal and dist < 0:
            continue
          w = gain[a] * np.exp(log_decay[a] * abs(dist))  # [N]
          out[:, ti] += w[:, None] * x[:, si]
  return out


@pytest.mark.parametrize('causal', [False, True])
def test_md_tpe_and_gradients(causal):
  rng = np.random.default_rng(4)
  grid = (3, 4)
  x = _rand(rng, 2, 12, 2, 3)
  ld, gain = -jnp.abs(_rand(rng, 2, 2)), _rand(rng, 2, 2)
  np.testing.assert_allclose(lightnet.md_tpe(x, grid, ld, gain, causal=causal),
                             numpy_tpe(x, grid, ld, gain, causal), atol=1e-12)
  w = _rand(rng, *x.shape)
  f = lambda *a: jnp.sum(lightnet.md_tpe(*a[:1], grid, *a[1:], causal=causal) * w)
  grads = jax.grad(f, (0, 1, 2))(x, ld, gain)
  eps = 1e-6
  d = [_rand(rng, *a.shape) for a in (x, ld, gain)]
  plus = f(*(a + eps * da for a, da in zip((x, ld, gain), d)))
  minus = f(*(a - eps * da for a, da in zip((x, ld, gain), d)))
  np.testing.assert_allclose(sum(jnp.sum(g * da) for g, da in zip(grads, d)),
                             (plus - minus) / (2 * eps), rtol=1e-7)


def test_layers():
  x = _rand(np.random.default_rng(5), 2, 6, 8)
  for causal, grid in ((True, None), (False, (2, 3))):
    layer = lightnet.LightNetAttention(8, 2, 4, causal=causal, grid=grid,
                                       rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    q = jax.nn.silu(jnp.einsum('btd,dnh->btnh', x, layer.wq[...]))
    k, v = (jnp.einsum('btd,dnh->btnh', x, w[...]) for w in (layer.wk, layer.wv))
    o = numpy_lightnet(q, k, v, causal=causal, grid=grid or (6,))
    gate = jax.nn.sigmoid(jnp.einsum('btd,dr,rnh->btnh', x, layer.w_gate1[...],
                                     layer.w_gate2[...]))
    o = o * gate
    o = o / np.sqrt(np.mean(o ** 2, axis=(-2, -1), keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, np.einsum('btnh,nhd->btd', o, layer.wo[...]),
                               atol=1e-10)
    graphdef, params = nnx.split(layer, nnx.Param)
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(params)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0)
               for g in jax.tree.leaves(grads))
  tpe = lightnet.MDTPE(8, 2, (2, 3), rngs=nnx.Rngs(1))
  assert tpe(x).shape == x.shape


def test_bad_inputs():
  rng = np.random.default_rng(6)
  q = _rand(rng, 1, 6, 2, 4)
  with pytest.raises(ValueError, match='lrpe_grid'):
    lightnet.lightnet_attention(q, q, q, lrpe_grid=(2, 2))
  with pytest.raises(ValueError, match='divisible'):
    lightnet.lightnet_attention(q, q, q, lrpe_grid=(1, 2, 3))
  with pytest.raises(ValueError, match='initial_state requires'):
    lightnet.lightnet_attention(q, q, q, causal=False,
                                initial_state=(q, q))
  with pytest.raises(ValueError, match='initial_state must have shapes'):
    lightnet.lightnet_attention(q, q, q, initial_state=(
        jnp.zeros((1, 2, 4, 3)), jnp.zeros((1, 2, 4))))
  with pytest.raises(ValueError, match='initial_state must be'):
    lightnet.recurrent_lightnet_attention(q, q, q, initial_state=q)
  with pytest.raises(ValueError, match='log_decay must be <= 0'):
    lightnet.md_tpe(q, (6,), jnp.ones((1, 2)), jnp.ones((1, 2)))
  with pytest.raises(ValueError, match='gain must have shape'):
    lightnet.md_tpe(q, (6,), -jnp.ones((1, 2)), jnp.ones((2, 2)))
  with pytest.raises(ValueError, match='divisible'):
    lightnet.LightNetAttention(8, 2, 3, grid=(2, 3), rngs=nnx.Rngs(0))
