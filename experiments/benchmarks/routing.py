r"""Routed attention on the xla path: predicted vs measured time, traced vs static.

    python -m experiments.benchmark --suite=cpu_core --topics=routing --workdir=/tmp/rt
    python -m experiments.benchmarks.routing --suite=cpu_core --parts=timing
    python -m experiments.benchmarks.routing --suite=cpu_core --parts=quality

Parts (one run of the topic does both; `--parts` of this module's own entry picks):

* `timing`. The simulator (`kernels.xla.cost_model`) is calibrated: a handful of
  small static and traced calls are timed and its per-machine constants fitted to
  them (section `calibration`; the constants in section `constants`). Then: every
  static mask family of the `sparse` topic (`sparse.mask_zoo`), forward and
  forward+backward (section `static`); every routing method of `attention.routing`
  (section `method`), its traced call (routing included) next to the static xla
  call with the same blocks (`kernels.xla.dynamic.static_equivalent`); and the
  issue's target row (section `target`): T=16384, N=8, H=64, B=1, MoBA top-k
  keeping 1/8 of the blocks, traced / static forward (target <= 1.25) and
  forward+backward (target <= 1.35). Every timing row has the simulator's
  prediction, the measurement and predicted / measured (target: within 25%).
* `quality`. MQAR ("Zoology", Arora et al. 2023) at T = 2048 (cpu_core) with a tiny
  decoder trained once with dense causal attention, then evaluated, with the same
  parameters, with MoBA routing ("MoBA", Lu et al. 2025; parameter-free gate) and
  with SeerAttention AttnGates ("SeerAttention", Gao et al. 2024) distilled on the
  frozen model (`experiments.models.seer_distill`), each at several top-k, next to
  dense: the accuracy-vs-density curve (section `quality`; target: within 5 points
  of dense at 1/4 density).

Durations on the shared 2-core machine (busy, load 4-10): quick timing 2-4 min;
cpu_core timing about 8 min (estimated: its calibration and target rows alone took
2 min 51 s); cpu_core quality about 12-16 min (estimated from 0.57 s per training
step, 1500 steps; not run here).

Every call of the timing part (calibration included) is timed in the same rounds,
each round in a fresh random order (`_time_all`), so the constants and the rows they
predict see the same machine; times are the minima over rounds, in milliseconds
(`_ms`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import routing as routing_lib
from attention.masks import base as masks_base
from attention.masks import dynamic as masks_dynamic
from attention.masks import static as masks_static
from experiments.benchmarks import common
from experiments.benchmarks import sparse
from kernels import problem as problem_lib
from kernels import xla
from kernels.xla import cost_model

TARGETS = dict(fwd_ratio=1.25, fwd_bwd_ratio=1.35, prediction=0.25,
               quality_points=5.0)

# Calibration calls: (name, kind, T, N, K, H, mask spec, xla options). kind 'static'
# runs a static Mask ('dense', 'causal', 'window:<w>', 'docs:<n>'; '+perm': inside a
# seeded random token permutation of q, k, v and back, as BiFormer / VMoBA); 'traced' a
# DynamicBlockMask of a seeded random block matrix ('blocks:<block>:<density>',
# '+causal' for a causal inner mask); 'reduce' (forward only) a router's causal
# masked row max of q k^T outside the attention, every query against the first <n>
# keys ('init:<n>') or within its group of <g> ('local:<g>'), as AnchorAttention's
# anchors.
_CALIBRATION = {
    'small': (
        ('dense', 'static', 1024, 8, 8, 64, 'dense', {}),
        ('causal_2k', 'static', 2048, 8, 8, 64, 'causal', {}),
        ('causal_1k', 'static', 1024, 8, 8, 64, 'causal', {}),
        ('causal_1k_h32', 'static', 1024, 8, 8, 32, 'causal', {}),
        ('causal_1k_h128', 'static', 1024, 4, 4, 128, 'causal', {}),
        ('window_128', 'static', 2048, 8, 8, 64, 'window:128', {}),
        ('causal_64x64', 'static', 512, 4, 4, 64, 'causal',
         dict(block_q=64, block_kv=64, bwd_block_q=64, bwd_block_kv=64)),
        ('docs_4', 'static', 2048, 8, 8, 64, 'docs:4', {}),
        ('gqa_causal', 'static', 1024, 8, 2, 64, 'causal', {}),
        ('traced_256', 'traced', 2048, 8, 8, 64, 'blocks:256:0.25+causal', {}),
        ('traced_128', 'traced', 1024, 8, 8, 32, 'blocks:128:0.5', {}),
        ('traced_512', 'traced', 4096, 8, 8, 64, 'blocks:512:0.125+causal', {}),
        ('traced_64', 'traced', 2048, 8, 8, 64, 'blocks:64:0.125+causal', {}),
        ('window_perm', 'static', 4096, 8, 8, 64, 'window:128+perm', {}),
        ('reduce_init', 'reduce', 2048, 8, 8, 64, 'init:256', {}),
        ('reduce_local', 'reduce', 2048, 8, 8, 64, 'local:256', {}),
    ),
    'tiny': (
        ('dense', 'static', 128, 2, 2, 16, 'dense', {}),
        ('causal', 'static', 256, 2, 2, 16, 'causal', {}),
        ('causal_h32', 'static', 128, 2, 2, 32, 'causal', {}),
        ('window', 'static', 256, 2, 2, 16, 'window:32', {}),
        ('traced', 'traced', 256, 2, 2, 16, 'blocks:64:0.5+causal', {}),
        ('traced_h32', 'traced', 128, 2, 2, 32, 'blocks:32:0.5', {}),
        ('reduce', 'reduce', 256, 2, 2, 16, 'init:64', {}),
        ('window_perm', 'static', 256, 2, 2, 16, 'window:32+perm', {}),
    ),
}

# Routing methods at T = 4096 (N=8, H=64), each keeping about 1/8 of the blocks.
_METHODS_4K = dict(
    moba=dict(q_len=4096, block=256, top_k=2),
    biformer=dict(grid=(64, 64), regions=8, top_k=8),
    seer_attention=dict(q_len=4096, block=64, top_k=8),
    minference_block_sparse=dict(q_len=4096, block=64, top_k=8),
    minference_vertical_slash=dict(q_len=4096, num_vertical=128, num_slash=256,
                                   block=64),
    anchor_attention=dict(q_len=4096, group_size=512, sub_block=128, num_init=512,
                          block_kv=64),
    vmoba=dict(grid=(4, 32, 32), cell=(1, 16, 16), threshold=0.25, budget=2))

SUITES = {
    'quick': dict(calibration='small', rounds=5, zoo_length=1024, heads=8,
                  head_dim=64, zoo=None,
                  methods=dict(
                      moba=dict(q_len=2048, block=256, top_k=2),
                      biformer=dict(grid=(32, 32), regions=8, top_k=8),
                      seer_attention=dict(q_len=2048, block=64, top_k=4),
                      minference_block_sparse=dict(q_len=2048, block=64, top_k=4),
                      minference_vertical_slash=dict(q_len=2048, num_vertical=64,
                                                     num_slash=128, block=64),
                      anchor_attention=dict(q_len=2048, group_size=256,
                                            sub_block=64, num_init=256,
                                            block_kv=64),
                      vmoba=dict(grid=(2, 32, 32), cell=(1, 16, 16), threshold=0.25,
                                 budget=2)),
                  target=dict(q_len=4096, heads=8, head_dim=64, block=512,
                              top_k=1, keep=1 / 8),
                  quality='quick'),
    'cpu_core': dict(calibration='small', rounds=5, zoo_length=4096, heads=8,
                     head_dim=64, zoo=None,
                     methods=_METHODS_4K,
                     target=dict(q_len=16384, heads=8, head_dim=64, block=512,
                                 top_k=4, keep=1 / 8),
                     quality='cpu_core'),
    'full': dict(calibration='small', rounds=7, zoo_length=4096, heads=8,
                 head_dim=64, zoo=None,
                 methods=_METHODS_4K,
                 target=dict(q_len=16384, heads=8, head_dim=64, block=512,
                             top_k=4, keep=1 / 8),
                 quality='cpu_core'),
}
# The smallest sizes (seconds), for the end-to-end test of this topic.
TINY = dict(calibration='tiny', rounds=1, zoo_length=256, heads=2, head_dim=16,
            zoo=('causal',),
            methods={},  # the target row runs the method code path (MoBA)
            target=dict(q_len=512, heads=2, head_dim=16, block=64, top_k=1,
                        keep=1 / 8),
            quality='tiny')

# MQAR quality runs: a tiny decoder trained with dense attention, then evaluated with
# MoBA routing at each top_k (density ~ top_k / number of blocks).
QUALITY = {
    'tiny': dict(seq_len=64, block=16, top_ks=(2,), steps=2, batch=4, dim=16,
                 depth=1, heads=2, pairs=4, vocab=8, eval_batches=1,
                 learning_rate=3e-3, distill_steps=2, distill_learning_rate=1e-3),
    # About 3 minutes on the busy 2-core machine; dense reached 25% (chance 6%) after
    # 500 steps there: not yet converged.
    'quick': dict(seq_len=512, block=64, top_ks=(1, 2, 4, 8), steps=500, batch=16,
                  dim=64, depth=2, heads=2, pairs=8, vocab=16, eval_batches=4,
                  learning_rate=3e-3, distill_steps=50, distill_learning_rate=1e-3),
    # Training dominates: 0.57 s per step measured on the busy 2-core machine (about
    # 0.35 s expected on a quiet one), so 1500 steps take 9-14 minutes, plus about
    # 2 minutes of distillation and evaluation (not run here). Of the 16 blocks,
    # top_k = 4 lists 23% of all 16 x 16 blocks (block_density) and top_k = 2 23% of
    # the 136 causal ones (causal_block_fraction): the two readings of "1/4 density".
    'cpu_core': dict(seq_len=2048, block=128, top_ks=(1, 2, 4, 8, 16), steps=1500,
                     batch=8, dim=64, depth=2, heads=2, pairs=8, vocab=16,
                     eval_batches=4, learning_rate=3e-3, distill_steps=100,
                     distill_learning_rate=1e-3),
}


def static_twin(dyn: masks_dynamic.DynamicBlockMask,
                num_heads: int) -> masks_base.Mask:
  """The static Mask with the blocks (and inner mask) of a concrete routed mask."""
  from kernels.xla import dynamic  # pylint: disable=g-import-not-at-top
  return dynamic.static_equivalent(dyn, num_heads)


# ----------------------------------------------------------------------------------------
# Calls and their simulated work.
# ----------------------------------------------------------------------------------------


def _inputs(b: int, t: int, n: int, kh: int, h: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32))
               for shape in ((b, t, n, h), (b, t, kh, h), (b, t, kh, h)))


def _grad(fn: Callable[..., jax.Array]) -> Callable[..., Any]:
  return common.fwd_bwd_fn(fn)


def _static_fns(mask: masks_base.Mask | None, perm: np.ndarray | None = None,
                **options):
  """Forward / fwd+bwd of the static xla call (inside the token permutation `perm`)."""
  from attention import masks  # pylint: disable=g-import-not-at-top

  def fn(q, k, v):
    if perm is not None:
      q, k, v = (masks.apply_permutation(x, perm) for x in (q, k, v))
    problem = problem_lib.make_problem(q, k, v, mask=mask)
    out = xla.attention(q, k, v, problem, **options)
    return out if perm is None else masks.invert_permutation(out, perm)
  return jax.jit(fn), _grad(fn)


def _traced_fns():
  """Forward / fwd+bwd of the traced xla path with the lists as traced arguments."""
  def fn(q, k, v, dyn):
    return attention.dot_product_attention(q, k, v, mask=dyn, implementation='xla')
  return jax.jit(fn), _grad(fn)


def _static_mask(spec: str, t: int) -> masks_base.Mask | None:
  name, _, arg = spec.removesuffix('+perm').partition(':')
  if name == 'dense':
    return None
  if name == 'causal':
    return masks_base.causal(t)
  if name == 'window':
    return masks_static.sliding_window(t, int(arg), 0)
  if name == 'docs':
    return masks_static.documents([t // int(arg)] * int(arg))
  raise ValueError(f'calibration mask spec must be dense, causal, window:<w> or '
                   f'docs:<n>, got {spec!r}.')


def random_blocks(t: int, heads: int, block: int, density: float, causal: bool,
                  seed: int = 0) -> masks_dynamic.DynamicBlockMask:
  """A DynamicBlockMask of a seeded random block matrix (diagonal always listed)."""
  n = -(-t // block)
  rng = np.random.default_rng(seed)
  blocks = rng.random((1, heads, n, n)) < density
  blocks |= np.eye(n, dtype=bool)[None, None]
  if causal:
    blocks &= np.tril(np.ones((n, n), bool))[None, None]
  return masks_dynamic.from_block_matrix(
      jnp.asarray(blocks), q_len=t, kv_len=t, block_q=block, block_kv=block,
      inner=masks_base.causal(t) if causal else None)


def _traced_mask(spec: str, t: int, n: int) -> masks_dynamic.DynamicBlockMask:
  body, _, inner = spec.partition('+')
  name, block, density = body.split(':')
  if name != 'blocks' or inner not in ('', 'causal'):
    raise ValueError(f'traced calibration spec must be blocks:<block>:<density>'
                     f'[+causal], got {spec!r}.')
  return random_blocks(t, n, int(block), float(density), inner == 'causal')


def masked_row_max(q: jax.Array, k: jax.Array, spec: str) -> jax.Array:
  """Causal masked row max of q k^T [B, N, T]: against the first n keys ('init:<n>')
  or within each query's group of g ('local:<g>'), as AnchorAttention's anchors."""
  name, _, arg = spec.partition(':')
  b, t, n, h = q.shape
  if name not in ('init', 'local') or not arg.isdigit() or t % int(arg):
    raise ValueError(f'reduce calibration spec must be init:<n> or local:<g> with n, '
                     f'g dividing {t}, got {spec!r}.')
  m = int(arg)
  if name == 'init':
    s = jnp.einsum('btnh,bsnh->bnts', q, k[:, :m])  # [B, N, T, n]
    visible = np.arange(m)[None] <= np.arange(t)[:, None]
    return jnp.max(jnp.where(visible, s, -jnp.inf), -1)
  qg, kg = (x.reshape(b, t // m, m, n, h) for x in (q, k))
  s = jnp.einsum('bgtnh,bgsnh->bngts', qg, kg)  # [B, N, G, g, g]
  tri = np.tril(np.ones((m, m), bool))
  return jnp.max(jnp.where(tri, s, -jnp.inf), -1).reshape(b, n, t)


def _reduce_work(spec: str, b: int, t: int, n: int, h: int) -> cost_model.Work:
  name, _, arg = spec.partition(':')
  m = int(arg)
  if name == 'init':
    return cost_model.masked_reduce_work(batch=b * n, rows=t, cols=m, head_dim=h)
  return cost_model.masked_reduce_work(batch=b * n * (t // m), rows=m, cols=m,
                                       head_dim=h)


@dataclasses.dataclass
class _Timed:
  """A call to time: zero-argument fns and the simulated work of each pass."""
  name: str
  fns: dict[str, Callable[[], Any]]
  work: dict[str, cost_model.Work]
  info: dict[str, Any]


def _static_timed(name: str, mask, b, t, n, kh, h, options,
                  perm: np.ndarray | None = None) -> _Timed:
  q, k, v = _inputs(b, t, n, kh, h)
  fwd, fb = _static_fns(mask, perm, **options)
  sp = cost_model.static_plan(mask, batch=b, q_len=t, kv_len=t, num_heads=n,
                              num_kv_heads=kh, head_dim=h, **options)
  steps = cost_model.step_counts(sp.fwd, 'fwd')
  work = dict(fwd=cost_model.static_work(sp),
              fwd_bwd=cost_model.static_work(sp, backward=True))
  if perm is not None:
    work = {p: w + cost_model.permutation_work(
        batch=b, q_len=t, num_heads=n, num_kv_heads=kh, head_dim=h,
        backward=p == 'fwd_bwd') for p, w in work.items()}
  return _Timed(
      name, dict(fwd=functools.partial(fwd, q, k, v),
                 fwd_bwd=functools.partial(fb, q, k, v)), work,
      dict(q_len=t, heads=n, head_dim=h, path='static',
           tiles=f'{sp.fwd.block_q}x{sp.fwd.block_kv}x{sp.fwd.kv_chunk}',
           fwd_steps=steps.full + steps.partial))


def _traced_timed(name: str, dyn, b, t, n, kh, h, routing=None,
                  fns=None) -> _Timed:
  """A traced call: `fns` (fwd, fwd_bwd) of (q, k, v) or, by default, attention
  over `dyn` passed as a traced argument; `routing` the router's work if included."""
  q, k, v = _inputs(b, t, n, kh, h)
  if fns is None:
    fwd, fb = _traced_fns()
    calls = dict(fwd=functools.partial(fwd, q, k, v, dyn),
                 fwd_bwd=functools.partial(fb, q, k, v, dyn))
  else:
    calls = dict(fwd=functools.partial(fns[0], q, k, v),
                 fwd_bwd=functools.partial(fns[1], q, k, v))
  work = dict(
      fwd=cost_model.traced_work(dyn, batch=b, num_heads=n, num_kv_heads=kh,
                                 head_dim=h),
      fwd_bwd=cost_model.traced_work(dyn, batch=b, num_heads=n, num_kv_heads=kh,
                                     head_dim=h, backward=True))
  if routing is not None:
    work = {p: w + routing for p, w in work.items()}
  st = cost_model.traced_steps(dyn, batch=b, num_heads=n, num_kv_heads=kh)
  return _Timed(name, calls, work,
                dict(q_len=t, heads=n, head_dim=h, path='traced',
                     tiles=f'{dyn.block_q}x{dyn.block_kv}', fwd_steps=st.steps))


