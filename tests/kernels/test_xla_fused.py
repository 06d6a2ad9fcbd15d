"""Both forward step forms of kernels/xla.py (fused three-dot / online) vs oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.masks import base
from kernels import xla
from tests.kernels import test_xla


def _masks(t, s):
  rng = np.random.default_rng(3)
  holes = np.tril(np.ones((t, s), bool))
  holes[4] = False  # rows no key is visible to
  holes[17:20] = False
  head_dep = rng.random((4, t, s)) < 0.3
  head_dep[1] = holes
  return {
      'none': None,
      'causal': base.causal(t, s),
      'window': test_xla._window(t, s, 6),  # pylint: disable=protected-access
      'empty_rows': base.from_array(holes),
      'head_dependent': base.from_array(head_dep),
  }


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('name', list(_masks(40, 33)))
def test_step_forms_match_oracles(fused, name):
  rng = np.random.default_rng(11)
  t, s = 40, 33
  mask_obj = _masks(t, s)[name]
  with jax.enable_x64(True):
    q = test_xla._rand(rng, 2, t, 4, 8)  # pylint: disable=protected-access
    k = test_xla._rand(rng, 2, s, 2, 8)  # pylint: disable=protected-access
    v = test_xla._rand(rng, 2, s, 2, 5)  # pylint: disable=protected-access
    for extra in (dict(), dict(bias=test_xla._rand(rng, 1, 4, t, s),  # pylint: disable=protected-access
                               logits_soft_cap=2.5,
                               sinks=test_xla._rand(rng, 4))):  # pylint: disable=protected-access
      for impl in (dict(block_q=16, block_kv=8), dict(block_q=8, block_kv=8, lanes=3),
                   dict(block_q=8, block_kv=8, kv_chunk=2)):
        test_xla._check_against_oracles(  # pylint: disable=protected-access
            q, k, v, mask_obj=mask_obj, impl_kwargs=dict(impl, fused=fused),
            **extra)


@pytest.mark.parametrize('fused', [True, False])
def test_step_forms_segments_and_dense_mask(fused):
  rng = np.random.default_rng(12)
  b, t, s, n, kh = 2, 29, 51, 6, 3
  with jax.enable_x64(True):
    q = test_xla._rand(rng, b, t, n, 8)  # pylint: disable=protected-access
    k = test_xla._rand(rng, b, s, kh, 8)  # pylint: disable=protected-access
    v = test_xla._rand(rng, b, s, kh, 8)  # pylint: disable=protected-access
    test_xla._check_against_oracles(  # pylint: disable=protected-access
        q, k, v, mask=jnp.asarray(rng.random((b, 1, t, s)) < 0.6),
        q_segment_ids=jnp.asarray(rng.integers(0, 3, (b, t))),
        kv_segment_ids=jnp.asarray(rng.integers(0, 3, (b, s))),
        mask_obj=base.causal(t, s), impl_kwargs=dict(block_q=8, block_kv=16,
                                                     fused=fused))


@pytest.mark.parametrize('fused', [True, False])
def test_float32_large_logit_jumps_and_empty_rows(fused):
  """Row maxima that jump by far more than exp's range between tiles, in float32.

  The last key block holds logits ~200 above the first ones: a step whose rescaling
  underflowed or whose masked rows produced NaN would show here.
  """
  rng = np.random.default_rng(13)
  t = s = 48
  q = rng.standard_normal((1, t, 2, 8)).astype(np.float32)
  k = rng.standard_normal((1, s, 2, 8)).astype(np.float32)
  v = rng.standard_normal((1, s, 2, 4)).astype(np.float32)
  k[:, 40:] *= 60.0
  q[:, :, :, 0] = np.abs(q[:, :, :, 0]) + 1.0
  k[:, 40:, :, 0] = np.abs(k[:, 40:, :, 0]) * 60.0
  dense = np.ones((t, s), bool)
  dense[7] = False
  mask_obj = base.from_array(dense)
  out, lse = test_xla._xla(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                           scale=1.0, mask_obj=mask_obj, block_q=16, block_kv=8,
                           fused=fused, return_residuals=True)
  with jax.enable_x64(True):
    want, want_lse = test_xla._ref(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)), scale=1.0,
        mask_obj=mask_obj, return_residuals=True)
  assert np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5, rtol=1e-5)
  finite = np.isfinite(np.asarray(want_lse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(want_lse)[finite],
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(out)[0, 7], 0.0)


@pytest.mark.parametrize('fused', [True, False])
def test_step_forms_gradients_match_reference(fused):
  rng = np.random.default_rng(14)
  t, s = 24, 30
  mask_obj = base.causal(t, s)
  with jax.enable_x64(True):
    q = test_xla._rand(rng, 1, t, 4, 8)  # pylint: disable=protected-access
    k = test_xla._rand(rng, 1, s, 2, 8)  # pylint: disable=protected-access
    v = test_xla._rand(rng, 1, s, 2, 6)  # pylint: disable=protected-access
    sinks = test_xla._rand(rng, 4)  # pylint: disable=protected-access

    def loss(fn):
      return lambda q, k, v, sinks: jnp.sum(jnp.sin(fn(q, k, v, sinks)))

    ours = loss(lambda q, k, v, sinks: test_xla._xla(
        q, k, v, scale=0.4, mask_obj=mask_obj, sinks=sinks, block_q=8, block_kv=8,
        fused=fused))
    ref = loss(lambda q, k, v, sinks: test_xla._ref(
        q, k, v, scale=0.4, mask_obj=mask_obj, sinks=sinks))
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-9, rtol=1e-9)


def test_auto_fused_only_where_tile_dots_run_on_one_core():
  # 256 x 256 x 64 multiply-adds per head stay under the threshold; 512 x 256 do not.
  assert xla._auto_fused(256, 256, 1, 64)  # pylint: disable=protected-access
  assert not xla._auto_fused(512, 256, 1, 64)  # pylint: disable=protected-access
  assert not xla._auto_fused(256, 256, 1, 128)  # pylint: disable=protected-access
  # Chunked (banded) steps always take the online form.
  assert not xla._auto_fused(64, 64, 4, 64)  # pylint: disable=protected-access
  # GQA rows count towards the dot size; many batch items keep the online form.
  assert not xla._auto_fused(256, 256, 1, 64, group=2)  # pylint: disable=protected-access
  assert xla._auto_fused(256, 256, 1, 64, batch_items=8)  # pylint: disable=protected-access
  assert not xla._auto_fused(256, 256, 1, 64, batch_items=16)  # pylint: disable=protected-access
  with pytest.raises(TypeError, match='fused'):
    q = jnp.zeros((1, 8, 2, 4))
    test_xla._xla(q, q, q, scale=1.0, fused='yes')
