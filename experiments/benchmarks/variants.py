r"""The variant zoo measured: MoH head skipping, FlashBias, HyperAttention, quality.

    python -m experiments.benchmark --suite=cpu_core --topics=variants --workdir=/tmp/var
    python -m experiments.benchmarks.variants --suite=cpu_core --parts=timing \
        --workdir=/tmp/var

One table (every row has every column of `COLUMNS`; '' where a column does not apply),
also written per section to <workdir>/variants_<section>.csv. Ratio columns are
computed from the measured columns of the same row (`ratio` = time_s / baseline_s,
`vs_softmax` = tokens_per_s / softmax's tokens_per_s). Times are medians over
interleaved rounds after a warm-up (every round calls each contender once, in a
rotated order, so the load of a shared machine hits them alike), float32, xla.

Sections (part `timing`):

* `moh`: MoH ("MoH: Multi-Head Attention as Mixture-of-Head Attention", Jin et al.
  2024) inference forward of the attention layer with head skipping
  (`mixture_of_heads.benchmark_head_skipping`: shared weights, learned router, half
  of the routed heads active per token, static budget) vs the dense multi-head layer;
  target ratio <= 0.7 at T=4096 (N=8, H=64). One row per (shared heads, causal).
* `flash_bias_alibi`: causal ALiBi ("Train Short, Test Long", Press et al. 2022) by
  FlashBias's exact rank-2 augmentation ("FlashBias", Wu et al. 2025) vs the plain
  causal forward at T=16384 (B=1, N=8, H=64); target <= 1.2. Beside it ALiBi as a
  score_mod, and the relative error of FlashBias vs the score_mod output.
* `flash_bias_svd`: a general bias [1, N, T, T] float32 factored by a randomized SVD
  of rank 16 (`flash_bias.svd_bias_factors`; its one-off cost in `prep_s`) and run as
  augmented heads, vs the dense-bias path (`bias=` of `dot_product_attention`),
  non-causal, at T=8192 (the dense bias is 2 GiB; at 16384 it would be 8 GiB, plus
  the copies the call makes, not comfortable on a 24 GiB machine). Two biases: T5's
  bucketed relative bias with a random N(0, 1) table (Raffel et al. 2020; sharp near
  the diagonal, far from low rank) and a 2D distance bias -m_n ||p_i - p_j|| on a
  64 x 128 token grid (smooth but for its cusp at distance 0). Target: faster than
  the dense path. `bias_rel_error` is the factorisation's relative Frobenius error,
  `rel_error` the output's vs the dense-bias output, `rel_error_values` the output
  error per row in units of a typical value row (see `hyper_error`). A T5 score_mod
  row (the same bias, no dense array) for context.
* `hyper_error`: HyperAttention ("HyperAttention", Han et al. 2023) error vs exact
  over lengths x (block, sample) budgets, non-causal, one head, clustered inputs
  (`hyper_attention.clustered_qkv`, mean over seeds; max in `detail`): `rel_error`
  relative to the exact output's norm, `rel_error_values` per row in units of a
  typical value row (as `hyper_attention.relative_error`; the first grows with T at a
  fixed budget because exact rows of mean-zero values shrink like 1 / sqrt(T)).
* `hyper_time`: HyperAttention (the registry defaults: b = m = 256, exact below 4096
  tokens, 7 hyperplanes) vs exact attention, non-causal and causal, at T=16384 (N=8,
  H=64), with the errors of the timed call.

Measured (timing part, cpu_core, this 2-core CPU, mostly quiet, 303 s, matmul
5.0e11 FLOP/s): MoH 2 shared + 3 of 6 routed heads 0.82x (non-causal) / 1.35x
(causal: the gathered queries run the traced-block-list path, the dense layer skips
the upper triangle by static tiles); 0 shared + 4 of 8 routed 0.69x / 1.28x.
FlashBias ALiBi 1.03x the plain causal forward (score_mod ALiBi 1.05x), error 2.4e-5.
SVD rank 16 0.93x (T5, bias error 0.18, output error 0.35) and 0.86x (2D distance,
bias error 0.012, output error 0.63: the cusp) of the dense-bias time; T5 as a
score_mod 12x. HyperAttention at T=16384: 0.16x exact non-causal, 0.76x causal;
value-relative error 0.18 / 0.13 / 0.09 at budgets 64 / 128 / 256 (T=16384).

Part `quality` (section `quality`): every registered variant and layer
(`attention.registry`) trained by the training library (`train_lib.Trainer`) on MQAR
("Zoology", Arora et al. 2023; the config of the `quality` topic,
`quality._config`) and on the bars images (a ViT), next to softmax: eval accuracy,
training tokens/s (and images/s for bars), compile time. All runs of a task are
compiled first, then trained in interleaved chunks of steps. A name that cannot run a
task (causal-only on the ViT, grid-only on the LM) is a row with status 'n/a: <the
library's reason>'; an unexpected failure is a row 'failed: <error>'.

Default (`cpu_core`) quality sizes: decoder dim 32, depth 2, 2 heads, MQAR T=64 with 8
key-value pairs over 16 keys / 16 values, batch 32, 500 steps at learning rate 1e-2
(softmax: eval accuracy 0.999 measured; 0.70 at 300 steps); ViT dim 32, depth 2,
16 x 16 bars images in 4 x 4 patches (16 tokens), batch 32, 200 steps (softmax 1.0).
With the 35 names registered now: 70 rows, 49 of them trained, each ~2-5 s of
compilation on a quiet 2-core CPU plus 500 x 2048 tokens at 64k-380k tokens/s
(measured: softmax 380k, MoH 360k, lightnet_layer 64k): an estimated 8-12 minutes
quiet (~20 loaded), plus ~5 for the timing part.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import registry
from attention import score_mods
from attention.variants import flash_bias
from attention.variants import hyper_attention
from attention.variants import mixture_of_heads
from experiments import data as data_lib
from experiments import train_lib
from experiments.benchmarks import common
from experiments.benchmarks import quality as quality_bench
from experiments.configs import vit as vit_configs

COLUMNS = (
    'section', 'name', 'setting', 'q_len', 'status',
    'time_s', 'baseline', 'baseline_s', 'ratio', 'target', 'met',
    'rel_error', 'rel_error_values', 'bias_rel_error', 'prep_s',
    'block_size', 'sample_size', 'budget', 'skipped_fraction', 'overflow',
    'eval_accuracy', 'eval_loss', 'tokens_per_s', 'images_per_s', 'vs_softmax',
    'steps', 'num_params', 'compile_s', 'detail', 'matmul_flops_per_s')
# ratio <= target (MoH, ALiBi); ratio < target (SVD: faster than the dense path).
TARGETS = dict(moh=0.7, flash_bias_alibi=1.2, flash_bias_svd=1.0)
PARTS = ('timing', 'quality')

_QUALITY = dict(
    # MQAR decoder (the `quality` topic's config) and bars ViT; None: every name.
    mqar_len=64, vocab=16, dim=32, depth=2, heads=2, batch=32, steps=500,
    lr=1e-2, bars_image=16, bars_patch=4, bars_steps=200, bars_lr=3e-3, chunks=5,
    eval_batches=4, names=None)
SUITES = {
    'quick': dict(
        heads=8, head_dim=64, rounds=3, moh_len=1024, moh_shared=(2, 0),
        moh_causal=(False, True), hyper_causal=(False, True),
        alibi_len=4096, svd_len=2048, svd_grid=(32, 64), svd_rank=16,
        hyper_lengths=(1024, 2048), hyper_budgets=((64, 64), (128, 128)),
        hyper_seeds=(0, 1), hyper_time_len=4096,
        quality=dict(_QUALITY, steps=150, bars_steps=100, chunks=3)),
    'cpu_core': dict(
        heads=8, head_dim=64, rounds=5, moh_len=4096, moh_shared=(2, 0),
        moh_causal=(False, True), hyper_causal=(False, True),
        alibi_len=16384, svd_len=8192, svd_grid=(64, 128), svd_rank=16,
        hyper_lengths=(1024, 4096, 16384),
        hyper_budgets=((64, 64), (128, 128), (256, 256)), hyper_seeds=(0, 1, 2),
        hyper_time_len=16384, quality=_QUALITY),
    'full': dict(
        heads=8, head_dim=64, rounds=7, moh_len=4096, moh_shared=(2, 0),
        moh_causal=(False, True), hyper_causal=(False, True),
        alibi_len=16384, svd_len=8192, svd_grid=(64, 128), svd_rank=16,
        hyper_lengths=(1024, 4096, 16384),
        hyper_budgets=((64, 64), (128, 128), (256, 256), (512, 512)),
        hyper_seeds=(0, 1, 2), hyper_time_len=16384,
        quality=dict(_QUALITY, steps=1000, bars_steps=400, chunks=6)),
}
# The smallest sizes, for the end-to-end test of this topic: three names that cover
# both tasks and both kinds of n/a (retention is causal only, focal_modulation needs
# the grid), one MoH / HyperAttention setting.
TINY = dict(
    heads=4, head_dim=16, rounds=1, moh_len=64, moh_shared=(2,),
    moh_causal=(True,), hyper_causal=(False,),
    alibi_len=128, svd_len=64, svd_grid=(8, 8), svd_rank=4,
    hyper_lengths=(64,), hyper_budgets=((16, 16),), hyper_seeds=(0,),
    hyper_time_len=128,
    quality=dict(mqar_len=16, vocab=4, dim=8, depth=1, heads=2, batch=4, steps=3,
                 lr=1e-2, bars_image=8, bars_patch=2, bars_steps=3, bars_lr=1e-2,
                 chunks=1, eval_batches=1,
                 names=('softmax', 'retention', 'focal_modulation')))


# ----------------------------------------------------------------------------------
# Rows and timing.
# ----------------------------------------------------------------------------------


def make_row(section: str, name: str, **values: Any) -> dict[str, Any]:
  """A row with every column of `COLUMNS` ('' where not given)."""
  unknown = set(values) - set(COLUMNS)
  if unknown:
    raise ValueError(f'unknown columns {sorted(unknown)}; COLUMNS are {COLUMNS}.')
  row = {c: '' for c in COLUMNS}
  row.update(section=section, name=name, status='ok')
  row.update(values)
  return row


def _ratio_row(section: str, name: str, time_s: float, baseline: str,
               baseline_s: float, target: float | None = None,
               strict: bool = False, **values: Any) -> dict[str, Any]:
  ratio = time_s / baseline_s
  extra = {}
  if target is not None:
    extra = dict(target=target,
                 met=bool(ratio < target if strict else ratio <= target))
  return make_row(section, name, time_s=time_s, baseline=baseline,
                  baseline_s=baseline_s, ratio=ratio, **extra, **values)


def interleaved_median(fns: dict[str, Callable[[], Any]], rounds: int,
                       warmup: int = 1,
                       clock: Callable[[], float] = time.perf_counter
                      ) -> dict[str, float]:
  """Median wall time (s) of each zero-argument callable over interleaved rounds.

  Each callable is called `warmup` times first (compilation); then every round
  calls each once, in an order rotated by one per round.
  """
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}.')
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      common.block(fns[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = clock()
      common.block(fns[name]())
      times[name].append(clock() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _rel_error(got: jax.Array, want: jax.Array) -> float:
  """||got - want||_F / ||want||_F in float64 on the host."""
  g = np.asarray(got, np.float64)
  w = np.asarray(want, np.float64)
  return float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-300))


def _rel_error_values(got: jax.Array, want: jax.Array, value: jax.Array) -> float:
  """||got - want||_F / (sqrt(rows) * RMS row norm of V): the error per output row
  in units of a typical value vector (`hyper_attention.relative_error`'s 'values')."""
  g = np.asarray(got, np.float64)
  w = np.asarray(want, np.float64)
  v = np.asarray(value, np.float64)
  rows = math.prod(g.shape[:-1])
  scale = math.sqrt(rows * np.mean(np.sum(v * v, axis=-1)))
  return float(np.linalg.norm(g - w) / max(scale, 1e-300))


def _normal(shape: tuple[int, ...], seed: int) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape,
                                                                 np.float32))


