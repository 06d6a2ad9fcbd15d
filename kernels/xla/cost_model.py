"""Time model of the plans the blocked XLA attention runs: counted work x constants.

The xla path (`kernels.xla.attention`) runs a static plan: per set of query heads
sharing one block structure, lane groups of query blocks (forward) or kv blocks
(backward), each group one step per FULL and one per PARTIAL tile (or kv chunk), every
lane of a group computing every step (padding lanes too), at the tiling `tiling_for` /
`bwd_tiling_for` chose, in the step form `_auto_fused` chose. This module rebuilds that
plan exactly as `attention` does, walks its lists and counts the work one call does:

    calls          passes (fixed cost: dispatch, layout copies' setup)
    steps          loop bodies run (inner tile steps and outer lane-group steps)
    big_dot_flops  FLOPs of tile dots XLA:CPU runs on every core (per batch item at
                   least `_THREADED_DOT` multiply-adds, or the fused step's calls)
    small_dot_flops  FLOPs of the other tile dots (one core)
    logits         logit elements passing through the softmax's elementwise work
                   (static path: tiles of one step, fused with their dots)
    masked_logits  logit elements a bitmap / validity mask is gathered and applied to
    traced_logits  logit elements of the traced path's elementwise work (mask, exp,
                   sums over all rows of a step at once: arrays beyond the caches)
    reduced_logits score elements a router reduces outside the attention (a masked
                   row max / any over a q k^T product it materialises: AnchorAttention's
                   anchors and stripes), unfused with the dot that makes them
    permuted_elements  elements of q, k, v and the output (and, backward, of their
                   cotangents) a token permutation around the attention moves
                   (BiFormer's regions, VMoBA's cells): a gather of the whole array
    bytes          bytes copied: tile gathers, index gathers, layout copies, dQ updates

and predicts time = sum_i work_i x seconds_per_unit_i with per-machine constants
(`Constants`) fitted by `fit` (non-negative least squares on relative error) to a few
timed calls on the current machine. The same counts are made for the traced
`DynamicBlockMask` path from the concrete lists of one mask (`traced_work`), and for
the work a routed call does around the attention: its router (`routing_work`,
`anchor_routing_work`) and a token permutation (`permutation_work`).

Forward and backward are counted separately; `jax.grad` of the custom_vjp runs the
forward once and then the backward, so a forward+backward call is their sum.
"""

from __future__ import annotations

# This module mirrors the private planning functions of kernels.xla.
# pylint: disable=protected-access

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from attention.masks import base as masks_base
from attention.masks import dynamic as masks_dynamic
from kernels.xla import plan as plan_lib
from kernels.xla import tiling

FIELDS = ('calls', 'steps', 'fused_dot_flops', 'big_dot_flops', 'small_dot_flops',
          'bwd_dot_flops', 'traced_dot_flops', 'logits', 'masked_logits',
          'traced_logits', 'reduced_logits', 'permuted_elements',
          'bytes')


@dataclasses.dataclass(frozen=True)
class Work:
  """Counted work of one pass (see the module docstring for each field)."""
  calls: float = 0.0
  steps: float = 0.0
  fused_dot_flops: float = 0.0
  big_dot_flops: float = 0.0
  small_dot_flops: float = 0.0
  bwd_dot_flops: float = 0.0
  traced_dot_flops: float = 0.0
  logits: float = 0.0
  masked_logits: float = 0.0
  traced_logits: float = 0.0
  reduced_logits: float = 0.0
  permuted_elements: float = 0.0
  bytes: float = 0.0

  def __add__(self, other: 'Work') -> 'Work':
    return Work(*(getattr(self, f) + getattr(other, f) for f in FIELDS))

  def scaled(self, factor: float) -> 'Work':
    return Work(*(getattr(self, f) * factor for f in FIELDS))

  def vector(self) -> np.ndarray:
    return np.asarray([getattr(self, f) for f in FIELDS], np.float64)

  def as_dict(self) -> dict[str, float]:
    return {f: float(getattr(self, f)) for f in FIELDS}


