"""Shared plumbing of the Pallas block-sparse flash-attention kernels.

Both kernels (`kernels.pallas.tpu`, `kernels.pallas.gpu`) implement FlashAttention-2
(Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning") restricted to the active tiles of a compiled `BlockMask`, the same
block-sparse scheme as JAX's splash attention. This module owns what does not depend
on the hardware: which mask arrays join the BlockMask and which become bias tiles,
the static plan (the BlockMask turned into int32 scalar tables) or, for a traced
`DynamicBlockMask`, the dynamic plan (traced kv-block lists plus the inner mask's
static per-tile tables), the table look-ups both kernels share, padding and layout,
the `custom_vjp` wiring, the per-tile math both kernels share (soft-cap, score_mod and
its vjp, the dropout multiplier), the parts of the backward pass that are cheap
elementwise XLA (delta = rowsum(o * do) - dlse, the sink gradient, summing per-program
bias / score_mod-parameter gradient partials), and the score_mod lowering check.

Layout inside the kernels: q/out/do [B, N, T_pad, H], k/v [B, K, S_pad, H]; query head
n reads kv head n // G (G = N // K) through the index maps, so k/v are never repeated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from attention.masks import base as masks_base
from attention.masks import block as masks_block
from attention.masks import dynamic as masks_dynamic
from attention.masks import static as masks_static
from kernels import problem as problem_lib
from kernels._arrays import pad_axis  # pylint: disable=unused-import (used as common.pad_axis)

# Finite stand-in for -inf inside the kernels (as splash attention): exp() of it is 0
# and max() with it stays finite, so no NaN appears in fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# Every query sees every key (used when only padding needs masking).
FullMask = masks_static.Full


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def static_mask_array(mask: Any) -> bool:
  """Whether a dense `mask` array can be compiled into the BlockMask.

  It must be concrete (not traced) and batch-independent; other mask arrays are
  applied in-kernel as an additive 0 / -inf bias tile (O(T * S) memory).
  """
  return mask is not None and not _is_tracer(mask) and mask.shape[0] == 1


def check_interpret(interpret: Any, backend: str) -> bool:
  """`interpret` as a bool; None means: interpret unless on `backend`."""
  if interpret is None:
    return jax.default_backend() != backend
  if not isinstance(interpret, (bool, np.bool_)):
    raise TypeError(
        f'interpret must be a bool or None, got {type(interpret).__name__}.')
  return bool(interpret)


def effective_mask(mask_obj: masks_base.Mask | None, mask: Any, t: int, s: int,
                   n: int) -> masks_base.Mask:
  """One static Mask: mask_obj AND the dense mask array if it is static."""
  result = mask_obj
  if static_mask_array(mask):
    dense = np.asarray(mask, dtype=bool)[0]  # [N or 1, T or 1, S or 1]
    if dense.shape[0] == 1:
      dense = np.broadcast_to(dense[0], (t, s))
    else:
      dense = np.broadcast_to(dense, (n, t, s))
    dense_mask = masks_base.from_array(np.ascontiguousarray(dense))
    result = dense_mask if result is None else result & dense_mask
  return FullMask((t, s)) if result is None else result


def _forward_fill(part: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Bitmap block to fetch at each step: the partial index, else the previous one.

  FULL tiles and padding steps reuse the last fetched bitmap block so a pipelined
  kernel issues no new copy for them (the block index does not change).
  """
  out = np.zeros_like(part)
  last = np.zeros(part.shape[:-1], dtype=part.dtype)
  for j in range(part.shape[-1]):
    cur = part[..., j]
    last = np.where((cur >= 0) & (j < counts), cur, last)  # counts: [..., rows]
    out[..., j] = last
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """Static per-call tables derived from a BlockMask (NumPy; hashed by identity).

  Tables are per unique head pattern (row `head_map[n]` serves query head n), as in
  the BlockMask: forward / dq lists [U, nq, A], dk/dv lists [U, nk, Aq]. `*_part` is
  the bitmap index (-1 = FULL) and `*_fetch` the bitmap block to fetch at each step
  (see `_forward_fill`).
  """
  block_mask: masks_block.BlockMask
  num_heads: int
  head_map: np.ndarray  # int32 [N]
  kv_indices: np.ndarray
  kv_counts: np.ndarray
  kv_part: np.ndarray
  kv_fetch: np.ndarray
  q_indices: np.ndarray
  q_counts: np.ndarray
  q_part: np.ndarray
  q_fetch: np.ndarray
  partial_masks: np.ndarray  # bool [P, bq, bk], P >= 1
  has_partial: bool

  @property
  def block_q(self) -> int:
    return self.block_mask.block_q

  @property
  def block_kv(self) -> int:
    return self.block_mask.block_kv

  @property
  def padded_q_len(self) -> int:
    return self.block_mask.padded_q_len

  @property
  def padded_kv_len(self) -> int:
    return self.block_mask.padded_kv_len

  def tables(self, which: str) -> list[np.ndarray]:
    """[head_map, indices, counts, part, fetch] for 'kv' (fwd, dq) or 'q' (dk/dv)."""
    return [self.head_map] + [getattr(self, f'{which}_{name}') for name in
                              ('indices', 'counts', 'part', 'fetch')]

  def table_bytes(self) -> int:
    """Bytes of int32 scalar tables one kernel prefetches (the larger direction)."""
    return 4 * max(sum(a.size for a in self.tables(w)) for w in ('kv', 'q'))

  # ----- the interface the kernels use (shared with `DynamicPlan`) -----
  # `which` is 'kv' (forward, dq: rows are q blocks, steps walk kv blocks) or 'q'
  # (dk/dv: rows are kv blocks, steps walk q blocks); `t` are the five tables of
  # `kernel_tables` as refs (scalar-prefetch refs on TPU, whole-array refs on GPU).
  has_empty = False  # every listed tile is computed

  @property
  def needs_part(self) -> bool:
    """Whether a step must read its tile class (bitmap index / FULL / EMPTY)."""
    return self.has_partial

  def steps(self, which: str) -> int:
    return getattr(self, f'{which}_indices').shape[-1]

  def kernel_tables(self, which: str, opt) -> list[jax.Array]:
    del opt
    return [jnp.asarray(a) for a in self.tables(which)]

  def block(self, which, t, b, n, i, j):
    """Block index (kv block for 'kv', q block for 'q') of step j of row i."""
    del which, b
    return t[1][t[0][n], i, j]

  def count(self, which, t, b, n, i):
    del which, b
    return t[2][t[0][n], i]

  def part(self, which, t, b, n, i, j):
    """Tile class of step j: bitmap index (PARTIAL) or FULL_TILE."""
    del which, b
    return t[3][t[0][n], i, j]

  def fetch(self, which, t, b, n, i, j):
    """Bitmap block a pipelined kernel fetches at step j (see `_forward_fill`)."""
    del which, b
    return t[4][t[0][n], i, j]