def _qkv(t: int, n: int, h: int, seed: int = 0):
  return tuple(_normal((1, t, n, h), seed + i) for i in range(3))


# ----------------------------------------------------------------------------------
# MoH.
# ----------------------------------------------------------------------------------


def moh_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """MoH head-skipping inference vs the dense multi-head layer (section `moh`)."""
  rows = []
  n = cfg['heads']
  for shared in cfg['moh_shared']:
    routed = n - shared
    for causal in cfg['moh_causal']:
      r = mixture_of_heads.benchmark_head_skipping(
          seq_len=cfg['moh_len'], num_heads=n, head_dim=cfg['head_dim'],
          num_shared_heads=shared, top_k=max(1, routed // 2), causal=causal,
          repeats=cfg['rounds'], implementation='xla', layer=True)
      rows.append(_ratio_row(
          'moh', 'moh_head_skipping', r['skip_s'], 'dense multi-head layer',
          r['dense_s'], TARGETS['moh'],
          setting=(f'{"causal" if causal else "non-causal"}, {shared} shared + '
                   f'{r["top_k"]}/{routed} routed heads'),
          q_len=cfg['moh_len'], budget=r['budget'],
          skipped_fraction=r['skipped_fraction'], overflow=r['overflow'],
          detail=f'N={n} H={cfg["head_dim"]} B=1 xla, learned router (random '
                 f'init), capacity factor 1'))
  return rows


# ----------------------------------------------------------------------------------
# FlashBias.
# ----------------------------------------------------------------------------------


def flash_bias_alibi_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """FlashBias ALiBi vs the plain causal forward (section `flash_bias_alibi`)."""
  t, n, h = cfg['alibi_len'], cfg['heads'], cfg['head_dim']
  q, k, v = _qkv(t, n, h)
  alibi = score_mods.alibi(n)
  fns = {
      'plain': jax.jit(lambda q, k, v: attention.dot_product_attention(
          q, k, v, is_causal=True, implementation='xla')),
      'flash_bias': jax.jit(lambda q, k, v: flash_bias.alibi_flash_bias_attention(
          q, k, v, is_causal=True, implementation='xla')),
      'score_mod': jax.jit(lambda q, k, v: attention.dot_product_attention(
          q, k, v, is_causal=True, score_mod=alibi, implementation='xla')),
  }
  best = interleaved_median({name: (lambda f=f: f(q, k, v))
                             for name, f in fns.items()}, cfg['rounds'])
  got, want = fns['flash_bias'](q, k, v), fns['score_mod'](q, k, v)
  errors = dict(rel_error=_rel_error(got, want),
                rel_error_values=_rel_error_values(got, want, v))
  common_values = dict(setting='causal', q_len=t,
                       detail=f'B=1 N={n} H={h} xla float32')
  return [
      _ratio_row('flash_bias_alibi', 'flash_bias_alibi', best['flash_bias'],
                 'plain causal', best['plain'], TARGETS['flash_bias_alibi'],
                 **errors, **common_values),
      _ratio_row('flash_bias_alibi', 'alibi_score_mod', best['score_mod'],
                 'plain causal', best['plain'], **common_values),
  ]


def t5_bias(t: int, table: jax.Array) -> jax.Array:
  """T5's bidirectional bucketed bias [1, N, T, T] from a [32, N] table."""
  pos = jnp.arange(t)
  buckets = score_mods.t5_relative_position_bucket(
      pos[None, :] - pos[:, None], bidirectional=True)  # [T, T]
  return jnp.moveaxis(table[buckets], -1, 0)[None]  # [1, N, T, T]


def distance_2d_bias(grid: tuple[int, int], num_heads: int) -> jax.Array:
  """-m_n ||p_i - p_j|| over a row-major 2D token grid, [1, N, T, T] (ALiBi slopes)."""
  ys, xs = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  p = jnp.asarray(np.stack([ys.ravel(), xs.ravel()], -1), jnp.float32)  # [T, 2]
  dist = jnp.sqrt(jnp.sum(jnp.square(p[:, None] - p[None]), -1))  # [T, T]
  slopes = jnp.asarray(score_mods.alibi_slopes(num_heads), jnp.float32)
  return (-slopes[:, None, None] * dist[None])[None]  # [1, N, T, T]


def flash_bias_svd_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """SVD rank-R FlashBias vs the dense-bias path (section `flash_bias_svd`)."""
  t, n, h, rank = cfg['svd_len'], cfg['heads'], cfg['head_dim'], cfg['svd_rank']
  if math.prod(cfg['svd_grid']) != t:
    raise ValueError(f'svd_grid {cfg["svd_grid"]} must hold svd_len={t} tokens.')
  q, k, v = _qkv(t, n, h, seed=10)
  table = _normal((32, n), seed=20)
  dense = jax.jit(lambda q, k, v, bias: attention.dot_product_attention(
      q, k, v, bias=bias, implementation='xla'))
  low_rank = jax.jit(lambda q, k, v, u, w: flash_bias.flash_bias_attention(
      q, k, v, u, w, implementation='xla'))
  t5_mod = score_mods.t5_relative_bias(n, table=table)
  t5_fn = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, score_mod=t5_mod, implementation='xla'))
  factor = jax.jit(lambda bias: flash_bias.svd_bias_factors(
      bias, rank, method='randomized'))
  rows = []
  biases = (('t5 random table', lambda: t5_bias(t, table)),
            (f'2d distance {cfg["svd_grid"][0]}x{cfg["svd_grid"][1]}',
             lambda: distance_2d_bias(cfg['svd_grid'], n)))
  for label, make_bias in biases:
    bias = common.block(jax.jit(make_bias)())
    factor(bias)  # compile
    t0 = time.perf_counter()
    u, w, bias_err = common.block(factor(bias))
    prep = time.perf_counter() - t0
    fns = {'dense': lambda: dense(q, k, v, bias),
           'svd': lambda: low_rank(q, k, v, u, w)}
    if label.startswith('t5'):
      fns['t5_score_mod'] = lambda: t5_fn(q, k, v)
    best = interleaved_median(fns, cfg['rounds'])
    want = dense(q, k, v, bias)
    got = low_rank(q, k, v, u, w)
    values = dict(setting=f'non-causal, bias: {label}', q_len=t,
                  detail=f'B=1 N={n} H={h} xla float32, dense bias '
                         f'{bias.size * 4 / 2**30:.2f} GiB, randomized SVD '
                         f'(8 oversample, 2 power iterations)')
    rows.append(_ratio_row(
        'flash_bias_svd', f'flash_bias_svd_r{rank}', best['svd'], 'dense bias',
        best['dense'], TARGETS['flash_bias_svd'], strict=True,
        rel_error=_rel_error(got, want),
        rel_error_values=_rel_error_values(got, want, v),
        bias_rel_error=float(bias_err), prep_s=prep, **values))
    if 't5_score_mod' in best:
      got = t5_fn(q, k, v)
      rows.append(_ratio_row(
          'flash_bias_svd', 't5_score_mod', best['t5_score_mod'], 'dense bias',
          best['dense'], rel_error=_rel_error(got, want),
          rel_error_values=_rel_error_values(got, want, v), **values))
    del bias, u, w, want, got
  return rows


