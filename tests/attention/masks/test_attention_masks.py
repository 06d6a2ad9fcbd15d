"""Attention with each mask object equals attention with the materialised mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from attention import masks
from tests import oracles

T = 24
N = 4


def _masks():
  img = np.array([1] * 5 + [0] * 7 + [1] * 4 + [0] * 8)
  return {
      'causal': masks.causal(T, offset=-2),
      'sliding': masks.sliding_window(T, 3, 1),
      'chunked': masks.chunked_causal(T, 5),
      'sink': masks.sink_window(T, 2, 4),
      'prefix': masks.prefix_lm(T, 7),
      'documents': masks.documents([5, 11, 8]),
      'modality': masks.modality_mutual(img, np.repeat([0, 1], [12, 12])),
      'pine': masks.bidirectional_segments(np.repeat([-1, 0, 1, -1],
                                                     [3, 8, 8, 5])),
      'nb1d': masks.neighborhood((T,), 5, 2, 2, True),
      'nb2d': masks.neighborhood((4, 6), (3, 3), (1, 3)),
      'nb3d': masks.neighborhood((2, 3, 4), (2, 2, 3), 1, 1, (True, False,
                                                               False)),
      'halo': masks.halo_blocks((4, 6), 2, 1),
      'crossformer': masks.crossformer((4, 6), 2, 'long'),
      'power': masks.power_attention(T, 3, 1, 1, True),
      's2': masks.s2_attention(T, N, 3, 1, 4, dense_heads=(0,),
                               token_causal=True),
      'radial': masks.radial(4, 6),
      'moa': masks.moa(T, [[2, 0.1], [4, 0.0], [1, 0.5], [8, 0.0]]),
      'per_head': masks.per_head([masks.causal(T), masks.full(T),
                                  masks.sliding_window(T, 2, 2),
                                  masks.prefix_lm(T, 4)]),
      'permuted': masks.permute_mask(masks.neighborhood((2, 3, 4), 2),
                                     masks.grid_permutation((2, 3, 4), 'HWF')),
  }


MASKS = _masks()


def _inputs(seed=0, kv_heads=2):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((2, T, N, 8))
  k = rng.standard_normal((2, T, kv_heads, 8))
  v = rng.standard_normal((2, T, kv_heads, 6))
  return q, k, v


@pytest.mark.parametrize('name', sorted(MASKS))
def test_mask_object_equals_materialized(name):
  mask = MASKS[name]
  q, k, v = _inputs()
  dense = mask.materialize(N)  # [N, T, S]
  with jax.enable_x64(True):
    args = [jnp.asarray(x) for x in (q, k, v)]
    out_obj, lse_obj = api.dot_product_attention(
        *args, mask=mask, implementation='reference', return_residuals=True)
    out_arr, lse_arr = api.dot_product_attention(
        *args, mask=jnp.asarray(dense[None]), implementation='reference',
        return_residuals=True)
    np.testing.assert_allclose(out_obj, out_arr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse_obj, lse_arr, rtol=1e-12, atol=1e-12)
    want, want_lse = oracles.numpy_attention(q, k, v, scale=8 ** -0.5,
                                             mask=dense[None])
    np.testing.assert_allclose(out_obj, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(lse_obj, want_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('name', ['nb2d', 's2', 'pine'])
def test_mask_object_gradients(name):
  mask = MASKS[name]
  dense = jnp.asarray(mask.materialize(N)[None])
  q, k, v = _inputs(1)

  def loss(m, q, k, v):
    out = api.dot_product_attention(q, k, v, mask=m,
                                    implementation='reference')
    return jnp.sum(jnp.sin(out))

  with jax.enable_x64(True):
    args = [jnp.asarray(x) for x in (q, k, v)]
    g_obj = jax.jit(jax.grad(lambda *a: loss(mask, *a), argnums=(0, 1, 2)))(*args)
    g_arr = jax.jit(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2)))(*args)
    for a, b in zip(g_obj, g_arr):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_mask_head_count_mismatch_is_rejected():
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _inputs())
  with pytest.raises(ValueError, match='num_heads'):
    api.dot_product_attention(q, k, v, mask=masks.s2_attention(T, 3, 3, 1, 4),
                              implementation='reference')
  with pytest.raises(ValueError, match='shape'):
    api.dot_product_attention(q, k, v, mask=masks.causal(T + 1),
                              implementation='reference')
