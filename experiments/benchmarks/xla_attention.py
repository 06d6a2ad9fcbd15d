r"""Benchmark of the blocked XLA attention (kernels/xla/) against the issue-4 targets.

  python -m experiments.benchmarks.xla_attention --suite=cpu_core --workdir=/tmp/xla_bench

Every speed target is a ratio measured side by side in one run, quoted next to the same
run's 2048 x 2048 float32 matmul FLOP/s:
- causal, B=1, T=4096, N=8, H=64, float32 forward: <= 0.5x the time of
  `jax.nn.dot_product_attention(is_causal=True)`, and effective FLOP/s (4 * H * N *
  visible pairs / time) >= 50% of the matmul FLOP/s;
- sliding window 512 at T=16384: time <= 1.5x (visible-pair fraction of the window /
  that of causal) x our causal time at the same T (rows `window_vs_causal_*`; the rows
  `*_tiling_sweep` time other (block_q, block_kv, kv_chunk) tilings), and >= 10x
  faster than `jax.nn.dot_product_attention` with the dense boolean mask (one head: the
  dense [N, T, T] logits of eight heads would need 17 GB);
- forward + backward (jax.grad of a scalar) <= 3.3x the forward time;
- ALiBi as a score_mod (`attention.score_mods.alibi`, "Train Short, Test Long", Press
  et al. 2022), causal T=16384: forward time <= 1.15x the plain causal forward, timed
  in the same interleaved rounds, and both fwd+bwd peak memories (VmHWM);
- causal T=65536, N=8, H=64 forward + backward: peak resident memory (VmHWM of a
  fresh subprocess) < 4 GiB.
Times are minima over interleaved rounds (`common.interleaved_best`): each round times
every contender once (ours, jax.nn, our fwd+bwd and the matmul for the causal rows;
window and causal for the window row), so the slow phases of a shared machine hit them
alike; the minimum is the least disturbed sample. Rows `*_bwd_tiling_sweep` time
backward tilings, `tradeoff_*` what the two ratio targets read with the slower 256 x 256
fused causal forward, `batched_tile_dot` XLA:CPU's dot threading threshold. The 'quick'
suite runs the same rows at small sizes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import score_mods
from attention.masks import base as masks_base
from experiments.benchmarks import common
from kernels import problem as problem_lib
from kernels import xla

SUITES = ('quick', 'cpu_core', 'full')


def _check_suite(suite: str) -> str:
  if suite not in SUITES:
    raise ValueError(f'suite must be one of {SUITES}, got {suite!r}.')
  return suite


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
  """Minimum wall time of `fn()` over `repeats` calls after one warm-up (compile)."""
  jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


_MATMUL_N = 2048
_MATMUL_FLOP = 2.0 * _MATMUL_N**3


def _matmul_fn() -> Callable[[], Any]:
  """A zero-argument call of the 2048 x 2048 float32 matmul (inputs made once)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((_MATMUL_N, _MATMUL_N)),
                  jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return lambda: f(a, a)


def matmul_flops(repeats: int = 5) -> float:
  """FLOP/s of the 2048 x 2048 float32 matmul (the ceiling quoted beside every row)."""
  return _MATMUL_FLOP / _best_time(_matmul_fn(), repeats)


def sliding_window(t: int, window: int) -> masks_base.Mask:
  """Causal sliding window: q - window < k <= q (each row sees <= window keys)."""
  return masks_base.causal(t) & ~masks_base.causal(t, offset=-window)


def visible_pairs(t: int, window: int | None = None) -> int:
  """Exact count of visible (q, k) pairs: causal, or a causal sliding window."""
  rows = np.arange(t)
  return int(np.sum(np.minimum(rows + 1, t if window is None else window)))


def _inputs(b: int, t: int, n: int, h: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(key, (b, t, n, h), jnp.float32) for key in keys]


def _ours(mask, scale, score_mod=None, **kw):
  """Jitted xla.attention on make_problem(mask, scale, score_mod), options `kw`."""

  def fn(q, k, v):
    problem = problem_lib.make_problem(q, k, v, scale=scale, mask=mask,
                                       score_mod=score_mod)
    return xla.attention(q, k, v, problem, **kw)

  return jax.jit(fn)


