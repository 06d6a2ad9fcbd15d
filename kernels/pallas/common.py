"""Shared plumbing of the Pallas block-sparse flash-attention kernels.

Both kernels (`kernels.pallas.tpu`, `kernels.pallas.gpu`) implement FlashAttention-2
(Dao, 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning") restricted to the active tiles of a compiled `BlockMask`, the same
block-sparse scheme as JAX's splash attention. This module owns what does not depend
on the hardware: input checks (`unsupported`), the static plan (the BlockMask turned
into per-query-head scalar tables), padding and layout, the `custom_vjp` wiring, and
the parts of the backward pass that are cheap elementwise XLA (delta = rowsum(o * do),
the sink gradient).

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

# Finite stand-in for -inf inside the kernels (as splash attention): exp() of it is 0
# and max() with it stays finite, so no NaN appears in fully masked rows.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, eq=False)
class FullMask(masks_base.Mask):
  """Every query sees every key (used when only padding needs masking)."""
  shape: tuple[int, int]

  def _predicate(self, q, k, h):
    del h
    return np.ones(np.broadcast_shapes(np.shape(q), np.shape(k)), dtype=bool)

  def _block_classes(self, block_q, block_kv, nq, nk):
    q0, q1, k0, k1, real = masks_base.block_ranges(self.shape, block_q,
                                                   block_kv, nq, nk)
    empty = (q0 > q1) | (k0 > k1)
    return np.where(real, masks_base.FULL,
                    np.where(empty, masks_base.EMPTY,
                             masks_base.PARTIAL)).astype(np.int8)


def _is_tracer(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


def unsupported(*, name: str, bias, mask, mask_obj, query=None,
                **unused) -> str | None:
  """Reasons shared by both Pallas kernels (None: supported).

  The kernels take visibility only from a static BlockMask (plus segment ids), so a
  dense `mask` array must be concrete and batch-independent (it is compiled into the
  BlockMask); additive `bias` is not implemented.
  """
  del mask_obj, query, unused
  if bias is not None:
    return (f'{name} does not implement additive `bias` (use implementation='
            "'xla' or 'reference')")
  if mask is not None:
    if _is_tracer(mask):
      return (f'{name} needs a concrete `mask` array to compile its BlockMask; '
              'got a traced array (pass a Mask object, e.g. '
              'attention.masks.from_array, or compute the mask outside jit)')
    if mask.shape[0] != 1:
      return (f'{name} needs a batch-independent `mask` (dim 0 of size 1) to '
              f'compile its BlockMask; got shape {tuple(mask.shape)}')
  return None


def effective_mask(mask_obj: masks_base.Mask | None, mask: Any, t: int, s: int,
                   n: int) -> masks_base.Mask:
  """One static Mask: mask_obj AND the (concrete, batch-free) dense mask array."""
  result = mask_obj
  if mask is not None:
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

  Forward / dq lists are [N, nq, A] (one row per query head, expanded through
  `head_map`), dk/dv lists [N, nk, Aq]. `*_part` is the bitmap index (-1 = FULL) and
  `*_fetch` the bitmap block to fetch at each step (see `_forward_fill`).
  """
  block_mask: masks_block.BlockMask
  num_heads: int
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


@functools.lru_cache(maxsize=128)
def make_plan(mask: masks_base.Mask, block_q: int, block_kv: int,
              num_heads: int) -> Plan:
  """Compiles `mask` and expands its tables per query head (cached)."""
  bm = masks_block.compile_mask(
      mask, block_q, block_kv,
      num_heads=num_heads if mask.head_dependent else None)
  head_map = (bm.head_map if len(bm.head_map) == num_heads else
              np.zeros((num_heads,), np.int32))

  def expand(idx, cnt, part):
    idx, cnt, part = idx[head_map], cnt[head_map], part[head_map]
    fetch = _forward_fill(part, cnt)
    arrays = [np.ascontiguousarray(x, dtype=np.int32)
              for x in (idx, cnt, part, fetch)]
    for a in arrays:
      a.setflags(write=False)
    return arrays

  kv = expand(bm.kv_indices, bm.kv_counts, bm.kv_partial)
  qs = expand(bm.q_indices, bm.q_counts, bm.q_partial)
  has_partial = bm.partial_masks.shape[0] > 0
  partial = (bm.partial_masks if has_partial else
             np.zeros((1, block_q, block_kv), dtype=bool))
  return Plan(block_mask=bm, num_heads=num_heads, kv_indices=kv[0],
              kv_counts=kv[1], kv_part=kv[2], kv_fetch=kv[3],
              q_indices=qs[0], q_counts=qs[1], q_part=qs[2], q_fetch=qs[3],
              partial_masks=partial, has_partial=has_partial)


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
  """Everything static about one call (a `custom_vjp` non-differentiable argument)."""
  plan: Plan
  scale: float
  soft_cap: float | None
  num_kv_heads: int
  has_sinks: bool
  has_segments: bool
  interpret: bool
  extra: Any = None  # kernel-specific settings (e.g. GPU num_warps)

  @property
  def group(self) -> int:
    return self.plan.num_heads // self.num_kv_heads


