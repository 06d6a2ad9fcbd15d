"""ACT vs a direct NumPy float64 implementation of its equations; grads; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx
from tests.attention.interventions import numpy_oracle as npo


def test_act_pure_functions_match_numpy():
  q, k, _ = fx.qkv(0)
  site, vis = fx.site(window=6)
  p = fx.base_probs(q, k, vis)

  @jax.jit
  def fn(p, site):
    scores, count = ivs.act_sink_scores(p, site.visible())
    sinks = ivs.act_sinks(scores, count, site.kv_positions, 0.1)
    return scores, count, sinks, ivs.act_calibrate(p, sinks, 0.4)

  scores, count, sinks, cal = fn(jnp.asarray(p, jnp.float32), site)
  np.testing.assert_array_equal(count[:, 0], vis[:, 0].sum(1))
  np_scores = p.sum(2) / np.maximum(vis.sum(2), 1)
  np.testing.assert_allclose(scores, np_scores, atol=1e-6)
  sinks = np.asarray(sinks)
  # The first visible key (index 0; index 2 in the padded row) is never a sink.
  assert not sinks[0, :, 0].any() and not sinks[1, :, 2].any()
  assert sinks.any()
  np.testing.assert_allclose(cal, npo.act(p, vis, np.asarray(site.kv_positions), 0.1,
                                          0.4), atol=1e-6)


def test_act_attend_matches_numpy_and_keeps_other_heads():
  q, k, v = fx.qkv(1)
  site, vis = fx.site(window=5)
  act = ivs.ACT(tau=0.1, beta=0.4, heads=(0, 3), layers=(0,))
  record = ivs.Record(probs=True)
  out, rec = ivs.attend(q, k, v, site, (act,), record, method='dense')
  p = fx.base_probs(q, k, vis)
  want = npo.act(p, vis, np.asarray(site.kv_positions), 0.1, 0.4, heads=(0, 3))
  assert np.abs(want - p).max() > 0.05  # the calibration did something
  np.testing.assert_allclose(rec['probs'], want, atol=1e-6)
  np.testing.assert_allclose(rec['probs'].sum(-1), p.sum(-1), atol=1e-5)
  np.testing.assert_allclose(out, npo.apply(want, v), atol=2e-5)
  plain, rec0 = ivs.attend(q, k, v, site, (), record, method='dense')
  for h in (1, 2):  # unselected heads: bitwise unchanged
    np.testing.assert_array_equal(rec['probs'][:, h], rec0['probs'][:, h])
    np.testing.assert_array_equal(out[:, :, h], plain[:, :, h])
  # Not applied outside its layers.
  other, _ = ivs.attend(q, k, v, site.replace(layer=1), (act,), method='dense')
  np.testing.assert_array_equal(other, plain)


def test_act_decode_query_against_a_cache():
  q, k, v = fx.qkv(2, t=1, s=16)
  site = ivs.AttentionSite.default(fx.B, 1, 16, scale=fx.SCALE)
  out, rec = ivs.attend(q, k, v, site, (ivs.ACT(),), ivs.Record(probs=True))
  vis = npo.visible(np.asarray(site.q_positions), np.asarray(site.kv_positions),
                    np.ones((fx.B, 16), bool))
  p = fx.base_probs(q, k, vis)
  want = npo.act(p, vis, np.asarray(site.kv_positions), 0.1, 0.4)
  np.testing.assert_allclose(rec['probs'], want, atol=1e-6)
  np.testing.assert_allclose(out, npo.apply(want, v), atol=2e-5)


def _act_float64(q, k, v, vis, heads, tau, beta, temperature=None, t_heads=()):
  """A float64 jnp version of Temperature then ACT (sinks from its own probs).

  Unpadded keys (key 0 is the first visible); rows that see nothing give zeros.
  """
  b, t, n, _ = q.shape
  rep = n // k.shape[2]
  kr, vr = jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2)
  z = jnp.einsum('btnh,bsnh->bnts', q, kr) * fx.SCALE
  if temperature is not None:
    inv = np.ones(n)
    inv[list(t_heads)] = 1.0 / temperature
    z = z * inv[:, None, None]
  z = jnp.where(vis, z, -1e30)
  p = jnp.where(vis, jax.nn.softmax(z, axis=-1), 0.0)
  count = vis.sum(2)  # [B, 1, S]
  score = jax.lax.stop_gradient(p).sum(2) / np.maximum(count, 1)  # [B, N, S]
  first = np.zeros((b, 1, k.shape[1]), bool)
  first[:, :, 0] = True  # unpadded rows: key 0 is the first visible
  sel = np.zeros((1, n, 1), bool)
  sel[0, list(heads)] = True
  s = ((score > tau) & ~first & sel)[:, :, None, :]
  m = jnp.sum(jnp.where(s, p, 0.0), -1, keepdims=True)
  rest = jnp.sum(jnp.where(s, 0.0, p), -1, keepdims=True)
  new = jnp.where(s, beta * p, p + (1 - beta) * m * p / jnp.where(rest > 0, rest, 1))
  return jnp.einsum('bnts,bsnv->btnv', new, vr)


def _grad_check(interventions, method, tau=0.1, beta=0.4, temperature=None,
                t_heads=()):
  q, k, v = fx.qkv(3)
  site, vis = fx.site(pad=0)
  q_valid = np.ones((fx.B, fx.T), bool)
  q_valid[1, 4] = False  # a padding query: sees nothing, zero output and gradient
  site = site.replace(q_valid=jnp.asarray(q_valid))
  vis = vis & q_valid[:, None, :, None]
  w = jnp.asarray(np.random.default_rng(4).normal(size=(fx.B, fx.T, fx.N, fx.H)),
                  jnp.float32)

  def loss(q, k, v):
    out, _ = ivs.attend(q, k, v, site, interventions, method=method, block=8)
    return jnp.sum(out * w)

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  heads = next((iv.heads for iv in interventions if isinstance(iv, ivs.ACT)), ())
  with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)]
    ref = jax.jit(jax.grad(lambda q, k, v: jnp.sum(
        _act_float64(q, k, v, vis, heads, tau, beta, temperature, t_heads) *
        np.asarray(w, np.float64)), argnums=(0, 1, 2)))(*args)
    ref = [np.asarray(r) for r in ref]
  for g, r in zip(got, ref):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, r, atol=2e-4, rtol=1e-3)
  np.testing.assert_array_equal(np.asarray(got[0])[1, 4], 0.0)


def test_act_gradients_dense_match_float64():
  _grad_check((ivs.ACT(heads=(0, 1, 3)),), 'dense')


def test_act_after_temperature_gradients_blocked_match_float64():
  _grad_check((ivs.Temperature(temperature=2.0, heads=(1,)), ivs.ACT(heads=(0, 1))),
              'blocked', temperature=2.0, t_heads=(1,))


def test_act_bad_input():
  for kw, name in (({'tau': 1.5}, 'tau'), ({'tau': -0.1}, 'tau'),
                   ({'beta': 2.0}, 'beta'), ({'beta': float('nan')}, 'beta')):
    with pytest.raises(ValueError, match=name):
      ivs.ACT(**kw)
  with pytest.raises(TypeError, match='tau'):
    ivs.ACT(tau='0.1')
  with pytest.raises(ValueError, match='layers'):
    ivs.ACT(layers=(0, 0))
  q, k, v = fx.qkv(0)
  site, _ = fx.site()
  with pytest.raises(ValueError, match='heads must be in'):
    ivs.attend(q, k, v, site, (ivs.ACT(heads=(4,)),))
  with pytest.raises(ValueError, match='layers must be in'):
    ivs.attend(q, k, v, site, (ivs.ACT(layers=(3,)),))
