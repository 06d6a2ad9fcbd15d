"""DCAL: rollout, GLCA and PWCA vs NumPy float64; the DCAL ViT trains."""

from flax import nnx
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention.variants import dual_cross_attention as dca
from experiments import models
from experiments.configs import vit as vit_configs
from experiments.models import dcal


def _softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _attend(q, k, v):
  p = _softmax(np.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1]))
  return np.einsum('bnts,bsnh->btnh', p, v)


def test_rollout_and_top_r_equal_numpy():
  rng = np.random.default_rng(0)
  maps = _softmax(rng.normal(size=(3, 2, 2, 5, 5)))  # [L, B, N, T, T]
  ref = np.stack([np.eye(5)] * 2)
  for layer in maps:  # S_hat_l = (0.5 mean_h S_l + 0.5 E) S_hat_{l-1}
    ref = np.einsum('bts,bsu->btu', 0.5 * layer.mean(1) + 0.5 * np.eye(5), ref)
  with jax.enable_x64(True):
    out = dca.attention_rollout(jnp.asarray(maps))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(dca.attention_rollout(list(maps))), ref,
                               rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out).sum(-1), 1.0, rtol=1e-12)
    scores = dca.token_scores(out)
    np.testing.assert_allclose(np.asarray(scores), ref.mean(1), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(dca.token_scores(out, 0)), ref[:, 0])
    idx = np.asarray(dca.select_top_r(scores, 2))
    np.testing.assert_array_equal(idx, np.argsort(-ref.mean(1), -1,
                                                  kind='stable')[:, :2])


def test_glca_and_pwca_equal_references_and_grads():
  rng = np.random.default_rng(1)
  q, k, v, k2, v2 = rng.normal(size=(5, 2, 6, 2, 4))
  idx = np.array([[4, 1], [0, 5]])
  with jax.enable_x64(True):
    a = tuple(jnp.asarray(x) for x in (q, k, v, k2, v2))
    glca = dca.global_local_cross_attention(a[0], a[1], a[2], jnp.asarray(idx),
                                            implementation='reference')
    ref = _attend(q[np.arange(2)[:, None], idx], k, v)
    np.testing.assert_allclose(np.asarray(glca), ref, rtol=1e-10, atol=1e-12)
    pw = lambda *x: dca.pairwise_cross_attention(*x, implementation='reference')
    ref = _attend(q, np.concatenate([k, k2], 1), np.concatenate([v, v2], 1))
    np.testing.assert_allclose(np.asarray(pw(*a)), ref, rtol=1e-10, atol=1e-12)
    jtu.check_grads(pw, a, order=1, modes=['rev'])
    losses, w = jnp.asarray([1.0, 2.0, 3.0]), jnp.asarray([0.0, 0.5, -0.5])
    np.testing.assert_allclose(
        float(dca.uncertainty_weighted_loss(losses, w)),
        0.5 * sum(np.exp(-wi) * li + wi for li, wi in zip([1, 2, 3], [0, .5, -.5])))


def test_bad_input():
  x = jnp.ones((1, 4, 1, 2))
  with pytest.raises(ValueError, match='r must'):
    dca.select_top_r(jnp.ones((1, 4)), 5)
  with pytest.raises(ValueError, match='key_pair'):
    dca.pairwise_cross_attention(x, x, x, jnp.ones((1, 3, 1, 2)), x)
  with pytest.raises(ValueError, match='attention_maps'):
    dca.attention_rollout([])
  with pytest.raises(ValueError, match='cls_index'):
    dca.token_scores(jnp.ones((1, 4, 4)), 4)
  with pytest.raises(TypeError, match='indices'):
    dca.global_local_cross_attention(x, x, x, jnp.ones((1, 2)))


def test_dcal_vit_matches_vit_and_trains():
  config = vit_configs.get_config('tiny')
  config.model.update(dict(dim=16, head_dim=8, mlp_dim=32, depth=1))
  vit = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  model = dcal.DCALViT(vit, 4, r_ratio=0.25, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)))
  partner = jnp.roll(jnp.arange(8), 1)
  np.testing.assert_allclose(np.asarray(model(images)['sa']),
                             np.asarray(vit(images)[0]), rtol=1e-5, atol=1e-5)
  graphdef, params = nnx.split(model)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: dcal.dcal_loss(
        nnx.merge(graphdef, p), images, labels, partner))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
  with pytest.raises(ValueError, match='partner'):
    model(images, jnp.arange(3))
