r"""Trains a transformer (decoder LM or ViT) with any attention variant of attnlab.

  python -m experiments.train --config=experiments/configs/lm.py:tiny \
      --workdir=/tmp/lm_tiny

Configs are ml_collections files with named presets (`file.py:preset`); fields are
overridden with `--config.<field>=value` and unknown fields are rejected. Re-running
with the same workdir resumes from its newest usable checkpoint (an unusable newer one
is reported in one line and moved to `<workdir>/checkpoints_corrupt/<step>`). The logic lives in
`experiments.train_lib`. Several processes: `python -m launch.local` (or launch.tpu_pod /
launch.slurm) around the same command.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import checkpointing
from experiments import common_flags
from experiments import train_lib
from experiments.configs import common
from launch import distributed

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. experiments/configs/lm.py:tiny.',
    lock_config=True)
_WORKDIR = common_flags.WORKDIR  # checkpoints and metrics; resumed if present
flags.mark_flags_as_required(['config'])


def main(argv):
  common_flags.start_checkpointing_binary(argv)
  distributed.initialize()  # no-op unless launched as several processes
  try:
    train_lib.validate_config(_CONFIG.value)
  except ValueError as e:  # One line, no traceback: the config is wrong.
    sys.stderr.write(f'FATAL config error: {e}\n')
    sys.exit(2)
  logging.info('Config:\n%s', _CONFIG.value)
  checkpointing.install_quiet_event_loop_hook()
  try:
    summary = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except checkpointing.CheckpointError as e:
    logging.error('%s', e)
    sys.exit(1)
  logging.info('Done: %s', summary)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, after checking the --config.<field> names.

  An unknown field is one line naming it and the closest valid names, and exit
  status 2; ml_collections would raise a bare AttributeError inside flag parsing.
  """
  message = common.check_override_flags(argv)
  if message:
    sys.stderr.write(f'FATAL Flags parsing error: {message}\n')
    sys.exit(2)
  return app.parse_flags_with_usage(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
