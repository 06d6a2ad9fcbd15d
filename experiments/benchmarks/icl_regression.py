"""Benchmark: training throughput of the in-context regression study.

Target (issue 7): the paper preset of He et al. (ICML 2025, arXiv 2503.12734), main
run H in {1, 2, 4, 8} (+ the linear-attention baseline), 500k Adam steps at batch
256, d = 5, L = 40, in under 30 minutes on a 2-core CPU. Rows report measured steps/s
(compilation excluded) and the projected wall time of 500k steps; variants are timed
side by side in one process so their ratios are meaningful on a noisy machine:
all models jointly vs each head count alone, folded vs per-token projections,
threefry vs unsafe_rbg data streams, plus a dense matmul throughput as the ceiling.

  suite 'quick'    a few hundred steps per variant (minutes).
  suite 'cpu_core' longer timing windows.
  suite 'full'     also trains the paper main run to completion (actual wall time).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from experiments.configs import icl_regression as configs
from experiments.icl import data
from experiments.icl import study
from experiments.icl import training

SUITES = ('quick', 'cpu_core', 'full')
PAPER_STEPS = 500_000


def _paper_spec(**kw) -> training.RunSpec:
  base = dict(name='bench', task=data.Task(d=5, sigma2=0.1), length=40,
              heads=(1, 2, 4, 8), linear_heads=(1,), batch=256, lr=1e-3,
              steps=PAPER_STEPS, log_every=100, seeds=(0,))
  base.update(kw)
  return training.RunSpec(**base)


def _steps_per_s(spec: training.RunSpec, chunks: int,
                 max_devices: int | None = None) -> tuple[float, float, int]:
  """(steps/s over `chunks` timed chunks, seconds of the first chunk incl. compile,
  devices used)."""
  mesh = training.make_mesh(spec, max_devices)
  state = training.shard_state(training.init_state(spec), mesh)
  chunk = training.make_chunk_fn(spec, mesh)
  t0 = time.perf_counter()
  state = chunk(state)
  int(state['step'])
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(chunks):
    state = chunk(state)
  int(state['step'])
  return (chunks * spec.log_every / (time.perf_counter() - t0), first,
          mesh.devices.size)


def _matmul_gflops(n: int = 512, reps: int = 20) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def _scan_rate(fn, steps: int) -> float:
  """Steps/s of `fn(i) -> scalar` run `steps` times in one jitted lax.scan."""
  f = jax.jit(lambda: jax.lax.scan(lambda c, i: (c + fn(i), None), 0.0,
                                   jnp.arange(steps))[0])
  f().block_until_ready()
  t0 = time.perf_counter()
  f().block_until_ready()
  return steps / (time.perf_counter() - t0)


def _component_rates(steps: int) -> dict[str, float]:
  """Per-step cost split: data generation alone vs H=1 forward+backward alone."""
  spec = _paper_spec(heads=(1,), linear_heads=())
  key = jax.random.key(0)
  batch = data.sample(spec.task, key, spec.batch, spec.length)
  params = training.init_state(spec)['params']
  params = jax.tree.map(lambda a: a[0], params)

  def grad_q(i):
    b = batch._replace(x=batch.x * (1 + i * 1e-9))
    g = jax.grad(lambda p: training.loss_fn(spec, p, b)[0])(params)
    return jnp.sum(g['softmax']['Q'])

  return {
      'data_only_steps_per_s': _scan_rate(lambda i: jnp.sum(data.sample(
          spec.task, jax.random.fold_in(key, i), spec.batch, spec.length).yq),
                                          steps),
      'h1_fwd_bwd_only_steps_per_s': _scan_rate(grad_q, steps),
  }


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """Runs the benchmark; returns flat rows of measured numbers.

  The trainer splits each batch over the JAX devices; a CPU process that has fewer
  devices than cores (the benchmark binary's default) runs the measurement in a
  subprocess with one host device per core, as `python -m experiments.icl_regression`
  does.
  """
  if suite not in SUITES:
    raise ValueError(f'suite must be one of {SUITES}, got {suite!r}.')
  cores = os.cpu_count() or 1
  if jax.devices()[0].platform == 'cpu' and len(jax.devices()) < cores:
    return _run_in_subprocess(suite, workdir, cores)
  return _run(suite, workdir)


def _run_in_subprocess(suite: str, workdir: str, devices: int
                       ) -> list[dict[str, Any]]:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}').strip()
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.benchmarks.icl_regression', suite,
       workdir], capture_output=True, text=True, env=env, cwd=root, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'icl_regression benchmark subprocess failed: '
                       f'{proc.stderr[-3000:]}')
  return json.loads(proc.stdout)


def _run(suite: str, workdir: str) -> list[dict[str, Any]]:
  chunks = 3 if suite == 'quick' else 10
  rows = []
  ceiling = _matmul_gflops()
  base = _paper_spec()
  variants = [('joint_H1_2_4_8_plus_linear', base, None),
               ('joint_one_device', base, 1)]
  variants += [(f'alone_H{h}', _paper_spec(heads=(h,), linear_heads=()), None)
               for h in base.heads]
  variants += [('joint_tokens_projection', _paper_spec(projection='tokens'), None),
               ('joint_unsafe_rbg', _paper_spec(rng_impl='unsafe_rbg'), None)]
  # The paper preset's extension runs, exactly as the binary builds them.
  paper = study.build_specs(configs.get_config('paper'))
  for run_name in ('noniso', 'multitask'):
    if run_name in paper:
      variants.append((f'paper_{run_name}', dataclasses.replace(
          paper[run_name], log_every=100), None))
  measured = {}
  for name, spec, max_devices in variants:
    sps, first, used = _steps_per_s(spec, chunks, max_devices)
    measured[name] = sps
    rows.append({
        'topic': 'icl_regression', 'suite': suite, 'variant': name,
        'heads': ','.join(map(str, spec.heads)),
        'linear_heads': ','.join(map(str, spec.linear_heads)),
        'batch': spec.batch, 'length': spec.length, 'd': spec.task.d,
        'projection': spec.projection, 'rng_impl': spec.rng_impl,
        'devices_used': used,
        'steps_per_s': sps, 'first_chunk_s_incl_compile': first,
        'timed_steps': chunks * spec.log_every,
        'projected_500k_steps_min': PAPER_STEPS / sps / 60,
        'matmul_gflops_ceiling': ceiling,
    })
  alone = [measured[f'alone_H{h}'] for h in base.heads]
  # Training the four softmax models one after another (the linear baseline not
  # included, so this favours the sequential option).
  seq_time = sum(PAPER_STEPS / s for s in alone)
  rows.append({
      'topic': 'icl_regression', 'suite': suite, 'variant': 'aggregate',
      'joint_steps_per_s': measured['joint_H1_2_4_8_plus_linear'],
      'joint_model_steps_per_s': measured['joint_H1_2_4_8_plus_linear'] * 5,
      'sequential_softmax_only_projected_min': seq_time / 60,
      'joint_projected_min': PAPER_STEPS /
                             measured['joint_H1_2_4_8_plus_linear'] / 60,
      'speedup_joint_vs_sequential': seq_time / (
          PAPER_STEPS / measured['joint_H1_2_4_8_plus_linear']),
      'speedup_folded_vs_tokens': measured['joint_H1_2_4_8_plus_linear'] /
                                  measured['joint_tokens_projection'],
      'speedup_unsafe_rbg_vs_threefry': measured['joint_unsafe_rbg'] /
                                        measured['joint_H1_2_4_8_plus_linear'],
      'speedup_all_devices_vs_one': measured['joint_H1_2_4_8_plus_linear'] /
                                    measured['joint_one_device'],
      # Every training run of `--preset=paper` (main + extensions), compilation and
      # analysis excluded.
      'paper_preset_all_runs_projected_min': sum(
          spec.steps / measured[name] for name, spec in (
              [('joint_H1_2_4_8_plus_linear', base)] +
              [(f'paper_{r}', paper[r]) for r in ('noniso', 'multitask')
               if r in paper])) / 60,
      'target_min': 30.0,
      'matmul_gflops_ceiling': ceiling,
      'devices': len(jax.devices()),
      **_component_rates(chunks * 100),
  })
  if suite == 'full':
    spec = dataclasses.replace(base, log_every=2500, name='bench_full')
    _, timing = training.train(spec, workdir, checkpoint_every=25_000)
    rows.append({'topic': 'icl_regression', 'suite': suite,
                 'variant': 'paper_main_run_actual', 'steps': spec.steps,
                 'wall_min': timing['wall_s'] / 60,
                 'steps_per_s': timing['steps_per_s'],
                 'resumed_from': timing['resumed_from']})
  return rows


if __name__ == '__main__':
  out = run(sys.argv[1] if len(sys.argv) > 1 else 'quick',
            sys.argv[2] if len(sys.argv) > 2 else '/tmp/icl_bench')
  print(json.dumps(out, indent=1, default=float))