# ----------------------------------------------------------------------------------
# HyperAttention.
# ----------------------------------------------------------------------------------


def hyper_error_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """HyperAttention relative error vs length and budget (section `hyper_error`).

  Inputs `hyper_attention.clustered_qkv(seed)` (one head), rng key(seed); the exact
  output is computed once per (length, seed) and shared by the budgets.
  """
  exact = jax.jit(lambda q, k, v: attention.dot_product_attention(
      q, k, v, implementation='xla'))
  approx = {b: jax.jit(functools.partial(
      hyper_attention.hyper_attention, block_size=b[0], sample_size=b[1],
      min_seq_len=1, num_projs=7, implementation='xla'))
            for b in cfg['hyper_budgets']}
  rows = []
  for t in cfg['hyper_lengths']:
    errors = {b: [] for b in approx}  # (output-relative, value-relative) pairs
    for seed in cfg['hyper_seeds']:
      q, k, v = hyper_attention.clustered_qkv(seed, seq_len=t, num_heads=1,
                                              head_dim=cfg['head_dim'])
      want = exact(q, k, v)
      for b, fn in approx.items():
        got = fn(q, k, v, rng=jax.random.key(seed))
        errors[b].append((_rel_error(got, want), _rel_error_values(got, want, v)))
    for (block, sample), errs in errors.items():
      out_err, val_err = np.asarray(errs).T
      rows.append(make_row(
          'hyper_error', 'hyper_attention', setting='non-causal, clustered q/k',
          q_len=t, block_size=block, sample_size=sample,
          rel_error=float(np.mean(out_err)),
          rel_error_values=float(np.mean(val_err)),
          detail=f'mean over seeds {tuple(cfg["hyper_seeds"])} (max '
                 f'{np.max(out_err):.4g} / {np.max(val_err):.4g}); N=1 '
                 f'H={cfg["head_dim"]}, 7 hyperplanes, no exact fallback '
                 f'(min_seq_len=1)'))
  return rows


