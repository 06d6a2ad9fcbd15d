r"""Run a binary as several local processes joined by `jax.distributed` on 127.0.0.1.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      python -m experiments.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`launch.distributed.initialize`), its own simulated CPU devices, and its output prefixed
by `[p<i>]`. If one process fails, the others are stopped and the exit code is non-zero.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from absl import app
from absl import flags

_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
_DEVICES = flags.DEFINE_integer('devices_per_process', 1,
                                'Simulated CPU devices per process.')
_TIMEOUT = flags.DEFINE_float('timeout', 0.0,
                              'Seconds before all processes are killed (0: none).')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int,
                port: int, devices_per_process: int) -> dict[str, str]:
  env = dict(base)
  flags_ = [f for f in env.get('XLA_FLAGS', '').split()
            if not f.startswith('--xla_force_host_platform_device_count')]
  flags_.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env.update(
      JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
      JAX_NUM_PROCESSES=str(num_processes),
      JAX_PROCESS_ID=str(process_id),
      JAX_PLATFORMS=env.get('JAX_PLATFORMS', 'cpu'),
      XLA_FLAGS=' '.join(flags_))
  return env


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ''):
    out.write(f'{prefix} {line}')
    out.flush()


def launch(command: Sequence[str], num_processes: int,
           devices_per_process: int = 1, timeout: float = 0.0,
           out=None) -> int:
  """Starts the processes, streams their output, returns the first non-zero code."""
  if not command:
    raise ValueError('command must be non-empty (put it after --).')
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}.')
  if devices_per_process < 1:
    raise ValueError(
        f'devices_per_process must be >= 1, got {devices_per_process}.')
  out = out or sys.stdout
  port = free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(dict(os.environ), process_id=i,
                      num_processes=num_processes, port=port,
                      devices_per_process=devices_per_process)
    p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f'[p{i}]', out),
                         daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  deadline = time.monotonic() + timeout if timeout > 0 else None
  code = 0
  while any(p.poll() is None for p in procs):
    failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
    expired = deadline is not None and time.monotonic() > deadline
    if failed or expired:
      code = failed[0] if failed else 124
      for p in procs:
        if p.poll() is None:
          p.kill()
      break
    time.sleep(0.1)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if code == 0:
    code = next((p.returncode for p in procs if p.returncode), 0)
  return code


def main(argv: Sequence[str]) -> None:
  sys.exit(launch(argv[1:], _NUM_PROCESSES.value, _DEVICES.value,
                  _TIMEOUT.value))


if __name__ == '__main__':
  app.run(main)