@dataclasses.dataclass(frozen=True)
class Constants:
  """Seconds per unit of each `Work` field on one machine (from `fit`)."""
  calls: float = 0.0
  steps: float = 0.0
  fused_dot_flops: float = 0.0
  big_dot_flops: float = 0.0
  small_dot_flops: float = 0.0
  bwd_dot_flops: float = 0.0
  traced_dot_flops: float = 0.0
  logits: float = 0.0
  masked_logits: float = 0.0
  traced_logits: float = 0.0
  reduced_logits: float = 0.0
  permuted_elements: float = 0.0
  bytes: float = 0.0

  def vector(self) -> np.ndarray:
    return np.asarray([getattr(self, f) for f in FIELDS], np.float64)

  def as_dict(self) -> dict[str, float]:
    return {f: float(getattr(self, f)) for f in FIELDS}


def predict(work: Work, constants: Constants) -> float:
  """Predicted seconds of `work` (sum over its counts of count x seconds per unit)."""
  if not isinstance(work, Work):
    raise TypeError(f'work must be a Work, got {type(work).__name__}.')
  if not isinstance(constants, Constants):
    raise TypeError(f'constants must be Constants, got {type(constants).__name__}.')
  return float(work.vector() @ constants.vector())


@dataclasses.dataclass(frozen=True)
class Fit:
  """Result of `fit`: the constants and how well they reproduce the timings."""
  constants: Constants
  rank: int  # rank of the design matrix (len(FIELDS): every constant identified)
  max_rel_err: float  # max |predicted / measured - 1| over the fitted timings
  rel_errs: tuple[float, ...]