def _grad_of(fn):
  return common.fwd_bwd_fn(fn)


def causal_rows(t: int, n: int, h: int, rounds: int,
                sweep: Sequence[tuple[int, int, int]]) -> list[dict[str, Any]]:
  """Causal forward vs jax.nn, fwd+bwd ratio, a tiling sweep.

  Ours, jax.nn, our fwd+bwd and the 2048 x 2048 matmul are timed in the same
  interleaved rounds (`common.interleaved_best`). `sweep` lists (block_q, block_kv,
  kv_chunk, lanes, fused) forward configurations (None: automatic).
  """
  q, k, v = _inputs(1, t, n, h)
  scale = h**-0.5
  mask = masks_base.causal(t)
  flops = 4.0 * h * n * visible_pairs(t)
  ours = _ours(mask, scale)
  ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v,
                                                             is_causal=True))
  err = float(jnp.max(jnp.abs(ours(q, k, v) - ref(q, k, v))))
  grad = _grad_of(ours)
  mm_fn = _matmul_fn()
  best = common.interleaved_best(
      dict(ours=lambda: ours(q, k, v), ref=lambda: ref(q, k, v),
           grad=lambda: grad(q, k, v), matmul=mm_fn), rounds)
  t_ours, t_ref, t_grad = best['ours'], best['ref'], best['grad']
  mm = _MATMUL_FLOP / best['matmul']
  blocks = xla.tiling_for(t, t, mask)
  bwd_blocks = list(xla.bwd_tiling_for(t, t, mask))
  rows = [dict(
      name=f'causal_fwd_T{t}_N{n}_H{h}', block_q=blocks[0], block_kv=blocks[1],
      kv_chunk=blocks[2], rounds=rounds,
      seconds=t_ours, jax_nn_seconds=t_ref, time_vs_jax_nn=t_ours / t_ref,
      target_time_vs_jax_nn=0.5, effective_flops=flops / t_ours,
      matmul_flops=mm, fraction_of_matmul=flops / t_ours / mm,
      target_fraction_of_matmul=0.5, max_abs_err_vs_jax_nn=err,
      meets_target=bool(t_ours / t_ref <= 0.5 and flops / t_ours / mm >= 0.5)),
          dict(name=f'causal_fwd_bwd_T{t}_N{n}_H{h}', block_q=blocks[0],
               block_kv=blocks[1], kv_chunk=blocks[2], bwd_blocks=bwd_blocks,
               rounds=rounds, seconds=t_grad, fwd_seconds=t_ours,
               fwd_bwd_over_fwd=t_grad / t_ours, target_fwd_bwd_over_fwd=3.3,
               effective_flops=3.5 * flops / t_grad, matmul_flops=mm,
               meets_target=bool(t_grad / t_ours <= 3.3))]
  fns = dict(default=lambda: ours(q, k, v))
  for bq, bk, chunk, lanes, fused in sweep:
    fn = _ours(mask, scale, block_q=bq, block_kv=bk, kv_chunk=chunk, lanes=lanes,
               fused=fused)
    fns[(bq, bk, chunk, lanes, fused)] = lambda fn=fn: fn(q, k, v)
  if sweep:
    sweep_best = common.interleaved_best(fns, max(1, rounds - 1))
    for (bq, bk, chunk, lanes, fused) in sweep:
      sec = sweep_best[(bq, bk, chunk, lanes, fused)]
      rows.append(dict(name=f'causal_fwd_T{t}_sweep', block_q=bq, block_kv=bk,
                       kv_chunk=chunk, lanes=lanes, fused=fused, seconds=sec,
                       vs_default=sec / sweep_best['default'],
                       fraction_of_matmul=flops / sec / mm, matmul_flops=mm))
  return rows