# fwd(cfg, q, k, v, sinks, q_seg, kv_seg) -> (out [B,N,Tp,Hv], lse [B,N,Tp] f32)
ForwardFn = Callable[..., tuple[jax.Array, jax.Array]]
# bwd(cfg, q, k, v, q_seg, kv_seg, lse, di, do) -> (dq, dk, dv)
BackwardFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def make_flash(forward: ForwardFn, backward: BackwardFn):
  """Wires a forward and a backward kernel into one `custom_vjp` function.

  The returned f(cfg, q, k, v, sinks, q_seg, kv_seg) -> (out, lse) works on padded,
  head-major inputs. The backward pass folds the lse cotangent into
  delta_i = rowsum(o_i * do_i) - dlse_i (FlashAttention-2, Alg. 2), so
  dS = P * (dP - delta) covers both, and the sink gradient is
  dsink_h = -sum_{b,t} exp(sink_h - lse) * delta.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, sinks, q_seg, kv_seg):
    return forward(cfg, q, k, v, sinks, q_seg, kv_seg)

  def flash_fwd(cfg, q, k, v, sinks, q_seg, kv_seg):
    out, lse = forward(cfg, q, k, v, sinks, q_seg, kv_seg)
    return (out, lse), (q, k, v, sinks, q_seg, kv_seg, out, lse)

  def flash_bwd(cfg, res, cts):
    q, k, v, sinks, q_seg, kv_seg, out, lse = res
    do, dlse = cts
    di = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    di = di - dlse.astype(jnp.float32)  # [B, N, Tp]
    # Rows that see nothing have lse = -inf; +inf makes every exp() vanish.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
    dq, dk, dv = backward(cfg, q, k, v, q_seg, kv_seg, lse_safe, di,
                          do.astype(q.dtype))
    dsinks = None
    if sinks is not None:
      p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse_safe)
      dsinks = (-jnp.sum(p_sink * di, axis=(0, 2))).astype(sinks.dtype)
    seg_ct = lambda s: None if s is None else np.zeros(s.shape, jax.dtypes.float0)
    return dq, dk, dv, dsinks, seg_ct(q_seg), seg_ct(kv_seg)

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def pad_axis(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
  """Pads `axis` of `x` at the end up to `length`."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def run(flash, cfg: Config, query: jax.Array, key: jax.Array, value: jax.Array,
        sinks, q_segment_ids, kv_segment_ids, return_residuals: bool,
        head_dim_pad: int | None = None, value_dim_pad: int | None = None):
  """Pads and transposes [B, T, N, H] inputs, runs `flash`, undoes the layout."""
  b, t, n, _ = query.shape
  s = key.shape[1]
  hv = value.shape[-1]
  tp, sp = cfg.plan.padded_q_len, cfg.plan.padded_kv_len
  q = pad_axis(query, 1, tp).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
  k = pad_axis(key, 1, sp).transpose(0, 2, 1, 3)  # [B, K, Sp, H]
  v = pad_axis(value, 1, sp).transpose(0, 2, 1, 3)  # [B, K, Sp, Hv]
  if head_dim_pad is not None:
    q, k = pad_axis(q, 3, head_dim_pad), pad_axis(k, 3, head_dim_pad)
  if value_dim_pad is not None:
    v = pad_axis(v, 3, value_dim_pad)
  q_seg = kv_seg = None
  if q_segment_ids is not None:
    q_seg = pad_axis(q_segment_ids.astype(jnp.int32), 1, tp)  # [B, Tp]
    kv_seg = pad_axis(kv_segment_ids.astype(jnp.int32), 1, sp)  # [B, Sp]
  out, lse = flash(cfg, q, k, v, sinks, q_seg, kv_seg)
  out = out[:, :, :t, :hv].transpose(0, 2, 1, 3)  # [B, T, N, Hv]
  del b, n, s
  if return_residuals:
    return out, lse[:, :, :t]
  return out


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
