"""Shared fixtures: the binary's offline default run (it trains the 'tiny' preset
for 6 steps into <workdir>/model), once per session; its model directory is the
tiny trainer checkpoint of the other tests."""

import os
import sys

from absl import flags
import pytest

from experiments.configs import lm

# The 'tiny' preset (2 layers, d=32, 2 heads, MQAR over 16 keys / 16 values, T=32),
# 6 steps: enough to have a real checkpoint, cheap to compile.
TINY_OVERRIDES = {'train.num_steps': 6, 'train.warmup_steps': 1,
                  'train.log_every': 6, 'train.eval_every': 6,
                  'train.checkpoint_every': 6, 'data.num_eval_batches': 1,
                  'train.tensorboard': False}
# Small runs: 4 calibration / 4 held-out examples, one batch each.
RUN_FLAGS = ['--num_calibration=4', '--num_eval=4', '--batch_size=4',
             '--num_random_masks=2']


def tiny_config():
  config = lm.get_config('tiny')
  config.update_from_flattened_dict(dict(TINY_OVERRIDES))
  return config


def run_binary(args):
  """Runs the real `experiments.recalibrate.main` with `args` (in process)."""
  from experiments import recalibrate  # pylint: disable=g-import-not-at-top
  for name in [n for n in flags.FLAGS if n.startswith('train_config.')]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()
  argv = ['recalibrate'] + list(args)
  saved = sys.argv
  sys.argv = argv  # config_flags reads the --train_config.* overrides from it.
  try:
    flags.FLAGS(argv)
    recalibrate.main(argv[:1])
  finally:
    sys.argv = saved


@pytest.fixture(scope='session')
def default_run(tmp_path_factory):
  """Workdir of `recalibrate` without --checkpoint (trains into <workdir>/model)."""
  workdir = str(tmp_path_factory.mktemp('default_run'))
  config = os.path.join(os.path.dirname(lm.__file__), 'lm.py') + ':tiny'
  run_binary([f'--workdir={workdir}', f'--train_config={config}',
              "--interventions=temperature:t=2,layers=1"] + RUN_FLAGS +
             [f'--train_config.{k}={v}' for k, v in TINY_OVERRIDES.items()])
  return workdir


@pytest.fixture(scope='session')
def trained_workdir(default_run):
  """A trainer workdir of the tiny preset: config.json + checkpoints/6."""
  return os.path.join(default_run, 'model')
