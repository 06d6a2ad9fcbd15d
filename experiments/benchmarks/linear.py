"""Speed and memory of the chunked linear-attention forms (`attention.linear`).

Rows, all B=1, N=8, H=64, float32, causal, timed side by side in interleaved rounds:

* `flat`: chunked lightning / linear attention (elu+1, normalised) forward and
  forward+backward at each of `flat_lengths`, time per token; a summary row per
  variant gives the per-token ratio longest / shortest (target <= 1.3: constant cost
  per token, Lightning Attention-2's claim).
* `chunked_vs_recurrent`: chunked vs `lax.scan` recurrent lightning forward at
  `recurrent_length` (target >= 5x).
* `crossover`: chunked lightning vs blocked causal softmax (`dot_product_attention`,
  implementation='xla') forward and fwd+bwd per length; the summary row names the
  first length at which lightning is faster.
* `memory`: peak resident memory (VmHWM) of a fresh subprocess running chunked
  lightning fwd+bwd at `memory_length` (target < 2 GiB), the method of the softmax
  benchmark (`xla_attention.memory_row`); beside it XLA's compiled estimate
  (arguments + outputs + temporaries) of the same function.

    python -m experiments.benchmark --suite=cpu_core --topics=linear --workdir=/tmp/lin
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import linear
from experiments.benchmarks import common

HEADS, HEAD_DIM = 8, 64
SUITES = {
    'quick': dict(flat_lengths=(1024, 4096), recurrent_length=2048,
                  crossover_lengths=(256, 512, 1024, 2048), memory_length=8192,
                  rounds=2),
    'cpu_core': dict(flat_lengths=(4096, 65536), recurrent_length=16384,
                     crossover_lengths=(256, 512, 1024, 2048, 4096, 8192),
                     memory_length=65536, rounds=3),
    'full': dict(flat_lengths=(4096, 16384, 65536), recurrent_length=16384,
                 crossover_lengths=(256, 512, 1024, 2048, 4096, 8192, 16384),
                 memory_length=65536, rounds=5),
}
# The smallest sizes, for the end-to-end test of this topic.
TINY = dict(flat_lengths=(64, 128), recurrent_length=64,
            crossover_lengths=(32, 64), memory_length=128, rounds=1)
TARGETS = dict(flat_ratio=1.3, recurrent_speedup=5.0, memory_gib=2.0)

_FNS = {
    'lightning': lambda q, k, v: linear.lightning_attention(
        q, k, v, implementation='xla')[0],
    'linear': lambda q, k, v: linear.linear_attention(
        q, k, v, implementation='xla')[0],
    'lightning_recurrent': lambda q, k, v: linear.recurrent_lightning_attention(
        q, k, v)[0],
    'softmax_xla': lambda q, k, v: attention.dot_product_attention(
        q, k, v, is_causal=True, implementation='xla'),
}


def _inputs(t: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(1, t, HEADS, HEAD_DIM)) * 0.5,
                           jnp.float32) for _ in range(3))


def _fwd(name: str):
  return jax.jit(_FNS[name])


def _fwd_bwd(name: str):
  return common.fwd_bwd_fn(_FNS[name])


def _time(fns: dict[str, Any], args, rounds: int) -> dict[str, float]:
  return common.interleaved_best(
      {k: functools.partial(f, *args) for k, f in fns.items()}, rounds)


def _flat_rows(cfg) -> list[dict[str, Any]]:
  rows, per_token = [], {}
  for t in cfg['flat_lengths']:
    args = _inputs(t)
    fns = {}
    for name in ('lightning', 'linear'):
      fns[(name, 'fwd')] = _fwd(name)
      fns[(name, 'fwd_bwd')] = _fwd_bwd(name)
    best = _time(fns, args, cfg['rounds'])
    for name in ('lightning', 'linear'):
      fwd, fb = best[(name, 'fwd')], best[(name, 'fwd_bwd')]
      per_token[(name, t)] = (fwd / t, fb / t)
      rows.append(dict(section='flat', variant=name, implementation='xla',
                       q_len=t, fwd_s=fwd, fwd_bwd_s=fb,
                       fwd_us_per_token=1e6 * fwd / t,
                       fwd_bwd_us_per_token=1e6 * fb / t))
  lo, hi = min(cfg['flat_lengths']), max(cfg['flat_lengths'])
  for name in ('lightning', 'linear'):
    (f_lo, b_lo), (f_hi, b_hi) = per_token[(name, lo)], per_token[(name, hi)]
    fr, br = f_hi / f_lo, b_hi / b_lo
    rows.append(dict(section='flat_summary', variant=name, lengths=f'{lo}->{hi}',
                     fwd_per_token_ratio=fr, fwd_bwd_per_token_ratio=br,
                     target=TARGETS['flat_ratio'],
                     met=bool(fr <= TARGETS['flat_ratio'] and
                              br <= TARGETS['flat_ratio'])))
  return rows


def _recurrent_rows(cfg) -> list[dict[str, Any]]:
  t = cfg['recurrent_length']
  best = _time({'chunked': _fwd('lightning'),
                'recurrent': _fwd('lightning_recurrent')}, _inputs(t),
               cfg['rounds'])
  speedup = best['recurrent'] / best['chunked']
  return [dict(section='chunked_vs_recurrent', variant='lightning', q_len=t,
               chunked_fwd_s=best['chunked'], recurrent_fwd_s=best['recurrent'],
               speedup=speedup, target=TARGETS['recurrent_speedup'],
               met=bool(speedup >= TARGETS['recurrent_speedup']))]


def _crossover_rows(cfg) -> list[dict[str, Any]]:
  rows, first = [], {'fwd': None, 'fwd_bwd': None}
  for t in cfg['crossover_lengths']:
    fns = {('lightning', 'fwd'): _fwd('lightning'),
           ('softmax_xla', 'fwd'): _fwd('softmax_xla'),
           ('lightning', 'fwd_bwd'): _fwd_bwd('lightning'),
           ('softmax_xla', 'fwd_bwd'): _fwd_bwd('softmax_xla')}
    best = _time(fns, _inputs(t), cfg['rounds'])
    row = dict(section='crossover', q_len=t)
    for kind in ('fwd', 'fwd_bwd'):
      lin, soft = best[('lightning', kind)], best[('softmax_xla', kind)]
      row.update({f'lightning_{kind}_s': lin, f'softmax_xla_{kind}_s': soft,
                  f'{kind}_softmax_over_lightning': soft / lin})
      if first[kind] is None and lin < soft:
        first[kind] = t
    rows.append(row)
  rows.append(dict(section='crossover_summary',
                   fwd_crossover_len=first['fwd'] or 'none in range',
                   fwd_bwd_crossover_len=first['fwd_bwd'] or 'none in range'))
  return rows


_MEMORY_SCRIPT = r'''
import json, sys
import numpy as np


def peak_kib():
  # VmHWM: this process's own peak RSS (ru_maxrss would carry over fork and exec).
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1])
  return -1


import jax, jax.numpy as jnp
from attention import linear
from experiments.benchmarks import common
t, n, h = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
# q, k, v and the output's cotangent (the backward's input, common.vjp_fn).
q, k, v, d_out = [jnp.asarray(rng.standard_normal((1, t, n, h), dtype=np.float32))
                  for _ in range(4)]
jax.block_until_ready((q, k, v, d_out))
before = peak_kib()
f = jax.jit(common.vjp_fn(lambda q, k, v: linear.lightning_attention(
    q, k, v, implementation='xla')[0]))
g = jax.block_until_ready(f(d_out, q, k, v))
finite = all(bool(jnp.isfinite(x).all()) for x in g)
print(json.dumps(dict(peak_kib=peak_kib(), inputs_kib=before, finite=finite)))
'''


def _peak_rss(t: int) -> dict[str, Any]:
  """VmHWM of lightning fwd+bwd at length t in a fresh subprocess."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, str(t), str(HEADS),
                         str(HEAD_DIM)], capture_output=True, text=True, env=env,
                        cwd=root, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'memory subprocess failed: {proc.stderr[-2000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_rows(cfg) -> list[dict[str, Any]]:
  t = cfg['memory_length']
  args = _inputs(t)
  estimate = common.compiled_memory_bytes(_fwd_bwd('lightning'), *args)
  inputs = sum(a.size * a.dtype.itemsize for a in args)
  res = _peak_rss(t)
  gib = res['peak_kib'] / 2**20
  return [dict(section='memory', variant='lightning', q_len=t,
               fwd_bwd_peak_rss_gib=gib,
               peak_rss_before_attention_gib=res['inputs_kib'] / 2**20,
               xla_estimate_gib=estimate / 2**30, inputs_gib=inputs / 2**30,
               grads_finite=res['finite'], target=TARGETS['memory_gib'],
               met=bool(0 <= gib < TARGETS['memory_gib'] and res['finite']))]


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """All sections' rows (see the module docstring), with the matmul ceiling."""
  del workdir
  common.check_suite(suite)
  cfg = SUITES[suite]
  rows = (_flat_rows(cfg) + _recurrent_rows(cfg) + _crossover_rows(cfg) +
          _memory_rows(cfg))
  matmul = common.matmul_flops_per_s()
  for r in rows:
    r['matmul_flops_per_s'] = matmul
  return rows
