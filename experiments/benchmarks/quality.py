"""Quality next to speed: short MQAR training runs per attention variant.

Multi-query associative recall ("Zoology", Arora et al., 2023) at several lengths,
trained with the real training library (`experiments.train_lib`, the `mqar` LM preset
shrunk per suite) for each attention variant: eval accuracy on the recall positions and
the run's training tokens/s, relative to standard softmax measured in the same run.
Sparse masks get a window of a quarter of the length, so the table shows what long-range
recall they give up for their speed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from experiments import train_lib
from experiments.benchmarks import common
from experiments.benchmarks import train as train_bench
from experiments.configs import lm
from experiments.models import registry

SUITES = {
    # lengths, training steps, model (dim, depth, heads), batch, MQAR vocabulary,
    # variants (None: all).
    'quick': dict(lengths=(32, 64), steps=300, dim=32, depth=2, heads=2,
                  batch=32, vocab=16,
                  variants=('softmax', 'mask=sliding_window(L/4)')),
    'cpu_core': dict(lengths=(64, 128), steps=1000, dim=64, depth=2, heads=4,
                     batch=32, vocab=32, variants=None),
    'full': dict(lengths=(64, 128, 256), steps=3000, dim=64, depth=2, heads=4,
                 batch=64, vocab=64, variants=None),
}


def variants(seq_len: int) -> dict[str, dict[str, Any]]:
  """Variant name -> config overrides (softmax family + length-scaled masks)."""
  out = {name: o for name, o in train_bench.variants().items()
         if '@' not in name and not name.startswith('mask=')}
  w = max(seq_len // 4, 2)
  for spec in (f'sliding_window:{w},0', f'chunked_causal:{w}',
               f'sink_window:4,{w}'):
    if registry.parse_mask_spec(spec)[0] in registry.available_masks():
      out[f'mask={spec.split(":")[0]}(L/4)'] = {'model.attention.mask': spec}
  return out


def _config(seq_len: int, s: dict[str, Any], overrides: dict[str, Any]):
  config = lm.get_config('mqar')
  pairs = min(max(seq_len // 8, 1), s['vocab'])
  head_dim = s['dim'] // s['heads']
  config.update_from_flattened_dict({
      'data.seq_len': seq_len, 'data.batch_size': s['batch'],
      'data.mqar.num_pairs': pairs, 'data.mqar.num_queries': pairs,
      'data.mqar.num_keys': s['vocab'], 'data.mqar.num_values': s['vocab'],
      'model.dim': s['dim'], 'model.depth': s['depth'],
      'model.num_heads': s['heads'], 'model.num_kv_heads': s['heads'],
      'model.head_dim': head_dim, 'model.mlp_dim': 2 * s['dim'],
      'train.num_steps': s['steps'], 'train.warmup_steps': s['steps'] // 10,
      'train.log_every': s['steps'], 'train.eval_every': s['steps'],
      'train.checkpoint_every': s['steps'], 'train.tensorboard': False,
      'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1, **overrides})
  return config


def run(suite: str, workdir: str, *,
        names: list[str] | None = None) -> list[dict[str, Any]]:
  """One row per (variant, length): eval accuracy, loss, tokens/s vs softmax."""
  common.check_suite(suite)
  s = SUITES[suite]
  root = tempfile.mkdtemp(prefix='quality_', dir=workdir or None)
  rows = []
  try:
    for seq_len in s['lengths']:
      base = None
      for name, overrides in variants(seq_len).items():
        wanted = names if names is not None else s['variants']
        if wanted is not None and name not in wanted:
          continue
        config = _config(seq_len, s, overrides)
        run_dir = os.path.join(root, f'{name}_{seq_len}'.replace('/', '_'))
        t0 = time.perf_counter()
        summary = train_lib.train_and_evaluate(config, run_dir)
        seconds = time.perf_counter() - t0
        tokens_per_s = s['steps'] * s['batch'] * seq_len / seconds
        row = dict(variant=name, seq_len=seq_len, steps=s['steps'],
                   eval_accuracy=float(summary['eval']['accuracy']),
                   eval_loss=float(summary['eval']['loss']),
                   train_s_incl_compile=seconds, tokens_per_s=tokens_per_s)
        base = base or row
        row['speed_vs_first'] = tokens_per_s / base['tokens_per_s']
        rows.append(row)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return rows
