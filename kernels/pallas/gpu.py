"""Block-sparse flash attention for GPU (Pallas Triton lowering), driven by a `BlockMask`.

FlashAttention-2 (Dao, 2023): one program per (batch, query head, q block) keeps its
q tile and the running max / sum / accumulator in registers and walks, with a
`lax.fori_loop` whose trip count is the row's active-block count, only the kv blocks
listed for it in the compiled mask. FULL tiles take the unmasked branch of a
`lax.cond`; PARTIAL tiles load their deduplicated int8 bitmap. The backward pass is a
dq kernel (same lists) and a fused dk/dv kernel with one program per (batch, kv head,
kv block) that loops over the G query heads sharing that kv head and over each head's
transposed q list, so k/v and dk/dv are never repeated per query head. An additive
bias is read tile by tile; the dq kernel also stores the per-tile logits gradient.

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

from attention.masks import base as masks_base
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


def _logits(q, k, scale, soft_cap):
  """Scaled (soft-capped) float32 logits [bq, bk] and tanh for the soft-cap grad."""
  s = _dot(q, k, trans_b=True) * scale
  if soft_cap is None:
    return s, None
  t = jnp.tanh(s / soft_cap)
  return soft_cap * t, t


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


def _kv_tile(j, u, i, bk, idx_ref, part_ref, k_ref, v_ref, kv_seg_ref):
  """Step j of row (u, i): bitmap index and the listed k / v / segment-id tile."""
  part = part_ref[u, i, j]
  start = pl.multiple_of(idx_ref[u, i, j] * bk, bk)
  kv_ids = None if kv_seg_ref is None else kv_seg_ref[pl.ds(start, bk)]
  return (part, start, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :],
          kv_ids)


def _branch(cfg, part, masked_fn, full_fn, carry):
  """FULL tiles skip the bitmap; PARTIAL tiles read it."""
  if not cfg.plan.has_partial:
    return full_fn(carry)
  return lax.cond(part >= 0, masked_fn, full_fn, carry)


def _tables(plan: common.Plan, which: str):
  """[head_map, indices, counts, part] and the int8 bitmaps [P * bq, bk]."""
  arrays = [jnp.asarray(a) for a in plan.tables(which)[:4]]
  pm = plan.partial_masks.astype(np.int8)
  arrays.append(jnp.asarray(pm.reshape(-1, pm.shape[-1])))
  return arrays, [_whole(a.shape) for a in arrays]


def _row_inputs(cfg, bq, sp, q_seg, kv_seg, bias):
  """Specs / args of segment ids and bias for the forward and dq grids."""
  specs, args = [], []
  if cfg.has_segments:
    specs += [pl.BlockSpec((None, bq), lambda bi, ni, i: (bi, i)),
              pl.BlockSpec((None, sp), lambda bi, ni, i: (bi, 0))]
    args += [q_seg, kv_seg]
  if cfg.has_bias:
    specs.append(pl.BlockSpec(
        (None, None, bq, sp),
        lambda bi, ni, i: (*cfg.bias_index(bi, ni), i, 0)))
    args.append(bias)
  return specs, args


# ------------------------------------------------------------------ forward


def _fwd_kernel(hm_ref, kv_idx_ref, kv_cnt_ref, kv_part_ref, pm_ref, q_ref,
                k_ref, v_ref, *refs, cfg: common.Config, bq: int, bk: int):
  opt, (o_ref, lse_ref) = common.unpack_refs(refs, cfg,
                                             ('seg', 'bias', 'sinks'))
  n, i = pl.program_id(1), pl.program_id(2)
  u = hm_ref[n]
  q = q_ref[...]
  q_ids = None if opt['q_seg'] is None else opt['q_seg'][...]
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
    part, start, k, v, kv_ids = _kv_tile(j, u, i, bk, kv_idx_ref, kv_part_ref,
                                         k_ref, v_ref, opt['kv_seg'])

    def update(masked, carry):
      acc, m_prev, l_prev = carry
      s, _ = _logits(q, k, cfg.scale, cfg.soft_cap)
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
      acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
      return acc, m_next, l_next

    return _branch(cfg, part, functools.partial(update, True),
                   functools.partial(update, False), carry)

  acc, m, l = lax.fori_loop(0, kv_cnt_ref[u, i], body, (acc0, m0, l0))
  has = l > 0.0
  safe = jnp.where(has, l, 1.0)
  o_ref[...] = jnp.where(has[:, None], acc / safe[:, None],
                         0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(has, m + jnp.log(safe), -jnp.inf)


def _forward(cfg: common.Config, q, k, v, bias, sinks, q_seg, kv_seg):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  g = cfg.group
  args, in_specs = _tables(plan, 'kv')
  q_map = lambda bi, ni, i: (bi, ni, i, 0)
  kv_map = lambda bi, ni, i: (bi, common.kv_head(ni, g), 0, 0)
  in_specs += [pl.BlockSpec((None, None, bq, h), q_map),
               pl.BlockSpec((None, None, sp, h), kv_map),
               pl.BlockSpec((None, None, sp, hv), kv_map)]
  args += [q, k, v]
  specs, extra = _row_inputs(cfg, bq, sp, q_seg, kv_seg, bias)
  in_specs += specs
  args += extra
  if cfg.has_sinks:
    in_specs.append(_whole((n,)))
    args.append(sinks.astype(jnp.float32))
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


def _dq_kernel(hm_ref, kv_idx_ref, kv_cnt_ref, kv_part_ref, pm_ref, q_ref,
               k_ref, v_ref, lse_ref, di_ref, do_ref, *refs,
               cfg: common.Config, bq: int, bk: int):
  opt, refs = common.unpack_refs(refs, cfg, ('seg', 'bias'))
  if cfg.has_bias:
    _, dq_ref, dbias_ref = refs  # refs[0]: the aliased zeros input
  else:
    (dq_ref,), dbias_ref = refs, None
  n, i = pl.program_id(1), pl.program_id(2)
  u = hm_ref[n]
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  di = di_ref[...]
  q_ids = None if opt['q_seg'] is None else opt['q_seg'][...]

  def body(j, dq):
    part, start, k, v, kv_ids = _kv_tile(j, u, i, bk, kv_idx_ref, kv_part_ref,
                                         k_ref, v_ref, opt['kv_seg'])

    def update(masked, dq):
      s, t = _logits(q, k, cfg.scale, cfg.soft_cap)
      if opt['bias'] is not None:
        s = s + opt['bias'][:, pl.ds(start, bk)].astype(jnp.float32)
      vis = _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked)
      p = jnp.exp(s - lse[:, None])
      if vis is not None:
        p = jnp.where(vis, p, 0.0)
      dp = _dot(do, v, trans_b=True)  # [bq, bk]
      ds = p * (dp - di[:, None])  # d logits (after the soft-cap)
      if dbias_ref is not None:
        dbias_ref[:, pl.ds(start, bk)] = ds
      if t is not None:
        ds = ds * (1.0 - t * t)
      return dq + _dot(ds.astype(k.dtype), k)

    return _branch(cfg, part, functools.partial(update, True),
                   functools.partial(update, False), dq)

  dq = lax.fori_loop(0, kv_cnt_ref[u, i], body,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dq(cfg: common.Config, q, k, v, bias, q_seg, kv_seg, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  sp, hv = k.shape[2], v.shape[-1]
  g = cfg.group
  args, in_specs = _tables(plan, 'kv')
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
  specs, extra = _row_inputs(cfg, bq, sp, q_seg, kv_seg, bias)
  in_specs += specs
  args += extra
  out_specs = [pl.BlockSpec((None, None, bq, h), q_map)]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  aliases = {}
  if cfg.has_bias:
    # d logits per active tile; EMPTY tiles keep the aliased zeros.
    in_specs.append(pl.BlockSpec(memory_space=pl.ANY))
    aliases = {len(args): 1}
    args.append(jnp.zeros((b, n, tp, sp), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, bq, sp), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, sp), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk),
      grid=(b, n, tp // bq),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg, h),
      interpret=cfg.interpret,
      name='block_sparse_flash_dq',
  )(*args)
  return outs[0], (outs[1] if cfg.has_bias else None)


# ------------------------------------------------------------------ backward: dk, dv


def _dkv_kernel(hm_ref, q_idx_ref, q_cnt_ref, q_part_ref, pm_ref, q_ref, k_ref,
                v_ref, lse_ref, di_ref, do_ref, *refs, cfg: common.Config,
                bq: int, bk: int):
  opt, (dk_ref, dv_ref) = common.unpack_refs(refs, cfg, ('seg', 'bias'))
  kh, kb = pl.program_id(1), pl.program_id(2)
  k = k_ref[...]
  v = v_ref[...]
  kv_ids = None if opt['kv_seg'] is None else opt['kv_seg'][...]

  def head(gi, carry):
    n = kh * cfg.group + gi
    u = hm_ref[n]
    bias_head = n if cfg.bias_heads else 0

    def body(j, carry):
      qb = q_idx_ref[u, kb, j]
      part = q_part_ref[u, kb, j]
      start = pl.multiple_of(qb * bq, bq)
      q = q_ref[gi, pl.ds(start, bq), :]
      do = do_ref[gi, pl.ds(start, bq), :]
      lse = lse_ref[gi, pl.ds(start, bq)]
      di = di_ref[gi, pl.ds(start, bq)]
      q_ids = None if opt['q_seg'] is None else opt['q_seg'][pl.ds(start, bq)]

      def update(masked, carry):
        dk, dv = carry
        s, t = _logits(q, k, cfg.scale, cfg.soft_cap)  # [bq, bk]
        if opt['bias'] is not None:
          s = s + opt['bias'][bias_head, pl.ds(start, bq), :].astype(
              jnp.float32)
        vis = _tile_visibility(part, pm_ref, bq, q_ids, kv_ids, masked)
        p = jnp.exp(s - lse[:, None])
        if vis is not None:
          p = jnp.where(vis, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)  # [bk, Hv]
        dp = _dot(do, v, trans_b=True)  # [bq, bk]
        ds = p * (dp - di[:, None])
        if t is not None:
          ds = ds * (1.0 - t * t)
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [bk, H]
        return dk, dv

      return _branch(cfg, part, functools.partial(update, True),
                     functools.partial(update, False), carry)

    return lax.fori_loop(0, q_cnt_ref[u, kb], body, carry)

  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv = lax.fori_loop(0, cfg.group, head, init)
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(cfg: common.Config, q, k, v, bias, q_seg, kv_seg, lse, di, do):
  plan = cfg.plan
  bq, bk = plan.block_q, plan.block_kv
  b, n, tp, h = q.shape
  kh_count, sp, hv = k.shape[1], k.shape[2], v.shape[-1]
  g = cfg.group
  args, in_specs = _tables(plan, 'q')
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
    args += [q_seg, kv_seg]
  if cfg.has_bias:
    nb = bias.shape[1]
    in_specs.append(pl.BlockSpec(
        (None, nb, tp, bk),
        lambda bi, kh, kb: (bi if cfg.bias_batch else 0, 0, 0, kb)))
    args.append(bias)
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


def _backward(cfg, q, k, v, bias, q_seg, kv_seg, lse, di, do):
  dq, dlogits = _dq(cfg, q, k, v, bias, q_seg, kv_seg, lse, di, do)
  dk, dv = _dkv(cfg, q, k, v, bias, q_seg, kv_seg, lse, di, do)
  return dq, dk, dv, dlogits


_flash = common.make_flash(_forward, _backward)


# ------------------------------------------------------------------ public API


def attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
              scale: float, bias: jax.Array | None = None,
              mask: jax.Array | None = None,
              mask_obj: masks_base.Mask | None = None,
              logits_soft_cap: float | None = None,
              sinks: jax.Array | None = None,
              q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None,
              return_residuals: bool = False,
              block_sizes: BlockSizes | None = None,
              interpret: bool | None = None):
  """Block-sparse flash attention on GPU (see `attention.dot_product_attention`).

  Inputs are validated by `dot_product_attention`; this is its implementation entry.

  Every input combination of the dispatch contract is supported: the static mask
  (mask_obj AND a concrete batch-independent `mask` array) drives the block lists;
  `bias` and any other `mask` array are added to the logits tile by tile.

  Args (beyond the dispatch contract):
    block_sizes: tiles and launch parameters, default 64 x 64.
    interpret: run the Pallas interpreter; default True unless the backend is GPU.

  Returns:
    out [B, T, N, H_v] (and lse [B, N, T] float32 with `return_residuals`).
  """
  if block_sizes is None:
    block_sizes = BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise TypeError('block_sizes must be a kernels.pallas.gpu.BlockSizes, got '
                    f'{type(block_sizes).__name__}.')
  interpret = common.check_interpret(interpret, 'gpu')
  cfg, bias = common.configure(
      query, key, value, scale=scale, bias=bias, mask=mask, mask_obj=mask_obj,
      logits_soft_cap=logits_soft_cap, sinks=sinks, q_segment_ids=q_segment_ids,
      block_q=block_sizes.block_q, block_kv=block_sizes.block_kv,
      interpret=interpret, extra=block_sizes)
  pad = lambda d: max(MIN_BLOCK, common.next_power_of_two(d))
  return common.run(_flash, cfg, query, key, value, bias, sinks,
                    q_segment_ids, kv_segment_ids, return_residuals,
                    head_dim_pad=pad(query.shape[-1]),
                    value_dim_pad=pad(value.shape[-1]))