@functools.lru_cache(maxsize=128)
def make_plan(mask: masks_base.Mask, block_q: int, block_kv: int,
              num_heads: int) -> Plan:
  """Compiles `mask` into kernel tables for `num_heads` query heads (cached)."""
  bm = masks_block.compile_mask(
      mask, block_q, block_kv,
      num_heads=num_heads if mask.head_dependent else None)
  head_map = (bm.head_map if len(bm.head_map) == num_heads else
              np.zeros((num_heads,), np.int32))

  def tables(idx, cnt, part):
    return [np.ascontiguousarray(x, dtype=np.int32)
            for x in (idx, cnt, part, _forward_fill(part, cnt))]

  kv = tables(bm.kv_indices, bm.kv_counts, bm.kv_partial)
  qs = tables(bm.q_indices, bm.q_counts, bm.q_partial)
  head_map = np.ascontiguousarray(head_map, dtype=np.int32)
  for a in kv + qs + [head_map]:
    a.setflags(write=False)
  has_partial = bm.partial_masks.shape[0] > 0
  partial = (bm.partial_masks if has_partial else
             np.zeros((1, block_q, block_kv), dtype=bool))
  return Plan(block_mask=bm, num_heads=num_heads, head_map=head_map,
              kv_indices=kv[0], kv_counts=kv[1], kv_part=kv[2], kv_fetch=kv[3],
              q_indices=qs[0], q_counts=qs[1], q_part=qs[2], q_fetch=qs[3],
              partial_masks=partial, has_partial=has_partial)


# Tile classes in the per-step `part` look-up: >= 0 is a bitmap index (PARTIAL).
FULL_TILE = -1
EMPTY_TILE = -2