def _calibration_timed(level: str) -> list[_Timed]:
  out = []
  for name, kind, t, n, kh, h, spec, options in _CALIBRATION[level]:
    if kind == 'static':
      perm = (np.random.default_rng(0).permutation(t) if spec.endswith('+perm')
              else None)
      out.append(_static_timed(name, _static_mask(spec, t), 1, t, n, kh, h, options,
                               perm=perm))
    elif kind == 'reduce':
      q, k, _ = _inputs(1, t, n, n, h)
      fn = jax.jit(functools.partial(masked_row_max, spec=spec))
      out.append(_Timed(name, dict(fwd=functools.partial(fn, q, k)),
                        dict(fwd=_reduce_work(spec, 1, t, n, h)),
                        dict(q_len=t, heads=n, head_dim=h, path='reduce', tiles=spec,
                             fwd_steps=0)))
    else:
      out.append(_traced_timed(name, _traced_mask(spec, t, n), 1, t, n, kh, h))
  return out


def _time_all(timed: Sequence[_Timed], rounds: int,
              seed: int = 0) -> dict[tuple[str, str], float]:
  """Minimum wall time of every call over `rounds` rounds, each in a new random order.

  As `common.interleaved_best`, but the order is shuffled every round (not rotated),
  so a slow phase of the shared machine does not fall on the same calls each round.
  """
  fns = {(c.name, p): f for c in timed for p, f in c.fns.items()}
  if len(fns) != sum(len(c.fns) for c in timed):
    raise ValueError('timed calls must have distinct names, got '
                     f'{[c.name for c in timed]}.')
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}.')
  for f in fns.values():
    common.block(f())  # compile
  names = list(fns)
  best = dict.fromkeys(names, float('inf'))
  rng = np.random.default_rng(seed)
  for _ in range(rounds):
    for i in rng.permutation(len(names)):
      t0 = time.perf_counter()
      common.block(fns[names[i]]())
      best[names[i]] = min(best[names[i]], time.perf_counter() - t0)
  return best


