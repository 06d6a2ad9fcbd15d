"""Decoder-only language models (RoPE, pre-norm RMSNorm, SwiGLU) on token data.

Run (from the repository root):

  python -m experiments.train --config=experiments/configs/lm.py:<preset> \
      --workdir=/tmp/lm_<preset>

Override any field, e.g. `--config.model.attention.mask=causal
--config.model.num_kv_heads=1 --config.model.attention.sinks=True`; misspelt fields
are rejected. Presets and what to expect:

* tiny: 2 layers, d=32, multi-query associative recall with 4 pairs over 16 keys /
  16 values, T=32, 60 steps; the smoke-test preset. Measured (1 CPU device, float32):
  train loss 3.89 at step 5 -> 2.61 at step 60; eval_loss 2.59, eval_accuracy 0.17
  (chance 1/16); under a minute on a busy 2-core machine, mostly compilation.
* mqar: multi-query associative recall ("Zoology"), 8 pairs / 8 queries over 64 keys
  and 64 values, T=64, 2 layers, d=64, 3000 steps. Expected (not measured here: ~0.4 s
  per step on the busy 2-core CPU, i.e. ~20 min): eval_accuracy rising from chance
  (1/64) towards 1.0 once the induction circuit forms.
* selective_copy: selective copying ("Mamba"), 8 tokens in T=64, 3000 steps. Expected
  (not measured here): eval_accuracy well above chance (1/16).
* icl_regression: in-context scalar linear regression with 32 bins, T=64, 3000 steps.
  Expected (not measured here): eval_loss below ln(32) = 3.47 as examples accumulate.
* pystdlib: byte-level LM on the Python standard library's source, T=128, 4 layers,
  d=128, 3000 steps. Expected (not measured here): eval_loss (nats/byte) well below
  ln(256) = 5.5.
* small: the benchmark preset (bytes, T=256, 4 layers, d=128); as pystdlib.
* shakespeare: tfds tiny_shakespeare, byte-level, T=128 (downloads once).
* lm1b: tfds lm1b, byte-level, T=128 (downloads ~1 GB once).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.model.update(dict(dim=32, depth=2, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64))
  c.data.update(dict(name='mqar', seq_len=32, batch_size=16,
                     num_eval_batches=2))
  c.data.mqar.update(dict(num_pairs=4, num_queries=4, num_keys=16,
                          num_values=16))
  c.train.update(dict(num_steps=60, learning_rate=3e-3, warmup_steps=5,
                      log_every=5, eval_every=20, checkpoint_every=10,
                      keep_checkpoints=2))


def _synthetic(c: ml_collections.ConfigDict, name: str) -> None:
  c.data.update(dict(name=name, seq_len=64, batch_size=64))
  c.train.update(dict(num_steps=3000, learning_rate=3e-3, warmup_steps=200,
                      log_every=100, eval_every=500, checkpoint_every=500))


def _bytes_lm(c: ml_collections.ConfigDict, name: str, seq_len: int) -> None:
  c.model.update(dict(dim=128, depth=4, num_heads=4, num_kv_heads=4,
                      head_dim=32, mlp_dim=384))
  c.data.update(dict(name=name, seq_len=seq_len, batch_size=32))
  c.train.update(dict(num_steps=3000, learning_rate=1e-3, warmup_steps=200,
                      log_every=100, eval_every=500, checkpoint_every=500))


PRESETS = {
    'tiny': _tiny,
    'mqar': lambda c: _synthetic(c, 'mqar'),
    'selective_copy': lambda c: _synthetic(c, 'selective_copy'),
    'icl_regression': lambda c: _synthetic(c, 'icl_regression'),
    'pystdlib': lambda c: _bytes_lm(c, 'bytes', 128),
    'small': lambda c: _bytes_lm(c, 'bytes', 256),
    'shakespeare': lambda c: _bytes_lm(c, 'tiny_shakespeare', 128),
    'lm1b': lambda c: _bytes_lm(c, 'lm1b', 128),
}


def get_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  """The locked config of `preset` (one of `PRESETS`)."""
  return common.preset_config('lm', PRESETS, preset)
