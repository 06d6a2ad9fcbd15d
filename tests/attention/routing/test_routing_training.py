"""The registered routing names train: the loss of the tiny presets decreases."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import models
from experiments.configs import lm as lm_configs
from experiments.configs import vit as vit_configs


def _train(model, batch_loss, steps=6):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(
        lambda p: batch_loss(nnx.merge(graphdef, p, rest)))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return np.asarray(losses)


@pytest.mark.parametrize('variant', ['seer_attention_distill'])
def test_tiny_lm_loss_decreases(variant):
  config = lm_configs.get_config('tiny')
  config.model.attention.variant = variant
  model = models.build_model(config.model, vocab_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 33)))

  def loss(m):
    logits, aux = m(tokens[:, :-1])  # T = 32: 8 blocks of 4, top-3
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         tokens[:, 1:]).mean()
    return ce + sum(aux.values())  # the trainer's total (aux: the gate's KL)

  if variant == 'seer_attention_distill':
    _, aux = model(tokens[:, :-1])
    assert set(aux) == {'seer_gate_kl'} and float(aux['seer_gate_kl']) > 0
  losses = _train(model, loss)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize('variant', ['vmoba'])
def test_tiny_vit_loss_decreases(variant):
  config = vit_configs.get_config('tiny')
  config.model.attention.variant = variant
  model = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  if variant == 'vmoba':  # partitions cycle with depth (VMoBA): 1d, 2d, ...
    assert [b.attn.layer.partition for b in model.encoder.blocks] == [
        ('1d', '2d', '3d')[i % 3] for i in range(len(model.encoder.blocks))]
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 16, 16, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, (8,)))

  def loss(m):
    logits, aux = m(images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + sum(aux.values())  # sparsifiner: its predictor's distillation

  losses = _train(model, loss)
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
