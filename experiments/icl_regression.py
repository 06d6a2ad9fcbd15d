r"""In-context linear regression with multi-head softmax attention.

Reproduces He, Pan, Chen, Yang, "In-Context Linear Regression Demystified" (ICML
2025, arXiv 2503.12734): trains one-layer multi-head softmax attention (and a linear
attention baseline) on fresh in-context regression prompts, then writes PNG figures
and summary.json into --workdir. Resumes from the newest usable orbax checkpoint in
--workdir (an unusable newer one is reported in one line and moved to
<workdir>/checkpoints_corrupt/<run>/<step>).

  python -m experiments.icl_regression --workdir=/tmp/icl --preset=quick
  python -m experiments.icl_regression --workdir=/tmp/icl_paper --preset=paper

Flags left unset take the preset's value (experiments/configs/icl_regression.py).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from experiments import common_flags
from experiments.configs import icl_regression as configs
from launch import distributed

_WORKDIR = common_flags.WORKDIR  # required
_PRESET = flags.DEFINE_enum('preset', 'quick', list(configs.PRESETS),
                            'Settings preset.')
flags.DEFINE_integer('d', None, 'Covariate dimension d.')
flags.DEFINE_integer('context_length', None, 'Training context length L.')
flags.DEFINE_float('sigma2', None, 'Label noise variance sigma^2.')
flags.DEFINE_list('heads', None, 'Head counts of the softmax models, e.g. 1,2,4,8.')
flags.DEFINE_integer('steps', None, 'Adam steps of the main run.')
flags.DEFINE_integer('batch', None, 'Prompts per step.')
flags.DEFINE_float('lr', None, 'Adam learning rate.')
flags.DEFINE_list('seeds', None, 'Seeds (trained together, vmapped), e.g. 0,1,2.')
flags.DEFINE_integer('log_every', None, 'Steps per jitted chunk / trajectory point.')
flags.DEFINE_integer('checkpoint_every', None, 'Checkpoint period in steps.')
flags.DEFINE_list('linear_heads', None,
                  'Head counts of linear-attention baselines; empty disables.')
flags.DEFINE_bool('linear_normalize', None,
                  'Divide the linear attention sum by the context length.')
flags.DEFINE_list('eval_lengths', None, 'Context lengths for error vs L.')
flags.DEFINE_integer('n_test', None, 'Test prompts per length.')
flags.DEFINE_bool('noniso', None, 'Run the non-isotropic covariates study.')
flags.DEFINE_float('rho', None, 'Covariance Sigma_ij = rho^|i-j| (non-isotropic).')
flags.DEFINE_list('noniso_heads', None, 'Head counts of the non-isotropic run.')
flags.DEFINE_integer('noniso_steps', None, 'Steps of the non-isotropic run.')
flags.DEFINE_bool('multitask', None, 'Run the multi-task (d=6, 2 tasks) study.')
flags.DEFINE_list('multitask_heads', None, 'Head counts of the multi-task run.')
flags.DEFINE_integer('multitask_steps', None, 'Steps of the multi-task run.')
flags.DEFINE_enum('projection', None, ['folded', 'tokens'],
                  'Attention projection order (same function; folded is faster).')
flags.DEFINE_enum('rng_impl', None, ['threefry2x32', 'unsafe_rbg', 'rbg'],
                  'PRNG implementation of the data stream.')
flags.DEFINE_integer('interrupt_after_steps', None,
                     'Stop after this many steps of each run, as if killed '
                     '(checkpoint kept); for testing resumption.')

_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None, 'JAX CPU devices to expose (default: one per core); the '
    'batch is split over them. Ignored when XLA_FLAGS forces a device count.')

_LIST_FIELDS = ('heads', 'seeds', 'linear_heads', 'eval_lengths', 'noniso_heads',
                'multitask_heads')


def config_from_flags(flag_values=flags.FLAGS):
  """The preset config with every given flag applied (raises app.UsageError)."""
  config = configs.get_config(flag_values.preset).unlock()
  for name in config.keys():
    value = flag_values[name].value if name in flag_values else None
    if value is None:
      continue
    if name in _LIST_FIELDS:
      try:
        value = tuple(int(v) for v in value if v.strip())
      except ValueError:
        raise app.UsageError(
            f'--{name} must be a comma-separated list of ints, got '
            f'{",".join(value)!r}.') from None
    setattr(config, name, value)
  return config.lock()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}.')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required.')
  if _CPU_DEVICES.value is not None and _CPU_DEVICES.value < 1:
    raise app.UsageError(f'--cpu_devices must be >= 1, got {_CPU_DEVICES.value}.')
  # One JAX device per core: the trainer splits each batch over them.
  distributed.use_cpu_cores(_CPU_DEVICES.value)
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  from experiments.icl import study  # pylint: disable=g-import-not-at-top
  config = config_from_flags()
  try:
    study.build_specs(config)
  except (TypeError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  stop = flags.FLAGS.interrupt_after_steps
  if stop is not None and (stop <= 0 or stop % config.log_every):
    raise app.UsageError(f'--interrupt_after_steps must be a positive multiple '
                         f'of log_every ({config.log_every}), got {stop}.')
  from experiments import checkpointing  # pylint: disable=g-import-not-at-top
  checkpointing.install_quiet_event_loop_hook()
  try:
    summary = study.run(config, _WORKDIR.value, stop_after_step=stop)
  except checkpointing.CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if summary is None:
    print(f'Interrupted; resume with the same flags and --workdir='
          f'{_WORKDIR.value}.', file=sys.stderr)
    return
  print(json.dumps({'verdicts': summary['verdicts'],
                    'timing_s': {k: v for k, v in summary['timing'].items()
                                 if k != 'runs'},
                    'summary': f'{_WORKDIR.value}/summary.json'}, indent=1))
  print(closing_list(_WORKDIR.value, summary))


def closing_list(workdir: str, summary: dict) -> str:
  """'Wrote:' and one line per output of the study, by full path."""
  workdir = os.path.abspath(workdir)
  lines = ['Wrote:',
           f'  {os.path.join(workdir, "summary.json")}  (numbers and verdicts)']
  lines += [f'  {os.path.join(workdir, name)}' for name in summary['figures']]
  lines.append(f'  {os.path.join(workdir, "metrics.jsonl")}  (loss per chunk)')
  lines.append(f'  {os.path.join(workdir, "checkpoints")}/  (resumable state)')
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
