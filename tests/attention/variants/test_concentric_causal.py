"""Concentric causal attention: ring ordering, positions and mask vs brute force."""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from attention import masks
from attention.variants import concentric_causal as cca


def _rings_by_peeling(h, w):
  """Ring ids by peeling the border of the remaining rectangle, ring after ring."""
  ring = -np.ones((h, w), np.int64)
  top, left, bottom, right, r = 0, 0, h - 1, w - 1, 0
  while top <= bottom and left <= right:
    for i in range(top, bottom + 1):
      for j in range(left, right + 1):
        if i in (top, bottom) or j in (left, right):
          ring[i, j] = r
    top, left, bottom, right, r = top + 1, left + 1, bottom - 1, right - 1, r + 1
  return ring.reshape(-1), r


@pytest.mark.parametrize('grid', [(4, 4), (5, 3), (1, 6), (6, 7)])
def test_rings_order_positions(grid):
  ring, count = _rings_by_peeling(*grid)
  np.testing.assert_array_equal(cca.ring_index(grid), ring)
  assert cca.num_rings(grid) == count
  order = cca.concentric_order(grid)
  assert sorted(order.tolist()) == list(range(ring.size))
  assert np.all(np.diff(ring[order]) >= 0)  # border first
  for r in range(count):  # raster order inside each ring
    inside = order[ring[order] == r]
    assert np.all(np.diff(inside) > 0)
  pos = cca.position_ids(grid, 3, 2)
  n = ring.size
  np.testing.assert_array_equal(pos, np.r_[0, 1, 2, 3 + ring, 3 + count,
                                           4 + count])


def _mask_brute(grid, p, s):
  ring, _ = _rings_by_peeling(*grid)
  n = ring.size
  t = p + n + s
  out = np.zeros((t, t), bool)
  for q in range(t):
    for k in range(t):
      if p <= q < p + n and p <= k < p + n:
        out[q, k] = ring[k - p] <= ring[q - p]
      else:
        out[q, k] = k <= q
  return out


@pytest.mark.parametrize('grid,p,s', [((4, 4), 2, 3), ((3, 5), 0, 0), ((5, 5), 1, 0)])
def test_mask_equals_brute_force_and_compiles(grid, p, s):
  mask = cca.concentric_causal(grid, p, s)
  dense = _mask_brute(grid, p, s)
  np.testing.assert_array_equal(mask.materialize(), dense)
  bm = masks.compile_mask(mask, block_q=8, block_kv=8)  # the block format
  np.testing.assert_array_equal(np.asarray(bm.materialize()).reshape(dense.shape),
                                dense)


def _rope(x, pos, base=10000.0):
  h = x.shape[-1] // 2
  freqs = base ** (-np.arange(h) / h)
  ang = pos[:, None] * freqs[None]
  sin, cos = np.sin(ang)[None, :, None], np.cos(ang)[None, :, None]
  x1, x2 = x[..., :h], x[..., h:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def test_attention_equals_dense_reference_and_grads():
  grid, p, s = (4, 4), 2, 2
  rng = np.random.default_rng(0)
  q, k, v = rng.normal(size=(3, 2, 20, 2, 4))
  pos = cca.position_ids(grid, p, s).astype(np.float64)
  qr, kr = _rope(q, pos), _rope(k, pos)
  logits = np.einsum('btnh,bsnh->bnts', qr, kr) / 2.0
  logits = np.where(_mask_brute(grid, p, s), logits, -np.inf)
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ref = np.einsum('bnts,bsnh->btnh', a, v)
  with jax.enable_x64(True):
    f = lambda q_, k_, v_: cca.concentric_causal_attention(
        q_, k_, v_, grid=grid, prefix_len=p, suffix_len=s,
        implementation='reference')
    args = tuple(jnp.asarray(x) for x in (q, k, v))
    np.testing.assert_allclose(np.asarray(f(*args)), ref, rtol=1e-10, atol=1e-10)
    jtu.check_grads(f, args, order=1, modes=['rev'])


def test_bad_input():
  with pytest.raises(ValueError, match='grid'):
    cca.ring_index((4,))
  with pytest.raises(ValueError, match='prefix_len'):
    cca.concentric_causal((4, 4), -1)
  with pytest.raises(TypeError, match='suffix_len'):
    cca.position_ids((4, 4), 0, 1.5)
  x = jnp.ones((1, 17, 1, 4))
  with pytest.raises(ValueError, match='prefix_len'):
    cca.concentric_causal_attention(x, x, x, grid=(4, 4))
  with pytest.raises(ValueError, match='rope_base'):
    cca.concentric_causal_attention(x, x, x, grid=(4, 4), prefix_len=1,
                                    rope_base=0.0)
