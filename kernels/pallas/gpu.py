"""Block-sparse flash attention for GPU (Pallas Triton lowering), driven by a `BlockMask`.

FlashAttention-2 (Dao, 2023): one program per (batch, query head, q block) keeps its
q tile and the running max / sum / accumulator in registers and walks, with a
`lax.fori_loop` whose trip count is the row's active-block count, only the kv blocks
listed for it in the compiled mask (or in a traced `DynamicBlockMask`'s int32 lists,
passed as inputs; see `common.DynamicPlan`). FULL tiles take the unmasked branch of a
`lax.cond`; PARTIAL tiles load their deduplicated int8 bitmap; EMPTY tiles (listed
blocks a DynamicBlockMask's inner mask hides) are skipped. The backward pass is a
dq kernel (same lists) and a fused dk/dv kernel with one program per (batch, kv head,
kv block) that loops over the G query heads sharing that kv head and over each head's
transposed q list, so k/v and dk/dv are never repeated per query head. An additive
bias is read tile by tile; the dq kernel also writes per-program bias-gradient and
score_mod-parameter-gradient partials (summed outside, so no two programs write the
same memory). score_mod runs per tile after the soft-cap (its params are whole-array
inputs); dropout recomputes its counter-based keep mask per tile from the seed.

Triton constraints followed: block_q / block_kv are powers of two >= 16 (tl.dot minimum),
head dims are zero-padded to a power of two >= 16 outside the kernel (exact: zero
columns add nothing to q.k and produce zero output columns that are sliced off),
tables are int32, bitmaps int8, accumulation in float32; num_warps / num_stages are
passed as `plgpu.CompilerParams`. On CPU the kernels run with `interpret=True`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from kernels.pallas import common

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_KV = 64
MIN_BLOCK = 16
_NAME = "implementation='pallas_gpu'"


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two >= 16) and Triton launch parameters."""
  block_q: int = DEFAULT_BLOCK_Q
  block_kv: int = DEFAULT_BLOCK_KV
  num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
  num_stages: int = 2

  def __post_init__(self):
    for name in ('block_q', 'block_kv'):
      value = common.check_block(name, getattr(self, name), power_of_two=True)
      if value < MIN_BLOCK:
        raise ValueError(f'{name} must be >= {MIN_BLOCK} (tl.dot), got {value}.')
    if self.num_warps is not None:
      common.check_block('num_warps', self.num_warps, power_of_two=True)
    common.check_block('num_stages', self.num_stages)


def _whole(shape):
  """A BlockSpec holding the whole array in every program."""
  return pl.BlockSpec(tuple(shape), lambda *_: (0,) * len(shape))


def _compiler_params(cfg: common.Config, head_dim: int):
  sizes = cfg.extra
  warps = sizes.num_warps or (4 if head_dim <= 64 else 8)
  return plgpu.CompilerParams(num_warps=warps, num_stages=sizes.num_stages)


def _dot(a, b, **kw):
  """tl.dot with a float32 result (float64 inputs in interpret mode included)."""
  return plgpu.dot(a, b, **kw).astype(jnp.float32)


def _tile_ids(cfg: common.Config, b, n, q_start, kv_start, bq: int, bk: int):
  """(b, h, q_idx [bq, 1], kv_idx [1, bk]) int32 (global indices), or None."""
  if not cfg.needs_ids:
    return None
  full = lambda x: jnp.full((1, 1), x, jnp.int32)
  q = (q_start + jnp.arange(bq, dtype=jnp.int32))[:, None]
  kv = (kv_start + jnp.arange(bk, dtype=jnp.int32))[None, :]
  return full(b), full(n), q, kv


def _seed(opt):
  return None if opt['seed'] is None else (opt['seed'][0], opt['seed'][1])


def _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked):
  """Bitmap (if `masked`) AND same segment, or None when all visible."""
  vis = None
  if masked:
    start = pl.multiple_of(part * bq, bq)
    vis = pm_ref[pl.ds(start, bq), :] != 0  # [bq, bk]
  if q_ids is not None:
    same = q_ids[:, None] == kv_ids[None, :]
    vis = same if vis is None else jnp.logical_and(vis, same)
  return vis


