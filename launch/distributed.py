"""Multi-process initialisation shared by every experiment binary.

`initialize()` is called first thing in each binary's main. It is a no-op for a single
process and otherwise calls `jax.distributed.initialize`:
- explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID (set by
  `launch.local` and `launch.slurm`); on CPU, cross-process collectives use gloo;
- automatic: on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts) or a
  multi-task SLURM job, JAX discovers the cluster itself.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax

_initialized = False


def cluster_env(env: Mapping[str, str] | None = None) -> dict[str, object] | None:
  """The explicit cluster spec from `env`, None for automatic / single process.

  Raises ValueError when the variables are incomplete or inconsistent.
  """
  env = os.environ if env is None else env
  keys = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')
  present = [k for k in keys if env.get(k)]
  if not present:
    return None
  if len(present) != len(keys):
    missing = sorted(set(keys) - set(present))
    raise ValueError(f'set all of {keys} for a multi-process run; missing {missing}.')
  try:
    num = int(env['JAX_NUM_PROCESSES'])
    pid = int(env['JAX_PROCESS_ID'])
  except ValueError as e:
    raise ValueError(
        'JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got '
        f"{env['JAX_NUM_PROCESSES']!r} and {env['JAX_PROCESS_ID']!r}.") from e
  if num < 1 or not 0 <= pid < num:
    raise ValueError(
        f'JAX_PROCESS_ID must be in [0, JAX_NUM_PROCESSES={num}), got {pid}.')
  return dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
              num_processes=num, process_id=pid)


def _auto_cluster(env: Mapping[str, str]) -> bool:
  tpu_hosts = env.get('TPU_WORKER_HOSTNAMES', '')
  slurm_tasks = env.get('SLURM_NTASKS', '1')
  return ',' in tpu_hosts or (slurm_tasks.isdigit() and int(slurm_tasks) > 1)


def use_cpu_cores(count: int | None = None) -> int | None:
  """Exposes `count` (default: every core) JAX CPU devices; call before any JAX op.

  XLA:CPU runs one device's program largely on one thread for small ops, so
  data-parallel code (e.g. the in-context regression trainer) uses all cores only
  when each core is a device. Returns the count set, or None when nothing changed:
  XLA_FLAGS already forces a host device count (tests force 8), or JAX's backends
  are already initialised.
  """
  if '--xla_force_host_platform_device_count' in os.environ.get('XLA_FLAGS', ''):
    return None
  if count is None:
    count = os.cpu_count() or 1
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f'count must be a positive int or None, got {count!r}.')
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # Backends already initialised: keep their devices.
    return None
  return count


def initialize() -> None:
  """Joins the multi-process job described by the environment (idempotent)."""
  global _initialized
  if _initialized:
    return
  spec = cluster_env()
  if spec is not None:
    if spec['num_processes'] > 1:
      if os.environ.get('JAX_PLATFORMS', 'cpu').startswith('cpu'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
      jax.distributed.initialize(**spec)
  elif _auto_cluster(os.environ):
    jax.distributed.initialize()
  _initialized = True
