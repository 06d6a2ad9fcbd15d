r"""Run a binary on every host of a Cloud TPU VM slice (a pod) with gcloud.

  python -m launch.tpu_pod --tpu=my-v5e-32 --zone=us-west4-a --repo_dir=~/attnlab -- \
      python -m experiments.train --config=experiments/configs/lm.py:small --workdir=gs://b/run

Prints the commands (default) or runs them with --run. Every host installs the repo with
the [tpu] extra and starts the same command; `launch.distributed.initialize` then joins
the hosts automatically (TPU_WORKER_HOSTNAMES), so the binary runs unchanged.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

_TPU = flags.DEFINE_string('tpu', None, 'TPU VM name.')
_ZONE = flags.DEFINE_string('zone', None, 'GCP zone of the TPU VM.')
_PROJECT = flags.DEFINE_string('project', None, 'GCP project (default: gcloud config).')
_REPO_DIR = flags.DEFINE_string('repo_dir', '~/attnlab',
                                'Checkout of this repo on every host.')
_RUN = flags.DEFINE_bool('run', False, 'Execute instead of printing.')


def commands(command: Sequence[str], *, tpu: str, zone: str,
             repo_dir: str, project: str | None = None) -> list[list[str]]:
  """gcloud invocations: install on all workers, then run on all workers."""
  if not command:
    raise ValueError('command must be non-empty (put it after --).')
  for name, value in (('tpu', tpu), ('zone', zone), ('repo_dir', repo_dir)):
    if not value:
      raise ValueError(f'{name} must be set, got {value!r}.')
  base = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', tpu, f'--zone={zone}',
          '--worker=all']
  if project:
    base.append(f'--project={project}')
  install = f"cd {repo_dir} && pip install -e '.[tpu]'"
  run = f'cd {repo_dir} && {shlex.join(command)}'
  return [base + ['--command', install], base + ['--command', run]]


def main(argv: Sequence[str]) -> None:
  cmds = commands(argv[1:], tpu=_TPU.value, zone=_ZONE.value,
                  repo_dir=_REPO_DIR.value, project=_PROJECT.value)
  for cmd in cmds:
    print(shlex.join(cmd))
    if _RUN.value:
      code = subprocess.call(cmd)
      if code:
        sys.exit(code)


if __name__ == '__main__':
  app.run(main)
