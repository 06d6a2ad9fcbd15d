"""The registered vision layers train in the tiny ViT: the loss decreases."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import models
from experiments.configs import vit as vit_configs


@pytest.mark.parametrize('variant', ['davit', 'crossformer'])
def test_tiny_vit_loss_decreases(variant):
  config = vit_configs.get_config('tiny')
  # depth 2 for DaViT: one dual block (window, then channel attention).
  config.model.update(dict(dim=16, head_dim=8, mlp_dim=32,
                           depth=2 if variant == 'davit' else 1))
  config.model.attention.variant = variant
  model = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  if variant != 'channel_attention':  # Alternating by depth (DaViT / CrossFormer).
    kinds = [type(b.attn.layer).__name__ for b in model.encoder.blocks]
    assert kinds == (['WindowAttention', 'ChannelAttention'] if variant == 'davit'
                     else ['CrossFormerAttention'])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits, aux = nnx.merge(graphdef, p, rest)(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  losses = []
  for _ in range(5):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
