"""Block-sparse flash attention for TPU (Pallas Mosaic), driven by a `BlockMask`.

FlashAttention-2 (Dao, 2023) restricted to the active tiles of the compiled mask, with
the structure of JAX's splash attention (`jax.experimental.pallas.ops.tpu.
splash_attention`): the active kv-block list of every (query head, q block) is
scalar-prefetched into SMEM and the k/v index maps read it, so the grid
(batch, head, q block, step) visits only active tiles; steps past a row's count are
skipped with `pl.when` and re-use the previous block index (no new DMA). FULL tiles run
without mask work; PARTIAL tiles read their deduplicated bitmap block. A traced
`DynamicBlockMask` is prefetched the same way: its [Bm, Hm, nq, budget] lists replace
the static ones (the grid's last axis is the budget) and its inner static mask's
per-tile classes are looked up per (q block, kv block), EMPTY tiles skipped (see
`common.DynamicPlan`).

Three kernels: forward (out, lse), dq (over the kv lists; with a bias it also writes
the per-tile logits gradient) and a fused dk/dv kernel (over the transposed q lists,
accumulating the G = N // K query heads of one kv head in VMEM scratch, so k/v and
dk/dv are never repeated per query head). An additive bias is read tile by tile
through the same index maps.

score_mod runs per tile after the soft-cap (its params are whole-array VMEM inputs;
the dq kernel takes the per-tile vjp and writes per-program params-gradient partials),
dropout recomputes its counter-based keep mask per tile from the SMEM seed.

Tiling (Mosaic): block_q and block_kv are multiples of 128 (each is the lane dimension
of a logits tile in one of the kernels; interpret mode accepts multiples of 8); head dims are whole blocks (any size; a
multiple of 128 fills the MXU). Running statistics m / l are (block_q, 128) lane-
replicated VMEM scratch; segment ids and lse are passed lane- or sublane-replicated.
On CPU the kernels run with `interpret=True`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import numpy as np

from kernels.pallas import common

NUM_LANES = 128
NUM_SUBLANES = 8
NT_DIMS = (((1,), (1,)), ((), ()))  # a @ b.T
NN_DIMS = (((1,), (0,)), ((), ()))  # a @ b

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 128
_NAME = "implementation='pallas_tpu'"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: multiples of 8; Mosaic (interpret=False) needs multiples of 128."""
  block_q: int = DEFAULT_BLOCK_Q
  block_kv: int = DEFAULT_BLOCK_KV

  def __post_init__(self):
    common.check_block('block_q', self.block_q, multiple=NUM_SUBLANES)
    common.check_block('block_kv', self.block_kv, multiple=NUM_SUBLANES)


