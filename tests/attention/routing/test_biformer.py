"""BiFormer bi-level routing attention vs NumPy loops over the paper's two levels."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.routing import biformer
from tests import oracles

GRID, REGIONS, TOP_K = (4, 6), (2, 3), 2  # 6 regions of 2 x 2 tokens


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _qkv(seed, b=2, n=2, kh=2, h=4, t=24):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(b, t, n, h))),
          jnp.asarray(rng.normal(size=(b, t, kh, h))),
          jnp.asarray(rng.normal(size=(b, t, kh, h))))


def numpy_regions(grid, regions):
  """region[t] of each row-major token by loops."""
  (hh, ww), (sh, sw) = grid, regions
  out = np.zeros(hh * ww, int)
  for y in range(hh):
    for x in range(ww):
      out[y * ww + x] = (y // (hh // sh)) * sw + x // (ww // sw)
  return out


def numpy_routing(q, k, grid, regions, top_k):
  """I^r by loops: region means over all heads, A^r, stable descending sort."""
  q, k = np.asarray(q), np.asarray(k)
  b, t, n, h = q.shape
  k = np.repeat(k, n // k.shape[2], axis=2)
  reg = numpy_regions(grid, regions)
  r = regions[0] * regions[1]
  out = np.zeros((b, r, top_k), int)
  for bi in range(b):
    qr = np.stack([q[bi, reg == i].reshape(-1, n * h).mean(0) for i in range(r)])
    kr = np.stack([k[bi, reg == i].reshape(-1, n * h).mean(0) for i in range(r)])
    a = qr @ kr.T / np.sqrt(n * h)
    for i in range(r):
      out[bi, i] = np.argsort(-a[i], kind='stable')[:top_k]
  return out


def numpy_gather_attention(q, k, v, routes, grid, regions):
  """Each query attends (per head) to the concatenated tokens of its routed regions."""
  q, k, v = (np.asarray(x) for x in (q, k, v))
  b, t, n, h = q.shape
  k, v = (np.repeat(x, n // x.shape[2], axis=2) for x in (k, v))
  reg = numpy_regions(grid, regions)
  out = np.zeros((b, t, n, v.shape[-1]))
  for bi in range(b):
    for ti in range(t):
      keys = np.concatenate([np.flatnonzero(reg == u) for u in routes[bi, reg[ti]]])
      for ni in range(n):
        z = k[bi, keys, ni] @ q[bi, ti, ni] / np.sqrt(h)
        p = np.exp(z - z.max())
        out[bi, ti, ni] = (p / p.sum()) @ v[bi, keys, ni]
  return out


def _dense_mask(routes, grid, regions):
  reg = numpy_regions(grid, regions)
  b = routes.shape[0]
  mask = np.zeros((b, 1, len(reg), len(reg)), bool)
  for bi in range(b):
    for ti in range(len(reg)):
      mask[bi, 0, ti] = np.isin(reg, routes[bi, reg[ti]])
  return mask


def test_permutation_and_routing_match_loops():
  perm = biformer.region_permutation(GRID, REGIONS)
  reg = numpy_regions(GRID, REGIONS)
  np.testing.assert_array_equal(reg[perm], np.repeat(np.arange(6), 4))
  assert sorted(perm) == list(range(24))
  assert biformer.default_regions((14, 14)) == (7, 7)
  assert biformer.default_regions((4, 16)) == (2, 4)
  for seed, kh in ((0, 2), (1, 1)):  # MHA and GQA routing
    q, k, _ = _qkv(seed, kh=kh)
    want = numpy_routing(q, k, GRID, REGIONS, TOP_K)
    got = biformer.region_routing(q, k, grid=GRID, regions=REGIONS, top_k=TOP_K)
    np.testing.assert_array_equal(got, want)
    mask = biformer.bi_level_routing_mask(q, k, grid=GRID, regions=REGIONS,
                                          top_k=TOP_K)
    assert mask.kv_indices.shape == (2, 1, 6, TOP_K) and mask.block_q == 4
    blocks = np.zeros((2, 1, 6, 6), bool)
    for bi in range(2):
      for i in range(6):
        blocks[bi, 0, i, want[bi, i]] = True
    np.testing.assert_array_equal(mask.block_matrix(), blocks)
  # Ties go to the lower region: constant features give regions 0..k-1.
  ones = jnp.ones((1, 24, 2, 4))
  np.testing.assert_array_equal(
      biformer.region_routing(ones, ones, grid=GRID, regions=REGIONS, top_k=3),
      np.tile([0, 1, 2], (1, 6, 1)))


def test_attention_equals_gather_oracle_forward_and_gradients():
  q, k, v = _qkv(2, kh=1)  # GQA (MHA routing is checked above)
  routes = numpy_routing(q, k, GRID, REGIONS, TOP_K)
  want = numpy_gather_attention(q, k, v, routes, GRID, REGIONS)
  fn = lambda q, k, v, impl: biformer.bi_level_routing_attention(
      q, k, v, grid=GRID, regions=REGIONS, top_k=TOP_K, implementation=impl)
  for impl in ('reference', None):
    np.testing.assert_allclose(fn(q, k, v, impl), want, atol=1e-10)
  # Gradients (routing fixed and detached) = the dense-mask softmax backward.
  dout = jnp.asarray(np.random.default_rng(3).normal(size=want.shape))
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, 'reference') * dout),
                           argnums=(0, 1, 2)))(q, k, v)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=0.5,
                                      mask=_dense_mask(routes, GRID, REGIONS))
  for got, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(got, ref[name], atol=1e-10, err_msg=name)


def test_layer_is_attention_plus_lce_and_gradients_reach_every_parameter():
  layer = biformer.BiLevelRoutingAttention(8, 2, 4, grid=GRID, regions=REGIONS,
                                           top_k=TOP_K, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 24, 8)))
  proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...])
  q, k, v = proj(layer.wq), proj(layer.wk), proj(layer.wv)
  routes = numpy_routing(q, k, GRID, REGIONS, TOP_K)
  o = numpy_gather_attention(q, k, v, routes, GRID, REGIONS)
  # LCE by loops: 5 x 5 depthwise cross-correlation, zero padding.
  vg = np.asarray(v).reshape(2, 4, 6, 8)
  wgt = np.asarray(layer.lce_weight[...])
  lce = np.zeros_like(vg)
  for y in range(4):
    for xx in range(6):
      for dy in range(5):
        for dx in range(5):
          yy, x2 = y + dy - 2, xx + dx - 2
          if 0 <= yy < 4 and 0 <= x2 < 6:
            lce[:, y, xx] += wgt[dy, dx] * vg[:, yy, x2]
  o = o + lce.reshape(2, 24, 2, 4)
  want = np.einsum('btnh,nhd->btd', o, np.asarray(layer.wo[...]))
  y, grads = nnx.jit(lambda m: (m(x), nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)))(
      layer)
  np.testing.assert_allclose(y, want, atol=1e-10)
  for name in ('wq', 'wk', 'wv', 'wo', 'lce_weight', 'lce_bias'):
    g = getattr(grads, name)[...]
    assert np.all(np.isfinite(g)) and np.any(g != 0), name


def test_bad_input_names_the_argument():
  q, k, v = _qkv(6)
  kw = dict(grid=GRID, regions=REGIONS, top_k=TOP_K)
  with pytest.raises(ValueError, match='top_k must be in \\[1, 6\\]'):
    biformer.bi_level_routing_attention(q, k, v, **{**kw, 'top_k': 0})
  with pytest.raises(ValueError, match='top_k must be in \\[1, 6\\]'):
    biformer.bi_level_routing_attention(q, k, v, **{**kw, 'top_k': 7})
  with pytest.raises(ValueError, match=r'regions\[1\] \(4\) must divide'):
    biformer.bi_level_routing_attention(q, k, v, **{**kw, 'regions': (2, 4)})
  with pytest.raises(ValueError, match='grid must be a 2D feature map'):
    biformer.bi_level_routing_attention(q, k, v, **{**kw, 'grid': (24,)})
  with pytest.raises(ValueError, match='query length \\(24\\) must equal'):
    biformer.bi_level_routing_attention(q, k, v, **{**kw, 'grid': (4, 4),
                                                    'regions': 2})
  with pytest.raises(ValueError, match='key must have shape'):
    biformer.bi_level_routing_attention(q, k[:, :12], v, **kw)
  with pytest.raises(ValueError, match='grid is required'):
    biformer.BiLevelRoutingAttention(8, 2, 4, grid=None, rngs=nnx.Rngs(0))
