"""The registered vision layers alternate by depth inside the tiny ViT.

(That every registered layer trains is tests/experiments/test_registry_training.py.)
"""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from experiments.configs import vit as vit_configs


@pytest.mark.parametrize('variant', ['davit', 'crossformer'])
def test_layers_alternate_by_depth_in_the_vit(variant):
  config = vit_configs.get_config('tiny')
  config.model.update(dict(dim=16, head_dim=8, mlp_dim=32, depth=2))
  config.model.attention.variant = variant
  model = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  layers = [b.attn.layer for b in model.encoder.blocks]
  if variant == 'davit':  # one dual block: window, then channel attention
    assert [type(l).__name__ for l in layers] == ['WindowAttention',
                                                  'ChannelAttention']
  else:  # SDA at even depth, LDA at odd
    assert [l.long_distance for l in layers] == [False, True]
    assert layers[0].embed is not None and layers[1].embed is None
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 1)),
                       jnp.float32)
  logits, _ = model(images)
  assert logits.shape == (2, 4) and np.all(np.isfinite(logits))
