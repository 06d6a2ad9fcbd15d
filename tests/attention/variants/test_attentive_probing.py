"""Efficient probing (EP) vs direct float64 loops; training on a frozen tiny ViT."""

from flax import nnx
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from attention.variants import attentive_probing as ap
from experiments import models
from experiments.configs import vit as vit_configs
from experiments.models import attentive_probe


def _ep_loops(x, queries, w_v):
  b, n, d = x.shape
  m = queries.shape[0]
  c = w_v.shape[1] // m
  out = np.zeros((b, w_v.shape[1]))
  for bi in range(b):
    v = x[bi] @ w_v  # [N, D']
    for mi in range(m):
      s = np.array([queries[mi] @ x[bi, j] for j in range(n)]) / np.sqrt(d)
      a = np.exp(s - s.max())
      a /= a.sum()
      out[bi, mi * c:(mi + 1) * c] = a @ v[:, mi * c:(mi + 1) * c]
  return out


def test_efficient_probe_equals_loops_and_grads():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 8))
  queries, w_v = rng.normal(size=(4, 8)), rng.normal(size=(8, 8))
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(a) for a in (x, queries, w_v))
    out = ap.efficient_probe(*args)
    np.testing.assert_allclose(np.asarray(out), _ep_loops(x, queries, w_v),
                               rtol=1e-12, atol=1e-12)
    jtu.check_grads(ap.efficient_probe, args, order=1, modes=['rev'])


def test_bad_input():
  x = jnp.ones((2, 5, 8))
  with pytest.raises(ValueError, match='queries'):
    ap.efficient_probe(x, jnp.ones((4, 6)), jnp.ones((8, 8)))
  with pytest.raises(ValueError, match='w_v'):
    ap.efficient_probe(x, jnp.ones((3, 8)), jnp.ones((8, 8)))
  with pytest.raises(ValueError, match='num_queries'):
    ap.EfficientProbe(8, 3, num_queries=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='features'):
    ap.efficient_probe(jnp.ones((5, 8)), jnp.ones((4, 8)), jnp.ones((8, 8)))


def test_probe_trains_on_frozen_vit():
  config = vit_configs.get_config('tiny')
  config.model.update(dict(dim=16, head_dim=8, mlp_dim=32, depth=1))
  vit = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  before = jax.tree.map(np.asarray, nnx.state(vit, nnx.Param))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)))
  tokens = attentive_probe.vit_patch_tokens(vit, images)
  assert tokens.shape == (8, 16, 16)
  probe = ap.EfficientProbe(16, 4, num_queries=4, rngs=nnx.Rngs(1))
  probe_before = jax.tree.map(np.asarray, nnx.state(probe, nnx.Param))
  probe, losses = attentive_probe.train_probe(
      vit, probe, lambda i: (images, labels), steps=5, learning_rate=3e-2)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
  after = jax.tree.map(np.asarray, nnx.state(vit, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)  # ViT frozen
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), probe_before,
                         jax.tree.map(np.asarray, nnx.state(probe, nnx.Param)))
  assert all(jax.tree.leaves(changed))  # every probe parameter trained
  with pytest.raises(ValueError, match='images'):
    attentive_probe.vit_patch_tokens(vit, images[:, :8])
  with pytest.raises(ValueError, match='steps'):
    attentive_probe.train_probe(vit, probe, lambda i: (images, labels), steps=0)