def _timing_rows(section: str, timed: Sequence[_Timed], best, constants
                ) -> list[dict[str, Any]]:
  rows = []
  for c in timed:
    for p in c.fns:
      measured = best[(c.name, p)]
      predicted = cost_model.predict(c.work[p], constants)
      rows.append(dict(
          section=section, name=c.name, pass_=p,
          predicted_over_measured=predicted / measured,
          within_25pct=bool(abs(predicted / measured - 1) <= TARGETS['prediction']),
          predicted_ms=1e3 * predicted, measured_ms=1e3 * measured, **c.info))
  return rows


def _fit_rows(level: str, timed: Sequence[_Timed], best
             ) -> tuple[cost_model.Fit, list[dict[str, Any]]]:
  """Fits the simulator's constants to the timed calibration calls."""
  keys = [(c.name, p) for c in timed for p in c.fns]
  works = [c.work[p] for c in timed for p in c.fns]
  fit = cost_model.fit(works, [best[k] for k in keys])
  rows = _timing_rows('calibration', timed, best, fit.constants)
  rows.append(dict(section='constants', name=f'fit_{level}', fit_rank=fit.rank,
                   constants=len(cost_model.FIELDS),
                   fit_max_rel_err=fit.max_rel_err,
                   **{f'{k}_s_per_unit': v
                      for k, v in fit.constants.as_dict().items()}))
  return fit, rows