def _kv_tile(cfg, tabs, b, n, i, j, bk, k_ref, v_ref, kv_seg_ref):
  """Step j of row i: tile class and the listed k / v / segment-id tile."""
  plan = cfg.plan
  part = plan.part('kv', tabs, b, n, i, j) if plan.needs_part else None
  start = pl.multiple_of(plan.block('kv', tabs, b, n, i, j) * bk, bk)
  kv_ids = None if kv_seg_ref is None else kv_seg_ref[pl.ds(start, bk)]
  return (part, start, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :],
          kv_ids)


def _branch(cfg, part, masked_fn, full_fn, carry):
  """FULL tiles skip the bitmap; PARTIAL tiles read it; EMPTY tiles (an inner
  mask hiding a listed block of a DynamicBlockMask) leave the carry unchanged."""
  plan = cfg.plan
  if not plan.needs_part:
    return full_fn(carry)
  run = full_fn
  if plan.has_partial:
    run = lambda c: lax.cond(part >= 0, masked_fn, full_fn, c)
  if not plan.has_empty:
    return run(carry)
  return lax.cond(part >= common.FULL_TILE, run, lambda c: c, carry)


_NUM_TABLES = 4  # (head_map | maps), indices, counts, (part | tile)


def _tables(plan, which: str, opt):
  """The plan's look-up tables (whole-array int32 inputs) and the int8 bitmaps
  [P * bq, bk]."""
  arrays = plan.kernel_tables(which, opt)[:_NUM_TABLES]
  pm = plan.partial_masks.astype(np.int8)
  arrays.append(jnp.asarray(pm.reshape(-1, pm.shape[-1])))
  return arrays, [_whole(a.shape) for a in arrays]


def _row_inputs(cfg, bq, sp, opt):
  """Specs / args of segment ids and bias for the forward and dq grids."""
  specs, args = [], []
  if cfg.has_segments:
    specs += [pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
              pl.BlockSpec((None, sp), lambda bi, ni, i: (bi, 0))]
    args += [opt['q_seg'], opt['kv_seg']]
  if cfg.has_bias:
    rows = bq if cfg.bias_rows else 1
    specs.append(pl.BlockSpec(
        (None, None, rows, sp),
        lambda bi, ni, i: (*cfg.bias_index(bi, ni), i if cfg.bias_rows else 0,
                           0)))
    args.append(opt['bias'])
  return specs, args


def _extra_inputs(cfg, opt):
  """Specs / args of the dropout seed and the score_mod params (whole arrays)."""
  specs, args = [], []
  if cfg.has_dropout:
    specs.append(_whole((2,)))
    args.append(opt['seed'])
  for x in opt['params']:
    specs.append(_whole(x.shape))
    args.append(x)
  return specs, args


def _logits(cfg, q, k, leaves, ids):
  s = _dot(q, k, trans_b=True) * cfg.scale  # [bq, bk]
  return common.tile_logits(cfg, s, leaves, ids)


# ------------------------------------------------------------------ forward


def _fwd_kernel(*refs, cfg: common.Config, bq: int, bk: int):
  tabs, pm_ref = refs[:_NUM_TABLES], refs[_NUM_TABLES]
  q_ref, k_ref, v_ref = refs[_NUM_TABLES + 1:_NUM_TABLES + 4]
  opt, (o_ref, lse_ref) = common.unpack_refs(
      refs[_NUM_TABLES + 4:], cfg, ('seg', 'bias', 'sinks', 'seed', 'params'))
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[...]
  q_ids = None if opt['q_seg'] is None else opt['q_seg'][...]
  leaves = common.read_params(cfg, opt['params'])
  hv = o_ref.shape[-1]
  if opt['sinks'] is not None:
    # The sink is one more logit with zero value: start from m = sink, l = 1.
    m0 = jnp.full((bq,), opt['sinks'][n], jnp.float32)
    l0 = jnp.ones((bq,), jnp.float32)
  else:
    m0 = jnp.full((bq,), common.MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
  acc0 = jnp.zeros((bq, hv), jnp.float32)

  def body(j, carry):
    part, start, k, v, kv_ids = _kv_tile(cfg, tabs, b, n, i, j, bk, k_ref,
                                         v_ref, opt['kv_seg'])
    ids = _tile_ids(cfg, b, n, i * bq, start, bq, bk)

    def update(masked, carry):
      acc, m_prev, l_prev = carry
      s, _, _ = _logits(cfg, q, k, leaves, ids)
      if opt['bias'] is not None:
        s = s + opt['bias'][:, pl.ds(start, bk)].astype(jnp.float32)
      vis = _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked)
      if vis is not None:
        s = jnp.where(vis, s, common.MASK_VALUE)
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
      p = jnp.exp(s - m_next[:, None])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      alpha = jnp.exp(m_prev - m_next)
      l_next = alpha * l_prev + jnp.sum(p, axis=1)
      if cfg.has_dropout:  # P V uses the dropped probabilities, l does not
        p = p * common.tile_dropout(cfg, _seed(opt), ids)
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
      return acc, m_next, l_next

    return _branch(cfg, part, functools.partial(update, True),
                   functools.partial(update, False), carry)

  count = cfg.plan.count('kv', tabs, b, n, i)
  acc, m, l = lax.fori_loop(0, count, body, (acc0, m0, l0))
  inv, lse = common.safe_normalize(l, m)
  o_ref[...] = (acc * inv[:, None]).astype(o_ref.dtype)
  lse_ref[...] = lse