def _lanes(x: jax.Array, width: int) -> jax.Array:
  """A lane-replicated [rows, 128] statistic as [rows, width]."""
  if width % NUM_LANES == 0:
    return jnp.tile(x, (1, width // NUM_LANES))
  return jnp.broadcast_to(x[:, :1], (x.shape[0], width))


def _visible(masked: bool, mask_ref, q_ids, kv_ids):
  """Visibility of the tile (None = all visible): bitmap AND same segment."""
  vis = mask_ref[...] if masked else None
  if q_ids is not None:
    same = q_ids == kv_ids
    vis = same if vis is None else jnp.logical_and(vis, same)
  return vis


# ------------------------------------------------------------------ shared pieces

# Scalar-prefetched tables (`Plan.kernel_tables` / `DynamicPlan.kernel_tables`):
# static: head_map, indices, counts, part, fetch; dynamic: maps, indices, counts,
# tile, fetch. Index maps and kernels read them through the plan's look-ups.
_NUM_TABLES = 5


def _run_steps(plan, run, part, step):
  """Runs `step` on the active steps; returns whether this step runs.

  `run` is j < count; `part` the step's tile class (None: every tile FULL). FULL
  tiles run `step(False)` (no mask work), PARTIAL tiles `step(True)`, EMPTY tiles
  (an inner mask hiding a listed block of a DynamicBlockMask) are skipped.
  """
  if part is None:
    pl.when(run)(lambda: step(False))
    return run
  if plan.has_empty:
    run = jnp.logical_and(run, part >= common.FULL_TILE)
  if not plan.has_partial:
    pl.when(run)(lambda: step(False))
    return run
  is_partial = part >= 0
  pl.when(jnp.logical_and(run, jnp.logical_not(is_partial)))(
      lambda: step(False))
  pl.when(jnp.logical_and(run, is_partial))(lambda: step(True))
  return run


def _step_class(plan, which, tabs, b, n, i, j):
  """(j < count, tile class or None) of step j of row i."""
  part = plan.part(which, tabs, b, n, i, j) if plan.needs_part else None
  return j < plan.count(which, tabs, b, n, i), part


def _tile_ids(cfg: common.Config, b, n, q0, kv0, shape, q_axis: int):
  """(b, h, q_idx, kv_idx) int32 for a tile (global indices), or None if unused."""
  if not cfg.needs_ids:
    return None
  q = q0 * shape[q_axis] + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  kv = kv0 * shape[1 - q_axis] + lax.broadcasted_iota(jnp.int32, shape,
                                                      1 - q_axis)
  full = lambda x: jnp.full((1, 1), x, jnp.int32)
  return full(b), full(n), q, kv


def _seed(opt):
  return None if opt['seed'] is None else (opt['seed'][0], opt['seed'][1])


def _bias_tile(cfg: common.Config, bias_ref):
  if bias_ref is None:
    return None
  return bias_ref[...].astype(jnp.float32)  # [bq, bk] or [1, bk] (key bias)


def _row_specs(cfg: common.Config, bq: int, bk: int):
  """Specs of the optional per-tile inputs of the forward / dq kernels."""
  kv_block = functools.partial(cfg.plan.block, 'kv')

  specs = []
  if cfg.has_segments:
    specs += [
        pl.BlockSpec((None, bq, NUM_LANES), lambda bi, ni, i, j, *_: (bi, i, 0)),
        pl.BlockSpec((None, NUM_SUBLANES, bk),
                     lambda bi, ni, i, j, *tabs: (
                         bi, 0, kv_block(tabs, bi, ni, i, j))),
    ]
  if cfg.has_bias:
    rows = bq if cfg.bias_rows else 1
    specs.append(pl.BlockSpec(
        (None, None, rows, bk),
        lambda bi, ni, i, j, *tabs: (
            *cfg.bias_index(bi, ni), i if cfg.bias_rows else 0,
            kv_block(tabs, bi, ni, i, j))))
  return specs


def _whole(shape):
  """A block holding the whole array in every program (VMEM: score_mod params)."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _extra_inputs(cfg: common.Config, opt):
  """Specs / args of the dropout seed (SMEM) and the score_mod params (VMEM)."""
  specs, args = [], []
  if cfg.has_dropout:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(opt['seed'])
  for x in opt['params']:
    specs.append(_whole(x.shape))
    args.append(x)
  return specs, args


def _tables(plan, which: str, opt):
  return plan.kernel_tables(which, opt)


# ------------------------------------------------------------------ forward


def _fwd_kernel(*refs, cfg: common.Config, bq: int, bk: int, steps: int):
  tabs, (q_ref, k_ref, v_ref) = refs[:_NUM_TABLES], refs[_NUM_TABLES:_NUM_TABLES + 3]
  opt, refs = common.unpack_refs(
      refs[_NUM_TABLES + 3:], cfg,
      ('seg', 'bias', 'sinks', 'seed', 'params', 'mask'))
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  plan = cfg.plan
  b, n, i, j = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                pl.program_id(3))
  hv = acc_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    if opt['sinks'] is not None:
      # The sink is one more logit with zero value: start from m = sink, l = 1.
      m_ref[...] = jnp.full(m_ref.shape, opt['sinks'][n], jnp.float32)
      l_ref[...] = jnp.ones_like(l_ref)
    else:
      m_ref[...] = jnp.full(m_ref.shape, common.MASK_VALUE, jnp.float32)
      l_ref[...] = jnp.zeros_like(l_ref)

  def step(masked: bool):
    ids = _tile_ids(cfg, b, n, i, plan.block('kv', tabs, b, n, i, j), (bq, bk), 0)
    s = lax.dot_general(q_ref[...], k_ref[...], NT_DIMS,
                        preferred_element_type=jnp.float32) * cfg.scale
    s, _, _ = common.tile_logits(cfg, s, common.read_params(cfg, opt['params']),
                                 ids)
    bias = _bias_tile(cfg, opt['bias'])
    if bias is not None:
      s = s + bias
    q_ids = kv_ids = None
    if opt['q_seg'] is not None:
      q_ids = _lanes(opt['q_seg'][...], bk)  # [bq, bk]
      kv_ids = opt['kv_seg'][:1, :]  # [1, bk]
    vis = _visible(masked, opt['mask'], q_ids, kv_ids)
    if vis is not None:
      s = jnp.where(vis, s, common.MASK_VALUE)
    m_prev, l_prev = m_ref[...], l_ref[...]  # [bq, 128]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - _lanes(m_next, bk))  # [bq, bk]
    if vis is not None:
      p = jnp.where(vis, p, 0.0)  # rows with nothing visible yet stay at 0
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + jnp.sum(p, axis=-1, keepdims=True)
    m_ref[...] = m_next
    if cfg.has_dropout:  # P V uses the dropped probabilities, l does not
      p = p * common.tile_dropout(cfg, _seed(opt), ids)
    pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], NN_DIMS,
                         preferred_element_type=jnp.float32)  # [bq, Hv]
    acc_ref[...] = _lanes(alpha, hv) * acc_ref[...] + pv

  _run_steps(plan, *_step_class(plan, 'kv', tabs, b, n, i, j), step)

  @pl.when(j == steps - 1)
  def _finish():
    inv, lse = common.safe_normalize(l_ref[...], m_ref[...])
    o_ref[...] = (acc_ref[...] * _lanes(inv, hv)).astype(o_ref.dtype)
    lse_ref[...] = lse


def _segment_inputs(q_seg, kv_seg):
  """q ids lane-replicated [B, Tp, 128], kv ids sublane-replicated [B, 8, Sp]."""
  b, tp = q_seg.shape
  sp = kv_seg.shape[1]
  q_lanes = lax.broadcast_in_dim(q_seg, (b, tp, NUM_LANES), (0, 1))
  kv_rows = lax.broadcast_in_dim(kv_seg, (b, NUM_SUBLANES, sp), (0, 2))
  return q_lanes, kv_rows


def _row_args(cfg, opt):
  args = []
  if cfg.has_segments:
    args += list(_segment_inputs(opt['q_seg'], opt['kv_seg']))
  if cfg.has_bias:
    args.append(opt['bias'])
  return args


def _kv_maps(plan, g):
  def q_map(bi, ni, i, j, *_):
    return bi, ni, i, 0

  def kv_map(bi, ni, i, j, *tabs):
    return bi, common.kv_head(ni, g), plan.block('kv', tabs, bi, ni, i, j), 0

  def fetch_map(bi, ni, i, j, *tabs):
    return plan.fetch('kv', tabs, bi, ni, i, j), 0, 0

  return q_map, kv_map, fetch_map


def _forward(cfg: common.Config, q, k, v, opt):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  hv = v.shape[-1]
  steps = plan.steps('kv')
  q_map, kv_map, fetch_map = _kv_maps(plan, cfg.group)
  in_specs = [pl.BlockSpec((None, None, bq, h), q_map),
              pl.BlockSpec((None, None, bk, h), kv_map),
              pl.BlockSpec((None, None, bk, hv), kv_map)]
  in_specs += _row_specs(cfg, bq, bk)
  args = [q, k, v] + _row_args(cfg, opt)
  if cfg.has_sinks:
    in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
    args.append(opt['sinks'].astype(jnp.float32))
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  if plan.has_partial:
    in_specs.append(pl.BlockSpec((None, bq, bk), fetch_map))
    args.append(jnp.asarray(plan.partial_masks))
  kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, steps=steps)
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_TABLES, grid=(b, n, tp // bq, steps),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bq, hv), q_map),
                     pl.BlockSpec((None, None, bq, NUM_LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, NUM_LANES), jnp.float32),
                          pltpu.VMEM((bq, hv), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel',
                               'arbitrary')),
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp, NUM_LANES), jnp.float32)],
      interpret=cfg.interpret,
      name='block_sparse_flash_fwd',
  )(*_tables(plan, 'kv', opt), *args)
  return out, lse[..., 0]


# ------------------------------------------------------------------ backward: dq


def _dq_kernel(*refs, cfg: common.Config, bq: int, bk: int, steps: int):
  tabs = refs[:_NUM_TABLES]
  q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref = refs[_NUM_TABLES:_NUM_TABLES + 6]
  opt, refs = common.unpack_refs(refs[_NUM_TABLES + 6:], cfg,
                                 ('seg', 'bias', 'seed', 'params', 'mask'))
  refs = refs[1:] if cfg.has_bias else refs  # the aliased zeros input
  dq_ref, refs = refs[0], refs[1:]
  dbias_ref, refs = (refs[0], refs[1:]) if cfg.has_bias else (None, refs)
  floats = common.float_param_indices(cfg)
  dparam_refs, (acc_ref,) = refs[:len(floats)], refs[len(floats):]
  plan = cfg.plan
  b, n, i, j = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                pl.program_id(3))
  listed, part = _step_class(plan, 'kv', tabs, b, n, i, j)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)
    for r in dparam_refs:  # this program's slice of the params-gradient partials
      r[...] = jnp.zeros_like(r)

  def step(masked: bool):
    k = k_ref[...]
    kb = plan.block('kv', tabs, b, n, i, j)
    ids = _tile_ids(cfg, b, n, i, kb, (bq, bk), 0)
    leaves = common.read_params(cfg, opt['params'])
    s = lax.dot_general(q_ref[...], k, NT_DIMS,
                        preferred_element_type=jnp.float32) * cfg.scale
    s, pre, t = common.tile_logits(cfg, s, leaves, ids)
    bias = _bias_tile(cfg, opt['bias'])
    if bias is not None:
      s = s + bias
    q_ids = kv_ids = None
    if opt['q_seg'] is not None:
      q_ids = _lanes(opt['q_seg'][...], bk)
      kv_ids = opt['kv_seg'][:1, :]
    vis = _visible(masked, opt['mask'], q_ids, kv_ids)
    p = jnp.exp(s - _lanes(lse_ref[...], bk))  # [bq, bk]
    if vis is not None:
      p = jnp.where(vis, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], NT_DIMS,
                         preferred_element_type=jnp.float32)  # [bq, bk]
    if cfg.has_dropout:
      dp = dp * common.tile_dropout(cfg, _seed(opt), ids)
    ds = p * (dp - _lanes(di_ref[...], bk))  # d logits (after bias)
    if dbias_ref is not None:
      if cfg.bias_rows:
        dbias_ref[...] = ds
      else:  # key bias: this q block's column sums, sublane-replicated
        dbias_ref[...] = jnp.broadcast_to(jnp.sum(ds, axis=0, keepdims=True),
                                          dbias_ref.shape)
    ds, dparams = common.tile_dlogits(cfg, ds, pre, t, leaves, ids, True)
    for r, idx in zip(dparam_refs, floats):
      r[...] += dparams[idx].reshape(r.shape).astype(r.dtype)
    acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, NN_DIMS,
                                    preferred_element_type=jnp.float32)

  ran = _run_steps(plan, listed, part, step)
  if dbias_ref is not None:
    # A visited d-bias block no step writes is zeroed: the block (i, 0) of a q
    # block with no active tile, and listed tiles the inner mask makes EMPTY (a
    # DynamicBlockMask). Padding steps re-visit the last block: left alone.
    empty_row = plan.count('kv', tabs, b, n, i) == 0
    @pl.when(jnp.logical_and(jnp.logical_not(ran),
                             jnp.logical_or(listed, empty_row)))
    def _unwritten():
      dbias_ref[...] = jnp.zeros_like(dbias_ref)

  @pl.when(j == steps - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dq(cfg: common.Config, q, k, v, opt, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  nq = tp // bq
  steps = plan.steps('kv')
  q_map, kv_map, fetch_map = _kv_maps(plan, cfg.group)
  lanes = lambda x: lax.broadcast_in_dim(x, x.shape + (NUM_LANES,), (0, 1, 2))
  in_specs = [pl.BlockSpec((None, None, bq, h), q_map),
              pl.BlockSpec((None, None, bk, h), kv_map),
              pl.BlockSpec((None, None, bk, hv), kv_map),
              pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
              pl.BlockSpec((None, None, bq, NUM_LANES), q_map),
              pl.BlockSpec((None, None, bq, hv), q_map)]
  in_specs += _row_specs(cfg, bq, bk)
  args = [q, k, v, lanes(lse), lanes(di), do]
  args += _row_args(cfg, opt)
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  if plan.has_partial:
    in_specs.append(pl.BlockSpec((None, bq, bk), fetch_map))
    args.append(jnp.asarray(plan.partial_masks))
  out_specs = [pl.BlockSpec((None, None, bq, h), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  aliases = {}
  if cfg.has_bias:
    # Per-program d-bias partials [B, N, Tp, Sp] (or the key bias's column sums
    # [B, N, nq, 8, Sp]); EMPTY tiles are never visited and keep the aliased zeros.
    if cfg.bias_rows:
      shape = (b, n, tp, sp)
      spec = pl.BlockSpec(
          (None, None, bq, bk),
          lambda bi, ni, i, j, *tabs: (bi, ni, i, plan.block('kv', tabs, bi, ni, i, j)))
    else:
      shape = (b, n, nq, NUM_SUBLANES, sp)
      spec = pl.BlockSpec(
          (None, None, None, NUM_SUBLANES, bk),
          lambda bi, ni, i, j, *tabs: (bi, ni, i, 0,
                                    plan.block('kv', tabs, bi, ni, i, j)))
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    aliases = {_NUM_TABLES + len(args): 1}
    args.append(jnp.zeros(shape, jnp.float32))
    out_specs.append(spec)
    out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
  for idx in common.float_param_indices(cfg):
    # One [1, *shape] slice of the params gradient per (b, n, q block) program.
    shape = common.kernel_param_shape(cfg.param_shapes[idx][0])
    zeros = (0,) * len(shape)
    out_specs.append(pl.BlockSpec(
        (None,) + shape,
        lambda bi, ni, i, j, *_, z=zeros: ((bi * n + ni) * nq + i,) + z))
    out_shape.append(jax.ShapeDtypeStruct((b * n * nq,) + shape, jnp.float32))
  kernel = functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, steps=steps)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_TABLES, grid=(b, n, nq, steps),
          in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel',
                               'arbitrary')),
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=cfg.interpret,
      name='block_sparse_flash_dq',
  )(*_tables(plan, 'kv', opt), *args)
  outs = list(outs)
  dq = outs.pop(0)
  dbias = None
  if cfg.has_bias:
    partial = outs.pop(0)
    if not cfg.bias_rows:
      partial = partial[:, :, :, 0, :]  # [B, N, nq, Sp]
    dbias = common.sum_dbias(partial, cfg, opt['bias'].shape)
  return dq, dbias, common.sum_dparams(cfg, outs)


# ------------------------------------------------------------------ backward: dk, dv


def _dkv_kernel(*refs, cfg: common.Config, bq: int, bk: int, steps: int):
  tabs = refs[:_NUM_TABLES]
  q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref = refs[_NUM_TABLES:_NUM_TABLES + 6]
  opt, refs = common.unpack_refs(refs[_NUM_TABLES + 6:], cfg,
                                 ('seg', 'bias', 'seed', 'params', 'mask'))
  dk_ref, dv_ref, dk_acc, dv_acc = refs
  plan = cfg.plan
  b, kh, kb, gi, j = (pl.program_id(0), pl.program_id(1), pl.program_id(2),
                      pl.program_id(3), pl.program_id(4))
  n = kh * cfg.group + gi

  @pl.when(jnp.logical_and(gi == 0, j == 0))
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)
    dv_acc[...] = jnp.zeros_like(dv_acc)

  def step(masked: bool):
    q = q_ref[...]
    do = do_ref[...]
    # Transposed tile: kv positions on sublanes, q positions on lanes.
    ids = _tile_ids(cfg, b, n, plan.block('q', tabs, b, n, kb, j), kb, (bk, bq), 1)
    leaves = common.read_params(cfg, opt['params'])
    s = lax.dot_general(k_ref[...], q, NT_DIMS,
                        preferred_element_type=jnp.float32) * cfg.scale
    s, pre, t = common.tile_logits(cfg, s, leaves, ids)  # [bk, bq]
    if opt['bias'] is not None:
      s = s + opt['bias'][...].astype(jnp.float32)  # [bk, bq] or [bk, 1]
    q_ids = kv_ids = None
    if opt['q_seg'] is not None:
      kv_ids = _lanes(opt['kv_seg'][...], bq)  # [bk, bq]
      q_ids = opt['q_seg'][:1, :]  # [1, bq]
    vis = _visible(masked, opt['mask'], q_ids, kv_ids)
    p = jnp.exp(s - lse_ref[:1, :])  # [bk, bq]
    if vis is not None:
      p = jnp.where(vis, p, 0.0)
    dp = lax.dot_general(v_ref[...], do, NT_DIMS,
                         preferred_element_type=jnp.float32)  # [bk, bq]
    p_drop = p
    if cfg.has_dropout:
      mult = common.tile_dropout(cfg, _seed(opt), ids)
      p_drop, dp = p * mult, dp * mult
    dv_acc[...] += lax.dot_general(p_drop.astype(do.dtype), do, NN_DIMS,
                                   preferred_element_type=jnp.float32)
    ds = p * (dp - di_ref[:1, :])
    ds, _ = common.tile_dlogits(cfg, ds, pre, t, leaves, ids, False)
    dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, NN_DIMS,
                                   preferred_element_type=jnp.float32)

  _run_steps(plan, *_step_class(plan, 'q', tabs, b, n, kb, j), step)

  @pl.when(jnp.logical_and(gi == cfg.group - 1, j == steps - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dkv(cfg: common.Config, q, k, v, opt, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  kh_count, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = cfg.group
  steps = plan.steps('q')

  def q_block(tabs, bi, kh, kb, gi, j):
    return plan.block('q', tabs, bi, kh * g + gi, kb, j)

  def q_map(bi, kh, kb, gi, j, *tabs):
    return bi, kh * g + gi, q_block(tabs, bi, kh, kb, gi, j), 0

  def row_map(bi, kh, kb, gi, j, *tabs):
    return bi, kh * g + gi, 0, q_block(tabs, bi, kh, kb, gi, j)

  def kv_map(bi, kh, kb, gi, j, *_):
    return bi, kh, kb, 0

  rows = lambda x: lax.broadcast_in_dim(
      x, (b, n, NUM_SUBLANES, tp), (0, 1, 3))  # [B, N, 8, Tp]
  in_specs = [pl.BlockSpec((None, None, bq, h), q_map),
              pl.BlockSpec((None, None, bk, h), kv_map),
              pl.BlockSpec((None, None, bk, hv), kv_map),
              pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_map),
              pl.BlockSpec((None, None, NUM_SUBLANES, bq), row_map),
              pl.BlockSpec((None, None, bq, hv), q_map)]
  args = [q, k, v, rows(lse), rows(di), do]
  if cfg.has_segments:
    q_rows = lax.broadcast_in_dim(opt['q_seg'], (b, NUM_SUBLANES, tp), (0, 2))
    kv_lanes = lax.broadcast_in_dim(opt['kv_seg'], (b, sp, NUM_LANES), (0, 1))
    in_specs += [
        pl.BlockSpec((None, NUM_SUBLANES, bq),
                     lambda bi, kh, kb, gi, j, *tabs: (
                         bi, 0, q_block(tabs, bi, kh, kb, gi, j))),
        pl.BlockSpec((None, bk, NUM_LANES),
                     lambda bi, kh, kb, gi, j, *_: (bi, kb, 0)),
    ]
    args += [q_rows, kv_lanes]
  if cfg.has_bias:
    # Bias transposed once to the [bk, bq] orientation of this kernel ([bk, 1] for
    # a key bias).
    cols = bq if cfg.bias_rows else 1
    in_specs.append(pl.BlockSpec(
        (None, None, bk, cols),
        lambda bi, kh, kb, gi, j, *tabs: (
            *cfg.bias_index(bi, kh * g + gi), kb,
            q_block(tabs, bi, kh, kb, gi, j) if cfg.bias_rows else 0)))
    args.append(opt['bias'].transpose(0, 1, 3, 2))  # [Bb, Nb, Sp, Tp or 1]
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  if plan.has_partial:
    # Bitmaps transposed once (static) to the [bk, bq] orientation.
    in_specs.append(pl.BlockSpec(
        (None, bk, bq),
        lambda bi, kh, kb, gi, j, *tabs: (
            plan.fetch('q', tabs, bi, kh * g + gi, kb, j), 0, 0)))
    args.append(jnp.asarray(
        np.ascontiguousarray(plan.partial_masks.transpose(0, 2, 1))))
  kernel = functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, steps=steps)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=_NUM_TABLES,
          grid=(b, kh_count, sp // bk, g, steps), in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, h), kv_map),
                     pl.BlockSpec((None, None, bk, hv), kv_map)],
          scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32),
                          pltpu.VMEM((bk, hv), jnp.float32)]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel',
                               'arbitrary', 'arbitrary')),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      interpret=cfg.interpret,
      name='block_sparse_flash_dkv',
  )(*_tables(plan, 'q', opt), *args)


def _backward(cfg, q, k, v, opt, lse, di, do):
  dq, dbias, dparams = _dq(cfg, q, k, v, opt, lse, di, do)
  dk, dv = _dkv(cfg, q, k, v, opt, lse, di, do)
  return dq, dk, dv, dbias, dparams


_flash = common.make_flash(_forward, _backward)


# ------------------------------------------------------------------ public API

# Scalar-prefetch tables live in SMEM (1 MiB per TensorCore on current chips); keep
# them well inside it.
SMEM_TABLE_BUDGET = 512 * 1024
# score_mod parameters are whole-array VMEM blocks in every kernel (double-buffered
# by the pipeline); VMEM is 16-128 MiB per core depending on the chip, shared with
# the q / k / v tiles, so small tables only.
PARAMS_VMEM_BUDGET = 2 * 1024 * 1024


def _smem_reason(plan) -> str | None:
  table_bytes = plan.table_bytes()
  if table_bytes <= SMEM_TABLE_BUDGET:
    return None
  return (f'the block tables need {table_bytes} bytes of SMEM, more than the '
          f'{SMEM_TABLE_BUDGET}-byte budget (use larger block_sizes or '
          "implementation='xla')")


def _hardware_reason(query, key, value, problem, block_q: int, block_kv: int,
                     plan=None) -> str | None:
  """Why these inputs cannot compile with Mosaic (None: they can).

  `block_q` / `block_kv` are the tiles (a DynamicBlockMask's own blocks).
  """
  if any(x.dtype == jnp.float64 for x in (query, key, value)):
    return 'float64 inputs (Mosaic has no float64)'
  owner = (' of the DynamicBlockMask (its blocks are the kernel tiles)'
           if problem.block_mask is not None else '')
  for name, size in (('block_q', block_q), ('block_kv', block_kv)):
    if size % NUM_LANES:
      return (f'{name}={size}{owner} is not a multiple of {NUM_LANES} '
              '(the lane dimension of a logits tile; smaller tiles run in '
              'interpret mode only)')
  if problem.score_mod is not None:
    leaves = jax.tree_util.tree_leaves(problem.score_mod.params)
    if any(jnp.result_type(x) == jnp.float64 for x in leaves):
      return 'float64 score_mod params (Mosaic has no float64)'
    size = common.params_bytes(problem)
    if size > PARAMS_VMEM_BUDGET:
      return (f'the score_mod params need {size} bytes of VMEM, more than the '
              f'{PARAMS_VMEM_BUDGET}-byte budget')
    reason = common.score_mod_reason(problem.score_mod)
    if reason:
      return reason
  if plan is None:
    n, t, s = query.shape[2], query.shape[1], key.shape[1]
    plan = common.plan_for(problem, t, s, n, block_q, block_kv)
  return _smem_reason(plan)


def unsupported(query: jax.Array, key: jax.Array, value: jax.Array,
                problem) -> str | None:
  """Why this problem cannot compile on this TPU (None: it can).

  Every problem runs in interpret mode (any backend but TPU); on a TPU backend the
  inputs and score_mod params must not be float64 (Mosaic has none), the score_mod
  must lower (no gathers / dynamic slices: `common.score_mod_reason`), its params
  must fit `PARAMS_VMEM_BUDGET`, and the scalar tables of the default 128 x 128
  tiles must fit `SMEM_TABLE_BUDGET`. A DynamicBlockMask's blocks are the tiles: they
  must be multiples of 128, and its lists (plus the inner mask's tables and the
  on-device bitmap-fetch table) must fit the same SMEM budget.
  """
  if jax.default_backend() != 'tpu':
    return None
  block_q, block_kv = DEFAULT_BLOCK_Q, DEFAULT_BLOCK_KV  # unless the mask fixes them
  if problem.block_mask is not None:
    block_q, block_kv = problem.block_mask.block_q, problem.block_mask.block_kv
  return _hardware_reason(query, key, value, problem, block_q, block_kv)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, problem, *,
              block_sizes: BlockSizes | None = None,
              interpret: bool | None = None):
  """Block-sparse flash attention on TPU for a `kernels.problem.AttentionProblem`.

  Every feature of the contract is supported: the static mask (mask_obj AND a
  concrete batch-independent `mask` array) drives the block lists, or a traced
  `DynamicBlockMask` (`problem.block_mask`) does: its kv-block lists are
  scalar-prefetched (the grid's last axis is its budget; steps past a row's count
  are skipped and re-use the last block index, so no new DMA), its inner static mask
  is looked up per tile (FULL: no mask work, PARTIAL: bitmap, EMPTY: skipped), and
  the dK / dV kernel walks the transposed lists built on device; `bias` and any
  other `mask` array are added to the logits tile by tile; score_mod, dropout, sinks,
  segments, soft-cap run per tile in all three kernels.

  Args:
    query, key, value, problem: see `kernels.problem` (validated by the API).
    block_sizes: tile sizes, default 128 x 128 (lengths are padded to multiples);
      multiples of 8 run in interpret mode, Mosaic needs multiples of 128. With a
      DynamicBlockMask the tiles are its blocks: leave None or pass equal sizes.
    interpret: run the Pallas interpreter; default True unless the backend is TPU.

  Returns:
    out [B, T, N, H_v] (and lse [B, N, T] float32 with `problem.return_residuals`).

  Raises:
    ValueError: when compiling for a TPU (interpret=False) what `unsupported` names;
      block_sizes that disagree with a DynamicBlockMask's blocks.
  """
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError('block_sizes must be a kernels.pallas.tpu.BlockSizes, got '
                    f'{type(block_sizes).__name__}.')
  common.check_dynamic_block_sizes(problem, block_sizes, _NAME)
  if block_sizes is None:
    block_sizes = BlockSizes()
  interpret = common.check_interpret(interpret, 'tpu')
  cfg, opt = common.configure(
      query, key, value, problem, block_q=block_sizes.block_q,
      block_kv=block_sizes.block_kv, interpret=interpret)
  if not interpret:
    reason = _hardware_reason(query, key, value, problem, cfg.plan.block_q,
                              cfg.plan.block_kv, cfg.plan)
    if reason:
      raise ValueError(f'{_NAME} does not support these inputs: {reason}.')
  return common.run(_flash, cfg, query, key, value, opt,
                    problem.return_residuals)
