"""Registered routing layers inside the models: aux losses and depth-dependent layout.

(That every registered name trains is tests/experiments/test_registry_training.py.)
"""

import jax.numpy as jnp
import numpy as np

from experiments import models
from experiments.configs import lm as lm_configs
from experiments.configs import vit as vit_configs


def test_seer_distill_layer_returns_its_gate_loss_to_the_lm():
  config = lm_configs.get_config('tiny')
  config.model.attention.variant = 'seer_attention_distill'
  model = models.build_model(config.model, vocab_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 32)))
  logits, aux = model(tokens)  # T = 32: 8 blocks of 4, top-3
  assert set(aux) == {'seer_gate_kl'} and float(aux['seer_gate_kl']) > 0
  assert np.all(np.isfinite(logits))


def test_vmoba_partitions_cycle_with_depth():
  config = vit_configs.get_config('tiny')
  config.model.attention.variant = 'vmoba'
  config.model.depth = 3
  model = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  assert [b.attn.layer.partition for b in model.encoder.blocks] == ['1d', '2d', '3d']