def calibrate(level: str, rounds: int
             ) -> tuple[cost_model.Fit, list[dict[str, Any]]]:
  """Times the calibration calls side by side and fits the simulator's constants."""
  timed = _calibration_timed(level)
  return _fit_rows(level, timed, _time_all(timed, rounds))


# ----------------------------------------------------------------------------------------
# Routing methods: the traced call (routing included) and its static twin.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """A routing method: its routing alone and its public attention function.

  `route(q, k)` -> DynamicBlockMask in the attention's token order; `attend(q, k, v)`
  the public function on the xla path (routing included); `inner` the static Mask it
  applies inside the routed blocks (MoBA: causal) and `permutation` the token order
  it attends in (BiFormer: regions contiguous), both reproduced by its static twin;
  `router_work(batch, heads, head_dim)` the router's work beyond the generic pooled
  gate of `cost_model.routing_work` (AnchorAttention's score reductions).
  """
  name: str
  q_len: int
  route: Callable[..., masks_dynamic.DynamicBlockMask]
  attend: Callable[..., jax.Array]
  inner: masks_base.Mask | None = None
  permutation: np.ndarray | None = None
  router_work: Callable[..., cost_model.Work] | None = None


def _moba(cfg: dict[str, Any]) -> Method:
  b, k = cfg['block'], cfg['top_k']
  return Method(
      'moba', cfg['q_len'],
      functools.partial(routing_lib.moba_mask, block_size=b, top_k=k),
      functools.partial(routing_lib.moba_attention, block_size=b, top_k=k,
                        implementation='xla'),
      inner=masks_base.causal(cfg['q_len']))


def _biformer(cfg: dict[str, Any]) -> Method:
  from attention.routing import biformer  # pylint: disable=g-import-not-at-top
  grid, regions, top_k = tuple(cfg['grid']), cfg['regions'], cfg['top_k']
  return Method(
      'biformer', grid[0] * grid[1],
      functools.partial(biformer.bi_level_routing_mask, grid=grid, regions=regions,
                        top_k=top_k),
      functools.partial(biformer.bi_level_routing_attention, grid=grid,
                        regions=regions, top_k=top_k, implementation='xla'),
      permutation=biformer.region_permutation(grid, regions))


def _seer(cfg: dict[str, Any]) -> Method:
  """SeerAttention's AttnGate (random, untrained projections) with row top-k."""
  from attention.routing import seer_attention as seer  # pylint: disable=g-import-not-at-top
  b, k, n, h, d = cfg['block'], cfg['top_k'], cfg['heads'], cfg['head_dim'], 64
  rng = np.random.default_rng(0)
  wk = jnp.asarray(rng.standard_normal((n, 3 * h, d), np.float32) / np.sqrt(3 * h))
  wq = jnp.asarray(rng.standard_normal((n, h, d), np.float32) / np.sqrt(h))

  def scores(q, k_):
    return seer.attn_gate_scores(q, k_, wk=wk, wq=wq, block_size=b, causal=True)

  def route(q, k_):
    return seer.seer_mask(scores(q, k_), block_size=b, q_len=q.shape[1], top_k=k)

  def attend(q, k_, v):
    return seer.seer_sparse_attention(q, k_, v, scores(q, k_), block_size=b, top_k=k,
                                      causal=True, implementation='xla')

  return Method('seer_attention', cfg['q_len'], route, attend,
                inner=masks_base.causal(cfg['q_len']))


def _minference_block_sparse(cfg: dict[str, Any]) -> Method:
  from attention.routing import minference  # pylint: disable=g-import-not-at-top
  route = functools.partial(minference.block_sparse_mask, top_k=cfg['top_k'],
                            block_q=cfg['block'], block_kv=cfg['block'])

  def attend(q, k, v):
    return attention.dot_product_attention(q, k, v, mask=route(q, k),
                                           implementation='xla')

  return Method('minference_block_sparse', cfg['q_len'], route, attend)


def _minference_vertical_slash(cfg: dict[str, Any]) -> Method:
  from attention.routing import minference  # pylint: disable=g-import-not-at-top
  pattern = dict(num_vertical=cfg['num_vertical'], num_slash=cfg['num_slash'],
                 block_q=cfg['block'], block_kv=cfg['block'])
  return Method('minference_vertical_slash', cfg['q_len'],
                functools.partial(minference.vertical_slash_mask, **pattern),
                functools.partial(minference.vertical_slash_attention,
                                  implementation='xla', **pattern))


def _anchor(cfg: dict[str, Any]) -> Method:
  from attention.routing import anchor_attention as anchor  # pylint: disable=g-import-not-at-top
  selection = dict(group_size=cfg['group_size'], sub_block=cfg['sub_block'],
                   num_init=cfg['num_init'], block_kv=cfg['block_kv'])
  def router_work(batch, heads, head_dim):
    return cost_model.anchor_routing_work(
        batch=batch, q_len=cfg['q_len'], num_heads=heads, head_dim=head_dim,
        group_size=cfg['group_size'], sub_block=cfg['sub_block'],
        num_init=cfg['num_init'])

  return Method('anchor_attention', cfg['q_len'],
                functools.partial(anchor.anchor_mask, **selection),
                functools.partial(anchor.anchor_attention, implementation='xla',
                                  **selection), router_work=router_work)


def _vmoba(cfg: dict[str, Any]) -> Method:
  from attention import masks  # pylint: disable=g-import-not-at-top
  from attention.routing import vmoba  # pylint: disable=g-import-not-at-top
  grid, cell = tuple(cfg['grid']), tuple(cfg['cell'])
  perm = vmoba.cell_permutation(grid, cell)
  block = int(np.prod(cell))
  opts = dict(threshold=cfg['threshold'], budget=cfg['budget'])

  def route(q, k):
    return vmoba.vmoba_mask(masks.apply_permutation(q, perm),
                            masks.apply_permutation(k, perm), block_size=block,
                            **opts)

  return Method('vmoba', int(np.prod(grid)), route,
                functools.partial(vmoba.vmoba_attention, grid=grid, cell=cell,
                                  implementation='xla', **opts),
                permutation=perm)


_METHODS = {'moba': _moba, 'biformer': _biformer, 'seer_attention': _seer,
            'minference_block_sparse': _minference_block_sparse,
            'minference_vertical_slash': _minference_vertical_slash,
            'anchor_attention': _anchor, 'vmoba': _vmoba}
_MODULES = {'moba': 'moba', 'biformer': 'biformer', 'seer_attention': 'seer_attention',
            'minference_block_sparse': 'minference',
            'minference_vertical_slash': 'minference',
            'anchor_attention': 'anchor_attention', 'vmoba': 'vmoba'}


def available_methods() -> tuple[str, ...]:
  """Routing methods of `attention.routing` this topic benchmarks (those present)."""
  import importlib  # pylint: disable=g-import-not-at-top
  names = []
  for name, module in _MODULES.items():
    try:
      importlib.import_module(f'attention.routing.{module}')
    except ImportError:
      continue
    names.append(name)
  return tuple(names)


def _static_call(method: Method, mask: masks_base.Mask):
  """The method's attention with the static `mask` (its permutation included)."""
  from attention import masks  # pylint: disable=g-import-not-at-top

  def fn(q, k, v):
    if method.permutation is not None:
      q, k, v = (masks.apply_permutation(x, method.permutation) for x in (q, k, v))
    out = attention.dot_product_attention(q, k, v, mask=mask, implementation='xla')
    if method.permutation is not None:
      out = masks.invert_permutation(out, method.permutation)
    return out

  return fn


def _method_timed(method: Method, heads: int, head_dim: int, prefix: str = ''
                 ) -> tuple[_Timed, _Timed, dict[str, Any]]:
  """(traced incl. routing, static twin, info) of one method at its size."""
  t, b, n = method.q_len, 1, heads
  q, k, v = _inputs(b, t, n, n, head_dim)
  dyn = method.route(q, k)
  if method.inner is not None:  # as the problem folds it (kernels.problem)
    dyn = dyn.replace(inner=method.inner if dyn.inner is None else
                      dyn.inner & method.inner)
  twin = static_twin(dyn, n)
  routing = cost_model.routing_work(
      batch=b, q_len=t, kv_len=t, num_heads=n, num_kv_heads=n, head_dim=head_dim,
      list_heads=dyn.num_heads, num_q_blocks=dyn.num_q_blocks,
      num_kv_blocks=dyn.num_kv_blocks, budget=dyn.budget)
  if method.router_work is not None:
    routing = routing + method.router_work(b, n, head_dim)
  traced = _traced_timed(f'{prefix}{method.name}/traced', dyn, b, t, n, n, head_dim,
                         routing=routing,
                         fns=(jax.jit(method.attend), _grad(method.attend)))
  static_fn = _static_call(method, twin)
  sp = cost_model.static_plan(twin, batch=b, q_len=t, kv_len=t, num_heads=n,
                              head_dim=head_dim)
  steps = cost_model.step_counts(sp.fwd, 'fwd')
  static = _Timed(
      f'{prefix}{method.name}/static',
      dict(fwd=functools.partial(jax.jit(static_fn), q, k, v),
           fwd_bwd=functools.partial(_grad(static_fn), q, k, v)),
      dict(fwd=cost_model.static_work(sp),
           fwd_bwd=cost_model.static_work(sp, backward=True)),
      dict(q_len=t, heads=n, head_dim=head_dim, path='static',
           tiles=f'{sp.fwd.block_q}x{sp.fwd.block_kv}x{sp.fwd.kv_chunk}',
           fwd_steps=steps.full + steps.partial))
  if method.permutation is not None:  # both calls permute q, k, v and the output
    for c in (traced, static):
      c.work = {p: w + cost_model.permutation_work(
          batch=b, q_len=t, num_heads=n, num_kv_heads=n, head_dim=head_dim,
          backward=p == 'fwd_bwd') for p, w in c.work.items()}
  listed = float(np.asarray(dyn.kv_counts).sum())
  info = dict(block_fraction=listed / (dyn.batch * dyn.num_heads * dyn.num_q_blocks *
                                       dyn.num_kv_blocks),
              block=f'{dyn.block_q}x{dyn.block_kv}', budget=dyn.budget)
  return traced, static, info


def _ratio_rows(section: str, name: str, traced: _Timed, static: _Timed, best,
                constants, info: dict[str, Any],
                targets: dict[str, float] | None = None) -> list[dict[str, Any]]:
  rows = []
  for p in ('fwd', 'fwd_bwd'):
    measured = best[(traced.name, p)] / best[(static.name, p)]
    predicted = (cost_model.predict(traced.work[p], constants) /
                 cost_model.predict(static.work[p], constants))
    row = dict(section=section, name=name, pass_=p,
               traced_over_static=measured,
               predicted_traced_over_static=predicted,
               traced_ms=1e3 * best[(traced.name, p)],
               static_ms=1e3 * best[(static.name, p)], **info)
    if targets is not None:
      goal = targets['fwd_ratio' if p == 'fwd' else 'fwd_bwd_ratio']
      row.update(target=goal, met=bool(measured <= goal))
    rows.append(row)
  return rows


def _target_method(cfg: dict[str, Any]) -> Method:
  """MoBA at the target size with top_k = keep * blocks (at least 1)."""
  n = -(-cfg['q_len'] // cfg['block'])
  top_k = max(1, int(round(cfg['keep'] * n)))
  return _moba(dict(q_len=cfg['q_len'], block=cfg['block'], top_k=top_k))


def timing_rows(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """The timing part: calibration, static zoo, methods, the target row.

  Every call (calibration ones included) is timed in the same interleaved rounds, so
  the fitted constants and the rows they predict see the same machine.
  """
  calibration = _calibration_timed(cfg['calibration'])
  heads, head_dim, t = cfg['heads'], cfg['head_dim'], cfg['zoo_length']
  zoo = [_static_timed(name, mask, 1, t, heads, heads, head_dim, {})
         for name, mask in sparse.mask_zoo(t, heads).items()
         if cfg['zoo'] is None or name in cfg['zoo']]
  methods = []
  for name in available_methods():
    if name not in cfg['methods']:
      continue
    method = _METHODS[name](dict(cfg['methods'][name], heads=heads,
                                 head_dim=head_dim))
    methods.append((name, None) + _method_timed(method, heads, head_dim))
  tcfg = cfg['target']
  methods.append((f'moba_T{tcfg["q_len"]}', TARGETS) + _method_timed(
      _target_method(tcfg), tcfg['heads'], tcfg['head_dim'],
      prefix=f'T{tcfg["q_len"]}_'))
  timed = calibration + zoo + [c for m in methods for c in m[2:4]]
  for c in zoo:  # distinct from the calibration calls of the same name
    c.name = f'zoo_{c.name}'
  best = _time_all(timed, cfg['rounds'])
  fit, rows = _fit_rows(cfg['calibration'], calibration, best)
  constants = fit.constants
  rows += _timing_rows('static', zoo, best, constants)
  for name, targets, traced, static, info in methods:
    section = 'method' if targets is None else 'target'
    rows += _timing_rows(section, [traced, static], best, constants)
    rows += _ratio_rows(f'{section}_ratio', name, traced, static, best, constants,
                        info, targets=targets)
  return rows


# ----------------------------------------------------------------------------------------
# Quality: MQAR accuracy vs routed density.
# ----------------------------------------------------------------------------------------


def _quality_config(q: dict[str, Any], variant: str = 'softmax'):
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config('mqar')
  head_dim = q['dim'] // q['heads']
  config.update_from_flattened_dict({
      'data.seq_len': q['seq_len'], 'data.batch_size': q['batch'],
      'data.num_eval_batches': q['eval_batches'],
      'data.mqar.num_pairs': q['pairs'], 'data.mqar.num_queries': q['pairs'],
      'data.mqar.num_keys': q['vocab'], 'data.mqar.num_values': q['vocab'],
      'model.dim': q['dim'], 'model.depth': q['depth'],
      'model.num_heads': q['heads'], 'model.num_kv_heads': q['heads'],
      'model.head_dim': head_dim, 'model.mlp_dim': 2 * q['dim'],
      'model.attention.variant': variant,
      'train.num_steps': q['steps'], 'train.warmup_steps': max(q['steps'] // 10, 1),
      'train.learning_rate': q['learning_rate'],
      'train.log_every': q['steps'], 'train.eval_every': q['steps'],
      'train.checkpoint_every': q['steps'], 'train.tensorboard': False,
      'mesh.data': 1, 'mesh.fsdp': 1, 'mesh.tensor': 1})
  return config


def moba_variant_name(block: int, top_k: int) -> str:
  """Registers (once) and names a MoBA model variant with this block and top_k."""
  from experiments.models import registry  # pylint: disable=g-import-not-at-top
  name = f'moba_b{block}_k{top_k}'
  if name not in registry.available_variants():
    registry.register_variant(name, routing_lib.moba.make_registry_variant(
        block_size=block, top_k=top_k))
  return name


def _accuracy(logits_fn: Callable[[Any], jax.Array],
              batches: Sequence[dict[str, np.ndarray]]) -> float:
  """Weighted argmax accuracy of logits_fn(inputs) over the eval batches."""
  correct = weight = 0.0
  for batch in batches:
    pred = np.asarray(jnp.argmax(logits_fn(jnp.asarray(batch['inputs'])), -1))
    correct += float(np.sum((pred == batch['targets']) * batch['weights']))
    weight += float(np.sum(batch['weights']))
  return correct / max(weight, 1.0)


def quality_rows(level: str) -> list[dict[str, Any]]:
  """MQAR accuracy vs block density: one dense-trained decoder, evaluated dense, with
  MoBA routing at each top_k, and with SeerAttention gates distilled on it (frozen)
  at each top_k (`experiments.models.seer_distill`)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from experiments import data as data_lib  # pylint: disable=g-import-not-at-top
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  from experiments.models import seer_distill  # pylint: disable=g-import-not-at-top
  q = QUALITY[level]
  config = _quality_config(q)
  source = data_lib.make_source(config.data, seed=config.seed, process_index=0,
                                process_count=1)
  trainer = train_lib.Trainer(config, source.info)
  state = trainer.init_state()
  t0 = time.perf_counter()
  train_batches = []
  for _ in range(q['steps']):
    batch = next(source.train)
    if len(train_batches) < q['distill_steps']:
      train_batches.append(batch['inputs'])
    state, metrics = trainer.train_step(state, batch)
  train_loss = float(jax.device_get(metrics['loss']))
  train_s = time.perf_counter() - t0
  model = nnx.merge(trainer.graphdef, state['params'])
  t0 = time.perf_counter()
  gates, losses = seer_distill.distill_decoder_lm(
      model, lambda i: jnp.asarray(train_batches[i % len(train_batches)]),
      block_size=q['block'], num_steps=q['distill_steps'],
      learning_rate=q['distill_learning_rate'])
  distill_s = time.perf_counter() - t0
  batches = source.eval_batches()
  n = -(-q['seq_len'] // q['block'])
  causal_blocks = n * (n + 1) / 2
  evals = [('dense', None, lambda: float(
      trainer.evaluate(state['params'], batches)['accuracy']))]
  for k in q['top_ks']:
    if k > n:
      continue
    evaluator = train_lib.Trainer(
        _quality_config(q, moba_variant_name(q['block'], k)), source.info)
    evals.append((f'moba_k{k}', k, lambda e=evaluator: float(
        e.evaluate(state['params'], batches)['accuracy'])))
    seer_fn = jax.jit(functools.partial(seer_distill.decoder_lm_sparse_logits,
                                        model, gates, top_k=k))
    evals.append((f'seer_attention_k{k}', k,
                  lambda f=seer_fn: _accuracy(f, batches)))
  rows, dense_acc = [], None
  for name, k, evaluate in evals:
    t1 = time.perf_counter()
    acc = evaluate()
    listed = causal_blocks if k is None else sum(min(j + 1, k) for j in range(n))
    dense_acc = acc if dense_acc is None else dense_acc
    rows.append(dict(
        section='quality', name=name,
        accuracy_points_vs_dense=100 * (acc - dense_acc),
        within_5_points=bool(100 * (dense_acc - acc) <= TARGETS['quality_points']),
        accuracy=acc, block_density=listed / (n * n),
        causal_block_fraction=listed / causal_blocks, top_k=k or n,
        block=q['block'], seq_len=q['seq_len'], train_steps=q['steps'],
        train_loss=train_loss, train_s=train_s, distill_steps=q['distill_steps'],
        distill_loss_first=float(losses[0]), distill_loss_last=float(losses[-1]),
        distill_s=distill_s, eval_s=time.perf_counter() - t1))
  return rows


def run(suite: str, workdir: str, parts: Sequence[str] = ('timing', 'quality')
       ) -> list[dict[str, Any]]:
  """Rows of the timing and / or quality parts (see the module docstring)."""
  del workdir
  common.check_suite(suite)
  unknown = [p for p in parts if p not in ('timing', 'quality')]
  if unknown or not parts:
    raise ValueError(f"parts must be a non-empty subset of ('timing', 'quality'), "
                     f'got {list(parts)}.')
  cfg = SUITES[suite]
  rows = []
  if 'timing' in parts:
    rows += timing_rows(cfg)
  if 'quality' in parts:
    rows += quality_rows(cfg['quality'])
  return rows


def run_and_write(suite: str, workdir: str, parts: Sequence[str]
                 ) -> list[dict[str, Any]]:
  """`run`, then <workdir>/routing[_part].json / .csv / .md (this module's entry)."""
  from experiments import benchmark  # pylint: disable=g-import-not-at-top
  from experiments import benchmark_report  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  rows = run(suite, workdir, parts)
  topic = 'routing' if len(set(parts)) == 2 else f'routing_{parts[0]}'
  benchmark.write_rows(workdir, topic, rows)
  seconds = time.perf_counter() - start
  text = (f'# routing ({", ".join(parts)}), suite={suite}, {seconds:.1f} s\n\n' +
          benchmark_report.topic_markdown(topic, rows, workdir, seconds))
  with open(os.path.join(workdir, f'{topic}.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  return rows


def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {argv[1:]}')
  fv = flags.FLAGS
  run_and_write(fv.suite, fv.workdir or '/tmp/attnlab_bench', fv.parts)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  # experiments.benchmark defines --suite and --workdir.
  from experiments import benchmark as _benchmark  # pylint: disable=g-import-not-at-top,unused-import
  flags.DEFINE_list('parts', ['timing', 'quality'],
                    "Parts to run: 'timing', 'quality'.")
  app.run(main)
