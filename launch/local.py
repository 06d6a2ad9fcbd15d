r"""Run a binary as several local processes joined by `jax.distributed` on 127.0.0.1.

  python -m launch.local --num_processes=2 --devices_per_process=4 -- \
      python -m experiments.train --config=experiments/configs/lm.py:tiny --workdir=/tmp/lm

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
`launch.distributed.initialize`), its own simulated CPU devices, and its output prefixed
by `[p<i>]`. The first process to fail (whichever it is) stops the others at once
(SIGTERM, then SIGKILL after --grace_period seconds); the launcher names it and exits
with its code (124 when --timeout expires).
"""

from __future__ import annotations

import os
import signal
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
_GRACE = flags.DEFINE_float(
    'grace_period', 10.0, 'Seconds between SIGTERM and SIGKILL when one process '
    'fails and the others are stopped.')


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


def _signal_group(p: subprocess.Popen, sig: int) -> None:
  """Sends `sig` to the process group of `p` (its children too, e.g. a shell's)."""
  try:
    os.killpg(p.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def _stop(procs: Sequence[subprocess.Popen], grace_period: float) -> None:
  """SIGTERM every process group, then SIGKILL those alive after the grace period."""
  for p in procs:
    _signal_group(p, signal.SIGTERM)
  deadline = time.monotonic() + grace_period
  for p in procs:
    try:
      p.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
      pass
  for p in procs:  # Also reaps group members (e.g. a shell's child) still alive.
    _signal_group(p, signal.SIGKILL)
    p.wait()


def launch(command: Sequence[str], num_processes: int,
           devices_per_process: int = 1, timeout: float = 0.0,
           out=None, grace_period: float = 10.0) -> int:
  """Starts the processes, streams their output, returns the first failure's code.

  The first process to exit non-zero (any process, not only process 0) stops the
  others at once: SIGTERM, then SIGKILL after `grace_period` seconds. The launcher
  reports which process failed with which code and returns that code (124 when
  `timeout` expired).
  """
  if not command:
    raise ValueError('command must be non-empty (put it after --).')
  if num_processes < 1:
    raise ValueError(f'num_processes must be >= 1, got {num_processes}.')
  if devices_per_process < 1:
    raise ValueError(
        f'devices_per_process must be >= 1, got {devices_per_process}.')
  if not grace_period >= 0:
    raise ValueError(f'grace_period must be >= 0, got {grace_period}.')
  out = out or sys.stdout
  port = free_port()
  procs, pumps = [], []
  for i in range(num_processes):
    env = process_env(dict(os.environ), process_id=i,
                      num_processes=num_processes, port=port,
                      devices_per_process=devices_per_process)
    # Own process group each, so stopping a process also stops its children.
    p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    t = threading.Thread(target=_pump, args=(p.stdout, f'[p{i}]', out),
                         daemon=True)
    t.start()
    procs.append(p)
    pumps.append(t)
  deadline = time.monotonic() + timeout if timeout > 0 else None
  code, message = 0, None
  try:
    code, message = _watch(procs, deadline, timeout)
  except KeyboardInterrupt:
    code, message = 130, '[launch.local] interrupted; stopping all processes.'
  if message:
    out.write(message + '\n')
    out.flush()
    _stop(procs, grace_period)
  for p in procs:
    p.wait()
  for t in pumps:
    t.join(timeout=5)
  if message:
    out.write(f'[launch.local] exit code {code}.\n')
    out.flush()
  return code


def _watch(procs: Sequence[subprocess.Popen], deadline: float | None,
           timeout: float) -> tuple[int, str | None]:
  """Waits for all to succeed, one to fail or the deadline: (code, message)."""
  code, message = 0, None
  while True:
    # Poll every process (not `any(...)`, which stops at the first live one and
    # would never notice a later process's failure).
    codes = [p.poll() for p in procs]
    failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
    if failed:
      index, code = failed[0]
      how = f'exit code {code}'
      if code < 0:  # Killed by a signal: report it, exit like a shell would.
        how = f'signal {-code} (exit code {128 - code})'
        code = 128 - code
      message = (f'[launch.local] process {index} failed with {how}; stopping '
                 f'the other processes.')
      break
    if all(c is not None for c in codes):
      break
    if deadline is not None and time.monotonic() > deadline:
      code = 124
      message = (f'[launch.local] timeout of {timeout:g}s expired; stopping all '
                 f'processes.')
      break
    time.sleep(0.05)
  return code, message


def main(argv: Sequence[str]) -> None:
  sys.exit(launch(argv[1:], _NUM_PROCESSES.value, _DEVICES.value,
                  _TIMEOUT.value, grace_period=_GRACE.value))


if __name__ == '__main__':
  app.run(main)
