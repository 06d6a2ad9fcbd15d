r"""Write (and optionally submit) a SLURM batch script for a GPU cluster.

  python -m launch.slurm --nodes=2 --gpus_per_node=8 --script=/tmp/job.sbatch -- \
      python -m experiments.train --config=experiments/configs/lm.py:small --workdir=/shared/run

One task per node; each task sees its node's GPUs and joins the job through
`launch.distributed.initialize` (JAX_COORDINATOR_ADDRESS = first node, process id =
SLURM_PROCID). The repo is installed with the [gpu] extra beforehand.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

_NODES = flags.DEFINE_integer('nodes', 1, 'Nodes.')
_GPUS = flags.DEFINE_integer('gpus_per_node', 8, 'GPUs per node.')
_TIME = flags.DEFINE_string('time', '04:00:00', 'Wall-clock limit.')
_PARTITION = flags.DEFINE_string('partition', None, 'SLURM partition.')
_SCRIPT = flags.DEFINE_string('script', 'attnlab.sbatch', 'Where to write the script.')
_PORT = flags.DEFINE_integer('port', 29500, 'Coordinator port on the first node.')
_SUBMIT = flags.DEFINE_bool('submit', False, 'Submit with sbatch after writing.')


def sbatch_script(command: Sequence[str], *, nodes: int, gpus_per_node: int,
                  time: str, port: int, partition: str | None = None) -> str:
  """The batch script text."""
  if not command:
    raise ValueError('command must be non-empty (put it after --).')
  if nodes < 1 or gpus_per_node < 1:
    raise ValueError(
        f'nodes and gpus_per_node must be >= 1, got {nodes} and {gpus_per_node}.')
  lines = [
      '#!/bin/bash',
      '#SBATCH --job-name=attnlab',
      f'#SBATCH --nodes={nodes}',
      '#SBATCH --ntasks-per-node=1',
      f'#SBATCH --gpus-per-node={gpus_per_node}',
      f'#SBATCH --time={time}',
  ]
  if partition:
    lines.append(f'#SBATCH --partition={partition}')
  lines += [
      'set -euo pipefail',
      'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
      f'export JAX_COORDINATOR_ADDRESS="$head:{port}"',
      'export JAX_NUM_PROCESSES="$SLURM_NNODES"',
      "srun bash -c 'JAX_PROCESS_ID=$SLURM_PROCID exec " +
      shlex.join(command).replace("'", "'\\''") + "'",
  ]
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  text = sbatch_script(argv[1:], nodes=_NODES.value, gpus_per_node=_GPUS.value,
                       time=_TIME.value, port=_PORT.value,
                       partition=_PARTITION.value)
  with open(_SCRIPT.value, 'w') as f:
    f.write(text)
  print(f'wrote {_SCRIPT.value}')
  if _SUBMIT.value:
    sys.exit(subprocess.call(['sbatch', _SCRIPT.value]))


if __name__ == '__main__':
  app.run(main)
