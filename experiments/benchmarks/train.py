"""Training throughput of the LM preset per attention variant, relative to softmax.

`run(suite, workdir)` builds the `small` LM preset (`experiments/configs/lm.py`) once
per attention configuration (every registered variant; softmax with sinks, soft-cap,
GQA and MQA; every `attention.dot_product_attention` implementation for this backend;
the mask specs of `MASK_SPECS` whose generators exist), compiles one training step
each, then times the steps round-robin (repeat r of every variant before repeat r + 1
of any, after one discarded warm-up round) so load changes hit all variants alike.
Rows: variant, tokens/s (median over repeats) and the ratio to standard softmax
attention (the default implementation) measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax

import attention
from experiments import data as data_lib
from experiments import train_lib
from experiments.configs import lm
from experiments.models import registry

# Mask specs benchmarked when `attention.masks` has the generator (others skipped).
MASK_SPECS = ('sliding_window:64,0', 'chunked_causal:64', 'sink_window:4,64')

SUITES = {
    # seq_len, batch, depth, dim, steps per repeat, repeats
    'quick': dict(seq_len=64, batch=8, depth=1, dim=64, steps=2, repeats=2),
    'cpu_core': dict(seq_len=256, batch=16, depth=4, dim=128, steps=3,
                     repeats=5),
    'full': dict(seq_len=256, batch=16, depth=4, dim=128, steps=10, repeats=5),
}


def variants() -> dict[str, dict[str, Any]]:
  """Benchmark name -> config overrides (flattened keys)."""
  out: dict[str, dict[str, Any]] = {'softmax': {}}
  out['softmax+sinks'] = {'model.attention.sinks': True}
  out['softmax+softcap30'] = {'model.attention.logits_soft_cap': 30.0}
  out['gqa(kv=2)'] = {'model.num_kv_heads': 2}
  out['mqa(kv=1)'] = {'model.num_kv_heads': 1}
  backend = jax.default_backend()
  for impl in attention.available_implementations():
    if impl.startswith('pallas_') and impl != f'pallas_{backend}':
      continue  # A kernel for another backend.
    out[f'softmax@{impl}'] = {'model.attention.implementation': impl}
  for name in registry.available_variants():
    if name != 'softmax':
      out[name] = {'model.attention.variant': name}
  masks = registry.available_masks()
  for spec in MASK_SPECS:
    if registry.parse_mask_spec(spec)[0] in masks:
      out[f'mask={spec}'] = {'model.attention.mask': spec}
  return out


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """Measures training tokens/s per attention variant (see module docstring)."""
  if suite not in SUITES:
    raise ValueError(f'suite must be one of {sorted(SUITES)}, got {suite!r}.')
  del workdir  # Rows are written by the caller.
  s = SUITES[suite]
  trainers = {}
  for name, overrides in variants().items():
    config = lm.get_config('small')
    config.update_from_flattened_dict({
        'data.seq_len': s['seq_len'], 'data.batch_size': s['batch'],
        'model.depth': s['depth'], 'model.dim': s['dim'],
        'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1, **overrides})
    source = data_lib.make_source(config.data, seed=0)
    trainer = train_lib.Trainer(config, source.info, jax.devices()[:1])
    state = trainer.init_state()
    batch = next(source.train)
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)  # Compile + warm up.
    jax.block_until_ready(metrics)
    trainers[name] = [trainer, state, batch, time.perf_counter() - t0]
  tokens_per_step = s['batch'] * s['seq_len']
  rates: dict[str, list[float]] = {name: [] for name in trainers}
  for repeat in range(s['repeats'] + 1):  # Repeat 0 is a discarded warm-up.
    for name, entry in trainers.items():
      trainer, state, batch, _ = entry
      t0 = time.perf_counter()
      for _ in range(s['steps']):
        state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready(metrics)
      if repeat:
        rates[name].append(s['steps'] * tokens_per_step /
                           (time.perf_counter() - t0))
      entry[1] = state
  base = statistics.median(rates['softmax'])
  rows = []
  for name, values in rates.items():
    median = statistics.median(values)
    rows.append({'benchmark': 'train', 'suite': suite, 'variant': name,
                 'seq_len': s['seq_len'], 'batch': s['batch'],
                 'depth': s['depth'], 'dim': s['dim'],
                 'tokens_per_sec': median,
                 'relative_to_softmax': median / base,
                 'compile_and_first_step_sec': trainers[name][3],
                 'repeats': s['repeats'], 'steps_per_repeat': s['steps']})
  return rows


def table(rows: list[dict[str, Any]]) -> str:
  """A plain-text table of `run`'s rows."""
  lines = [f'{"variant":<28} {"tokens/s":>12} {"vs softmax":>10}']
  for r in rows:
    lines.append(f'{r["variant"]:<28} {r["tokens_per_sec"]:>12,.0f} '
                 f'{r["relative_to_softmax"]:>10.3f}')
  return '\n'.join(lines)


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  print(table(run(sys.argv[1] if len(sys.argv) > 1 else 'quick', '')))