@dataclasses.dataclass(frozen=True, eq=False)
class DynamicPlan:
  """Static tables of a call over a traced `DynamicBlockMask` (hashed by identity).

  The kv-block lists are traced inputs (`opt['kv_indices']` [Bm, Hm, nq, A],
  `opt['kv_counts']` [Bm, Hm, nq]); the dK / dV lists are their transpose, built on
  device (`DynamicBlockMask.transpose`, [Bm, Hm, nk, Qb]). Query head n of batch b
  reads list row (b if Bm > 1 else 0, n // (N // Hm)). The inner static mask
  (token-level, AND the padding) is compiled once at the same tiles into
  `tile` int32 [U, nq, nk]: the bitmap index of a PARTIAL tile, FULL_TILE or
  EMPTY_TILE (listed but skipped), looked up per (q block, kv block) in the kernels.

  On TPU the bitmap block each step fetches (`fetch`, forward-filled over FULL /
  EMPTY / padding steps so no new copy is issued) depends on the traced lists, so it
  is computed on device per (batch row, fetch row r): r enumerates the distinct
  (list row, inner head row) pairs of the query heads (`pair_map` [N]).
  """
  inner: Plan
  tile: np.ndarray  # int32 [U, nq, nk]
  q_len: int
  kv_len: int
  mask_batch: int  # Bm
  mask_heads: int  # Hm
  budget: int  # A
  q_budget: int  # Qb
  pair_map: np.ndarray  # int32 [N]: fetch row of query head n
  pair_rows: np.ndarray  # int32 [R]: list row (head) of each fetch row
  pair_units: np.ndarray  # int32 [R]: inner head row of each fetch row
  has_empty: bool

  # The geometry and bitmaps are the inner plan's.
  block_q = property(lambda self: self.inner.block_q)
  block_kv = property(lambda self: self.inner.block_kv)
  padded_q_len = property(lambda self: self.inner.padded_q_len)
  padded_kv_len = property(lambda self: self.inner.padded_kv_len)
  num_heads = property(lambda self: self.inner.num_heads)
  head_map = property(lambda self: self.inner.head_map)
  partial_masks = property(lambda self: self.inner.partial_masks)
  has_partial = property(lambda self: self.inner.has_partial)

  @property
  def needs_part(self) -> bool:
    return self.has_partial or self.has_empty

  @property
  def num_q_blocks(self) -> int:
    return self.tile.shape[1]

  @property
  def num_kv_blocks(self) -> int:
    return self.tile.shape[2]

  def steps(self, which: str) -> int:
    return self.budget if which == 'kv' else self.q_budget

  def table_bytes(self) -> int:
    """Bytes of int32 scalar tables one kernel prefetches (the larger direction)."""
    rows = {'kv': (self.num_q_blocks, self.budget),
            'q': (self.num_kv_blocks, self.q_budget)}
    lists = self.mask_batch * self.mask_heads
    out = []
    for nrow, width in rows.values():
      fetch = (self.mask_batch * len(self.pair_rows) * nrow * width
               if self.has_partial else 1)
      out.append(2 * self.num_heads + lists * nrow * (width + 1) + self.tile.size
                 + fetch)
    return 4 * max(out)

  def lists(self, which: str, opt) -> tuple[jax.Array, jax.Array]:
    """(indices, counts) of the direction, int32 (the dK / dV ones transposed)."""
    idx = opt['kv_indices'].astype(jnp.int32)
    cnt = opt['kv_counts'].astype(jnp.int32)
    if which == 'kv':
      return idx, cnt
    full = masks_dynamic.DynamicBlockMask(idx, cnt, self.q_len, self.kv_len,
                                          self.block_q, self.block_kv)
    return full.transpose(self.q_budget)

  def _fetch(self, which: str, idx: jax.Array, cnt: jax.Array) -> jax.Array:
    """int32 [Bm, R, rows, width]: the bitmap block to fetch at each step."""
    tile = self.tile[self.pair_units]  # [R, nq, nk]
    if which == 'q':
      tile = tile.transpose(0, 2, 1)  # [R, nk, nq]
    rows, cnt = idx[:, self.pair_rows], cnt[:, self.pair_rows]  # [Bm, R, rows, .]
    part = jnp.take_along_axis(
        jnp.broadcast_to(jnp.asarray(tile)[None], (rows.shape[0],) + tile.shape),
        rows, axis=-1)  # [Bm, R, rows, width]
    pos = jnp.arange(rows.shape[-1], dtype=jnp.int32)
    valid = (pos < cnt[..., None]) & (part >= 0)
    last = jax.lax.cummax(jnp.where(valid, pos, -1), axis=part.ndim - 1)
    fetched = jnp.take_along_axis(part, jnp.maximum(last, 0), axis=-1)
    return jnp.where(last >= 0, fetched, 0).astype(jnp.int32)

  def kernel_tables(self, which: str, opt) -> list[jax.Array]:
    """[maps (inner head row and fetch row per query head, [2N]), indices, counts,
    tile, fetch]."""
    idx, cnt = self.lists(which, opt)
    maps = np.concatenate([self.head_map, self.pair_map]).astype(np.int32)
    fetch = (self._fetch(which, idx, cnt) if self.has_partial else
             jnp.zeros((1, 1, 1, 1), jnp.int32))
    return [jnp.asarray(maps), idx, cnt, jnp.asarray(self.tile), fetch]

  # ----- look-ups (see `Plan`) -----
  def _row(self, b, n):
    bm = b if self.mask_batch > 1 else 0
    per = self.num_heads // self.mask_heads
    if self.mask_heads == 1:
      return bm, 0
    if per == 1:
      return bm, n
    return bm, jax.lax.div(n, jnp.asarray(per, jnp.int32))

  def block(self, which, t, b, n, i, j):
    del which
    return t[1][(*self._row(b, n), i, j)]

  def count(self, which, t, b, n, i):
    del which
    return t[2][(*self._row(b, n), i)]

  def part(self, which, t, b, n, i, j):
    """Tile class of step j: bitmap index, FULL_TILE or EMPTY_TILE."""
    blk = self.block(which, t, b, n, i, j)
    u = t[0][n]
    return t[3][u, i, blk] if which == 'kv' else t[3][u, blk, i]

  def fetch(self, which, t, b, n, i, j):
    del which
    bm = b if self.mask_batch > 1 else 0
    return t[4][bm, t[0][self.num_heads + n], i, j]


