"""Head scaling / masking / temperature / SoftPAG vs NumPy float64; VHD scores; grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import interventions as ivs
from tests.attention.interventions import fixtures as fx
from tests.attention.interventions import numpy_oracle as npo


def test_head_edits_compose_and_match_numpy():
  q, k, v = fx.qkv(6)
  site, vis = fx.site()
  # Key 5 of batch row 0 is hidden: query 5 there has no key at its own position,
  # so SoftPAG leaves its row unchanged.
  valid = np.asarray(site.kv_valid).copy()
  valid[0, 5] = False
  site = site.replace(kv_valid=jnp.asarray(valid))
  pos = np.asarray(site.q_positions)
  vis = npo.visible(pos, pos, valid)
  edits = (ivs.Temperature(temperature=(2.0, 0.5), heads=(1, 2)),
           ivs.SoftPAG(s=0.3, heads=(2, 3)),
           ivs.HeadScaling(alpha=(1.5, 3.0), heads=(0, 2)),
           ivs.HeadMask(heads=(3,)))
  out, rec = ivs.attend(q, k, v, site, edits,
                        ivs.Record(probs=True, logits=True), method='dense')
  z = npo.logits(q, k, fx.SCALE)
  z[:, 1] /= 2.0
  z[:, 2] /= 0.5
  p = npo.softmax(z, np.broadcast_to(vis, z.shape))
  p = npo.softpag(p, pos, pos, vis, 0.3, heads=(2, 3))
  want = npo.apply(p, v)
  want[:, :, 0] *= 1.5
  want[:, :, 2] *= 3.0
  want[:, :, 3] = 0.0
  np.testing.assert_allclose(rec['probs'], p, atol=1e-6)
  np.testing.assert_allclose(out, want, atol=3e-5)
  np.testing.assert_array_equal(np.asarray(out)[:, :, 3], 0.0)
  fin = np.isfinite(np.asarray(rec['logits']))
  np.testing.assert_allclose(np.asarray(rec['logits'])[fin],
                             np.where(vis, z, 0)[fin], rtol=1e-5, atol=1e-5)
  # SoftPAG: an unchanged row (no own key) and a changed one.
  base = npo.softmax(z, np.broadcast_to(vis, z.shape))
  np.testing.assert_allclose(p[0, 2, 5], base[0, 2, 5])
  assert abs(p[0, 2, 6, 6] - (0.7 * base[0, 2, 6, 6] + 0.3)) < 1e-12
  # Unedited probabilities of head 0 (output scaling only) are bitwise the plain ones.
  _, rec0 = ivs.attend(q, k, v, site, (), ivs.Record(probs=True), method='dense')
  np.testing.assert_array_equal(rec['probs'][:, 0], rec0['probs'][:, 0])


def test_temperature_gradients_match_float64():
  q, k, v = fx.qkv(7)
  site, vis = fx.site(pad=0)
  w = np.random.default_rng(8).normal(size=(fx.B, fx.T, fx.N, fx.H))
  temp = ivs.Temperature(temperature=3.0, heads=(0, 3))
  got = jax.jit(jax.grad(lambda q, k, v: jnp.sum(ivs.attend(
      q, k, v, site, (temp,), method='dense')[0] * w), argnums=(0, 1, 2)))(q, k, v)

  def ref(q, k, v):
    kr, vr = jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2)
    z = jnp.einsum('btnh,bsnh->bnts', q, kr) * fx.SCALE
    z = z / np.array([3.0, 1.0, 1.0, 3.0])[:, None, None]
    p = jax.nn.softmax(jnp.where(vis, z, -jnp.inf), axis=-1)
    return jnp.sum(jnp.einsum('bnts,bsnv->btnv', p, vr) * w)

  with jax.enable_x64(True):
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(
        *[jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)])
    want = [np.asarray(x) for x in want]
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4)


def test_head_divergence_top_heads_and_guidance():
  rng = np.random.default_rng(9)
  a = rng.normal(size=(2, 3, 5, 4))
  b = a.copy()
  b[:, :, 3] += 2.0
  b[:, :, 1] += rng.normal(size=(2, 3, 4)) * 0.5
  scores = np.asarray(ivs.head_divergence_scores(a, b))
  np.testing.assert_allclose(scores, np.linalg.norm(a - b, axis=-1).mean((0, 1)),
                             rtol=1e-6)
  assert ivs.top_heads(scores, 2) == (3, 1)
  stacked = np.asarray(ivs.head_divergence_scores(np.stack([a, b]), np.stack([b, b])))
  assert stacked.shape == (2, 5) and ivs.top_heads(stacked, 1) == ((0, 3),)
  out, pert = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  np.testing.assert_allclose(ivs.guided(out, pert, 2.5), out + 2.5 * (out - pert),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='k must be'):
    ivs.top_heads(scores, 6)
  with pytest.raises(ValueError, match='out_with'):
    ivs.head_divergence_scores(a, b[:1])
  with pytest.raises(ValueError, match='out_perturbed'):
    ivs.guided(out, pert[:1], 1.0)


def test_head_edits_bad_input():
  with pytest.raises(ValueError, match='temperature'):
    ivs.Temperature(temperature=0.0)
  with pytest.raises(ValueError, match='temperature'):
    ivs.Temperature(temperature=(1.0, 2.0), heads=(0,))
  with pytest.raises(ValueError, match='alpha'):
    ivs.HeadScaling(alpha=-1.0)
  with pytest.raises(ValueError, match='alpha'):
    ivs.HeadScaling(alpha=(2.0, 2.0))
  with pytest.raises(ValueError, match=r's must be in \[0.0, 1.0\]'):
    ivs.SoftPAG(s=1.5)
  with pytest.raises(TypeError, match='heads'):
    ivs.HeadMask(heads=(0.5,))
