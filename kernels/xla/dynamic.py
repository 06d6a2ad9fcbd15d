"""Blocked attention over a traced `DynamicBlockMask`: the xla path's dynamic form.

The kv blocks each query block visits are traced arrays (a router's top-k, a gate's
threshold; MoBA, "MoBA: Mixture of Block Attention for Long-Context LLMs", Lu et al.
2025, and the routing methods of `attention`), so the loop cannot be planned on the
host as `kernels.xla.plan` does for a static mask. Instead every query block of every
(batch, head) advances together, one list slot per step:

    step j: for every row x = (b, head unit, q block), gather the j-th listed kv block
            (one batched gather of [bk, H] key / value tiles), one batched dot for the
            logits of all rows, FlashAttention's online-softmax update (Dao et al.,
            "FlashAttention", 2022) of the row's running max / sum / output.

The trip count is the largest list count (traced: a `while` loop), and slots past a
row's count are masked, so only listed blocks are ever computed and no T x S array
exists. Query heads that read the same list row and the same kv head (GQA with lists
per kv head or shared by all heads) form one "unit" whose gu * block_q query rows share
the gathered tile in one dot. Rows are optionally processed `rows_per_step` at a time
(an outer scan), which bounds the working set of a step.

Inside a listed tile the logits follow the contract's order (`kernels.problem`):
scale, soft-cap, score_mod (on broadcast global index arrays, its parameters'
gradients by `jax.vjp` per tile), bias (its tiles gathered per listed block), then
visibility: the static inner `Mask` (compiled once at trace time to per-tile states
and deduplicated bitmaps; FULL / EMPTY tiles read an all-True / all-False bitmap;
causal masks and their &, |, ~ combinations are evaluated from the indices), the
dense `mask` array's tiles, segment ids, and the padding of S. Dropout uses the
counter-based keep mask of `kernels.problem`, so the result does not depend on the
tiling.

Backward (`jax.custom_vjp`): the same slot loop recomputes the probabilities from the
saved log-sum-exp with keys on rows (K Q^T: every dot in the layout XLA:CPU's fast dot
kernels take, as in `kernels.xla.blocked`); dQ accumulates per row in the loop carry,
dK / dV are scatter-added (`.at[].add`, duplicates summed) into blocked [B * K * nk,
bk, D] accumulators, and the bias gradient into its blocked tiles.

Einsum letters: x row (b, unit, q block), m query rows of a unit (gu * bq), j key
position within a tile, h head dim, v value head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attention.masks import base as masks_base
from attention.masks import block as masks_block
from attention.masks import dynamic as masks_dynamic
from attention.masks import long_context as masks_long_context
from attention.masks import static as masks_static
from kernels import problem as problem_lib
from kernels._arrays import pad_axis
from kernels.xla import score_transform

_PRECISION = jax.lax.Precision.HIGHEST


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one call (hashable)."""
  scale: float
  soft_cap: float | None
  dropout_rate: float
  q_len: int  # T
  kv_len: int  # S
  block_q: int
  block_kv: int
  num_heads: int  # N
  kv_heads: int  # K
  list_batch: int  # Bm
  list_heads: int  # Hm
  inner: masks_base.Mask | None
  rows_per_step: int | None = None  # rows of an outer chunk (None: all rows)

  @property
  def num_q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)

  @property
  def unit(self) -> int:
    """Query heads per unit: consecutive heads sharing a list row and a kv head."""
    return math.gcd(self.num_heads // self.list_heads,
                    self.num_heads // self.kv_heads)

  @property
  def num_units(self) -> int:
    return self.num_heads // self.unit


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
  """Which gradients the caller needs (from custom_vjp symbolic zeros)."""
  bias: bool
  sinks: bool
  mod: bool = False


@functools.lru_cache(maxsize=64)
def _inner_tables(inner: masks_base.Mask, block_q: int, block_kv: int,
                  num_heads: int) -> tuple[np.ndarray, np.ndarray]:
  """(tile ids int32 [1 or N, nq, nk], bitmaps bool [P + 2, bq, bk]) of a static mask.

  Tile id 0 is EMPTY (all-False bitmap), 1 FULL (all-True), 2 + i the i-th partial
  bitmap; padding beyond the real lengths is masked (as `compile_mask` does).
  """
  bm = masks_block.compile_mask(
      inner, block_q, block_kv, num_heads=num_heads if inner.head_dependent else None)
  state = bm.block_state
  ids = np.where(state == masks_block.FULL, 1,
                 np.where(state == masks_block.PARTIAL, 2 + bm.partial_index, 0))
  ids = ids.astype(np.int32)[np.asarray(bm.head_map)] if inner.head_dependent else (
      ids[:1].astype(np.int32))
  bitmaps = np.concatenate([np.zeros((1, block_q, block_kv), bool),
                            np.ones((1, block_q, block_kv), bool),
                            np.asarray(bm.partial_masks, bool).reshape(
                                -1, block_q, block_kv)])
  return ids, bitmaps


def _is_index_mask(inner) -> bool:
  """Whether `inner` is causal masks combined by &, |, ~ (evaluated from indices)."""
  kind = type(inner)
  if kind is masks_base.Causal:
    return True
  if kind in (masks_base.And, masks_base.Or):
    return _is_index_mask(inner.a) and _is_index_mask(inner.b)
  if kind is masks_base.Not:
    return _is_index_mask(inner.a)
  return False


def _index_mask(inner, q_idx, kv_idx):
  """The predicate of an `_is_index_mask` mask on broadcast jnp index arrays."""
  kind = type(inner)
  if kind is masks_base.Causal:
    return kv_idx <= q_idx + int(inner.offset)
  if kind is masks_base.And:
    return _index_mask(inner.a, q_idx, kv_idx) & _index_mask(inner.b, q_idx, kv_idx)
  if kind is masks_base.Or:
    return _index_mask(inner.a, q_idx, kv_idx) | _index_mask(inner.b, q_idx, kv_idx)
  return ~_index_mask(inner.a, q_idx, kv_idx)


def _rows(cfg: _Config, batch: int) -> dict[str, np.ndarray]:
  """Static per-row indices: row x = (b, unit, q block), ascending in that order."""
  u, nu, nq = cfg.unit, cfg.num_units, cfg.num_q_blocks
  b, i, qb = np.meshgrid(np.arange(batch), np.arange(nu), np.arange(nq), indexing='ij')
  b, i, qb = b.reshape(-1), i.reshape(-1), qb.reshape(-1)
  list_row = (i * u) // (cfg.num_heads // cfg.list_heads)
  kv_head = (i * u) // (cfg.num_heads // cfg.kv_heads)
  list_b = b if cfg.list_batch == batch else np.zeros_like(b)
  return dict(b=b.astype(np.int32), unit=i.astype(np.int32), qb=qb.astype(np.int32),
              list_b=list_b.astype(np.int32), list_row=list_row.astype(np.int32),
              kv_base=((b * cfg.kv_heads + kv_head) *
                       cfg.num_kv_blocks).astype(np.int32))


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums x over the axes where `shape` is 1 (same rank), keeping them."""
  axes = tuple(a for a, (n, m) in enumerate(zip(x.shape, shape)) if m == 1 and n != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


class _Tiles:
  """Per-call arrays in blocked layout and the logits of one slot of a row chunk.

  Tiles are [Xc, u, bq, bk] (rows of the chunk, unit heads, queries, keys) or,
  transposed, [Xc, bk, u, bq] (keys on rows, the backward's layout).
  """

  def __init__(self, cfg: _Config, batch: int, cdt, *, bias, mask, q_seg, kv_seg,
               mod, seed):
    self.cfg, self.batch, self.cdt = cfg, batch, cdt
    bq, bk, nq, nk = cfg.block_q, cfg.block_kv, cfg.num_q_blocks, cfg.num_kv_blocks
    self.u = cfg.unit
    self.mod, self.seed = mod, seed
    self.bias = None if bias is None else _tile_layout(bias.astype(cdt), bq, bk, nq,
                                                       nk, 0)
    self.bias_shape = None if bias is None else bias.shape
    self.mask = None if mask is None else _tile_layout(mask, bq, bk, nq, nk, False)
    self.q_seg = self.kv_seg = None
    if q_seg is not None:
      self.q_seg = pad_axis(q_seg, 1, nq * bq, -1).reshape(batch, nq, bq)
      self.kv_seg = pad_axis(kv_seg, 1, nk * bk, -2).reshape(batch, nk, bk)
    self.index_mask = None
    self.ids = self.bitmaps = None
    if cfg.inner is not None:
      if _is_index_mask(cfg.inner):
        self.index_mask = cfg.inner
      else:
        ids, bitmaps = _inner_tables(cfg.inner, bq, bk, cfg.num_heads)
        self.ids, self.bitmaps = jnp.asarray(ids), jnp.asarray(bitmaps)
    # Keys past S need masking unless the inner bitmaps already mask them.
    self.pad_kv = cfg.kv_len % bk != 0 and self.ids is None

  def indices(self, rows, col, transposed: bool, clamp: bool = True):
    """Global (b, h, q_idx, kv_idx) int32 arrays broadcasting against a tile."""
    cfg, u = self.cfg, self.u
    bq, bk = cfg.block_q, cfg.block_kv
    b = rows['b']
    h = rows['unit'][:, None] * u + jnp.arange(u, dtype=jnp.int32)[None]  # [Xc, u]
    q_idx = rows['qb'][:, None] * bq + jnp.arange(bq, dtype=jnp.int32)[None]
    kv_idx = col[:, None] * bk + jnp.arange(bk, dtype=jnp.int32)[None]  # [Xc, bk]
    if clamp:  # padding positions (masked) see in-range indices
      q_idx = jnp.minimum(q_idx, cfg.q_len - 1)
      kv_idx = jnp.minimum(kv_idx, cfg.kv_len - 1)
    xc = b.shape[0]
    if transposed:
      return (b.reshape(xc, 1, 1, 1), h.reshape(xc, 1, u, 1),
              q_idx.reshape(xc, 1, 1, bq), kv_idx.reshape(xc, bk, 1, 1))
    return (b.reshape(xc, 1, 1, 1), h.reshape(xc, u, 1, 1),
            q_idx.reshape(xc, 1, bq, 1), kv_idx.reshape(xc, 1, 1, bk))

  def _tile_index(self, x, rows, col):
    """Advanced indices (b, head, q block, kv block) into a `_tile_layout` array."""
    bb, nb, nqb, nkb = x.shape[:4]
    u = self.u
    zero = jnp.zeros((1, 1), jnp.int32)
    ib = rows['b'][:, None] if bb != 1 else zero
    ih = (rows['unit'][:, None] * u + jnp.arange(u, dtype=jnp.int32)[None]
          if nb != 1 else zero)  # [Xc, u]
    iq = rows['qb'][:, None] if nqb != 1 else zero
    ik = col[:, None] if nkb != 1 else zero
    return ib, ih, iq, ik

  def gather_tiles(self, x, rows, col, transposed: bool):
    """Tiles [Xc?, u?, bq?, bk?] (or transposed) of a `_tile_layout` array."""
    t = x[self._tile_index(x, rows, col)]  # [Xc?, u?, bq?, bk?]
    return jnp.moveaxis(t, -1, 1) if transposed else t

  def add_tiles(self, acc, ds, rows, col):
    """acc[tiles] += ds [Xc, u, bq, bk] summed to the bias' broadcast shape."""
    index = self._tile_index(acc, rows, col)
    lead = jnp.broadcast_shapes(*(a.shape for a in index))
    return acc.at[index].add(_sum_to(ds, lead + acc.shape[4:]))

  def scores(self, qt, kt, rows, col, valid, *, transposed=False, mod_vjp=False,
             mod_params=False):
    """Masked logits (-inf where hidden), tanh (None without soft-cap), mod VJP.

    qt: [Xc, u * bq, H] (pre-scaled); kt: [Xc, bk, H]; col: [Xc] listed kv blocks;
    valid: [Xc] whether the slot is within the row's count.
    """
    cfg, u = self.cfg, self.u
    xc, bq, bk = qt.shape[0], cfg.block_q, cfg.block_kv
    if transposed:
      z = jnp.einsum('xjh,xmh->xjm', kt, qt,
                     precision=_PRECISION).reshape(xc, bk, u, bq)  # [Xc, bk, u, bq]
    else:
      z = jnp.einsum('xmh,xjh->xmj', qt, kt,
                     precision=_PRECISION).reshape(xc, u, bq, bk)  # [Xc, u, bq, bk]
    s, tanh, vjp = score_transform.transform(
        z, cfg.soft_cap, self.mod, lambda: self.indices(rows, col, transposed),
        mod_vjp=mod_vjp, mod_params=mod_params)
    if self.bias is not None:
      s = s + self.gather_tiles(self.bias, rows, col, transposed)
    visible = valid.reshape(xc, 1, 1, 1)

    def layout(x):  # [Xc?, u?, bq?, bk?] -> the logits' layout
      return jnp.moveaxis(x, -1, 1) if transposed else x

    if self.index_mask is not None or self.pad_kv:
      _, _, q_idx, kv_idx = self.indices(rows, col, transposed, clamp=False)
      if self.index_mask is not None:
        visible = visible & _index_mask(self.index_mask, q_idx, kv_idx)
      if self.pad_kv:
        visible = visible & (kv_idx < cfg.kv_len)
    if self.ids is not None:
      if self.ids.shape[0] == 1:
        tid = self.ids[0, rows['qb'], col][:, None]  # [Xc, 1]
      else:
        heads = rows['unit'][:, None] * u + jnp.arange(u, dtype=jnp.int32)[None]
        tid = self.ids[heads, rows['qb'][:, None], col[:, None]]  # [Xc, u]
      visible = visible & layout(self.bitmaps[tid])  # [Xc, u?, bq, bk]
    if self.mask is not None:
      visible = visible & self.gather_tiles(self.mask, rows, col, transposed)
    if self.q_seg is not None:
      qs = self.q_seg[rows['b'], rows['qb']]  # [Xc, bq]
      ks = self.kv_seg[rows['b'], col]  # [Xc, bk]
      same = qs[:, None, :, None] == ks[:, None, None, :]  # [Xc, 1, bq, bk]
      visible = visible & layout(same)
    s = jnp.where(visible, s, jnp.asarray(-jnp.inf, s.dtype))
    return s, tanh, vjp

  def dropout(self, rows, col, transposed: bool = False):
    return problem_lib.dropout_multiplier(
        self.seed, self.cfg.dropout_rate, *self.indices(rows, col, transposed),
        self.cdt)


def _tile_layout(x: jax.Array, bq: int, bk: int, nq: int, nk: int, value):
  """[B?, N?, T?, S?] -> [B?, N?, nq?, nk?, bq?, bk?] (broadcast dims stay 1)."""
  bb, nb, tb, sb = x.shape
  if tb != 1:
    x = pad_axis(x, 2, nq * bq, value)
  if sb != 1:
    x = pad_axis(x, 3, nk * bk, value)
  qn, qs = (nq, bq) if tb != 1 else (1, 1)
  kn, ks = (nk, bk) if sb != 1 else (1, 1)
  return x.reshape(bb, nb, qn, qs, kn, ks).transpose(0, 1, 2, 4, 3, 5)


def _compute_dtype(*arrays) -> jnp.dtype:
  dtypes = [a.dtype for a in arrays if a is not None]
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _prepare(cfg: _Config, q, k, v, bias, kv_indices, kv_counts):
  """Row-major blocked inputs: q [X, u * bq, H], k / v [B * K * nk, bk, D], lists."""
  b, _, _, h = q.shape
  cdt = _compute_dtype(q, k, v, bias)
  alpha = cfg.scale / cfg.soft_cap if cfg.soft_cap is not None else cfg.scale
  bq, bk, nq, nk = cfg.block_q, cfg.block_kv, cfg.num_q_blocks, cfg.num_kv_blocks
  u, nu = cfg.unit, cfg.num_units
  qx = pad_axis(q.astype(cdt) * jnp.asarray(alpha, cdt), 1, nq * bq)
  qx = qx.reshape(b, nq, bq, nu, u, h).transpose(0, 3, 1, 4, 2, 5).reshape(
      b * nu * nq, u * bq, h)  # [X, u * bq, H]

  def kv_blocks(x):
    d = x.shape[-1]
    x = pad_axis(x.astype(cdt), 1, nk * bk)
    return x.reshape(b, nk, bk, cfg.kv_heads, d).transpose(0, 3, 1, 2, 4).reshape(
        b * cfg.kv_heads * nk, bk, d)  # [B * K * nk, bk, D]

  rows = _rows(cfg, b)
  lists = kv_indices[rows['list_b'], rows['list_row'], rows['qb']]  # [X, A]
  counts = kv_counts[rows['list_b'], rows['list_row'], rows['qb']]  # [X]
  rows = {name: jnp.asarray(x) for name, x in rows.items()}
  return cdt, alpha, qx, kv_blocks(k), kv_blocks(v), rows, lists, counts


def _row_blocks(x: jax.Array, cfg: _Config, value) -> jax.Array:
  """[B, N, T] -> [X, u, bq] (the per-query-row values of each row)."""
  b = x.shape[0]
  nq, bq, u, nu = cfg.num_q_blocks, cfg.block_q, cfg.unit, cfg.num_units
  x = pad_axis(x, 2, nq * bq, value)
  return x.reshape(b, nu, u, nq, bq).transpose(0, 1, 3, 2, 4).reshape(-1, u, bq)


def _unrow_blocks(x: jax.Array, cfg: _Config, batch: int) -> jax.Array:
  """[X, u, bq] -> [B, N, T]."""
  nq, bq, u, nu = cfg.num_q_blocks, cfg.block_q, cfg.unit, cfg.num_units
  x = x.reshape(batch, nu, nq, u, bq).transpose(0, 1, 3, 2, 4)
  return x.reshape(batch, nu * u, nq * bq)[:, :, :cfg.q_len]


def _unrow_out(o: jax.Array, cfg: _Config, batch: int) -> jax.Array:
  """[X, u * bq, D] -> [B, T, N, D]."""
  nq, bq, u, nu = cfg.num_q_blocks, cfg.block_q, cfg.unit, cfg.num_units
  d = o.shape[-1]
  o = o.reshape(batch, nu, nq, u, bq, d).transpose(0, 2, 4, 1, 3, 5)
  return o.reshape(batch, nq * bq, nu * u, d)[:, :cfg.q_len]


def _chunked(cfg: _Config, num_rows: int, xs: dict[str, jax.Array]):
  """Splits the row axis of xs into [C, Xc] chunks (padding rows get count 0)."""
  step = cfg.rows_per_step
  if step is None or step >= num_rows:
    return 1, num_rows, {k: x[None] for k, x in xs.items()}
  c = -(-num_rows // step)
  out = {}
  for name, x in xs.items():
    x = pad_axis(x, 0, c * step, 0)
    out[name] = x.reshape((c, step) + x.shape[1:])
  return c, step, out


def _by_count(cfg: _Config, num_rows: int, xs: dict[str, jax.Array]):
  """Rows reordered by their list count (traced), so each chunk's loop, which runs to
  the largest count in the chunk, wastes few masked slots (the lane grouping of the
  static plan, done on device). Returns (xs, order); order is None with one chunk."""
  if cfg.rows_per_step is None or cfg.rows_per_step >= num_rows:
    return xs, None
  order = jnp.argsort(xs['counts'], stable=True)  # [X]
  return {name: jnp.take(x, order, axis=0) for name, x in xs.items()}, order


def _unsort(x: jax.Array, order: jax.Array | None) -> jax.Array:
  """Undoes `_by_count` on the row axis."""
  if order is None:
    return x
  return jnp.zeros_like(x).at[order].set(x)


def _slot(lists, j):
  return jax.lax.dynamic_index_in_dim(lists, j, axis=1, keepdims=False)  # [Xc]


def _forward(cfg: _Config, q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg,
             kv_seg, mod=None, seed=None):
  """out [B, T, N, Hv] (query dtype), lse [B, N, T]."""
  b = q.shape[0]
  hv = v.shape[-1]
  u, bq = cfg.unit, cfg.block_q
  drop = cfg.dropout_rate > 0
  cdt, _, qx, kf, vf, rows, lists, counts = _prepare(cfg, q, k, v, bias, kv_indices,
                                                     kv_counts)
  tiles = _Tiles(cfg, b, cdt, bias=bias, mask=mask, q_seg=q_seg, kv_seg=kv_seg,
                 mod=mod, seed=seed)
  num_rows = qx.shape[0]
  xs = dict(q=qx, lists=lists, counts=counts, **rows)
  if sinks is not None:
    sink_rows = sinks.astype(cdt).reshape(cfg.num_units, u)[rows['unit']]  # [X, u]
    xs['sink'] = sink_rows
  xs, order = _by_count(cfg, num_rows, xs)
  _, xc, xs = _chunked(cfg, num_rows, xs)

  def chunk(x):
    qt, lst, cnt = x['q'], x['lists'], x['counts']
    r = {name: x[name] for name in rows}
    if sinks is not None:
      m0 = jnp.broadcast_to(x['sink'][:, :, None], (xc, u, bq))
      l0 = jnp.ones((xc, u, bq), cdt)
    else:
      m0 = jnp.full((xc, u, bq), -jnp.inf, cdt)
      l0 = jnp.zeros((xc, u, bq), cdt)
    o0 = jnp.zeros((xc, u * bq, hv), cdt)

    def body(j, carry):
      m, l, o = carry
      col = _slot(lst, j)  # [Xc]
      flat = x['kv_base'] + col
      kt, vt = kf[flat], vf[flat]  # [Xc, bk, H], [Xc, bk, Hv]
      s, _, _ = tiles.scores(qt, kt, r, col, j < cnt)  # [Xc, u, bq, bk]
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      rescale = jnp.exp(m - m_safe)  # [Xc, u, bq]
      p = jnp.exp(s - m_safe[..., None])
      l = l * rescale + p.sum(-1)
      if drop:
        p = p * tiles.dropout(r, col)
      pv = jnp.einsum('xmj,xjv->xmv', p.reshape(xc, u * bq, -1), vt,
                      precision=_PRECISION)  # [Xc, u * bq, Hv]
      return m_new, l, o * rescale.reshape(xc, u * bq, 1) + pv

    trips = jnp.max(cnt)
    m, l, o = jax.lax.fori_loop(0, trips, body, (m0, l0, o0))
    safe = jnp.where(l == 0, 1.0, l)  # NaN stays NaN
    o = o / safe.reshape(xc, u * bq, 1)
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(safe))
    return o, lse

  o, lse = jax.lax.map(chunk, xs)  # [C, Xc, u * bq, Hv], [C, Xc, u, bq]
  o = _unsort(o.reshape((-1,) + o.shape[2:])[:num_rows], order)
  lse = _unsort(lse.reshape((-1,) + lse.shape[2:])[:num_rows], order)
  out = _unrow_out(o, cfg, b).astype(q.dtype)
  lse_dtype = jnp.float64 if cdt == jnp.float64 else jnp.float32
  return out, _unrow_blocks(lse, cfg, b).astype(lse_dtype)


def _backward(cfg: _Config, needs: _Needs, q, k, v, kv_indices, kv_counts, bias,
              sinks, mask, q_seg, kv_seg, out, lse, d_out, d_lse, mod=None, seed=None):
  """(dq, dk, dv, dbias, dsinks, d_mod_floats), recomputing tile by tile."""
  b, _, _, h = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  hv = v.shape[-1]
  u, bq, bk, nk = cfg.unit, cfg.block_q, cfg.block_kv, cfg.num_kv_blocks
  drop = cfg.dropout_rate > 0
  cdt, alpha, qx, kf, vf, rows, lists, counts = _prepare(cfg, q, k, v, bias,
                                                         kv_indices, kv_counts)
  tiles = _Tiles(cfg, b, cdt, bias=bias, mask=mask, q_seg=q_seg, kv_seg=kv_seg,
                 mod=mod, seed=seed)
  d_out = d_out.astype(cdt)
  delta, lse_safe = score_transform.softmax_backward_rows(
      out, d_out, lse, d_lse, cdt, _PRECISION)  # [B, N, T]
  nq = cfg.num_q_blocks
  dox = pad_axis(d_out, 1, nq * bq).reshape(b, nq, bq, cfg.num_units, u, hv)
  dox = dox.transpose(0, 3, 1, 4, 2, 5).reshape(-1, u * bq, hv)  # [X, u * bq, Hv]
  num_rows = qx.shape[0]
  xs = dict(q=qx, do=dox, lse=_row_blocks(lse_safe, cfg, jnp.inf),
            delta=_row_blocks(delta, cfg, 0), lists=lists, counts=counts, **rows)
  xs, order = _by_count(cfg, num_rows, xs)
  nc, xc, xs = _chunked(cfg, num_rows, xs)
  with_mod = mod is not None and needs.mod
  with_bias = bias is not None and needs.bias
  dmod0 = score_transform.zero_float_grads(mod) if with_mod else None
  dbias0 = jnp.zeros(tiles.bias.shape, cdt) if with_bias else None
  dk0 = jnp.zeros(kf.shape, cdt)
  dv0 = jnp.zeros(vf.shape, cdt)

  def chunk(carry, x):
    dk, dv, dbias, dmod = carry
    qt, dot, lst, cnt = x['q'], x['do'], x['lists'], x['counts']
    lse_x, delta_x = x['lse'][:, None], x['delta'][:, None]  # [Xc, 1, u, bq]
    r = {name: x[name] for name in rows}

    def body(j, inner):
      dq_t, dk, dv, dbias, dmod = inner
      col = _slot(lst, j)
      flat = x['kv_base'] + col
      kt, vt = kf[flat], vf[flat]  # [Xc, bk, H], [Xc, bk, Hv]
      s, tanh, mod_vjp = tiles.scores(qt, kt, r, col, j < cnt, transposed=True,
                                      mod_vjp=mod is not None,
                                      mod_params=with_mod)  # [Xc, bk, u, bq]
      p = jnp.exp(s - lse_x)
      keep = tiles.dropout(r, col, transposed=True) if drop else None
      p_drop = p if keep is None else p * keep
      dv_t = jnp.einsum('xjm,xmv->xjv', p_drop.reshape(xc, bk, -1), dot,
                        precision=_PRECISION)  # [Xc, bk, Hv]
      dp = jnp.einsum('xjv,xmv->xjm', vt, dot,
                      precision=_PRECISION).reshape(p.shape)  # [Xc, bk, u, bq]
      if keep is not None:
        dp = dp * keep
      ds = p * (dp - delta_x)  # d logits (after mod, + bias)
      if with_bias:
        dbias = tiles.add_tiles(dbias, jnp.moveaxis(ds, 1, -1), r, col)
      dz, dmod = score_transform.transform_vjp(ds, cfg.soft_cap, tanh, mod_vjp,
                                               dmod)
      dz = dz.reshape(xc, bk, -1)  # [Xc, bk, u * bq]
      dk_t = jnp.einsum('xjm,xmh->xjh', dz, qt,
                        precision=_PRECISION)  # [Xc, bk, H]
      dq_t = dq_t + jnp.einsum('xhj,xjm->xhm', jnp.swapaxes(kt, 1, 2), dz,
                               precision=_PRECISION)  # [Xc, H, u * bq]
      return dq_t, dk.at[flat].add(dk_t), dv.at[flat].add(dv_t), dbias, dmod

    dq0 = jnp.zeros((xc, h, u * bq), cdt)
    dq_t, dk, dv, dbias, dmod = jax.lax.fori_loop(
        0, jnp.max(cnt), body, (dq0, dk, dv, dbias, dmod))
    return (dk, dv, dbias, dmod), jnp.swapaxes(dq_t, 1, 2)

  if nc == 1:
    (dk, dv, dbias, dmod), dq = chunk((dk0, dv0, dbias0, dmod0),
                                      {name: a[0] for name, a in xs.items()})
    dq = dq[None]
  else:
    (dk, dv, dbias, dmod), dq = jax.lax.scan(chunk, (dk0, dv0, dbias0, dmod0), xs)
  dq = _unsort(dq.reshape((-1,) + dq.shape[2:])[:num_rows], order)  # [X, u * bq, H]
  dq = _unrow_out(dq, cfg, b) * jnp.asarray(alpha, cdt)

  def unblock(x):
    d = x.shape[-1]
    x = x.reshape(b, kh, nk, bk, d).transpose(0, 2, 3, 1, 4)
    return x.reshape(b, nk * bk, kh, d)[:, :s_len]

  dk, dv = unblock(dk), unblock(dv)
  dbias_out = None
  if with_bias:
    bb, nb, tb, sb = bias.shape
    qn, kn, qs, ks = dbias.shape[2:]
    dbias_out = dbias.transpose(0, 1, 2, 4, 3, 5).reshape(bb, nb, qn * qs, kn * ks)
    dbias_out = dbias_out[:, :, :tb, :sb].astype(bias.dtype)
  dsinks = None
  if sinks is not None and needs.sinks:
    p_sink = jnp.exp(sinks.astype(cdt)[None, :, None] - lse)  # [B, N, T]
    dsinks = jnp.sum(-p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias_out,
          dsinks, dmod)


def _is_primal(x) -> bool:
  return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg, kv_seg,
           mod, seed):
  return _forward(cfg, q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg,
                  kv_seg, mod, seed)


def _flash_fwd(cfg, *args):
  def unwrap(a):
    return jax.tree_util.tree_map(lambda x: x.value, a, is_leaf=_is_primal)

  def perturbed(a):
    return any(x.perturbed for x in jax.tree_util.tree_leaves(a, is_leaf=_is_primal))

  (q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg, kv_seg, mod,
   seed) = args
  needs = _Needs(bias=perturbed(bias), sinks=perturbed(sinks), mod=perturbed(mod))
  plain = [unwrap(a) for a in args]
  out, lse = _forward(cfg, *plain)
  del q, k, v, kv_indices, kv_counts, mask, q_seg, kv_seg, seed
  return (out, lse), (needs, plain, out, lse)


def _flash_bwd(cfg, res, cts):
  needs, args, out, lse = res
  (q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg, kv_seg, mod,
   seed) = args
  d_out, d_lse = cts
  zero = jax.custom_derivatives.SymbolicZero
  if isinstance(d_lse, zero):
    d_lse = None
  if isinstance(d_out, zero):
    d_out = jnp.zeros(out.shape, out.dtype)
  dq, dk, dv, dbias, dsinks, dfloats = _backward(
      cfg, needs, q, k, v, kv_indices, kv_counts, bias, sinks, mask, q_seg, kv_seg,
      out, lse, d_out, d_lse, mod, seed)
  dmod = score_transform.mod_cotangent(mod, dfloats)
  if bias is not None and dbias is None:
    dbias = jnp.zeros(bias.shape, bias.dtype)
  if sinks is not None and dsinks is None:
    dsinks = jnp.zeros(sinks.shape, sinks.dtype)
  return (dq, dk, dv, None, None, dbias, dsinks, None, None, None, dmod, None)


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg, *args):
  return _flash(cfg, *args)