def _forward(cfg: common.Config, q, k, v, opt):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  g = cfg.group
  args, in_specs = _tables(plan, 'kv', opt)
  q_map = lambda bi, ni, i: (bi, ni, i, 0)
  kv_map = lambda bi, ni, i: (bi, common.kv_head(ni, g), 0, 0)
  in_specs += [pl.BlockSpec((None, None, bq, h), q_map),
               pl.BlockSpec((None, None, sp, h), kv_map),
               pl.BlockSpec((None, None, sp, hv), kv_map)]
  args += [q, k, v]
  specs, extra = _row_inputs(cfg, bq, sp, opt)
  in_specs += specs
  args += extra
  if cfg.has_sinks:
    in_specs.append(_whole((n,)))
    args.append(opt['sinks'].astype(jnp.float32))
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(b, n, tp // bq),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bq, hv), q_map),
                 pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=_compiler_params(cfg, h),
      interpret=cfg.interpret,
      name='block_sparse_flash_fwd',
  )(*args)


# ------------------------------------------------------------------ backward: dq


def _dq_kernel(*refs, cfg: common.Config, bq: int, bk: int):
  tabs, pm_ref = refs[:_NUM_TABLES], refs[_NUM_TABLES]
  q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref = refs[_NUM_TABLES + 1:
                                                      _NUM_TABLES + 7]
  opt, refs = common.unpack_refs(refs[_NUM_TABLES + 7:], cfg,
                                 ('seg', 'bias', 'seed', 'params'))
  refs = refs[1:] if cfg.has_bias else refs  # the aliased zeros input
  dq_ref, refs = refs[0], refs[1:]
  dbias_ref, dparam_refs = ((refs[0], refs[1:]) if cfg.has_bias else
                            (None, refs))
  floats = common.float_param_indices(cfg)
  b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  di = di_ref[...]
  q_ids = None if opt['q_seg'] is None else opt['q_seg'][...]
  leaves = common.read_params(cfg, opt['params'])

  def body(j, carry):
    part, start, k, v, kv_ids = _kv_tile(cfg, tabs, b, n, i, j, bk, k_ref,
                                         v_ref, opt['kv_seg'])
    ids = _tile_ids(cfg, b, n, i * bq, start, bq, bk)

    def update(masked, carry):
      dq, dparams = carry
      s, pre, t = _logits(cfg, q, k, leaves, ids)
      if opt['bias'] is not None:
        s = s + opt['bias'][:, pl.ds(start, bk)].astype(jnp.float32)
      vis = _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked)
      p = jnp.exp(s - lse[:, None])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      dp = _dot(do, v, trans_b=True)  # [bq, bk]
      if cfg.has_dropout:
        dp = dp * common.tile_dropout(cfg, _seed(opt), ids)
      ds = p * (dp - di[:, None])  # d logits (after bias)
      if dbias_ref is not None:
        if cfg.bias_rows:
          dbias_ref[:, pl.ds(start, bk)] = ds
        else:  # key bias: this q block's column sums
          dbias_ref[pl.ds(start, bk)] = jnp.sum(ds, axis=0)
      ds, dmod = common.tile_dlogits(cfg, ds, pre, t, leaves, ids, True)
      dparams = tuple(a + dmod[idx].astype(jnp.float32)
                      for a, idx in zip(dparams, floats))
      return dq + _dot(ds.astype(k.dtype), k), dparams

    return _branch(cfg, part, functools.partial(update, True),
                   functools.partial(update, False), carry)

  init = (jnp.zeros(q.shape, jnp.float32),
          tuple(jnp.zeros(cfg.param_shapes[idx][0], jnp.float32)
                for idx in floats))
  count = cfg.plan.count('kv', tabs, b, n, i)
  dq, dparams = lax.fori_loop(0, count, body, init)
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)
  for r, d in zip(dparam_refs, dparams):  # this program's own slice
    r[...] = d.reshape(r.shape)