@functools.lru_cache(maxsize=128)
def make_dynamic_plan(inner: masks_base.Mask, block_q: int, block_kv: int,
                      num_heads: int, mask_batch: int, mask_heads: int,
                      budget: int, q_budget: int | None = None) -> DynamicPlan:
  """The static part of a DynamicBlockMask call (cached): `inner` is the static
  token mask (the block mask's inner AND a static mask array; `FullMask` if none),
  compiled at the block mask's tiles; Qb = `q_budget` (default nq)."""
  plan = make_plan(inner, block_q, block_kv, num_heads)
  bm = plan.block_mask
  state = bm.block_state
  tile = np.where(state == masks_block.EMPTY, EMPTY_TILE,
                  np.where(state == masks_block.FULL, FULL_TILE,
                           bm.partial_index)).astype(np.int32)
  rows = (np.arange(num_heads) // (num_heads // mask_heads)).astype(np.int32)
  pairs, pair_map = np.unique(np.stack([rows, plan.head_map], 1), axis=0,
                              return_inverse=True)
  arrays = dict(tile=np.ascontiguousarray(tile),
                pair_map=np.asarray(pair_map, np.int32).reshape(-1),
                pair_rows=np.ascontiguousarray(pairs[:, 0], np.int32),
                pair_units=np.ascontiguousarray(pairs[:, 1], np.int32))
  for a in arrays.values():
    a.setflags(write=False)
  t, s = inner.shape
  return DynamicPlan(
      inner=plan, q_len=t, kv_len=s, mask_batch=mask_batch,
      mask_heads=mask_heads, budget=budget,
      q_budget=bm.num_q_blocks if q_budget is None else q_budget,
      has_empty=bool(np.any(state == masks_block.EMPTY)), **arrays)


def plan_for(problem: problem_lib.AttentionProblem, t: int, s: int, n: int,
             block_q: int, block_kv: int) -> Plan | DynamicPlan:
  """The plan of a problem: static BlockMask tables, or a DynamicPlan whose tiles
  are the DynamicBlockMask's (block_q / block_kv are then ignored)."""
  dyn = problem.block_mask
  if dyn is None:
    return make_plan(effective_mask(problem.mask_obj, problem.mask, t, s, n),
                     block_q, block_kv, n)
  return make_dynamic_plan(effective_mask(dyn.inner, problem.mask, t, s, n),
                           dyn.block_q, dyn.block_kv, n, dyn.batch,
                           dyn.num_heads, dyn.budget)


def check_dynamic_block_sizes(problem: problem_lib.AttentionProblem,
                              block_sizes: Any, name: str) -> None:
  """Raises ValueError when `block_sizes` disagree with the DynamicBlockMask's."""
  dyn = problem.block_mask
  if dyn is None or block_sizes is None:
    return
  got = (block_sizes.block_q, block_sizes.block_kv)
  if got != (dyn.block_q, dyn.block_kv):
    raise ValueError(
        f'{name}: block_sizes (block_q, block_kv) must equal the DynamicBlockMask '
        f'blocks {(dyn.block_q, dyn.block_kv)} (the kernels tile by the mask\'s '
        f'blocks), got {got}; pass block_sizes=None.')


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything static about one call (a `custom_vjp` non-differentiable argument).

  Hashed by value (the Plan by identity; `make_plan` / `make_dynamic_plan` are
  cached), so repeated calls with the same mask, shapes and options reuse the
  compiled kernels (a DynamicBlockMask's new lists do not recompile).
  """
  plan: Plan | DynamicPlan
  scale: float
  soft_cap: float | None
  num_kv_heads: int
  has_sinks: bool
  has_segments: bool
  interpret: bool
  bias_batch: bool | None = None  # None: no bias; else bias has a batch dim > 1
  bias_heads: bool = False  # bias has a head dim > 1
  bias_rows: bool = True  # bias has a query dim; False: [Bb, Nb, 1, S] (key bias)
  mod: Any = None  # (fn, name, treedef) of the score_mod, or None
  param_shapes: tuple[tuple[tuple[int, ...], str], ...] = ()  # flattened params
  dropout_rate: float = 0.0
  extra: Any = None  # kernel-specific settings (e.g. GPU num_warps)

  @property
  def group(self) -> int:
    return self.plan.num_heads // self.num_kv_heads

  @property
  def has_bias(self) -> bool:
    return self.bias_batch is not None

  @property
  def has_dropout(self) -> bool:
    return self.dropout_rate > 0

  @property
  def needs_ids(self) -> bool:
    """Whether tiles need (b, h, q_idx, kv_idx) index arrays (score_mod, dropout)."""
    return self.mod is not None or self.has_dropout

  @property
  def num_params(self) -> int:
    return len(self.param_shapes)

  def bias_index(self, b, n):
    """Batch / head block index of the bias for batch b, query head n."""
    return (b if self.bias_batch else 0), (n if self.bias_heads else 0)


def kernel_param_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Kernel-side shape of a score_mod parameter (0-d leaves travel as [1])."""
  return tuple(shape) if shape else (1,)


def _is_float(dtype: Any) -> bool:
  return jnp.issubdtype(jnp.dtype(dtype), jnp.floating)


# ------------------------------------------------------------------ tile math


def read_params(cfg: Config, refs) -> list[jax.Array]:
  """The score_mod's parameter leaves read from their whole-array refs."""
  return [r[...].reshape(shape) for r, (shape, _) in zip(refs, cfg.param_shapes)]


def _call_mod(cfg: Config, leaves, score, ids):
  fn, _, treedef = cfg.mod
  params = jax.tree_util.tree_unflatten(treedef, list(leaves))
  return fn(params, score, *ids).astype(jnp.float32)


def tile_logits(cfg: Config, s: jax.Array, leaves, ids):
  """Logits of a tile from s = scale * q k^T (float32): soft-cap, then score_mod.

  Returns (z, pre, tanh): z the modified logits (bias and mask still to come), pre
  the score_mod's input (for its vjp), tanh for the soft-cap gradient (or None).
  """
  t = None
  if cfg.soft_cap is not None:
    t = jnp.tanh(s / cfg.soft_cap)
    s = cfg.soft_cap * t
  pre = s
  if cfg.mod is not None:
    s = _call_mod(cfg, leaves, s, ids)
  return s, pre, t


def tile_dlogits(cfg: Config, ds: jax.Array, pre, t, leaves, ids,
                 with_params: bool):
  """d(scale * q k^T) from dz = d logits, through score_mod and the soft-cap.

  With `with_params`, also this tile's gradient of the float score_mod parameters
  ({leaf index: gradient}); the mod's vjp is taken per tile (FlexAttention's
  backward, Dong et al. 2024).
  """
  dparams = None
  if cfg.mod is not None:
    floats = ([i for i, (_, dt) in enumerate(cfg.param_shapes) if _is_float(dt)]
              if with_params else [])

    def f(pre, *flt):
      full = list(leaves)
      for i, x in zip(floats, flt):
        full[i] = x
      return _call_mod(cfg, full, pre, ids)

    _, vjp = jax.vjp(f, pre, *[leaves[i] for i in floats])
    ds, *dflt = vjp(ds)
    if with_params:
      dparams = dict(zip(floats, dflt))
  if t is not None:
    ds = ds * (1.0 - t * t)
  return ds, dparams


def tile_dropout(cfg: Config, seed, ids) -> jax.Array:
  """keep / (1 - rate) of the tile (float32) from the int32-bitcast seed pair."""
  seed = tuple(jax.lax.bitcast_convert_type(x, jnp.uint32) for x in seed)
  return problem_lib.dropout_multiplier(seed, cfg.dropout_rate, *ids, jnp.float32)


def safe_normalize(l: jax.Array, m: jax.Array):
  """(1 / l, lse) with zeros / -inf for rows that saw nothing (l == 0).

  Tests l == 0 rather than l > 0 so that a NaN row (NaN in the query) stays NaN.
  """
  empty = l == 0.0
  safe = jnp.where(empty, 1.0, l)
  return (jnp.where(empty, 0.0, 1.0 / safe), jnp.where(empty, -jnp.inf,
                                                      m + jnp.log(safe)))


# fwd(cfg, q, k, v, opt) -> (out [B,N,Tp,Hv], lse [B,N,Tp]); opt: see `make_flash`.
ForwardFn = Callable[..., tuple[jax.Array, jax.Array]]
# bwd(cfg, q, k, v, opt, lse, di, do) -> (dq, dk, dv, dbias, dparams): dbias in the
# bias's own shape (partials already summed) or None; dparams a tuple of float32
# gradients of the float params in kernel shapes (None for non-float leaves).
BackwardFn = Callable[..., tuple[Any, ...]]


def make_flash(forward: ForwardFn, backward: BackwardFn):
  """Wires a forward and a backward kernel into one `custom_vjp` function.

  The returned f(cfg, q, k, v, opt) -> (out, lse) works on padded, head-major inputs;
  `opt` is a dict of the optional inputs: bias [Bb, Nb, Tb, Sp] (Bb in {1, B}, Nb in
  {1, N}, Tb in {1, Tp}), sinks [N], q_seg [B, Tp], kv_seg [B, Sp], seed int32[2]
  (the bitcast dropout seed), params (tuple of score_mod leaves, kernel shapes)
  and a DynamicBlockMask's kv_indices / kv_counts (integer: zero cotangents).
  The backward pass folds the lse cotangent into
  delta_i = rowsum(o_i * do_i) - dlse_i (FlashAttention-2, Alg. 2), so
  dS = P * (dP - delta) covers both (with dropout, o is the dropped output, as
  delta = rowsum(P * dP) needs), and the sink gradient is
  dsink_h = -sum_{b,t} exp(sink_h - lse) * delta.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, opt):
    return forward(cfg, q, k, v, opt)

  def flash_fwd(cfg, q, k, v, opt):
    out, lse = forward(cfg, q, k, v, opt)
    return (out, lse), (q, k, v, opt, out, lse)

  def flash_bwd(cfg, res, cts):
    q, k, v, opt, out, lse = res
    do, dlse = cts
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    di = di - dlse.astype(jnp.float32)  # [B, N, Tp]
    # Rows that see nothing have lse = -inf; +inf makes every exp() vanish.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    dq, dk, dv, dbias, dparams = backward(cfg, q, k, v, opt, lse_safe, di,
                                          do.astype(q.dtype))
    zeros0 = lambda x: np.zeros(x.shape, jax.dtypes.float0)
    ct = {name: None if x is None else zeros0(x) for name, x in opt.items()
          if name != 'params'}
    if opt['bias'] is not None:
      ct['bias'] = dbias.astype(opt['bias'].dtype)
    sinks = opt['sinks']
    if sinks is not None:
      p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_safe)
      ct['sinks'] = (-jnp.sum(p_sink * di, axis=(0, 2))).astype(sinks.dtype)
    ct['params'] = tuple(
        zeros0(x) if g is None else g.astype(x.dtype)
        for x, g in zip(opt['params'], dparams))
    return dq, dk, dv, ct

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def sum_dbias(partial: jax.Array, cfg: Config, bias_shape) -> jax.Array:
  """The bias gradient from per-program partials [B, N, R, Sp].

  R = Tp (bias with a query dim) or the number of q blocks (key bias: each q-block
  program wrote its column sums); batch / head dims the bias broadcasts over are
  summed here, outside the kernel (their programs wrote disjoint partials).
  """
  if not cfg.bias_rows:
    partial = jnp.sum(partial, axis=2, keepdims=True)
  axes = tuple(a for a in (0, 1) if bias_shape[a] == 1 and partial.shape[a] > 1)
  if axes:
    partial = jnp.sum(partial, axis=axes, keepdims=True)
  return partial


def sum_dparams(cfg: Config, partials) -> tuple[Any, ...]:
  """Per-program score_mod parameter gradients [P, *shape] summed over programs."""
  out, it = [], iter(partials)
  for _, dtype in cfg.param_shapes:
    out.append(jnp.sum(next(it), axis=0) if _is_float(dtype) else None)
  return tuple(out)


def float_param_indices(cfg: Config) -> list[int]:
  return [i for i, (_, dt) in enumerate(cfg.param_shapes) if _is_float(dt)]


def logits_bias(bias, mask, shape) -> jax.Array | None:
  """The additive bias tile source [Bb, Nb, Tb, S], or None.

  `bias` (broadcastable to [B, N, T, S]) plus, for a dense `mask` array that cannot
  be compiled into the BlockMask (traced or per batch), 0 where visible and -inf
  where not (exp(-inf) = 0 exactly, so this equals masking). Tb is 1 for a bias
  without a query dim (e.g. key padding [B, 1, 1, S]) and no dense mask, else T; the
  key dim is always materialised (S).
  """
  _, _, t, s = shape
  dyn = None if mask is None or static_mask_array(mask) else mask
  if bias is None and dyn is None:
    return None
  if bias is not None and bias.ndim < 4:
    bias = bias.reshape((1,) * (4 - bias.ndim) + tuple(bias.shape))
  parts = [x for x in (bias, dyn) if x is not None]
  lead = tuple(max(x.shape[a] for x in parts) for a in (0, 1))
  rows = t if dyn is not None or bias.shape[2] > 1 else 1
  target = lead + (rows, s)
  out = None
  if bias is not None:
    out = jnp.broadcast_to(bias, target)
  if dyn is not None:
    dtype = bias.dtype if bias is not None else jnp.float32
    neg = jnp.where(jnp.broadcast_to(dyn, target), 0.0, -jnp.inf).astype(dtype)
    out = neg if out is None else out + neg
  return out


def configure(query: jax.Array, key: jax.Array, value: jax.Array,
              problem: problem_lib.AttentionProblem, *, block_q: int,
              block_kv: int, interpret: bool,
              extra: Any = None) -> tuple[Config, dict[str, Any]]:
  """The static Config of one call and its optional inputs (see `make_flash`).

  With a DynamicBlockMask the tiles are the mask's (`block_q` / `block_kv` are
  ignored; callers check them with `check_dynamic_block_sizes`) and `opt` carries
  its traced lists.
  """
  del value
  b, t, n, _ = query.shape
  s, kh = key.shape[1], key.shape[2]
  plan = plan_for(problem, t, s, n, block_q, block_kv)
  bias = logits_bias(problem.bias, problem.mask, (b, n, t, s))
  mod, leaves, shapes = None, (), ()
  if problem.score_mod is not None:
    leaves, treedef = jax.tree_util.tree_flatten(problem.score_mod.params)
    leaves = tuple(jnp.asarray(x) for x in leaves)
    mod = (problem.score_mod.fn, problem.score_mod.name, treedef)
    shapes = tuple((tuple(x.shape), str(x.dtype)) for x in leaves)
  cfg = Config(
      plan=plan, scale=float(problem.scale), soft_cap=problem.logits_soft_cap,
      num_kv_heads=kh, has_sinks=problem.sinks is not None,
      has_segments=problem.q_segment_ids is not None, interpret=bool(interpret),
      bias_batch=None if bias is None else bias.shape[0] > 1,
      bias_heads=bias is not None and bias.shape[1] > 1,
      bias_rows=bias is None or bias.shape[2] > 1,
      mod=mod, param_shapes=shapes, dropout_rate=float(problem.dropout_rate),
      extra=extra)
  dyn = problem.block_mask
  opt = dict(bias=bias, sinks=problem.sinks, q_seg=problem.q_segment_ids,
             kv_seg=problem.kv_segment_ids, seed=problem.dropout_seed,
             params=leaves,
             kv_indices=None if dyn is None else dyn.kv_indices,
             kv_counts=None if dyn is None else dyn.kv_counts)
  return cfg, opt


def unpack_refs(refs, cfg: Config, names: tuple[str, ...]):
  """Splits a kernel's optional refs, in `names` order, off the front of `refs`.

  Names: 'seg' (q and kv segment ids: two refs), 'bias', 'sinks', 'seed', 'params'
  (a list of cfg.num_params refs), 'mask' (bitmaps).
  Returns ({name: ref or None} with 'seg' as 'q_seg' / 'kv_seg', remaining refs).
  """
  present = {'seg': cfg.has_segments, 'bias': cfg.has_bias,
             'sinks': cfg.has_sinks, 'mask': cfg.plan.has_partial,
             'seed': cfg.has_dropout}
  out = {}
  refs = list(refs)
  for name in names:
    if name == 'seg':
      out['q_seg'], out['kv_seg'] = (refs[:2] if present['seg'] else
                                     (None, None))
      refs = refs[2:] if present['seg'] else refs
    elif name == 'params':
      out['params'], refs = refs[:cfg.num_params], refs[cfg.num_params:]
    elif present[name]:
      out[name], refs = refs[0], refs[1:]
    else:
      out[name] = None
  return out, refs


@functools.partial(jax.jit, static_argnames=(
    'flash', 'cfg', 'return_residuals', 'head_dim_pad', 'value_dim_pad'))
def run(flash, cfg: Config, query: jax.Array, key: jax.Array, value: jax.Array,
        opt: dict[str, Any], return_residuals: bool,
        head_dim_pad: int | None = None, value_dim_pad: int | None = None):
  """Pads and transposes [B, T, N, H] inputs, runs `flash`, undoes the layout.

  `opt` comes from `configure` (bias from `logits_bias`).
  """
  t = query.shape[1]
  hv = value.shape[-1]
  tp, sp = cfg.plan.padded_q_len, cfg.plan.padded_kv_len
  q = pad_axis(query, 1, tp).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
  k = pad_axis(key, 1, sp).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
  v = pad_axis(value, 1, sp).transpose(0, 2, 1, 3)  # [B, K, Sp, Hv]
  if head_dim_pad is not None:
    q, k = pad_axis(q, 3, head_dim_pad), pad_axis(k, 3, head_dim_pad)
  if value_dim_pad is not None:
    v = pad_axis(v, 3, value_dim_pad)
  opt = dict(opt)
  if opt['q_seg'] is not None:
    opt['q_seg'] = pad_axis(opt['q_seg'].astype(jnp.int32), 1, tp)  # [B, Tp]
    opt['kv_seg'] = pad_axis(opt['kv_seg'].astype(jnp.int32), 1, sp)  # [B, Sp]
  bias = opt['bias']
  if bias is not None:
    if cfg.bias_rows:
      bias = pad_axis(bias, 2, tp)
    opt['bias'] = pad_axis(bias, 3, sp)  # [Bb, Nb, Tp or 1, Sp]
  if opt['seed'] is not None:
    opt['seed'] = jax.lax.bitcast_convert_type(opt['seed'], jnp.int32)
  opt['params'] = tuple(x.reshape(kernel_param_shape(x.shape))
                        for x in opt['params'])
  out, lse = flash(cfg, q, k, v, opt)
  out = out[:, :, :t, :hv].transpose(0, 2, 1, 3)  # [B, T, N, Hv]
  if return_residuals:
    return out, lse[:, :, :t]
  return out


# ------------------------------------------------------------------ hardware checks

# Primitives the Mosaic / Triton lowerings have no rule for (or only for scalar refs):
# a score_mod using them runs in interpret mode only.
UNLOWERABLE_PRIMITIVES = frozenset({
    'gather', 'scatter', 'scatter-add', 'scatter_add', 'scatter-mul',
    'scatter_mul', 'scatter-min', 'scatter_min', 'scatter-max', 'scatter_max',
    'dynamic_slice', 'dynamic_update_slice', 'sort', 'cumsum', 'cumprod', 'cummax',
    'cummin', 'cumlogsumexp', 'argsort', 'random_bits', 'random_seed',
    'random_wrap', 'random_unwrap', 'threefry2x32', 'while', 'pure_callback',
    'io_callback'})


def _primitives(jaxpr, found: set[str]) -> set[str]:
  for eqn in jaxpr.eqns:
    found.add(eqn.primitive.name)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _primitives(inner, found)
  return found


def score_mod_reason(mod: Any, dtype: Any = jnp.float32) -> str | None:
  """Why a score_mod cannot lower to Mosaic / Triton (None: its jaxpr can).

  Traces the mod on small broadcast tiles and looks for primitives the hardware
  lowerings lack (gathers from indexing a table with traced indices, scatters,
  dynamic slices; plain-closure score_mods are vmapped, which makes table lookups
  gathers).
  """
  params = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), mod.params)
  tile = (8, 128)
  score = jax.ShapeDtypeStruct(tile, dtype)
  scalar = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  index = jax.ShapeDtypeStruct(tile, jnp.int32)
  closed = jax.make_jaxpr(lambda p, *a: mod.fn(p, *a))(
      params, score, scalar, scalar, index, index)
  bad = sorted(_primitives(closed.jaxpr, set()) & UNLOWERABLE_PRIMITIVES)
  if not bad:
    return None
  return (f'score_mod {mod.name!r} uses {", ".join(bad)}, which the Pallas '
          'hardware lowering cannot compile (indexing a table with traced indices, '
          'or a plain function that is vmapped); write it as a '
          'kernels.problem.ScoreMod with jnp.where / one-hot arithmetic over the '
          "table (e.g. sum(where(idx == arange(L), table, 0))), or use "
          "implementation='xla'")


def params_bytes(problem: problem_lib.AttentionProblem) -> int:
  if problem.score_mod is None:
    return 0
  return sum(int(np.prod(jnp.shape(x))) * jnp.dtype(jnp.result_type(x)).itemsize
             for x in jax.tree_util.tree_leaves(problem.score_mod.params))


def check_block(name: str, value: Any, *, multiple: int = 1,
                power_of_two: bool = False) -> int:
  """Validates a block size (positive int, a multiple of / power of two)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value <= 0 or value % multiple:
    raise ValueError(
        f'{name} must be a positive multiple of {multiple}, got {value}.')
  if power_of_two and value & (value - 1):
    raise ValueError(f'{name} must be a power of two, got {value}.')
  return int(value)


def next_power_of_two(x: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(x, 1))))


def kv_head(query_head: jax.Array, group: int) -> jax.Array:
  """KV head of a query head in an index map (GQA: n // G, as int32 for Mosaic)."""
  if group == 1:
    return query_head
  return jax.lax.div(query_head, jnp.asarray(group, query_head.dtype))