def causal_bwd_sweep_rows(t: int, n: int, h: int, rounds: int,
                          tiles: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
  """fwd+bwd time of backward tilings (forward tiles automatic), side by side."""
  q, k, v = _inputs(1, t, n, h)
  scale = h**-0.5
  mask = masks_base.causal(t)
  fns = {}
  for bq, bk in tiles:
    fns[(bq, bk)] = functools.partial(
        _grad_of(_ours(mask, scale, bwd_block_q=bq, bwd_block_kv=bk)), q, k, v)
  best = common.interleaved_best(fns, rounds)
  auto = tuple(xla.bwd_tiling_for(t, t, mask))
  return [dict(name=f'causal_fwd_bwd_T{t}_bwd_tiling_sweep', bwd_block_q=bq,
               bwd_block_kv=bk, seconds=best[(bq, bk)], automatic=(bq, bk) == auto,
               vs_fastest=best[(bq, bk)] / min(best.values()))
          for bq, bk in tiles]


def window_rows(t: int, window: int, n: int, h: int, mm: float, repeats: int,
                sweep: Sequence[tuple[int, int, int]] = ()) -> list[dict[str, Any]]:
  """Sliding window vs our causal (density-scaled) and vs jax.nn with a dense mask.

  `sweep` lists (block_q, block_kv, kv_chunk) tilings timed on the same window,
  each reported against the same causal time (shows the automatic choice).
  """
  scale = h**-0.5
  win, causal = sliding_window(t, window), masks_base.causal(t)
  q, k, v = _inputs(1, t, n, h)
  f_win, f_causal = _ours(win, scale), _ours(causal, scale)
  best = common.interleaved_best(dict(win=lambda: f_win(q, k, v),
                                      causal=lambda: f_causal(q, k, v)), repeats)
  t_win, t_causal = best['win'], best['causal']
  pairs_win, pairs_causal = visible_pairs(t, window), visible_pairs(t)
  rel = pairs_win / pairs_causal
  density = pairs_win / (t * t)
  blocks = xla.tiling_for(t, t, win)
  rows = [dict(
      name=f'window{window}_vs_causal_T{t}_N{n}', block_q=blocks[0],
      block_kv=blocks[1], kv_chunk=blocks[2], causal_tiling=list(
          xla.tiling_for(t, t, causal)), seconds=t_win, causal_seconds=t_causal,
      mask_density=density, density_vs_causal=rel,
      time_over_density_scaled_causal=t_win / (rel * t_causal),
      target_time_over_density_scaled_causal=1.5,
      literal_time_over_density_x_causal=t_win / (density * t_causal),
      visited_tile_fraction=xla.visited_fraction(t, t, win),
      effective_flops=4.0 * h * n * pairs_win / t_win, matmul_flops=mm,
      meets_target=bool(t_win / (rel * t_causal) <= 1.5))]
  for bq, bk, chunk in sweep:
    fn = _ours(win, scale, block_q=bq, block_kv=bk, kv_chunk=chunk)
    sec = _best_time(lambda fn=fn: fn(q, k, v), repeats)
    rows.append(dict(
        name=f'window{window}_T{t}_tiling_sweep', block_q=bq, block_kv=bk,
        kv_chunk=chunk, seconds=sec, vs_auto=sec / t_win,
        time_over_density_scaled_causal=sec / (rel * t_causal),
        visited_fraction=xla.visited_fraction(t, t, win, block_q=bq,
                                              block_kv=bk, kv_chunk=chunk),
        model_cost_vs_auto=(xla._tiling_cost(win, bq, bk, chunk) /  # pylint: disable=protected-access
                            xla._tiling_cost(win, *blocks))))  # pylint: disable=protected-access
  # jax.nn with the dense mask: one head (eight would need ~17 GB of logits).
  q1, k1, v1 = (x[:, :, :1] for x in (q, k, v))
  dense = jnp.asarray(win.materialize())[None, None]  # [1, 1, T, T]
  ref = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m))
  f_win1 = _ours(win, scale)
  err = float(jnp.max(jnp.abs(f_win1(q1, k1, v1) - ref(q1, k1, v1, dense))))
  t_win1 = _best_time(lambda: f_win1(q1, k1, v1), repeats)
  t_ref1 = _best_time(lambda: ref(q1, k1, v1, dense), 1)
  rows.append(dict(
      name=f'window{window}_vs_jax_nn_dense_T{t}_N1', seconds=t_win1,
      jax_nn_seconds=t_ref1, speedup_vs_jax_nn=t_ref1 / t_win1,
      target_speedup_vs_jax_nn=10.0, max_abs_err_vs_jax_nn=err, matmul_flops=mm,
      meets_target=bool(t_ref1 / t_win1 >= 10.0)))
  return rows


