"""Shared fixtures: one tiny trainer workdir (the 'tiny' preset, 6 steps) per session."""

import jax
import pytest

from experiments import train_lib
from experiments.configs import lm

# The 'tiny' preset (2 layers, d=32, 2 heads, MQAR over 16 keys / 16 values, T=32),
# 6 steps: enough to have a real checkpoint, cheap to compile.
TINY_OVERRIDES = {'train.num_steps': 6, 'train.warmup_steps': 1,
                  'train.log_every': 6, 'train.eval_every': 6,
                  'train.checkpoint_every': 6, 'data.num_eval_batches': 1,
                  'train.tensorboard': False}


def tiny_config():
  config = lm.get_config('tiny')
  config.update_from_flattened_dict(dict(TINY_OVERRIDES))
  return config


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """A trainer workdir of the tiny preset: config.json + checkpoints/6."""
  workdir = str(tmp_path_factory.mktemp('tiny_lm'))
  train_lib.train_and_evaluate(tiny_config(), workdir,
                               devices=jax.devices()[:1])
  return workdir