# Logits per inner step (rows_per_step * gu * block_q * block_kv) of the default:
# at T = 4096, N = 8, 128 x 128 blocks, top-4 (1/8), 32 rows per step (2^19 logits)
# ran the forward in 36 ms vs 134 ms with all 256 rows at once (2-core CPU).
_STEP_LOGITS = 1 << 19


def default_rows_per_step(cfg: _Config) -> int:
  """Rows per inner loop keeping a step near 2^19 logits (a cache-sized working set)."""
  return max(1, _STEP_LOGITS // (cfg.unit * cfg.block_q * cfg.block_kv))


def config_for(problem: problem_lib.AttentionProblem,
               rows_per_step: int | None = None) -> _Config:
  """The static configuration of a validated problem with a block_mask."""
  dyn = problem.block_mask
  (_, t, n, _), (_, s, kh, _), _ = problem.shapes
  return _Config(scale=problem.scale, soft_cap=problem.logits_soft_cap,
                 dropout_rate=problem.dropout_rate, q_len=t, kv_len=s,
                 block_q=dyn.block_q, block_kv=dyn.block_kv, num_heads=n,
                 kv_heads=kh, list_batch=dyn.batch, list_heads=dyn.num_heads,
                 inner=dyn.inner, rows_per_step=rows_per_step)


def attention(query: jax.Array, key: jax.Array, value: jax.Array,
              problem: problem_lib.AttentionProblem, *,
              rows_per_step: int | None = None):
  """Attention over the traced block lists of `problem.block_mask`.

  Same semantics as `kernels.reference.attention`; tiles are exactly the mask's
  (block_q, block_kv). Visits only the listed blocks (a slot loop whose trip count is
  the largest list count) and never builds a T x S array.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    problem: an `AttentionProblem` whose `block_mask` is a DynamicBlockMask.
    rows_per_step: (batch, head unit, q block) rows per inner loop (None:
      `default_rows_per_step`); smaller bounds a step's working set.

  Returns:
    out [B, T, N, Hv] (query dtype), and with `problem.return_residuals` the
    log-sum-exp [B, N, T] (-inf where a row sees nothing).
  """
  if not isinstance(problem.block_mask, masks_dynamic.DynamicBlockMask):
    raise TypeError('problem.block_mask must be a DynamicBlockMask, got '
                    f'{type(problem.block_mask).__name__}.')
  if rows_per_step is not None and (isinstance(rows_per_step, bool) or
                                    not isinstance(rows_per_step, int) or
                                    rows_per_step < 1):
    raise ValueError(f'rows_per_step must be a positive int or None, got '
                     f'{rows_per_step!r}.')
  cfg = config_for(problem, rows_per_step)
  if rows_per_step is None:
    cfg = dataclasses.replace(cfg, rows_per_step=default_rows_per_step(cfg))
  dyn = problem.block_mask
  out, lse = _flash_jit(cfg, query, key, value, dyn.kv_indices, dyn.kv_counts,
                    problem.bias, problem.sinks, problem.mask, problem.q_segment_ids,
                    problem.kv_segment_ids, problem.score_mod,
                    problem.dropout_seed if problem.has_dropout else None)
  if problem.return_residuals:
    return out, lse
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class ListedBlocks(masks_long_context.BlockLevelPattern):
  """A static mask made of whole (block_size x block_size) cells: table[qb, kb].

  The static counterpart of one head of a DynamicBlockMask (square blocks), with an
  exact block structure, so the static xla path runs exactly the listed blocks.
  """
  shape: tuple[int, int]
  block_size: int
  table: np.ndarray  # bool [n, n], n = ceil(max(T, S) / block_size)
  token_causal: bool = False

  def _cells(self, qb, kb):
    return self.table[qb, kb]


def static_equivalent(block_mask: masks_dynamic.DynamicBlockMask, num_heads: int,
                      batch: int = 0) -> masks_base.Mask:
  """The static `Mask` with the same visible set as batch item `batch` of a concrete
  DynamicBlockMask (its listed blocks AND its inner mask), for `num_heads` heads.

  For comparing the traced path with the static one on the same blocks (benchmarks,
  tests): with square blocks it is block-level (exact structure, no T x S array),
  otherwise a dense array mask.
  """
  if not isinstance(block_mask, masks_dynamic.DynamicBlockMask):
    raise TypeError('block_mask must be a DynamicBlockMask, got '
                    f'{type(block_mask).__name__}.')
  if isinstance(block_mask.kv_indices, jax.core.Tracer):
    raise ValueError('block_mask must be concrete (not traced) to build a static mask.')
  if not 0 <= batch < block_mask.batch:
    raise ValueError(f'batch must be in [0, {block_mask.batch}), got {batch}.')
  rows = block_mask.head_rows(num_heads)
  blocks = np.asarray(block_mask.block_matrix())[batch]  # [Hm, nq, nk]
  t, s = block_mask.q_len, block_mask.kv_len
  if block_mask.block_q == block_mask.block_kv:
    size = block_mask.block_q
    n = -(-max(t, s) // size)
    per_row = []
    for r in range(blocks.shape[0]):
      table = np.zeros((n, n), bool)
      table[:blocks.shape[1], :blocks.shape[2]] = blocks[r]
      per_row.append(ListedBlocks((t, s), size, table))
  else:
    per_row = [masks_base.from_array(np.repeat(np.repeat(
        blocks[r], block_mask.block_q, 0), block_mask.block_kv, 1)[:t, :s])
               for r in range(blocks.shape[0])]
  mask = (per_row[0] if blocks.shape[0] == 1 else
          masks_static.per_head([per_row[r] for r in rows]))
  if block_mask.inner is not None:
    mask = mask & block_mask.inner
  return mask