def tradeoff_rows(t: int, t_win: int, window: int, n: int, h: int,
                  rounds: int) -> list[dict[str, Any]]:
  """The 256 x 256 fused forward against the two ratio targets, side by side.

  Times, in the same interleaved rounds, the default causal forward, the 256 x 256
  fused one and its fwd+bwd at T = t, the automatic window against the 256 x 256
  fused causal at T = t_win, and the 2048 x 2048 matmul: what the two ratio targets
  read if causal ran slower.
  """
  scale = h**-0.5
  q, k, v = _inputs(1, t, n, h)
  qw, kw, vw = _inputs(1, t_win, n, h)
  causal, causal_w = masks_base.causal(t), masks_base.causal(t_win)
  win = sliding_window(t_win, window)
  alt = dict(block_q=256, block_kv=256, kv_chunk=1, fused=True)
  f_default = _ours(causal, scale)
  f_alt = _ours(causal, scale, **alt)
  g_alt = _grad_of(f_alt)
  f_alt_w = _ours(causal_w, scale, **alt)
  f_win = _ours(win, scale)
  best = common.interleaved_best(dict(
      default=lambda: f_default(q, k, v), alt=lambda: f_alt(q, k, v),
      alt_grad=lambda: g_alt(q, k, v), alt_causal_w=lambda: f_alt_w(qw, kw, vw),
      win=lambda: f_win(qw, kw, vw), matmul=_matmul_fn()), rounds)
  rel = visible_pairs(t_win, window) / visible_pairs(t_win)
  flops = 4.0 * h * n * visible_pairs(t)
  mm = _MATMUL_FLOP / best['matmul']
  return [dict(name=f'tradeoff_256x256_fused_causal_T{t}', seconds=best['alt'],
               default_seconds=best['default'],
               alt_over_default=best['alt'] / best['default'],
               fraction_of_matmul=flops / best['alt'] / mm, matmul_flops=mm,
               fwd_bwd_seconds=best['alt_grad'],
               fwd_bwd_over_fwd=best['alt_grad'] / best['alt'],
               window_seconds=best['win'], causal_T_window_seconds=best['alt_causal_w'],
               window_time_over_density_scaled_causal=(
                   best['win'] / (rel * best['alt_causal_w'])))]


def dot_rows(shapes: Sequence[tuple[int, int, int, int]],
             rounds: int) -> list[dict[str, Any]]:
  """FLOP/s of batched [B, M, K] x [B, K, N] dots run in a loop (as tile dots run).

  Shows XLA:CPU's threading threshold: a dot whose batch items hold about 2^23
  multiply-adds or more runs on both cores, smaller ones on one.
  """
  steps = 20
  fns = {}
  for b, m, kk, nn in shapes:
    x = jnp.ones((steps, b, m, kk), jnp.float32)
    y = jnp.full((b, kk, nn), 1e-3, jnp.float32)
    f = jax.jit(lambda x, y: jax.lax.fori_loop(
        0, steps, lambda i, c: c + jnp.einsum('bmk,bkn->bmn', x[i], y)[:, 0, 0].sum(),
        0.0))
    fns[(b, m, kk, nn)] = functools.partial(f, x, y)
  best = common.interleaved_best(fns, rounds)
  return [dict(name='batched_tile_dot', batch=b, m=m, k=kk, n=nn,
               macs_per_item=m * kk * nn,
               flops=2.0 * b * m * kk * nn * steps / best[(b, m, kk, nn)])
          for b, m, kk, nn in shapes]


