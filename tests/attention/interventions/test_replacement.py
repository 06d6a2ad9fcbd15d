"""Record-and-replace, column re-weighting and activation patching vs NumPy float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx
from tests.attention.interventions import numpy_oracle as npo


def test_record_then_replace_maps():
  q_src, k_src, _ = fx.qkv(11)
  q, k, v = fx.qkv(12)
  site, vis = fx.site()
  src = site.replace(layer=1)
  _, rec = ivs.attend(q_src, k_src, v, src, (), ivs.Record(layers=(1,), probs=True))
  maps = rec['probs']
  edit = ivs.ReplaceProbs(maps=maps, heads=(1, 2), layers=(1,))
  out, got = ivs.attend(q, k, v, src, (edit,), ivs.Record(probs=True))
  p = fx.base_probs(q, k, vis)
  p[:, [1, 2]] = fx.base_probs(q_src, k_src, vis)[:, [1, 2]]
  np.testing.assert_allclose(got['probs'], p, atol=1e-6)
  np.testing.assert_allclose(out, npo.apply(p, v), atol=2e-5)
  # One map per selected layer ([L, B, N, T, S]), picked by the site's layer.
  stacked = ivs.ReplaceProbs(maps=jnp.stack([maps, 0 * maps]), layers=(1, 2))
  zero, _ = ivs.attend(q, k, v, site.replace(layer=2), (stacked,))
  np.testing.assert_array_equal(zero, 0.0)
  with pytest.raises(ValueError, match='blocked'):
    ivs.attend(q, k, v, src, (edit,), method='blocked')
  with pytest.raises(ValueError, match='maps must have shape'):
    ivs.attend(q, k, v, src, (ivs.ReplaceProbs(maps=maps[:, :2]),))
  with pytest.raises(ValueError, match='layers'):
    ivs.ReplaceProbs(maps=jnp.stack([maps, maps]), layers=(1,))


def test_reweight_columns_matches_numpy():
  q, k, v = fx.qkv(13)
  site, vis = fx.site(pad=0)
  c = np.linspace(0.5, 2.0, fx.T)
  c[0] = 0.0  # query 0 sees only key 0: its re-weighted row is all zero
  cb = np.stack([c, c[::-1]])
  cb[1, 0] = 3.0
  p = fx.base_probs(q, k, vis)
  for weights, method in ((c, 'blocked'), (cb, 'dense')):
    edit = ivs.ReweightColumns(c=jnp.asarray(weights, jnp.float32), heads=(0, 3))
    out, _ = ivs.attend(q, k, v, site, (edit,), method=method)
    w = p * (weights[None, None, None, :] if weights.ndim == 1 else
             weights[:, None, None, :])
    z = w.sum(-1, keepdims=True)
    want = p.copy()
    want[:, [0, 3]] = np.where(z > 0, w / np.where(z > 0, z, 1), 0)[:, [0, 3]]
    np.testing.assert_allclose(out, npo.apply(want, v), atol=2e-5, err_msg=method)
  assert np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match='c must be'):
    ivs.ReweightColumns(c=jnp.asarray([-1.0, 1.0]))
  with pytest.raises(ValueError, match='c must have shape'):
    ivs.attend(q, k, v, site, (ivs.ReweightColumns(c=jnp.ones((3,))),))


def test_patch_head_outputs_and_effect():
  q, k, v = fx.qkv(14)
  site, vis = fx.site()
  clean, _ = ivs.attend(q, k, v, site, ())
  qc = q + 1.0
  positions = np.zeros((fx.B, fx.T), bool)
  positions[:, -3:] = True
  edit = ivs.PatchHeadOutputs(outputs=clean,
                              positions=jnp.asarray(positions), heads=(2,))
  corrupt, _ = ivs.attend(qc, k, v, site, ())
  patched, _ = ivs.attend(qc, k, v, site, (edit,))
  want = np.asarray(corrupt).copy()
  want[:, -3:, 2] = np.asarray(clean)[:, -3:, 2]
  np.testing.assert_array_equal(patched, want)
  np.testing.assert_allclose(
      ivs.patching_effect(np.array([2.0, 1.0, 5.0]), np.array([0.0, 1.0, 1.0]),
                          np.array([1.5, 3.0, 2.0])), [0.75, 0.0, 0.25])
  with pytest.raises(ValueError, match='outputs must have shape'):
    ivs.attend(q, k, v, site, (ivs.PatchHeadOutputs(outputs=clean[:1]),))
