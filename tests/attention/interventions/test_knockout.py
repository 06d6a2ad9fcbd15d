"""Attention knockout vs NumPy float64: blocked edges, renormalisation, empty rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx
from tests.attention.interventions import numpy_oracle as npo


def _sets():
  queries = np.zeros((fx.B, fx.T), bool)
  keys = np.zeros((fx.B, fx.T), bool)
  queries[:, [0, 7, 8, 11]] = True
  keys[:, [0, 1, 2, 5]] = True
  return queries, keys


def test_knockout_matches_numpy_and_empty_rows_give_zeros():
  q, k, v = fx.qkv(10)
  site, vis = fx.site(pad=0)
  queries, keys = _sets()
  ko = ivs.Knockout(queries=jnp.asarray(queries), keys=jnp.asarray(keys),
                    heads=(0, 2), layers=(0, 1))
  for method in ('dense', 'blocked'):
    rec_req = ivs.Record(probs=True) if method == 'dense' else None
    out, rec = ivs.attend(q, k, v, site, (ko,), rec_req, method=method)
    blocked = queries[:, None, :, None] & keys[:, None, None, :]
    sel = np.zeros((1, fx.N, 1, 1), bool)
    sel[0, [0, 2]] = True
    vis_ko = np.broadcast_to(vis, blocked.shape[:1] + (fx.N,) + blocked.shape[2:]) & ~(
        blocked & sel)
    z = npo.logits(q, k, fx.SCALE)
    p = npo.softmax(z, vis_ko)
    np.testing.assert_allclose(out, npo.apply(p, v), atol=2e-5, err_msg=method)
    # Query 0 sees only key 0, which is knocked out on heads 0, 2: zeros, no NaN.
    np.testing.assert_array_equal(np.asarray(out)[:, 0, [0, 2]], 0.0)
    assert np.abs(np.asarray(out)[:, 0, [1, 3]]).min() > 0
    if method == 'dense':
      np.testing.assert_allclose(rec['probs'], p, atol=1e-6)
      assert np.all(np.asarray(rec['probs'])[blocked & sel] == 0)
  grad = jax.grad(lambda q: ivs.attend(q, k, v, site, (ko,), method='dense')[0].sum())(q)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad)[:, 0, [0, 2]], 0.0)


def test_knockout_layers_and_bad_input():
  assert ivs.knockout_layers(2, 3, 4) == (2, 3)
  assert ivs.knockout_layers(0, 1, 4) == (0,)
  with pytest.raises(ValueError, match='start'):
    ivs.knockout_layers(4, 1, 4)
  with pytest.raises(ValueError, match='width'):
    ivs.knockout_layers(0, 0, 4)
  queries, keys = _sets()
  with pytest.raises(ValueError, match='queries'):
    ivs.Knockout(keys=jnp.asarray(keys))
  q, k, v = fx.qkv(0)
  site, _ = fx.site()
  with pytest.raises(ValueError, match='keys must have shape'):
    ivs.attend(q, k, v, site, (ivs.Knockout(queries=jnp.asarray(queries),
                                            keys=jnp.asarray(keys[:, :4])),))
  with pytest.raises(TypeError, match='queries must be a bool'):
    ivs.attend(q, k, v, site, (ivs.Knockout(queries=jnp.asarray(queries, jnp.int32),
                                            keys=jnp.asarray(keys)),))