_MEMORY_SCRIPT = r'''
import json, resource, sys, time
import numpy as np


def peak_kib():
  # VmHWM: this process's own peak RSS. ru_maxrss is not usable here: Linux carries
  # it over fork and exec, so the child would report the benchmark parent's peak.
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1])
  except OSError:
    pass
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r // 1024 if sys.platform == 'darwin' else r


import jax, jax.numpy as jnp
from attention import score_mods
from attention.masks import base
from experiments.benchmarks import common
from kernels import problem as problem_lib
from kernels import xla
t, n, h = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
mod = score_mods.alibi(n) if sys.argv[4:] == ['alibi'] else None
rng = np.random.default_rng(0)
# NumPy float32 inputs (jax.random at this size has a larger transient peak than the
# attention itself).
# d_out: the output's cotangent, the backward's input (common.vjp_fn).
q, k, v, d_out = [jnp.asarray(rng.standard_normal((1, t, n, h), dtype=np.float32))
                  for _ in range(4)]
jax.block_until_ready((q, k, v, d_out))
before = peak_kib()
mask = base.causal(t)
f = jax.jit(common.vjp_fn(lambda q, k, v: xla.attention(
    q, k, v, problem_lib.make_problem(q, k, v, scale=h ** -0.5, mask=mask,
                                      score_mod=mod))))
start = time.perf_counter()
g = jax.block_until_ready(f(d_out, q, k, v))
seconds = time.perf_counter() - start
finite = all(bool(jnp.isfinite(x).all()) for x in g)
peak = peak_kib()
print(json.dumps(dict(peak_kib=peak, inputs_kib=before, seconds=seconds,
                      finite=finite)))
'''


def memory_row(t: int, n: int, h: int, score_mod: str | None = None,
               target_gib: float = 4.0) -> dict[str, Any]:
  """Peak RSS of causal fwd+bwd at length t in a fresh subprocess (its VmHWM).

  `score_mod='alibi'` adds `attention.score_mods.alibi(n)`.
  """
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ)
  env['PYTHONPATH'] = root + os.pathsep + env.get('PYTHONPATH', '')
  extra = [] if score_mod is None else [score_mod]
  proc = subprocess.run([sys.executable, '-c', _MEMORY_SCRIPT, str(t), str(n),
                         str(h)] + extra, capture_output=True, text=True, env=env,
                        cwd=root, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'memory subprocess failed: {proc.stderr[-2000:]}')
  res = json.loads(proc.stdout.strip().splitlines()[-1])
  peak_gib = res['peak_kib'] / 2**20
  suffix = '' if score_mod is None else f'_{score_mod}'
  return dict(name=f'causal_fwd_bwd_memory_T{t}_N{n}_H{h}{suffix}',
              peak_rss_gib=peak_gib,
              peak_rss_before_attention_gib=res['inputs_kib'] / 2**20,
              seconds_incl_compile=res['seconds'], grads_finite=res['finite'],
              target_peak_rss_gib=target_gib,
              meets_target=bool(peak_gib < target_gib and res['finite']))


