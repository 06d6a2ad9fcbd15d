"""Splash-attention interop and PARO token permutations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as sm)

from attention import api
from attention import masks


@pytest.mark.parametrize('mask,splash_type', [
    (masks.causal(32, 40, offset=4), sm.CausalMask),
    (masks.sliding_window(32, 5, 2, offset=-1), sm.LocalMask),
    (masks.sliding_window(32, None, 3), sm.LocalMask),
    (masks.chunked_causal(32, 6), sm.ChunkedCausalMask),
    (masks.full(32, 16), sm.FullMask),
    (masks.causal(32) & masks.sliding_window(32, 4, 4), sm.LogicalAnd),
    (masks.causal(32) | masks.prefix_lm(32, 5), sm.LogicalOr),
    (masks.neighborhood((4, 8), 3), sm.NumpyMask),
    (masks.per_head([masks.causal(32), masks.chunked_causal(32, 8)]),
     sm.MultiHeadMask),
    (masks.s2_attention(32, 2, 4, 1, 2), sm.MultiHeadMask),
])
def test_to_splash_and_back(mask, splash_type):
  obj = masks.to_splash(mask)
  assert isinstance(obj, splash_type)
  assert masks.splash_equal(mask, obj)
  back = masks.from_splash(obj)
  np.testing.assert_array_equal(back.materialize(), mask.materialize())


def test_from_splash_native_objects():
  shape = (24, 24)
  cases = [
      sm.CausalMask(shape, offset=-3),
      sm.LocalMask(shape, (4, 1), offset=2),
      sm.ChunkedCausalMask(shape, 5),
      sm.FullMask(shape),
      sm.NumpyMask(np.random.default_rng(0).random(shape) > 0.5),
      sm.LogicalAnd(sm.CausalMask(shape), sm.LocalMask(shape, (3, 0), 0)),
      sm.LogicalOr(sm.CausalMask(shape), sm.ChunkedCausalMask(shape, 4)),
      sm.MultiHeadMask([sm.CausalMask(shape), sm.FullMask(shape)]),
  ]
  for obj in cases:
    mask = masks.from_splash(obj)
    assert masks.splash_equal(mask, obj), type(obj).__name__
    # An independent look: every entry of the splash object by indexing.
    if not isinstance(obj, sm.MultiHeadMask):
      np.testing.assert_array_equal(mask.materialize(), obj[:, :])
  assert isinstance(masks.from_splash(cases[0]), masks.Causal)
  assert isinstance(masks.from_splash(cases[1]), masks.SlidingWindow)


def test_splash_equal_detects_difference():
  assert not masks.splash_equal(masks.causal(16), sm.CausalMask((16, 16), 1))
  assert not masks.splash_equal(masks.causal(16), sm.CausalMask((16, 8)))


def test_splash_bad_inputs():
  with pytest.raises(TypeError, match='obj'):
    masks.from_splash(np.ones((4, 4), bool))
  with pytest.raises(TypeError, match='mask'):
    masks.to_splash(sm.CausalMask((4, 4)))
  with pytest.raises(ValueError, match='allow_dense'):
    masks.to_splash(masks.radial(2, 4), allow_dense=False)


# ----- permutations -----
def test_grid_permutation_matches_loops():
  grid = (2, 3, 4)
  for order in itertools.permutations('FHW'):
    perm = masks.grid_permutation(grid, ''.join(order))
    expected = []
    ranges = {'F': range(2), 'H': range(3), 'W': range(4)}
    for a in ranges[order[0]]:
      for b in ranges[order[1]]:
        for c in ranges[order[2]]:
          pos = dict(zip(order, (a, b, c)))
          expected.append(pos['F'] * 12 + pos['H'] * 4 + pos['W'])
    np.testing.assert_array_equal(perm, expected)


def test_apply_invert_roundtrip_and_attention_equivariance():
  grid = (2, 3, 4)
  t = 24
  perm = masks.grid_permutation(grid, 'WFH')
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, t, 2, 4))) for _ in range(3))
  np.testing.assert_array_equal(
      masks.invert_permutation(masks.apply_permutation(q, perm), perm), q)
  np.testing.assert_array_equal(masks.apply_permutation(q, perm)[0, 5],
                                q[0, perm[5]])
  mask = masks.neighborhood(grid, (1, 3, 3))
  with jax.enable_x64(True):
    q, k, v = (x.astype(jnp.float64) for x in (q, k, v))
    ref = api.dot_product_attention(q, k, v, mask=mask,
                                    implementation='reference')
    pq, pk, pv = (masks.apply_permutation(x, perm) for x in (q, k, v))
    out = api.dot_product_attention(pq, pk, pv,
                                    mask=masks.permute_mask(mask, perm),
                                    implementation='reference')
    np.testing.assert_allclose(masks.invert_permutation(out, perm), ref,
                               rtol=1e-12, atol=1e-12)


def test_best_order_finds_block_diagonal_order():
  # Attention local in time only (same (h, w), any frame): tokens sharing (h, w)
  # become contiguous when F is the innermost axis.
  grid = (8, 4, 4)
  i = np.arange(128)
  f, hw = i // 16, i % 16
  pattern = hw[:, None] == hw[None, :]
  best, scores = masks.best_order(grid, pattern, 8)
  assert best.endswith('F') and best in ('HWF', 'WHF')
  assert scores[best] == max(scores.values()) > scores['FHW']
  # Same answer from a Mask object and from attention probabilities.
  mask = masks.crossformer(grid, (1, 4, 4), 'long')
  np.testing.assert_array_equal(mask.materialize(), pattern)
  assert masks.best_order(grid, mask, 8)[0] == best
  probs = pattern / pattern.sum(1, keepdims=True)
  best_p, _ = masks.best_order(grid, probs.astype(np.float64), 8,
                               threshold=1e-3)
  assert best_p == best
  del f


def test_permutation_bad_inputs():
  with pytest.raises(ValueError, match='order'):
    masks.grid_permutation((2, 3, 4), 'FHX')
  with pytest.raises(ValueError, match='order'):
    masks.grid_permutation((2, 3), (0, 0))
  with pytest.raises(ValueError, match='perm'):
    masks.apply_permutation(jnp.zeros((1, 5, 1, 1)), np.arange(4))
  with pytest.raises(ValueError, match='perm'):
    masks.permute_mask(masks.causal(4), np.array([0, 0, 1, 2]))
  with pytest.raises(ValueError, match='pattern'):
    masks.best_order((2, 3), np.ones((5, 5), bool), 2)
  with pytest.raises(ValueError, match='x must'):
    masks.apply_permutation(jnp.zeros((5, 1)), np.arange(5))
  with pytest.raises(ValueError, match='threshold'):
    masks.best_order((2, 2), np.ones((4, 4)), 2, threshold=0)
