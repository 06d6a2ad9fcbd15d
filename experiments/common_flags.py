"""Flags shared by several binaries, defined once so the binaries can be imported
together (tests, notebooks) without absl's DuplicateFlagError."""

import logging
from typing import Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Output directory: checkpoints, metrics, figures and results of the binary.')


def quiet_orbax(record: logging.LogRecord) -> bool:
  """A log filter that drops orbax's per-save / restore INFO chatter (warnings stay)."""
  return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def start_checkpointing_binary(argv: Sequence[str]) -> None:
  """The common start of the binaries that save orbax checkpoints in --workdir.

  Rejects positional arguments, drops orbax's per-save INFO lines from the log and
  requires --workdir.
  """
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  absl_logging.get_absl_handler().addFilter(quiet_orbax)
  if not WORKDIR.value:
    raise app.UsageError('--workdir is required.')
