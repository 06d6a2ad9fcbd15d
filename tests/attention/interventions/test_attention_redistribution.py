"""VAR vs a direct NumPy float64 implementation; massive-activation dims; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx
from tests.attention.interventions import numpy_oracle as npo

D = 512  # phi <= sqrt(D): a ratio above 20 needs D > 400 (real models: D >= 2048)
SINK_TOKENS = (0, 4)
DIMS = (7, 300)


def _hidden(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(fx.B, fx.T, D))
  x[:, SINK_TOKENS[0], DIMS[0]] = 600.0
  x[:, SINK_TOKENS[1], DIMS[1]] = -400.0
  x[:, 6, DIMS[0]] = 12.0  # large, but phi about 12 < 20: not a sink
  return x


def test_massive_activation_dims_and_ratio_match_numpy():
  x = _hidden()
  assert ivs.massive_activation_dims(x, top=2) == DIMS
  assert ivs.massive_activation_dims(x[None], top=1) == DIMS[:1]
  got = jax.jit(lambda h: (ivs.massive_activation_ratio(h, DIMS),
                           ivs.var_sink_tokens(h, DIMS)))(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got[0], npo.phi(x, DIMS), rtol=1e-5)
  want = npo.phi(x, DIMS) > 20
  np.testing.assert_array_equal(got[1], want)
  assert np.array_equal(np.nonzero(want[0])[0], SINK_TOKENS)
  with pytest.raises(ValueError, match='top'):
    ivs.massive_activation_dims(x, top=0)
  with pytest.raises(ValueError, match='hidden_states'):
    ivs.massive_activation_dims(np.ones(4))


def test_var_attend_matches_numpy_and_skips_the_last_layer():
  q, k, v = fx.qkv(5, sink_keys=SINK_TOKENS)
  x = _hidden()
  site, vis = fx.site(pad=0, hidden=jnp.asarray(x, jnp.float32))
  targets = np.zeros((fx.B, fx.T), bool)
  targets[:, 2:9] = True  # includes the sink token 4
  var = ivs.VAR(targets=jnp.asarray(targets), sink_dims=DIMS, heads=(0, 1, 2))
  record = ivs.Record(probs=True)
  out, rec = ivs.attend(q, k, v, site, (var,), record, method='dense')
  p = fx.base_probs(q, k, vis)
  sinks = npo.phi(x, DIMS) > 20
  want = npo.var(p, sinks, targets, 0.6, 0.5, 0.2, heads=(0, 1, 2))
  changed = np.abs(want - p).max(-1) > 1e-3  # [B, N, T]
  assert changed.sum() >= 10 and not changed[:, 3].any()
  np.testing.assert_allclose(rec['probs'], want, atol=1e-6)
  np.testing.assert_allclose(rec['probs'].sum(-1), p.sum(-1), atol=1e-5)
  np.testing.assert_allclose(out, npo.apply(want, v), atol=2e-5)
  plain, rec0 = ivs.attend(q, k, v, site, (), record, method='dense')
  np.testing.assert_array_equal(rec['probs'][:, 3], rec0['probs'][:, 3])
  last, _ = ivs.attend(q, k, v, site.replace(layer=2), (var,), method='dense')
  np.testing.assert_allclose(last, plain, atol=1e-6)
  assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-2
  # The selection: a larger rho / smaller p change as the equations say.
  var2 = ivs.VAR(targets=jnp.asarray(targets), sinks=jnp.asarray(sinks), p=0.3,
                 rho=0.9, min_target_mass=0.5)
  _, rec2 = ivs.attend(q, k, v, site, (var2,), record, method='dense')
  np.testing.assert_allclose(rec2['probs'], npo.var(p, sinks, targets, 0.3, 0.9, 0.5),
                             atol=1e-6)


def test_var_bad_input():
  tg = jnp.zeros((fx.B, fx.T), bool)
  for kw, name in (({'p': 1.5}, 'p'), ({'p': -0.1}, 'p'), ({'rho': 2.0}, 'rho'),
                   ({'min_target_mass': -1.0}, 'min_target_mass'),
                   ({'phi_threshold': 0.0}, 'phi_threshold')):
    with pytest.raises(ValueError, match=name):
      ivs.VAR(targets=tg, sink_dims=(0,), **kw)
  with pytest.raises(ValueError, match='sink_dims'):
    ivs.VAR(targets=tg)
  with pytest.raises(ValueError, match='targets'):
    ivs.VAR(sink_dims=(0,))
  q, k, v = fx.qkv(0)
  site, _ = fx.site(hidden=jnp.ones((fx.B, fx.T, 8)))
  with pytest.raises(ValueError, match='targets must have shape'):
    ivs.attend(q, k, v, site, (ivs.VAR(targets=tg[:, :5], sink_dims=(0,)),))
  with pytest.raises(ValueError, match='sink_dims must be < D'):
    ivs.attend(q, k, v, site, (ivs.VAR(targets=tg, sink_dims=(8,)),))
  qd, kd, vd = fx.qkv(0, t=1, s=fx.T)
  dsite = ivs.AttentionSite.default(fx.B, 1, fx.T, hidden=jnp.ones((fx.B, 1, 8)))
  with pytest.raises(ValueError, match='pass sinks'):
    ivs.attend(qd, kd, vd, dsite, (ivs.VAR(targets=tg, sink_dims=(0,)),))
