"""Vision Transformer (pre-norm, SwiGLU, mean pooling) for image classification.

Run (from the repository root):

  python -m experiments.train --config=experiments/configs/vit.py:<preset> \
      --workdir=/tmp/vit_<preset>

Presets and what to expect:

* tiny: 16x16 synthetic 'bars' images (4 orientations), patch 4, d=32, 60 steps
  (smoke test). Measured (1 CPU device, float32): train loss 1.57 at step 5 -> 0.82
  at step 60; eval_accuracy 0.72 (chance 0.25); under a minute, mostly compilation.
* bars: the same task, d=64, 1000 steps. Measured (1 CPU device): eval_accuracy
  0.996 at step 250 and 1.0 from step 500 on (eval_loss 2.7e-5 at step 1000); about
  2 minutes on a busy 2-core machine.
* mnist: tfds mnist, patch 4, d=64, 4 layers, 2000 steps (downloads once). Expected
  (not measured here): eval_accuracy above 0.95.
* cifar10: tfds cifar10, patch 4, d=128, 6 layers, 5000 steps (downloads once).
  Expected (not measured here): eval_accuracy of roughly 0.6 (a small ViT without
  augmentation).
Any attention variant/mask is selectable, e.g. `--config.model.attention.sinks=True`.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.model.update(dict(dim=32, depth=2, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, patch_size=4))
  c.data.update(dict(name='bars', batch_size=16, num_eval_batches=2))
  c.train.update(dict(num_steps=60, learning_rate=3e-3, warmup_steps=5,
                      log_every=5, eval_every=20, checkpoint_every=10,
                      keep_checkpoints=2))


def _bars(c: ml_collections.ConfigDict) -> None:
  c.data.update(dict(name='bars', batch_size=64))
  c.train.update(dict(num_steps=1000, learning_rate=3e-3, warmup_steps=100,
                      log_every=50, eval_every=250, checkpoint_every=250))


def _tfds(c: ml_collections.ConfigDict, name: str, dim: int, depth: int,
          steps: int) -> None:
  c.model.update(dict(dim=dim, depth=depth, num_heads=4, num_kv_heads=4,
                      head_dim=dim // 4, mlp_dim=3 * dim, patch_size=4))
  c.data.update(dict(name=name, batch_size=128, num_eval_batches=20))
  c.train.update(dict(num_steps=steps, learning_rate=1e-3, warmup_steps=200,
                      weight_decay=0.05, log_every=100, eval_every=500,
                      checkpoint_every=500))


PRESETS = {
    'tiny': _tiny,
    'bars': _bars,
    'mnist': lambda c: _tfds(c, 'mnist', 64, 4, 2000),
    'cifar10': lambda c: _tfds(c, 'cifar10', 128, 6, 5000),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  """The locked config of `preset` (one of `PRESETS`)."""
  return common.preset_config('vit', PRESETS, preset)
