"""Flags shared by several binaries, defined once so the binaries can be imported
together (tests, notebooks) without absl's DuplicateFlagError."""

import logging

from absl import flags

WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Output directory: checkpoints, metrics, figures and results of the binary.')


def quiet_orbax(record: logging.LogRecord) -> bool:
  """A log filter that drops orbax's per-save / restore INFO chatter (warnings stay)."""
  return record.levelno >= logging.WARNING or 'orbax' not in record.pathname