def hyper_time_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """HyperAttention vs exact attention time (section `hyper_time`)."""
  t, n, h = cfg['hyper_time_len'], cfg['heads'], cfg['head_dim']
  q, k, v = hyper_attention.clustered_qkv(0, seq_len=t, num_heads=n, head_dim=h)
  settings = dict(block_size=256, sample_size=256, min_seq_len=4096, num_projs=7)
  if t <= 4096:  # Small suites: keep the approximation on.
    settings.update(block_size=max(t // 8, 1), sample_size=max(t // 8, 1),
                    min_seq_len=max(t // 4, 1))
  rng = jax.random.key(0)
  rows = []
  for causal in cfg['hyper_causal']:
    hyper = jax.jit(lambda q, k, v, c=causal: hyper_attention.hyper_attention(
        q, k, v, rng=rng, is_causal=c, implementation='xla', **settings))
    exact = jax.jit(lambda q, k, v, c=causal: attention.dot_product_attention(
        q, k, v, is_causal=c, implementation='xla'))
    best = interleaved_median({'hyper': lambda f=hyper: f(q, k, v),
                               'exact': lambda f=exact: f(q, k, v)}, cfg['rounds'])
    got, want = hyper(q, k, v), exact(q, k, v)
    rows.append(_ratio_row(
        'hyper_time', 'hyper_attention', best['hyper'], 'exact attention',
        best['exact'], setting=('causal' if causal else 'non-causal') +
        ', clustered q/k', q_len=t, block_size=settings['block_size'],
        sample_size=settings['sample_size'],
        rel_error=_rel_error(got, want),
        rel_error_values=_rel_error_values(got, want, v),
        detail=f'B=1 N={n} H={h} xla float32, exact below '
               f'{settings["min_seq_len"]} tokens, 7 hyperplanes'))
  return rows


# ----------------------------------------------------------------------------------
# Quality: every registered name on MQAR and bars.
# ----------------------------------------------------------------------------------


def quality_names(q: dict[str, Any]) -> list[str]:
  """softmax first, then every other registered variant and layer (sorted)."""
  names = q['names'] if q['names'] is not None else (
      registry.available_variants() + registry.available_layers())
  unknown = [n for n in names if n not in registry.available_variants() and
             not registry.is_layer(n)]
  if unknown:
    raise ValueError(f'quality names must be registered, got unknown {unknown}.')
  return ['softmax'] + sorted(set(names) - {'softmax'})


def mqar_config(q: dict[str, Any], name: str):
  """The `quality` topic's MQAR decoder config, attention `name`."""
  sizes = dict(steps=q['steps'], dim=q['dim'], depth=q['depth'], heads=q['heads'],
               batch=q['batch'], vocab=q['vocab'])
  return quality_bench._config(  # pylint: disable=protected-access
      q['mqar_len'], sizes,
      {'model.attention.variant': name, 'train.learning_rate': q['lr'],
       'data.num_eval_batches': q['eval_batches']})


def bars_config(q: dict[str, Any], name: str):
  """The `bars` ViT preset at the quality sizes, attention `name`."""
  config = vit_configs.get_config('bars')
  steps = q['bars_steps']
  config.update_from_flattened_dict({
      'model.dim': q['dim'], 'model.depth': q['depth'],
      'model.num_heads': q['heads'], 'model.num_kv_heads': q['heads'],
      'model.head_dim': q['dim'] // q['heads'], 'model.mlp_dim': 2 * q['dim'],
      'model.patch_size': q['bars_patch'], 'model.attention.variant': name,
      'data.bars.image_size': q['bars_image'], 'data.batch_size': q['batch'],
      'data.num_eval_batches': q['eval_batches'],
      'train.num_steps': steps, 'train.warmup_steps': max(steps // 10, 1),
      'train.learning_rate': q['bars_lr'], 'train.log_every': steps,
      'train.eval_every': steps, 'train.checkpoint_every': steps,
      'train.tensorboard': False, 'mesh.data': 1, 'mesh.fsdp': 1,
      'mesh.tensor': 1})
  return config


def _first_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return text[0] if text else type(error).__name__


class _Run:
  """One (task, name) training run: compiled first, then stepped in chunks."""

  def __init__(self, task: str, name: str, config, steps: int):
    self.task, self.name, self.steps = task, name, steps
    self.status, self.train_s, self.done = 'ok', 0.0, 0
    self.compile_s, self.num_params, self.metrics = None, None, None
    t0 = time.perf_counter()
    try:
      self.source = data_lib.make_source(config.data, seed=config.seed)
      self.trainer = train_lib.Trainer(config, self.source.info,
                                       jax.devices()[:1])
      # The trainer's own init, run eagerly: its ops compile once per process and
      # are shared by every run (the jitted init compiles again for each model).
      # Placed as the jitted init would place it, so that the step's inputs keep
      # one sharding (the first step's compiled program serves every later one).
      self.state = jax.device_put(
          self.trainer._init_state(),  # pylint: disable=protected-access
          self.trainer.state_shardings)
      self.step()  # Compiles; the first step is not timed.
    except ValueError as e:  # The library refuses this task for this name.
      self.status = f'n/a: {_first_line(e)}'
      return
    except Exception as e:  # pylint: disable=broad-except
      self.status = f'failed: {type(e).__name__}: {_first_line(e)}'
      return
    self.compile_s = time.perf_counter() - t0
    self.num_params = self.trainer.num_params()
    self.info = self.source.info
    self.tokens_per_example = (
        (config.data.bars.image_size // config.model.patch_size) ** 2
        if task == 'bars' else config.data.seq_len)

  @property
  def ok(self) -> bool:
    return self.status == 'ok'

  def step(self, count: int = 1) -> None:
    for _ in range(count):
      self.state, self.metrics = self.trainer.train_step(
          self.state, next(self.source.train))
    jax.block_until_ready(self.metrics)
    self.done += count

  def timed_steps(self, count: int) -> None:
    if not self.ok or count <= 0:
      return
    t0 = time.perf_counter()
    try:
      self.step(count)
    except Exception as e:  # pylint: disable=broad-except
      self.status = f'failed: {type(e).__name__}: {_first_line(e)}'
      return
    self.train_s += time.perf_counter() - t0

  def row(self, softmax_tokens_per_s: float | None) -> dict[str, Any]:
    setting = ('MQAR decoder' if self.task == 'mqar' else 'bars ViT')
    if not self.ok:
      return make_row('quality', self.name, setting=setting, status=self.status)
    loss = float(self.metrics['loss'])
    if not math.isfinite(loss):
      return make_row('quality', self.name, setting=setting,
                      status=f'failed: non-finite training loss {loss}')
    ev = self.trainer.evaluate(self.state['params'], self.source.eval_batches())
    timed = self.done - 1
    examples_per_s = timed * self.trainer.config.data.batch_size / self.train_s
    tokens_per_s = examples_per_s * self.tokens_per_example
    extra = dict(images_per_s=examples_per_s) if self.task == 'bars' else {}
    return make_row(
        'quality', self.name, setting=setting, q_len=self.tokens_per_example,
        eval_accuracy=float(ev['accuracy']), eval_loss=float(ev['loss']),
        tokens_per_s=tokens_per_s,
        vs_softmax=('' if softmax_tokens_per_s is None else
                    tokens_per_s / softmax_tokens_per_s),
        steps=self.done, num_params=self.num_params, compile_s=self.compile_s,
        detail=f'final train loss {loss:.4g}; tokens/s over steps 2..{self.done}',
        **extra)


def quality_rows(q: dict[str, Any]) -> list[dict[str, Any]]:
  """Every name on MQAR and bars next to softmax (section `quality`)."""
  names = quality_names(q)
  rows = []
  for task, make_config, steps in (('mqar', mqar_config, q['steps']),
                                   ('bars', bars_config, q['bars_steps'])):
    runs = [_Run(task, name, make_config(q, name), steps) for name in names]
    remaining = steps - 1
    for c in range(q['chunks']):  # Interleaved: load changes hit every run alike.
      count = remaining // q['chunks'] + (c < remaining % q['chunks'])
      for run in runs:
        run.timed_steps(count)
    base = runs[0]  # softmax
    base_row = base.row(None)
    softmax_rate = base_row['tokens_per_s'] or None
    base_row['vs_softmax'] = 1.0 if softmax_rate else ''
    rows.append(base_row)
    rows.extend(run.row(softmax_rate) for run in runs[1:])
    for r in rows[-len(runs):]:
      r['setting'] = (f'MQAR T={q["mqar_len"]}, {q["vocab"]} keys, decoder '
                      f'd={q["dim"]} depth {q["depth"]}' if task == 'mqar' else
                      f'bars {q["bars_image"]}x{q["bars_image"]} patch '
                      f'{q["bars_patch"]}, ViT d={q["dim"]} depth {q["depth"]}')
  return rows


# ----------------------------------------------------------------------------------
# The topic.
# ----------------------------------------------------------------------------------


def timing_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  return (moh_rows(cfg) + flash_bias_alibi_rows(cfg) + flash_bias_svd_rows(cfg) +
          hyper_error_rows(cfg) + hyper_time_rows(cfg))


def write_sections(workdir: str, rows: list[dict[str, Any]]) -> list[str]:
  """<workdir>/variants_<section>.csv per section (all `COLUMNS`); the paths."""
  paths = []
  for section in dict.fromkeys(r['section'] for r in rows):
    path = os.path.join(workdir, f'variants_{section}.csv')
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=COLUMNS)
      writer.writeheader()
      writer.writerows(r for r in rows if r['section'] == section)
    paths.append(path)
  return paths


def run(suite: str, workdir: str, parts: Sequence[str] = PARTS
       ) -> list[dict[str, Any]]:
  """The rows of `parts` (see the module docstring), with the matmul ceiling."""
  common.check_suite(suite)
  unknown = [p for p in parts if p not in PARTS]
  if unknown or not parts:
    raise ValueError(f'parts must be a non-empty subset of {PARTS}, got '
                     f'{list(parts)}.')
  cfg = SUITES[suite]
  rows = []
  if 'timing' in parts:
    rows += timing_rows(cfg)
  if 'quality' in parts:
    rows += quality_rows(cfg['quality'])
  matmul = common.matmul_flops_per_s()
  for r in rows:
    r['matmul_flops_per_s'] = matmul
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    write_sections(workdir, rows)
  return rows


def run_and_write(suite: str, workdir: str, parts: Sequence[str]
                 ) -> list[dict[str, Any]]:
  """`run`, then <workdir>/variants[_part].json / .csv / .md (this module's entry)."""
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  from experiments import benchmark_report  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  rows = run(suite, workdir, parts)
  topic = 'variants' if len(set(parts)) == len(PARTS) else f'variants_{parts[0]}'
  benchmark.write_rows(workdir, topic, rows)
  seconds = time.perf_counter() - start
  text = (f'# variants ({", ".join(parts)}), suite={suite}, {seconds:.1f} s\n\n' +
          benchmark_report.topic_markdown(topic, rows, workdir, seconds))
  with open(os.path.join(workdir, f'{topic}.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  fv = flags.FLAGS
  run_and_write(fv.suite, fv.workdir or '/tmp/attnlab_bench', fv.parts)


if __name__ == '__main__':
  # experiments.benchmark defines --suite and --workdir.
  from experiments import benchmark as _benchmark  # pylint: disable=g-import-not-at-top,unused-import
  flags.DEFINE_list('parts', list(PARTS), f'Parts to run, among {PARTS}.')
  app.run(main)
