"""Shared measurement helpers for the benchmarks: timing, matmul ceiling, memory."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

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


def vjp_fn(fn: Callable[..., Any], argnums: Sequence[int] = (0, 1, 2)
          ) -> Callable[..., Any]:
  """(cotangent, *args) -> the gradients of args[argnums] pulled back from `cotangent`.

  The backward of a training step: the cotangent of `fn`'s output comes from
  elsewhere (the layers above), so it is an input of the program. The usual
  benchmark shortcut, grad of sum(fn), hands XLA a constant all-ones cotangent that
  it constant-folds and simplifies differently for each contender (T=2048, N=4,
  H=64, causal, CPU: the xla path 38-47 ms that way vs 31-33 ms with a run-time
  cotangent, jax.nn 241-247 vs 259-261 ms).
  """
  argnums = tuple(argnums)

  def run(cotangent, *args):
    def f(*diff):
      full = list(args)
      for i, x in zip(argnums, diff):
        full[i] = x
      return fn(*full)

    _, pull = jax.vjp(f, *(args[i] for i in argnums))
    return pull(cotangent)

  return run


def random_cotangent(fn: Callable[..., Any], *args: Any, seed: int = 0) -> Any:
  """A standard-normal cotangent (pytree, on device) of the output of fn(*args).

  Drawn with NumPy on the host (no RNG program to compile, no device transient).
  """
  leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(fn, *args))
  rng = np.random.default_rng(seed)
  out = []
  for leaf in leaves:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      out.append(jnp.asarray(rng.standard_normal(leaf.shape, np.float32)).astype(
          leaf.dtype))
    else:  # Integer outputs take float0 cotangents.
      out.append(np.zeros(leaf.shape, jax.dtypes.float0))
  return jax.tree_util.tree_unflatten(tree, out)


def fwd_bwd_fn(fn: Callable[..., Any], argnums: Sequence[int] = (0, 1, 2), *,
               seed: int = 0) -> Callable[..., Any]:
  """Jitted `(*args) -> gradients of args[argnums]` with a run-time cotangent.

  See `vjp_fn`. The cotangent is drawn once per input shapes (`random_cotangent`)
  outside the timed program and passed in as an argument. The returned function
  also has `.lower(*args)` (for `compiled_memory_bytes`).
  """
  jitted = jax.jit(vjp_fn(fn, argnums))
  cache: dict[Any, Any] = {}

  def cotangent(args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    key = (tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
    if key not in cache:
      cache[key] = random_cotangent(fn, *args, seed=seed)
    return cache[key]

  def call(*args):
    return jitted(cotangent(args), *args)

  call.lower = lambda *args: jitted.lower(cotangent(args), *args)
  return call


def compiled_memory_bytes(fn: Callable[..., Any], *args: Any) -> int:
  """XLA's peak device-memory estimate for `jit(fn)(*args)`: args + outputs + temps."""
  lower = getattr(fn, 'lower', None) or jax.jit(fn).lower
  compiled = lower(*args).compile()
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
