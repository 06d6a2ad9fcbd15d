"""Flags shared by several binaries, defined once so the binaries can be imported
together (tests, notebooks) without absl's DuplicateFlagError."""

from absl import flags

WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Output directory: checkpoints, metrics, figures and results of the binary.')
