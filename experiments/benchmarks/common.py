"""Shared measurement helpers for the benchmarks: timing, matmul ceiling, memory."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

SUITES = ('quick', 'cpu_core', 'full')


def check_suite(suite: str) -> str:
  if suite not in SUITES:
    raise ValueError(f'suite must be one of {SUITES}, got {suite!r}.')
  return suite


def block(x: Any) -> Any:
  return jax.tree_util.tree_map(
      lambda a: a.block_until_ready() if hasattr(a, 'block_until_ready') else a,
      x)


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5,
            warmup: int = 1, min_time: float = 0.0) -> float:
  """Median wall time (s) of `fn(*args)` after `warmup` calls (compile excluded).

  With `min_time`, repeats continue until that much time was spent (cheap calls get
  more samples).
  """
  for _ in range(warmup):
    block(fn(*args))
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start) < min_time:
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
    if len(times) >= 200:
      break
  return statistics.median(times)


def matmul_flops_per_s(n: int = 2048, dtype: Any = jnp.float32,
                       repeats: int = 5) -> float:
  """Measured FLOP/s of an n x n matmul (the ceiling quoted beside every table)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  seconds = time_fn(f, a, a, repeats=repeats, warmup=2)
  return 2.0 * n**3 / seconds


def compiled_memory_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """XLA's peak device-memory estimate for `jit(fn)(*args)`: args + outputs + temps."""
  compiled = jax.jit(fn).lower(*args).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    return -1
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
             stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def interleaved_best(fns: dict[str, Callable[[], Any]], rounds: int,
                     warmup: int = 1) -> dict[str, float]:
  """Minimum wall time (s) of each zero-argument callable, timed in rounds.

  Every round calls each function once, in a rotated order, so slow phases of a
  shared machine hit all of them alike and the ratios between them stay fair; the
  minimum over rounds is each one's least disturbed sample.
  """
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}.')
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      block(fns[name]())
  best = {name: float('inf') for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      block(fns[name]())
      best[name] = min(best[name], time.perf_counter() - t0)
  return best