def fit(works: Sequence[Work], seconds: Sequence[float]) -> Fit:
  """Constants minimising sum_i ((predicted_i - t_i) / t_i)^2 subject to >= 0.

  Relative error makes small and large calls count alike. Needs at least as many
  timings as `Work` fields; `Fit.rank` < len(FIELDS) means some constants are not
  identified by these timings (non-negative least squares then sets them as small as
  the others allow).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  works, seconds = list(works), list(seconds)
  if len(works) != len(seconds):
    raise ValueError(f'works and seconds must have the same length, got '
                     f'{len(works)} and {len(seconds)}.')
  if len(works) < len(FIELDS):
    raise ValueError(f'works must hold at least {len(FIELDS)} timed calls (one per '
                     f'constant), got {len(works)}.')
  for w in works:
    if not isinstance(w, Work):
      raise TypeError(f'works must hold Work, got {type(w).__name__}.')
  t = np.asarray(seconds, np.float64)
  if not np.all(np.isfinite(t)) or np.any(t <= 0):
    raise ValueError(f'seconds must be finite and > 0, got {seconds}.')
  x = np.stack([w.vector() for w in works])  # [R, F]
  if np.any(x < 0):
    raise ValueError('works must have non-negative counts.')
  scale = x.max(axis=0)
  scale = np.where(scale > 0, scale, 1.0)
  a = x / scale / t[:, None]  # relative-error rows, columns on one scale
  coef, _ = optimize.nnls(a, np.ones_like(t), maxiter=50 * a.shape[1])
  coef = coef / scale
  rank = int(np.linalg.matrix_rank(x / scale))
  rel = tuple(float(v) for v in x @ coef / t - 1.0)
  return Fit(Constants(*coef), rank, float(np.max(np.abs(rel))), rel)


# ----------------------------------------------------------------------------------------
# The static plan of kernels/xla.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class StaticPlan:
  """The plans `kernels.xla.attention` builds for one call (its choices, its cache)."""
  fwd: plan_lib._Plan
  bwd: plan_lib._Plan  # the backward's plan (`fwd` when the tiles are the same)
  fused: bool
  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  value_dim: int
  itemsize: int


def _positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def _check_heads(num_heads: int, num_kv_heads: int) -> None:
  if num_heads % num_kv_heads:
    raise ValueError(f'num_kv_heads must divide num_heads ({num_heads}), got '
                     f'{num_kv_heads}.')


def static_plan(mask_obj: masks_base.Mask | None, *, batch: int, q_len: int,
                kv_len: int, num_heads: int, num_kv_heads: int | None = None,
                head_dim: int = 64, value_dim: int | None = None,
                itemsize: int = 4, block_q: int | None = None,
                block_kv: int | None = None, kv_chunk: int | None = None,
                lanes: int | None = None, bwd_block_q: int | None = None,
                bwd_block_kv: int | None = None,
                fused: bool | None = None) -> StaticPlan:
  """The forward / backward plans `kernels.xla.attention` runs for these shapes.

  Mirrors its choices: `tiling_for` / `bwd_tiling_for` tiles, `_make_plan` lists and
  lanes (both cached, so this is the very plan object the kernel uses), `_auto_fused`
  step form. `mask_obj` is the problem's static mask (causal folded in) or None.
  """
  batch = _positive('batch', batch)
  q_len, kv_len = _positive('q_len', q_len), _positive('kv_len', kv_len)
  num_heads = _positive('num_heads', num_heads)
  num_kv_heads = _positive('num_kv_heads',
                           num_heads if num_kv_heads is None else num_kv_heads)
  _check_heads(num_heads, num_kv_heads)
  head_dim = _positive('head_dim', head_dim)
  value_dim = _positive('value_dim', head_dim if value_dim is None else value_dim)
  itemsize = _positive('itemsize', itemsize)
  tiling._check_mask_obj(mask_obj, q_len, kv_len)
  opts = [tiling._check_block_arg(n, v) for n, v in (
      ('block_q', block_q), ('block_kv', block_kv), ('kv_chunk', kv_chunk),
      ('lanes', lanes), ('bwd_block_q', bwd_block_q), ('bwd_block_kv', bwd_block_kv))]
  block_q, block_kv, kv_chunk, lanes, bwd_block_q, bwd_block_kv = opts
  if fused is not None and not isinstance(fused, bool):
    raise TypeError(f'fused must be a bool or None, got {type(fused).__name__}.')
  bq, bk, chunk = tiling._auto_tiling(q_len, kv_len, mask_obj, block_q, block_kv,
                                      kv_chunk, head_dim)
  bwd_q, bwd_kv = tiling._auto_bwd_tiling(q_len, kv_len, (bq, bk, chunk),
                                          bwd_block_q, bwd_block_kv)
  structure = (mask_obj if mask_obj is not None else
               plan_lib._AllVisible((q_len, kv_len)))
  fwd = plan_lib._make_plan(structure, num_heads, num_kv_heads, bq, bk,
                            batch * num_heads, lanes, chunk)
  bwd = fwd
  if (bwd_q, bwd_kv) != (bq, bk) or chunk != 1:
    bwd = plan_lib._make_plan(structure, num_heads, num_kv_heads, bwd_q, bwd_kv,
                              batch * num_heads, lanes, 1)
  if fused is None:
    fused = tiling._auto_fused(bq, bk, chunk, head_dim,
                               group=num_heads // num_kv_heads,
                               batch_items=batch * num_kv_heads)
  return StaticPlan(fwd=fwd, bwd=bwd, fused=fused, batch=batch, q_len=q_len,
                    kv_len=kv_len, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    head_dim=head_dim, value_dim=value_dim, itemsize=itemsize)


@dataclasses.dataclass(frozen=True)
class StepCounts:
  """Steps of one pass of a static plan, summed over its head groups.

  full / partial: loop steps over FULL / PARTIAL tiles (or kv chunks); each runs
  every lane of its group. lane_steps: lane-steps with real work; padding_lane_steps:
  lane-steps a lane computes and discards (its row has fewer steps than the group's
  longest, or it is a padding lane). groups: outer lane-group steps.
  """
  full: int
  partial: int
  lane_steps: int
  padding_lane_steps: int
  groups: int


def _pass_lists(plan: plan_lib._Plan, which: str):
  if which not in ('fwd', 'bwd'):
    raise ValueError(f"which must be 'fwd' or 'bwd', got {which!r}.")
  return [(grp, getattr(grp, which)) for grp in plan.groups]


def step_counts(plan: plan_lib._Plan, which: str) -> StepCounts:
  """Step counts of the forward ('fwd') or backward ('bwd') lists of a plan."""
  full = part = real = groups = lanes_total = 0
  for _, lists in _pass_lists(plan, which):
    g, c = lists.order.shape
    trips = lists.full_trips.astype(np.int64) + lists.part_trips
    full += int(lists.full_trips.sum())
    part += int(lists.part_trips.sum())
    rows = int(plan.num_q_blocks if which == 'fwd' else plan.num_kv_blocks)
    # Real lane-steps: each row's own list lengths (rows padded with `rows` have none).
    owned = lists.order < rows
    if lists.full_valid is not None:
      real_full = lists.full_valid.sum(axis=1)  # [G, C]
    else:
      real_full = np.where(owned, lists.full_trips[:, None], 0)
    empty = (plan.chunk_bitmaps if which == 'fwd' else plan.bitmaps).shape[0] - 1
    real_part = _real_partial(lists, rows, empty)
    real += int(real_full.sum() + real_part.sum())
    lanes_total += int((trips[:, None] * np.ones((1, c), np.int64)).sum())
    groups += g
  return StepCounts(full=full, partial=part, lane_steps=real,
                    padding_lane_steps=lanes_total - real, groups=groups)


def _real_partial(lists: plan_lib._Lists, rows: int, empty: int) -> np.ndarray:
  """Real PARTIAL lane-steps [G, C]: padding steps read the all-False bitmap `empty`.

  (`_build_lists` pads a PARTIAL list by repeating its last column with that bitmap;
  a real PARTIAL tile or chunk always has a visible position.)
  """
  a = lists.part_cols.shape[1]
  step = np.arange(a)[None, :, None]
  within = step < lists.part_trips[:, None, None]
  real = within & (lists.part_bitmap != empty)
  out = real.sum(axis=1)
  return np.where(lists.order < rows, out, 0)


def _is_big(rows: int, width: int, inner: int) -> bool:
  """Whether XLA:CPU runs a dot of this per-batch-item shape on every core."""
  return rows * width * inner >= tiling._THREADED_DOT


def _forward_work(sp: StaticPlan) -> Work:
  plan = sp.fwd
  b, h, hv, isz = sp.batch, sp.head_dim, sp.value_dim, sp.itemsize
  bq, width = plan.block_q, plan.kv_chunk * plan.block_kv
  work = Work(calls=1.0, bytes=float(isz * (
      b * plan.num_q_blocks * bq * sp.num_heads * (h + 2 * hv) +  # q in, out + copy
      2 * b * sp.kv_len * sp.num_kv_heads * (h + hv + 1))))  # k, v layout copies
  for grp, lists in _pass_lists(plan, 'fwd'):
    g, c = lists.order.shape
    ku, gu = len(grp.kv_heads), grp.group_size
    steps = int(lists.full_trips.sum() + lists.part_trips.sum())
    partial = int(lists.part_trips.sum())
    items = c * b * ku  # batch items of one step's dots
    rows = gu * bq
    elements = float(items * rows * width)  # logits of one step
    # Plain step: S = Q K^T, then P [V, 1]; fused: a second Q K^T for the row max.
    flops = elements * (2.0 * h * (2 if sp.fused else 1) + 2.0 * (hv + 1)) * steps
    kind = ('fused_dot_flops' if sp.fused else
            'big_dot_flops' if _is_big(rows, width, h) else 'small_dot_flops')
    passes = 2.0 if sp.fused else 1.0
    masked = partial + (0 if lists.full_valid is None else
                        int(lists.full_trips.sum()))
    loops = sum(int(not (tr == tr[0]).all()) for tr in
                (lists.full_trips, lists.part_trips) if tr.size)
    # k / v tiles gathered per step and query tiles per lane-group step, of the
    # group's heads. `_Tiles.kv` / `_q_tiles` slice every head before taking the
    # group's, but counting all of them over-predicted per-head structures 1.3-1.7x
    # in one (busy) run: XLA presumably folds the take into the gather.
    work = work + Work(
        steps=float(steps + g + loops * g), logits=passes * elements * steps,
        masked_logits=passes * elements * masked,
        bytes=float(isz * (steps * items * width * (h + hv + 1) +
                           g * items * rows * (h + hv)))) + Work(**{kind: flops})
  return work


def _backward_work(sp: StaticPlan) -> Work:
  plan = sp.bwd
  b, h, hv, isz = sp.batch, sp.head_dim, sp.value_dim, sp.itemsize
  bq, bk = plan.block_q, plan.block_kv
  t_pad = plan.num_q_blocks * bq
  s_pad = plan.num_kv_blocks * bk
  work = Work(calls=1.0, bytes=float(isz * (
      b * t_pad * sp.num_heads * (2 * h + 3 * hv + 2) +  # q, dO blocks, delta, dq out
      b * s_pad * sp.num_kv_heads * 2 * (h + hv))))  # k, v blocks, dk, dv out
  for grp, lists in _pass_lists(plan, 'bwd'):
    g, c = lists.order.shape
    ku, gu = len(grp.kv_heads), grp.group_size
    steps = int(lists.full_trips.sum() + lists.part_trips.sum())
    partial = int(lists.part_trips.sum())
    items = c * b * ku
    rows = gu * bq
    elements = float(items * rows * bk)
    masked = partial + (0 if lists.full_valid is None else
                        int(lists.full_trips.sum()))
    # S = K Q^T, dV += P^T dO, dP = V dO^T, dK += dS Q, dQ^T += K^T dS.
    flops = elements * 2.0 * (3 * h + 2 * hv) * steps
    work = work + Work(
        steps=float(steps + g), bwd_dot_flops=flops,
        logits=3.0 * elements * steps,  # exp, dS, their products
        masked_logits=elements * masked,
        bytes=float(isz * (steps * items * rows * (3 * h + hv + 2) +  # q, dO, dq rmw
                           g * items * bk * 2 * (h + hv))))
  return work


def static_work(sp: StaticPlan, backward: bool = False) -> Work:
  """Work of the forward (or, with `backward`, forward + backward) of a static plan."""
  if not isinstance(sp, StaticPlan):
    raise TypeError(f'sp must be a StaticPlan, got {type(sp).__name__}.')
  work = _forward_work(sp)
  return work + _backward_work(sp) if backward else work


# ----------------------------------------------------------------------------------------
# The traced (DynamicBlockMask) path of kernels/xla (kernels/xla/dynamic.py).
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TracedSteps:
  """Slot-loop steps of the traced path for one concrete mask.

  rows: (batch, head unit, q block) rows; unit: query heads sharing one row's tile;
  chunks: row chunks (outer steps); steps: slot steps summed over chunks (each the
  largest count among the chunk's rows); row_steps: steps x rows of their chunk
  (tiles computed, padding slots included); listed: tiles actually listed.
  """
  rows: int
  unit: int
  chunks: int
  rows_per_chunk: int
  steps: int
  row_steps: int
  listed: int


def default_rows_per_step(dyn: masks_dynamic.DynamicBlockMask, *, num_heads: int,
                          num_kv_heads: int) -> int:
  """The rows per slot step `kernels.xla.dynamic.attention` uses by default."""
  from kernels.xla import dynamic  # pylint: disable=g-import-not-at-top
  cfg = dynamic._Config(
      scale=1.0, soft_cap=None, dropout_rate=0.0, q_len=dyn.q_len, kv_len=dyn.kv_len,
      block_q=dyn.block_q, block_kv=dyn.block_kv, num_heads=num_heads,
      kv_heads=num_kv_heads, list_batch=dyn.batch, list_heads=dyn.num_heads,
      inner=dyn.inner)
  return int(dynamic.default_rows_per_step(cfg))


def traced_steps(dyn: masks_dynamic.DynamicBlockMask, *, batch: int, num_heads: int,
                 num_kv_heads: int | None = None,
                 rows_per_step: int | None = None) -> TracedSteps:
  """Steps the traced xla path runs on the concrete lists of `dyn`.

  Rows x = (b, unit, q block) in that order, a unit being the gcd(N / Hm, N / K)
  consecutive query heads that read one list row and one kv head; with more than one
  chunk the rows are ordered by list count (stable), then advance together
  `rows_per_step` at a time (None: the kernel's default,
  `kernels.xla.dynamic.default_rows_per_step`), each chunk for as many slots as its
  longest list.
  """
  if not isinstance(dyn, masks_dynamic.DynamicBlockMask):
    raise TypeError(f'dyn must be a DynamicBlockMask, got {type(dyn).__name__}.')
  batch = _positive('batch', batch)
  num_heads = _positive('num_heads', num_heads)
  num_kv_heads = _positive('num_kv_heads',
                           num_heads if num_kv_heads is None else num_kv_heads)
  _check_heads(num_heads, num_kv_heads)
  dyn.check(batch, num_heads, dyn.q_len, dyn.kv_len)
  if rows_per_step is None:
    rows_per_step = default_rows_per_step(dyn, num_heads=num_heads,
                                          num_kv_heads=num_kv_heads)
  rows_per_step = _positive('rows_per_step', rows_per_step)
  if isinstance(dyn.kv_counts, jax.core.Tracer):
    raise ValueError('dyn must be concrete (its lists computed, not traced) to count '
                     'the steps it runs.')
  counts = np.asarray(dyn.kv_counts)  # [Bm, Hm, nq]
  hm, nq = dyn.num_heads, dyn.num_q_blocks
  unit = int(np.gcd(num_heads // hm, num_heads // num_kv_heads))
  units = num_heads // unit
  list_row = (np.arange(units) * unit) // (num_heads // hm)  # [units]
  per_b = counts[np.minimum(np.arange(batch), counts.shape[0] - 1)]  # [B, Hm, nq]
  row_counts = per_b[:, list_row, :].reshape(-1).astype(np.int64)  # [X]
  rows = row_counts.size
  step = min(rows_per_step, rows)
  chunks = -(-rows // step)
  padded = np.zeros(chunks * step, np.int64)
  padded[:rows] = np.sort(row_counts, kind='stable') if chunks > 1 else row_counts
  trips = padded.reshape(chunks, step).max(axis=1)
  return TracedSteps(rows=rows, unit=unit, chunks=chunks, rows_per_chunk=step,
                     steps=int(trips.sum()), row_steps=int(trips.sum() * step),
                     listed=int(row_counts.sum()))


def traced_work(dyn: masks_dynamic.DynamicBlockMask, *, batch: int, num_heads: int,
                num_kv_heads: int | None = None, head_dim: int = 64,
                value_dim: int | None = None, itemsize: int = 4,
                rows_per_step: int | None = None, backward: bool = False) -> Work:
  """Work of the traced xla path's forward (+ backward) on the concrete `dyn`.

  Every slot step of a chunk computes a [u * bq, bk] tile for each of its rows
  (padding slots too, masked), gathering the listed key / value blocks; every logit
  passes the validity mask. The backward repeats the slot loop with five dots per
  tile and scatter-adds dK / dV.
  """
  st = traced_steps(dyn, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                    rows_per_step=rows_per_step)
  num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
  h = _positive('head_dim', head_dim)
  hv = _positive('value_dim', h if value_dim is None else value_dim)
  isz = _positive('itemsize', itemsize)
  bq, bk = dyn.block_q, dyn.block_kv
  nq, nk = dyn.num_q_blocks, dyn.num_kv_blocks
  rows = st.unit * bq  # query rows of one tile
  elements = float(st.row_steps * rows * bk)
  tile_bytes = float(st.row_steps * bk * (h + hv) * isz)  # gathered k, v tiles
  inner_bytes = 0.0
  inner = dyn.inner
  if inner is not None and type(inner) is not masks_base.Causal:  # pylint: disable=unidiomatic-typecheck
    inner_bytes = float(st.row_steps * (st.unit if inner.head_dependent else 1) *
                        bq * bk)  # bitmap gathers (bool)
  layout = float(isz * (batch * nq * bq * num_heads * (h + hv) +
                        2 * batch * nk * bk * num_kv_heads * (h + hv)))
  work = Work(calls=1.0, steps=float(st.steps + st.chunks),
              traced_dot_flops=elements * 2.0 * (h + hv), traced_logits=elements,
              bytes=layout + tile_bytes + inner_bytes)
  if backward:
    work = work + Work(
        calls=1.0, steps=float(st.steps + st.chunks),
        traced_dot_flops=elements * 2.0 * (3 * h + 2 * hv),
        traced_logits=3.0 * elements,
        bytes=layout * 2.0 + 3.0 * tile_bytes + inner_bytes)  # + dK / dV scatter
  return work


def routing_work(*, batch: int, q_len: int, kv_len: int, num_heads: int,
                 num_kv_heads: int, head_dim: int, list_heads: int,
                 num_q_blocks: int, num_kv_blocks: int, budget: int,
                 itemsize: int = 4) -> Work:
  """Work of a block router: pool q and k once, score [B, Hm, nq, nk], pick `budget`.

  A generic count for pooled-gate routers (MoBA, SeerAttention, BiFormer): one
  read of q and k, the block-score dot, and the top-k / one-hot scatter / compaction
  of `attention.masks.dynamic` (about budget + 2 passes over the score matrix).
  """
  vals = [_positive(n, v) for n, v in (
      ('batch', batch), ('q_len', q_len), ('kv_len', kv_len),
      ('num_heads', num_heads), ('num_kv_heads', num_kv_heads),
      ('head_dim', head_dim), ('list_heads', list_heads),
      ('num_q_blocks', num_q_blocks), ('num_kv_blocks', num_kv_blocks),
      ('budget', budget), ('itemsize', itemsize))]
  b, t, s, n, kh, h, hm, nq, nk, k, isz = vals
  scores = float(b * hm * nq * nk)
  return Work(steps=0.0, small_dot_flops=2.0 * scores * h,
              logits=scores * (k + 2),
              bytes=float(isz * b * (t * n + s * kh) * h))


def masked_reduce_work(*, batch: int, rows: int, cols: int, head_dim: int,
                       itemsize: int = 4) -> Work:
  """Work of a router's q k^T product [batch, rows, cols] reduced over a mask.

  `batch` counts the dot's batch items (batch x heads x groups); one read of the q and
  k rows, the dot (on every core when big enough, as `_is_big`), and every product
  element through the masked reduction (`reduced_logits`; about 2 ns per element on
  XLA:CPU, against 0.1-0.3 ns for the attention kernels' own masked logits).
  """
  b, r, c, h, isz = (_positive(n, v) for n, v in (
      ('batch', batch), ('rows', rows), ('cols', cols), ('head_dim', head_dim),
      ('itemsize', itemsize)))
  elements = float(b * r * c)
  kind = 'big_dot_flops' if _is_big(r, c, h) else 'small_dot_flops'
  return Work(reduced_logits=elements, bytes=float(isz * b * (r + c) * h),
              **{kind: 2.0 * h * elements})


def anchor_routing_work(*, batch: int, q_len: int, num_heads: int, head_dim: int,
                        group_size: int, sub_block: int, num_init: int,
                        itemsize: int = 4) -> Work:
  """Work of AnchorAttention's selection ("AnchorAttention", Zhang et al., 2025).

  As `attention.routing.anchor_attention.stripe_keys`: anchors from the scores of every
  query with the initial keys [T, init] and with its own group [G, g, g] (masked row
  max), then the sub-block mean queries' scores with every key [G * U, S] compared
  with the mean anchors and reduced (any) over the sub-blocks.
  """
  b, t, n, h, g, u, ni = (_positive(k, v) for k, v in (
      ('batch', batch), ('q_len', q_len), ('num_heads', num_heads),
      ('head_dim', head_dim), ('group_size', group_size), ('sub_block', sub_block),
      ('num_init', num_init)))
  ni = min(ni, t)
  common = dict(head_dim=h, itemsize=itemsize)
  return (masked_reduce_work(batch=b * n, rows=t, cols=ni, **common) +
          masked_reduce_work(batch=b * n * (t // g), rows=g, cols=g, **common) +
          masked_reduce_work(batch=b * n, rows=t // u, cols=t, **common))


def permutation_work(*, batch: int, q_len: int, num_heads: int, num_kv_heads: int,
                     head_dim: int, value_dim: int | None = None,
                     backward: bool = False) -> Work:
  """Work of a token permutation around the attention (BiFormer's regions, VMoBA's
  cells): q, k, v gathered into the permuted order and the output back; the
  backward moves dO, dQ, dK, dV alike.

  Counted per element (`permuted_elements`): on XLA:CPU the permutation around the
  static attention added 0.3-0.7 ns per element (side-by-side, busy 2-core machine,
  T = 1024-4096, N = 8, H = 64; 1.1 ns in a quiet run's fit), though the gathers
  alone take under 0.1 ns: several times its bytes' worth.
  """
  b, t, n, kh, h = (_positive(k, v) for k, v in (
      ('batch', batch), ('q_len', q_len), ('num_heads', num_heads),
      ('num_kv_heads', num_kv_heads), ('head_dim', head_dim)))
  hv = _positive('value_dim', h if value_dim is None else value_dim)
  once = float(b * t * (n * h + kh * h + kh * hv + n * hv))
  return Work(permuted_elements=once * (2.0 if backward else 1.0))