def _dq(cfg: common.Config, q, k, v, opt, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  nq = tp // bq
  g = cfg.group
  args, in_specs = _tables(plan, 'kv', opt)
  q_map = lambda bi, ni, i: (bi, ni, i, 0)
  row_map = lambda bi, ni, i: (bi, ni, i)
  kv_map = lambda bi, ni, i: (bi, common.kv_head(ni, g), 0, 0)
  in_specs += [pl.BlockSpec((None, None, bq, h), q_map),
               pl.BlockSpec((None, None, sp, h), kv_map),
               pl.BlockSpec((None, None, sp, hv), kv_map),
               pl.BlockSpec((None, None, bq), row_map),
               pl.BlockSpec((None, None, bq), row_map),
               pl.BlockSpec((None, None, bq, hv), q_map)]
  args += [q, k, v, lse, di, do]
  specs, extra = _row_inputs(cfg, bq, sp, opt)
  in_specs += specs
  args += extra
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  out_specs = [pl.BlockSpec((None, None, bq, h), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  aliases = {}
  if cfg.has_bias:
    # Per-program d-bias partials: [B, N, Tp, Sp] d logits per active tile, or the
    # key bias's column sums per q block [B, N, nq, Sp]; EMPTY tiles keep the
    # aliased zeros.
    if cfg.bias_rows:
      shape, spec = (b, n, tp, sp), pl.BlockSpec((None, None, bq, sp), q_map)
    else:
      shape = (b, n, nq, sp)
      spec = pl.BlockSpec((None, None, None, sp), q_map)
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    aliases = {len(args): 1}
    args.append(jnp.zeros(shape, jnp.float32))
    out_specs.append(spec)
    out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
  for idx in common.float_param_indices(cfg):
    # One [1, *shape] slice of the params gradient per (b, n, q block) program, so
    # no two programs write the same memory.
    shape = common.kernel_param_shape(cfg.param_shapes[idx][0])
    zeros = (0,) * len(shape)
    out_specs.append(pl.BlockSpec(
        (None,) + shape,
        lambda bi, ni, i, z=zeros: ((bi * n + ni) * nq + i,) + z))
    out_shape.append(jax.ShapeDtypeStruct((b * n * nq,) + shape, jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(b, n, nq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg, h),
      interpret=cfg.interpret,
      name='block_sparse_flash_dq',
  )(*args)
  outs = list(outs)
  dq = outs.pop(0)
  dbias = None
  if cfg.has_bias:
    dbias = common.sum_dbias(outs.pop(0), cfg, opt['bias'].shape)
  return dq, dbias, common.sum_dparams(cfg, outs)


# ------------------------------------------------------------------ backward: dk, dv


def _dkv_kernel(*refs, cfg: common.Config, bq: int, bk: int):
  tabs, pm_ref = refs[:_NUM_TABLES], refs[_NUM_TABLES]
  q_ref, k_ref, v_ref, lse_ref, di_ref, do_ref = refs[_NUM_TABLES + 1:
                                                      _NUM_TABLES + 7]
  opt, (dk_ref, dv_ref) = common.unpack_refs(
      refs[_NUM_TABLES + 7:], cfg, ('seg', 'bias', 'seed', 'params'))
  plan = cfg.plan
  b, kh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  kv_ids = None if opt['kv_seg'] is None else opt['kv_seg'][...]
  leaves = common.read_params(cfg, opt['params'])

  def head(gi, carry):
    n = kh * cfg.group + gi
    bias_head = n if cfg.bias_heads else 0

    def body(j, carry):
      qb = plan.block('q', tabs, b, n, kb, j)
      part = plan.part('q', tabs, b, n, kb, j) if plan.needs_part else None
      start = pl.multiple_of(qb * bq, bq)
      q = q_ref[gi, pl.ds(start, bq), :]
      do = do_ref[gi, pl.ds(start, bq), :]
      lse = lse_ref[gi, pl.ds(start, bq)]
      di = di_ref[gi, pl.ds(start, bq)]
      q_ids = None if opt['q_seg'] is None else opt['q_seg'][pl.ds(start, bq)]
      ids = _tile_ids(cfg, b, n, start, kb * bk, bq, bk)

      def update(masked, carry):
        dk, dv = carry
        s, pre, t = _logits(cfg, q, k, leaves, ids)  # [bq, bk]
        if opt['bias'] is not None:
          rows = pl.ds(start, bq) if cfg.bias_rows else pl.ds(0, 1)
          s = s + opt['bias'][bias_head, rows, :].astype(jnp.float32)
        vis = _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked)
        p = jnp.exp(s - lse[:, None])
        if vis is not None:
          p = jnp.where(vis, p, 0.0)
        dp = _dot(do, v, trans_b=True)  # [bq, bk]
        p_drop = p
        if cfg.has_dropout:
          mult = common.tile_dropout(cfg, _seed(opt), ids)
          p_drop, dp = p * mult, dp * mult
        dv = dv + _dot(p_drop.astype(do.dtype), do, trans_a=True)  # [bk, Hv]
        ds = p * (dp - di[:, None])
        ds, _ = common.tile_dlogits(cfg, ds, pre, t, leaves, ids, False)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [bk, H]
        return dk, dv

      return _branch(cfg, part, functools.partial(update, True),
                     functools.partial(update, False), carry)

    return lax.fori_loop(0, plan.count('q', tabs, b, n, kb), body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.group, head, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(cfg: common.Config, q, k, v, opt, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  kh_count, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = cfg.group
  args, in_specs = _tables(plan, 'q', opt)
  group_map = lambda bi, kh, kb: (bi, kh, 0, 0)  # block of G query heads
  kv_map = lambda bi, kh, kb: (bi, kh, kb, 0)
  in_specs += [pl.BlockSpec((None, g, tp, h), group_map),
               pl.BlockSpec((None, None, bk, h), kv_map),
               pl.BlockSpec((None, None, bk, hv), kv_map),
               pl.BlockSpec((None, g, tp), lambda bi, kh, kb: (bi, kh, 0)),
               pl.BlockSpec((None, g, tp), lambda bi, kh, kb: (bi, kh, 0)),
               pl.BlockSpec((None, g, tp, hv), group_map)]
  args += [q, k, v, lse, di, do]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, tp), lambda bi, kh, kb: (bi, 0)),
                 pl.BlockSpec((None, bk), lambda bi, kh, kb: (bi, kb))]
    args += [opt['q_seg'], opt['kv_seg']]
  if cfg.has_bias:
    bias = opt['bias']
    nb, rows = bias.shape[1], bias.shape[2]
    in_specs.append(pl.BlockSpec(
        (None, nb, rows, bk),
        lambda bi, kh, kb: (bi if cfg.bias_batch else 0, 0, 0, kb)))
    args.append(bias)
  specs, extra = _extra_inputs(cfg, opt)
  in_specs += specs
  args += extra
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(b, kh_count, sp // bk),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, bk, h), kv_map),
                 pl.BlockSpec((None, None, bk, hv), kv_map)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(cfg, h),
      interpret=cfg.interpret,
      name='block_sparse_flash_dkv',
  )(*args)


def _backward(cfg, q, k, v, opt, lse, di, do):
  dq, dbias, dparams = _dq(cfg, q, k, v, opt, lse, di, do)
  dk, dv = _dkv(cfg, q, k, v, opt, lse, di, do)
  return dq, dk, dv, dbias, dparams


_flash = common.make_flash(_forward, _backward)


# ------------------------------------------------------------------ public API

# Dynamic shared memory one Triton program may use: 227 KiB is the opt-in maximum
# per block on H100 / H200 (sm_90; 228 KiB per SM, 1 KiB reserved); A100 (sm_80)
# allows 163 KiB, so the estimate below is conservative only on sm_90.
SHARED_MEMORY_LIMIT = 227 * 1024
# Largest padded head dim accepted: the accumulators are [block, head_dim] float32
# register tiles; beyond 256 they spill (FlashAttention-2's kernels stop at 256 too).
MAX_HEAD_DIM = 256
# CUDA grid dims y / z (here query heads and q blocks / kv heads and kv blocks).
MAX_GRID_YZ = 65535
# score_mod params are loaded whole into every program (registers / shared memory).
PARAMS_BYTES_LIMIT = 16 * 1024
_TRITON_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


def _padded_dim(d: int) -> int:
  return max(MIN_BLOCK, common.next_power_of_two(d))


def shared_memory_bytes(sizes: BlockSizes, head_dim: int, value_dim: int,
                        itemsize: int) -> int:
  """Estimated shared memory of the largest kernel (dk/dv) for these tiles.

  Triton stages dot operands through shared memory; the tiles loaded inside the
  kv / q loop are pipelined `num_stages` deep. Per kernel: the loop tiles
  (forward / dq: k, v [block_kv, H / Hv]; dk/dv: q, do [block_q, H / Hv]) x stages,
  the tiles loaded once (q, do or k, v), and the p / ds tiles [block_q, block_kv]
  cast to the input dtype for the second dots; the maximum over the kernels.
  """
  bq, bk = sizes.block_q, sizes.block_kv
  h, hv = _padded_dim(head_dim), _padded_dim(value_dim)
  stages = sizes.num_stages
  fwd = bk * (h + hv) * stages + bq * (h + hv)
  dkv = bq * (h + hv) * stages + bk * (h + hv)
  return (max(fwd, dkv) + 2 * bq * bk) * itemsize


def _dynamic_sizes(problem, sizes: BlockSizes | None) -> BlockSizes | str:
  """The tiles of a DynamicBlockMask problem as BlockSizes (its blocks, the launch
  parameters of `sizes`), or why Triton cannot take them."""
  dyn = problem.block_mask
  for name in ('block_q', 'block_kv'):
    size = getattr(dyn, name)
    if size < MIN_BLOCK or size & (size - 1):
      return (f'{name}={size} of the DynamicBlockMask (its blocks are the kernel '
              f'tiles) is not a power of two >= {MIN_BLOCK} (tl.dot); other '
              'tiles run in interpret mode only')
  sizes = sizes or BlockSizes()
  return dataclasses.replace(sizes, block_q=dyn.block_q, block_kv=dyn.block_kv)


def _hardware_reason(query, key, value, problem, sizes: BlockSizes) -> str | None:
  """Why these inputs cannot compile with Triton (None: they can)."""
  if problem.block_mask is not None:
    sizes = _dynamic_sizes(problem, sizes)
    if isinstance(sizes, str):
      return sizes
  for name, x in (('query', query), ('key', key), ('value', value),
                  ('bias', problem.bias)):
    if x is not None and x.dtype not in _TRITON_DTYPES:
      return (f'{name} dtype {x.dtype} (Triton dots take float16 / bfloat16 / '
              'float32)')
  h, hv = query.shape[-1], value.shape[-1]
  for name, d in (('head_dim', h), ('value head_dim', hv)):
    if _padded_dim(d) > MAX_HEAD_DIM:
      return (f'{name} {d} (padded to {_padded_dim(d)}) exceeds {MAX_HEAD_DIM}, '
              'the largest register tile these kernels use')
  smem = shared_memory_bytes(sizes, h, hv, query.dtype.itemsize)
  if smem > SHARED_MEMORY_LIMIT:
    return (f'the tiles need about {smem} bytes of shared memory, more than '
            f'{SHARED_MEMORY_LIMIT} (use smaller block_sizes or fewer num_stages)')
  b, t, n, _ = query.shape
  s, kh = key.shape[1], key.shape[2]
  nq = -(-t // sizes.block_q)
  nk = -(-s // sizes.block_kv)
  if max(n, nq, kh, nk) > MAX_GRID_YZ:
    return (f'grid dims (heads {n}, q blocks {nq}, kv heads {kh}, kv blocks {nk}) '
            f'exceed the CUDA grid limit {MAX_GRID_YZ}')
  if problem.score_mod is not None:
    leaves = jax.tree_util.tree_leaves(problem.score_mod.params)
    for x in leaves:
      dt = jnp.result_type(x)
      if jnp.dtype(dt).itemsize == 8:
        return f'{dt} score_mod params (Triton kernels here use 32-bit types)'
      if any(d & (d - 1) for d in jnp.shape(x)):
        return (f'score_mod param of shape {list(jnp.shape(x))}: Triton blocks '
                'need power-of-two dims (pad the table)')
    size = common.params_bytes(problem)
    if size > PARAMS_BYTES_LIMIT:
      return (f'the score_mod params need {size} bytes, more than the '
              f'{PARAMS_BYTES_LIMIT} bytes loaded whole into every program')
    reason = common.score_mod_reason(problem.score_mod)
    if reason:
      return reason
  return None


def unsupported(query: jax.Array, key: jax.Array, value: jax.Array,
                problem) -> str | None:
  """Why this problem cannot compile with Triton on this GPU (None: it can).

  Every problem runs in interpret mode (any backend but GPU). On a GPU backend
  (default tiles): inputs / bias in float16, bfloat16 or float32 (Triton has no
  float64 dots); head dims padded to a power of two >= 16 (tl.dot's minimum, done
  outside the kernel) of at most `MAX_HEAD_DIM`; the shared-memory estimate
  (`shared_memory_bytes`) within `SHARED_MEMORY_LIMIT`; grid dims within the CUDA
  limit; score_mod params 32-bit with power-of-two dims, at most
  `PARAMS_BYTES_LIMIT` bytes, and a mod that lowers (`common.score_mod_reason`).
  A DynamicBlockMask's blocks are the tiles: powers of two >= 16, and the same
  shared-memory estimate at those tiles.
  """
  if jax.default_backend() != 'gpu':
    return None
  return _hardware_reason(query, key, value, problem, BlockSizes())


def attention(query: jax.Array, key: jax.Array, value: jax.Array, problem, *,
              block_sizes: BlockSizes | None = None,
              interpret: bool | None = None):
  """Block-sparse flash attention on GPU for a `kernels.problem.AttentionProblem`.

  Every feature of the contract is supported: the static mask (mask_obj AND a
  concrete batch-independent `mask` array) drives the block lists, or a traced
  `DynamicBlockMask` (`problem.block_mask`) does: its int32 kv-block lists are kernel
  inputs and each program loops over its row's count (a dynamic `fori_loop` bound),
  its inner static mask is looked up per tile (FULL: no mask work, PARTIAL:
  bitmap, EMPTY: skipped), and the dK / dV kernel loops over the transposed lists
  built on device; `bias` and any other `mask` array are added to the logits tile
  by tile; score_mod, dropout, sinks, segments, soft-cap run per tile in all three
  kernels.

  Args:
    query, key, value, problem: see `kernels.problem` (validated by the API).
    block_sizes: tiles and launch parameters, default 64 x 64. With a
      DynamicBlockMask the tiles are its blocks: leave None (default launch
      parameters) or pass equal block sizes.
    interpret: run the Pallas interpreter; default True unless the backend is GPU.

  Returns:
    out [B, T, N, H_v] (and lse [B, N, T] float32 with `problem.return_residuals`).

  Raises:
    ValueError: when compiling for a GPU (interpret=False) what `unsupported` names;
      block_sizes that disagree with a DynamicBlockMask's blocks.
  """
  if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
    raise TypeError('block_sizes must be a kernels.pallas.gpu.BlockSizes, got '
                    f'{type(block_sizes).__name__}.')
  common.check_dynamic_block_sizes(problem, block_sizes, _NAME)
  if block_sizes is None:
    block_sizes = BlockSizes()
  interpret = common.check_interpret(interpret, 'gpu')
  if not interpret:
    reason = _hardware_reason(query, key, value, problem, block_sizes)
    if reason:
      raise ValueError(f'{_NAME} does not support these inputs: {reason}.')
  cfg, opt = common.configure(
      query, key, value, problem, block_q=block_sizes.block_q,
      block_kv=block_sizes.block_kv, interpret=interpret, extra=block_sizes)
  return common.run(_flash, cfg, query, key, value, opt,
                    problem.return_residuals,
                    head_dim_pad=_padded_dim(query.shape[-1]),
                    value_dim_pad=_padded_dim(value.shape[-1]))
