r"""Trains a transformer (decoder LM or ViT) with any attention variant of attnlab.

  python -m experiments.train --config=experiments/configs/lm.py:tiny \
      --workdir=/tmp/lm_tiny

Configs are ml_collections files with named presets (`file.py:preset`); fields are
overridden with `--config.<field>=value` and unknown fields are rejected. Re-running
with the same workdir resumes from its latest checkpoint. The logic lives in
`experiments.train_lib`.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and preset, e.g. experiments/configs/lm.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints and metrics (resumed if present).')
_DISTRIBUTED = flags.DEFINE_bool(
    'jax_distributed', False,
    'Call jax.distributed.initialize() first (multi-host TPU/GPU runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter from the console (warnings stay)."""
  return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('Config:\n%s', _CONFIG.value)
  summary = train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info('Done: %s', summary)


if __name__ == '__main__':
  app.run(main)