def alibi_rows(t: int, n: int, h: int, rounds: int,
               memory: bool = True) -> list[dict[str, Any]]:
  """ALiBi as a score_mod vs the plain causal forward, interleaved; peak memories.

  The score_mod is `attention.score_mods.alibi(n)` (score + m_h * (kv_idx - q_idx),
  the slopes its params) applied per tile inside the blocked kernel.
  """
  q, k, v = _inputs(1, t, n, h)
  scale = h**-0.5
  mask = masks_base.causal(t)
  alibi = score_mods.alibi(n)
  plain, with_alibi = _ours(mask, scale), _ours(mask, scale, score_mod=alibi)
  best = common.interleaved_best(
      dict(plain=lambda: plain(q, k, v), alibi=lambda: with_alibi(q, k, v)), rounds)
  ratio = best['alibi'] / best['plain']
  row = dict(name=f'alibi_score_mod_vs_causal_fwd_T{t}_N{n}_H{h}', rounds=rounds,
             seconds=best['alibi'], causal_seconds=best['plain'],
             time_vs_causal=ratio, target_time_vs_causal=1.15,
             meets_target=bool(ratio <= 1.15))
  if memory:
    plain_mem = memory_row(t, n, h)
    alibi_mem = memory_row(t, n, h, score_mod='alibi')
    row.update(causal_fwd_bwd_peak_rss_gib=plain_mem['peak_rss_gib'],
               alibi_fwd_bwd_peak_rss_gib=alibi_mem['peak_rss_gib'],
               grads_finite=bool(plain_mem['grads_finite'] and
                                 alibi_mem['grads_finite']))
  return [row]


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """Runs the rows of `suite`; writes <workdir>/xla_attention.json; returns rows."""
  _check_suite(suite)
  os.makedirs(workdir, exist_ok=True)
  mm = matmul_flops()
  if suite == 'quick':
    rows = causal_rows(1024, 4, 64, 2, sweep=[(256, 256, 1, 1, None)])
    rows += causal_bwd_sweep_rows(1024, 4, 64, 1, [(256, 256), (256, 512)])
    rows += window_rows(2048, 256, 4, 64, mm, 2, sweep=[(256, 256, 1)])
    rows += tradeoff_rows(1024, 2048, 256, 4, 64, 1)
    rows += dot_rows([(8, 256, 64, 256), (8, 512, 64, 256)], 1)
    rows += alibi_rows(2048, 4, 64, 2)
    rows.append(memory_row(4096, 4, 64))
  else:
    sweep = [(256, 256, 1, 1, True), (256, 256, 1, 1, False), (256, 512, 1, 1, None),
             (512, 512, 1, 1, None), (512, 128, 2, 1, None), (1024, 256, 1, 1, None),
             (512, 256, 1, 1, True), (128, 128, 1, 1, None), (256, 256, 1, 2, None)]
    window_sweep = [(256, 128, 6), (160, 32, 21), (128, 128, 5), (128, 64, 10),
                    (256, 256, 3), (64, 64, 9)]
    if suite == 'full':
      sweep += [(128, 256, 1, 1, None), (512, 128, 1, 1, None), (64, 64, 1, 8, None)]
      window_sweep += [(256, 256, 1), (128, 128, 1), (64, 64, 1), (256, 64, 12),
                       (512, 256, 4)]
    rows = causal_rows(4096, 8, 64, 8, sweep=sweep)
    rows += causal_bwd_sweep_rows(4096, 8, 64, 5, [(256, 256), (256, 512), (512, 512),
                                                   (512, 256), (128, 512),
                                                   (256, 1024)])
    rows += window_rows(16384, 512, 8, 64, mm, 3, sweep=window_sweep)
    rows += alibi_rows(16384, 8, 64, 3)
    rows += tradeoff_rows(4096, 16384, 512, 8, 64, 4)
    rows += dot_rows([(8, 256, 64, 256), (8, 512, 64, 256), (8, 256, 64, 512),
                      (8, 256, 256, 64), (8, 512, 256, 64), (1, 2048, 64, 2048)], 3)
    rows.append(memory_row(65536, 8, 64))
  rows.append(dict(name='matmul_2048_f32_end_of_run', flops=matmul_flops(),
                   matmul_flops_start_of_run=mm))
  with open(os.path.join(workdir, 'xla_attention.json'), 'w') as f:
    json.dump(rows, f, indent=1, default=float)
  return rows


def _main(argv: Sequence[str]) -> None:
  """`--suite=`, `--workdir=`; `--memory_only=T` runs just the peak-RSS row at T."""
  suite, workdir, memory_only = 'quick', '/tmp/xla_attention_bench', None
  for arg in argv:
    if arg.startswith('--suite='):
      suite = arg.split('=', 1)[1]
    elif arg.startswith('--workdir='):
      workdir = arg.split('=', 1)[1]
    elif arg.startswith('--memory_only='):
      memory_only = int(arg.split('=', 1)[1])
    else:
      raise ValueError(f'unknown argument {arg!r} (use --suite=, --workdir=, '
                       '--memory_only=).')
  rows = ([memory_row(memory_only, 8, 64)] if memory_only is not None else
          run(suite, workdir))
  for row in rows:
    print(json.dumps(row, default=float), flush=True)


if __name__ == '__main__':
  _main(sys.argv[1:])
