"""The blocked computation of the XLA attention: tiles, forward, backward, custom_vjp.

Forward: FlashAttention's online softmax (Dao et al. 2022; FlashAttention-2's loop
order, Dao 2023) over the work lists of `kernels.xla.plan`; each step is either the
online-softmax step (two dots) or `_fused_tile` (three dots that XLA:CPU runs as two
multi-threaded library calls). Backward: a `jax.custom_vjp` recomputing the
probabilities tile by tile from the saved log-sum-exp, keys on rows (K Q^T).

Per tile, the logits follow the reference's order: scale, soft-cap, score_mod (on
broadcast index arrays of the tile's global b, query head, q and kv positions), bias,
mask. Dropout multiplies the probabilities of the P V product by the counter-based
keep mask of `kernels.problem` (its row sums stay undropped).

Einsum letters: c lane, b batch, k kv head, g query heads per kv head, m rows of a lane
(g * block_q), q / j query / key position within a tile, h head dim, v value head dim.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import problem as problem_lib
from kernels._arrays import pad_axis
from kernels.xla import score_transform
from kernels.xla.plan import _HeadGroup, _Lists, _Plan

_PRECISION = jax.lax.Precision.HIGHEST


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration of one call (hashable: plan by identity)."""
  plan: _Plan
  scale: float
  soft_cap: float | None
  bwd_plan: _Plan | None = None  # tiles of the backward pass (None: `plan`'s).
  fused: bool = True  # forward steps as `_fused_tile` (else one online-softmax step)
  dropout_rate: float = 0.0  # > 0: online steps with a separate (undropped) row sum
  q_len: int = 0  # T and S: score_mod indices are clamped to them (padding)
  kv_len: int = 0


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Needs:
  """Which gradients the caller needs (from custom_vjp symbolic zeros)."""
  bias: bool
  sinks: bool
  mod: bool = False  # the score_mod's float params


def _bdot(spec: str, x: jax.Array, y: jax.Array, precision=None) -> jax.Array:
  """An einsum whose three leading batch dims ('cbk') are flattened into one.

  XLA:CPU runs a dot with a single batch dimension several times faster than the
  same dot with three.
  """
  lead = x.shape[:3]
  out = jnp.einsum(spec.replace('cbk', 'x'), x.reshape((-1,) + x.shape[3:]),
                   y.reshape((-1,) + y.shape[3:]), precision=precision)
  return out.reshape(lead + out.shape[1:])


def _blocks(x: jax.Array, block: int, num: int, value=0) -> jax.Array:
  """[B, L, heads, D] -> [num + 1, B, heads, block, D] (one extra all-`value` block)."""
  b, _, n, d = x.shape
  x = pad_axis(x, 1, (num + 1) * block, value)
  return x.reshape(b, num + 1, block, n, d).transpose(1, 0, 3, 2, 4)


def _unblocks(x: jax.Array, length: int) -> jax.Array:
  """[num, B, heads, block, D] -> [B, length, heads, D]."""
  num, b, n, block, d = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, num * block, n, d)[:, :length]


def _row_blocks(x: jax.Array, block: int, num: int, value) -> jax.Array:
  """[B, heads, L] -> [num + 1, B, heads, block]."""
  b, n, _ = x.shape
  x = pad_axis(x, 2, (num + 1) * block, value)
  return x.reshape(b, n, num + 1, block).transpose(2, 0, 1, 3)


def _pad_tiled(x: jax.Array | None, t_pad: int, s_pad: int, value):
  """Pads dims 2 / 3 of a [B?, N?, T?, S?] array to the padded lengths (if not 1)."""
  if x is None:
    return None
  if x.shape[2] != 1:
    x = pad_axis(x, 2, t_pad, value)
  if x.shape[3] != 1:
    x = pad_axis(x, 3, s_pad, value)
  return x


class _Tiles:
  """Per-call arrays in blocked layout and the tile-level logit computation.

  A step's tile is block_q rows by `chunk` consecutive kv blocks (width chunk *
  block_kv). With chunk == 1, keys / values are blocks [nk + 1, B, K, bk, D] and kv
  segments [nk + 1, B, bk], gathered per step; with chunk > 1 they are [B, K, S', D]
  and [B, S'] (see `_prepare`) and each step takes one dynamic slice.
  """

  def __init__(self, cfg: _Config, grp: _HeadGroup, *, k_src, v_src, bias,
               mask, q_seg, kv_seg, batch: int, chunk: int, bitmaps: np.ndarray,
               mod: problem_lib.ScoreMod | None = None, seed=None):
    plan = cfg.plan
    self.cfg, self.grp = cfg, grp
    self.bq, self.bk = plan.block_q, plan.block_kv
    self.chunk = chunk
    self.width = chunk * plan.block_kv
    self.ku = len(grp.kv_heads)
    self.gu = grp.group_size
    self.batch = batch
    self.k_src, self.v_src = k_src, v_src
    self.bitmaps = jnp.asarray(bitmaps)
    self.bias = self._heads(bias)
    self.mask = self._heads(mask)
    self.q_seg, self.kv_seg = q_seg, kv_seg
    self.mod, self.seed = mod, seed

  def indices(self, rows, cols, transposed: bool):
    """Global (b, h, q_idx, kv_idx) int32 arrays broadcasting against a tile.

    Layout [C, B, Ku, gu, bq, W] (transposed: [C, B, Ku, W, gu, bq]); h holds the
    query heads of this group's [Ku, gu] arrangement, q_idx / kv_idx the positions
    of the tile's row block and column block (chunk), clamped to T - 1 / S - 1 so
    that padding rows / keys (masked, probability 0) see in-range indices.
    """
    c = rows.shape[0]
    b = jnp.arange(self.batch, dtype=jnp.int32)
    h = jnp.asarray(self.grp.heads.reshape(self.ku, self.gu))
    q_idx = jnp.minimum(rows.astype(jnp.int32)[:, None] * self.bq +
                        jnp.arange(self.bq, dtype=jnp.int32)[None],
                        self.cfg.q_len - 1)  # [C, bq]
    kv_idx = jnp.minimum(cols.astype(jnp.int32)[:, None] * self.bk +
                         jnp.arange(self.width, dtype=jnp.int32)[None],
                         self.cfg.kv_len - 1)  # [C, W]
    if transposed:
      return (b.reshape(1, -1, 1, 1, 1, 1), h.reshape(1, 1, self.ku, 1, self.gu, 1),
              q_idx.reshape(c, 1, 1, 1, 1, self.bq),
              kv_idx.reshape(c, 1, 1, self.width, 1, 1))
    return (b.reshape(1, -1, 1, 1, 1, 1), h.reshape(1, 1, self.ku, self.gu, 1, 1),
            q_idx.reshape(c, 1, 1, 1, self.bq, 1),
            kv_idx.reshape(c, 1, 1, 1, 1, self.width))

  def dropout(self, rows, cols, dtype, transposed: bool = False):
    """keep / (1 - rate) of the tile (`kernels.problem.dropout_multiplier`)."""
    return problem_lib.dropout_multiplier(
        self.seed, self.cfg.dropout_rate, *self.indices(rows, cols, transposed),
        dtype)

  def _span(self, src, cols, axis: int):
    """[C] chunk starts -> [C, ...] slices of `width` keys of src along `axis`."""

    def one(c):
      return jax.lax.dynamic_slice_in_dim(src, c.astype(jnp.int32) * self.bk,
                                          self.width, axis=axis)

    if cols.shape[0] == 1:
      return one(cols[0])[None]
    return jax.vmap(one)(cols)

  def _heads(self, x):
    """Selects this group's heads of a [B?, N?, T?, S?] array."""
    if x is None or x.shape[1] == 1:
      return x
    if len(self.grp.heads) == x.shape[1] and np.array_equal(
        self.grp.heads, np.arange(x.shape[1])):
      return x
    return jnp.take(x, jnp.asarray(self.grp.heads), axis=1)

  def kv(self, src, cols):
    """Key or value tiles [C, B, Ku, width, D] of the steps starting at `cols`."""
    if self.chunk == 1:
      x = src[cols]
    else:
      x = self._span(src, cols, 2)  # [C, B, K, W, D]
    if not self.grp.all_kv:
      x = jnp.take(x, jnp.asarray(self.grp.kv_heads), axis=2)
    return x

  def tile_slices(self, x, rows, cols):
    """Lane tiles [C, B?, Ku?, gu?, bq?, width?] of a [B?, Nu?, Tp?, Sp?] array."""
    tq = self.bq if x.shape[2] != 1 else 1
    tk = self.width if x.shape[3] != 1 else 1

    def one(r, c):
      return jax.lax.dynamic_slice(
          x, _tile_start(r, c, self.bq if tq > 1 else 0,
                         self.bk if tk > 1 else 0),
          (x.shape[0], x.shape[1], tq, tk))

    t = jax.vmap(one)(rows, cols)  # [C, B?, Nu?, bq?, bk?]
    heads = (self.ku, self.gu) if x.shape[1] != 1 else (1, 1)
    return t.reshape(t.shape[:2] + heads + t.shape[3:])

  def scores(self, qt, kt, rows, cols, bitmap_ids, valid, transposed=False,
             fill=-jnp.inf, additive=False, mod_vjp=False, mod_params=False):
    """Masked logits, tanh(z) (None without soft-cap) and the score_mod's VJP.

    The VJP (only with `mod_vjp` and a score_mod, else None) maps d(modded logits)
    to (d(pre-mod logits), d(float params)); the param list is empty unless
    `mod_params`.

    qt: [C, B, Ku, gu * bq, H] (pre-scaled); kt: [C, B, Ku, W, H] (W = width).
    Returns [C, B, Ku, gu, bq, W], or with `transposed` [C, B, Ku, W, gu, bq]: keys
    on rows, which lets every backward dot keep its contracted dim in the layout
    XLA:CPU's fast dot kernels take (a dot contracting the leading dim of its
    left operand ran at half the speed). Masked logits are `fill`; with
    `additive`, the mask is applied as an added [.., bq, W] tile of 0 / `fill`
    (XLA:CPU fuses an add into the surrounding dot fusion, a select it does not).
    """
    c = qt.shape[0]
    if transposed:
      z = _bdot('cbkjh,cbkmh->cbkjm', kt, qt,
                precision=_PRECISION)  # [C, B, Ku, W, gu * bq]
      z = z.reshape(c, self.batch, self.ku, self.width, self.gu, self.bq)
    else:
      z = _bdot('cbkmh,cbkjh->cbkmj', qt, kt,
                precision=_PRECISION)  # [C, B, Ku, gu * bq, W]
      z = z.reshape(c, self.batch, self.ku, self.gu, self.bq, self.width)

    def layout(x):  # [C, B?, Ku?, gu?, bq?, W?] -> the logits' layout
      return jnp.moveaxis(x, -1, 3) if transposed else x

    s, tanh, vjp = score_transform.transform(
        z, self.cfg.soft_cap, self.mod,
        lambda: self.indices(rows, cols, transposed), mod_vjp=mod_vjp,
        mod_params=mod_params)
    if self.bias is not None:
      s = s + layout(self.tile_slices(self.bias, rows, cols))
    visible = None

    def conj(a, b):
      return b if a is None else a & b

    if bitmap_ids is not None:
      visible = layout(
          self.bitmaps[bitmap_ids][:, None, None, None])  # [C, 1, 1, 1, bq, W]
    if valid is not None:
      visible = conj(visible, valid[:, None, None, None, None, None])
    if self.mask is not None:
      visible = conj(visible, layout(self.tile_slices(self.mask, rows, cols)))
    if self.q_seg is not None:
      qs = self.q_seg[rows]  # [C, B, bq]
      ks = (self.kv_seg[cols] if self.chunk == 1 else
            self._span(self.kv_seg, cols, 1))  # [C, B, W]
      same = qs[:, :, :, None] == ks[:, :, None, :]  # [C, B, bq, W]
      visible = conj(visible, layout(same[:, :, None, None]))
    if visible is not None:
      fill = jnp.asarray(fill, s.dtype)
      if additive:
        s = s + jnp.where(visible, jnp.zeros((), s.dtype), fill)
      else:
        s = jnp.where(visible, s, fill)
    return s, tanh, vjp


def _scan_steps(lists: _Lists, x, body, carry):
  """Runs the FULL then the PARTIAL steps of one lane group."""

  def full_step(a, carry):
    valid = None if lists.full_valid is None else x['full_valid'][a]
    return body(carry, x['full_cols'][a], None, valid)

  def part_step(a, carry):
    return body(carry, x['part_cols'][a], x['part_bitmap'][a], None)

  for trips, xs_trips, step in ((lists.full_trips, x['full_trips'], full_step),
                                (lists.part_trips, x['part_trips'], part_step)):
    if trips.size and (trips == trips[0]).all():
      # Every group runs the same number of steps (e.g. one chunk per row of a
      # sliding window): a static loop, unrolled when it is a single step.
      if int(trips[0]) == 1:
        carry = step(0, carry)
      elif int(trips[0]) > 1:
        carry = jax.lax.fori_loop(0, int(trips[0]), step, carry)
    else:
      carry = jax.lax.fori_loop(0, xs_trips, step, carry)
  return carry


def _lists_xs(lists: _Lists) -> dict[str, jax.Array]:
  xs = dict(rows=lists.order, full_cols=lists.full_cols,
            full_trips=lists.full_trips, part_cols=lists.part_cols,
            part_bitmap=lists.part_bitmap, part_trips=lists.part_trips)
  if lists.full_valid is not None:
    xs['full_valid'] = lists.full_valid
  return {k: jnp.asarray(v) for k, v in xs.items()}


def _regroup(blocks: jax.Array, order: np.ndarray) -> jax.Array:
  """[R + 1, ...] -> [G, C, ...] in lane order (static gather)."""
  return jnp.take(blocks, jnp.asarray(order.reshape(-1)), axis=0).reshape(
      order.shape + blocks.shape[1:])


def _ungroup(ys: jax.Array, order: np.ndarray, rows: int) -> jax.Array:
  """[G, C, ...] in lane order -> [rows, ...] in row order."""
  flat = ys.reshape((-1,) + ys.shape[2:])
  inverse = np.argsort(order.reshape(-1), kind='stable')[:rows]
  return jnp.take(flat, jnp.asarray(inverse), axis=0)


def _group_q(q_blocks, grp: _HeadGroup):
  """[nq + 1, B, N, bq, H] -> [nq + 1, B, Ku, gu * bq, H] for this group."""
  n = q_blocks.shape[2]
  x = q_blocks
  if not np.array_equal(grp.heads, np.arange(n)):
    x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
  r, b, _, bq, d = x.shape
  return x.reshape(r, b, len(grp.kv_heads), grp.group_size * bq, d)


def _q_tiles(q: jax.Array, rows: jax.Array, grp: _HeadGroup, bq: int) -> jax.Array:
  """[B, T', N, H] -> this group's query tiles [C, B, Ku, gu * bq, H] of `rows`.

  Padding lanes (row nq) read a clamped slice; their results are discarded.
  """
  b, _, n, h = q.shape

  def one(r):
    x = jax.lax.dynamic_slice_in_dim(q, r.astype(jnp.int32) * bq, bq,
                                     axis=1)  # [B, bq, N, H]
    if not np.array_equal(grp.heads, np.arange(n)):
      x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
    x = x.transpose(0, 2, 1, 3)  # [B, Nu, bq, H]
    return x.reshape(b, len(grp.kv_heads), grp.group_size * bq, h)

  if rows.shape[0] == 1:
    return one(rows[0])[None]
  return jax.vmap(one)(rows)


def _group_kv(blocks, grp: _HeadGroup):
  """[nk + 1, B, K, bk, D] -> [nk + 1, B, Ku, bk, D] for this group."""
  if grp.all_kv:
    return blocks
  return jnp.take(blocks, jnp.asarray(grp.kv_heads), axis=2)


def _group_rows(x, grp: _HeadGroup):
  """[R, B, N, bq] -> [R, B, Ku, gu, bq] for this group."""
  n = x.shape[2]
  if not np.array_equal(grp.heads, np.arange(n)):
    x = jnp.take(x, jnp.asarray(grp.heads), axis=2)
  r, b, _, bq = x.shape
  return x.reshape(r, b, len(grp.kv_heads), grp.group_size, bq)


def _ungroup_heads(parts: list[jax.Array], plan: _Plan, axis: int) -> jax.Array:
  """Concatenates per-group head slices and restores the query head order."""
  x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)
  if plan.head_order is None:
    return x
  inverse = np.argsort(plan.head_order)
  return jnp.take(x, jnp.asarray(inverse), axis=axis)


def _prepare(cfg: _Config, q, k, v, bias, mask, q_seg, kv_seg, chunk: int = 1):
  """Casts, scales and lays out the inputs (shared by forward and backward).

  With chunk == 1, k / v come back as blocks [nk + 1, B, K, bk, D] and kv segments as
  [nk + 1, B, bk]; with chunk > 1 as [B, K, S', D] and [B, S'] with S' = max(nk,
  chunk) * bk, which holds every chunk (`_chunk_work` never starts one past nk - chunk).
  """
  plan = cfg.plan
  cdt = _compute_dtype(q, k, v, bias)
  alpha = cfg.scale / cfg.soft_cap if cfg.soft_cap is not None else cfg.scale
  nq, nk = plan.num_q_blocks, plan.num_kv_blocks
  bq, bk = plan.block_q, plan.block_kv
  t_pad, s_pad = nq * bq, max(nk, chunk) * bk
  q_blocks = _blocks(q.astype(cdt) * jnp.asarray(alpha, cdt), bq, nq)
  if chunk == 1:
    k_src = _blocks(k.astype(cdt), bk, nk)
    v_src = _blocks(v.astype(cdt), bk, nk)
  else:  # Chunks lie inside [0, s_pad): no copy when S is already s_pad long.
    # Heads before keys, so that a step's slice needs no transpose.
    k_src = pad_axis(k.astype(cdt), 1, s_pad).transpose(0, 2, 1, 3)  # [B, K, S', H]
    v_src = pad_axis(v.astype(cdt), 1, s_pad).transpose(0, 2, 1, 3)  # [B, K, S', Hv]
  bias = _pad_tiled(None if bias is None else bias.astype(cdt), t_pad, s_pad, 0)
  mask = _pad_tiled(mask, t_pad, s_pad, False)
  if q_seg is not None:
    q_seg = pad_axis(q_seg, 1, (nq + 1) * bq, -1).reshape(
        q_seg.shape[0], nq + 1, bq).transpose(1, 0, 2)  # [nq + 1, B, bq]
    kv_seg = pad_axis(kv_seg, 1, s_pad + (bk if chunk == 1 else 0), -2)
    if chunk == 1:
      kv_seg = kv_seg.reshape(kv_seg.shape[0], nk + 1, bk).transpose(
          1, 0, 2)  # [nk + 1, B, bk]
  return cdt, alpha, q_blocks, k_src, v_src, bias, mask, q_seg, kv_seg


def _compute_dtype(*arrays) -> jnp.dtype:
  dtypes = [a.dtype for a in arrays if a is not None]
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _rowwise(x: jax.Array) -> jax.Array:
  """Per-row values [C, B, Ku, gu, bq] -> [C, B, Ku, gu * bq, 1] (the output rows)."""
  return x.reshape(x.shape[:3] + (-1, 1))


def _fused_tile(tiles: _Tiles, qt, kt, vt, rows, cols, bitmap_ids, valid):
  """One forward tile as two single-output computations XLA:CPU fuses whole.

  Returns the tile's row maxima m_t [C, B, Ku, gu, bq] (-inf where the tile hides
  the entire row) and A = exp(S - rowmax(S)) [V, 1] [C, B, Ku, gu * bq, Hv + 1],
  whose last column holds the row sums. The caller rescales A by exp(m_t - m).

  Why not the textbook online-softmax step: XLA:CPU (jax 0.10) lowers
  `exp(S - rowmax(S)) @ V` -- dot, max, exp and dot -- to one multi-threaded
  YNNPACK fusion that keeps the logits in cache, but any further input or output
  (the running max, the row sum) splits the step into single-threaded library calls
  and loop fusions that stream the [gu * bq, W] logits through memory several times.
  m_t comes from a second logits dot (fused with its max reduction): three tile dots
  instead of two, in fewer, faster calls (see kernels/README.md for the timings).
  """
  # The barrier keeps common-subexpression elimination from merging the two logits
  # dots, which would give the shared logits two users and break both fusions.
  s_max, _, _ = tiles.scores(qt, jax.lax.optimization_barrier(kt), rows, cols,
                             bitmap_ids, valid, additive=True)
  m_t = s_max.max(-1)  # [C, B, Ku, gu, bq]
  # Masked logits are the dtype's finite minimum here: a row the tile hides then
  # gives exp(0) = 1 terms (finite, discarded by the caller's scale of 0), not NaN.
  # A -inf bias or score_mod (or a very negative one plus the fill, which overflows
  # to -inf) would give rows of -inf, whose row max makes exp(-inf + inf) NaN: with
  # a bias or score_mod the logits are clamped to the finite floor. The clamp stays
  # inside the fusion (causal T = 2048, N = 8, H = 64, 256 x 256 tiles, with a key
  # bias: 51.1 ms clamped vs 51.7 ms not); without a bias the clamp cost 5.5%
  # (43.9 vs 41.5 ms) and no -inf can arise, so plain tiles are not clamped.
  floor = jnp.finfo(qt.dtype).min
  s, _, _ = tiles.scores(qt, kt, rows, cols, bitmap_ids, valid, fill=floor,
                         additive=True)
  if tiles.bias is not None or tiles.mod is not None:
    s = jnp.maximum(s, floor)
  p = jnp.exp(s - s.max(-1, keepdims=True))  # [C, B, Ku, gu, bq, W]
  a = _bdot('cbkmj,cbkjv->cbkmv', p.reshape(p.shape[:3] + (-1,) + p.shape[-1:]), vt,
            precision=_PRECISION)  # [C, B, Ku, gu * bq, Hv + 1]
  return m_t, a


def _forward(cfg: _Config, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod=None,
             seed=None):
  """Blocked forward: out [B, T, N, Hv] (query dtype), lse [B, N, T]."""
  plan = cfg.plan
  b, t, n, _ = q.shape
  hv = v.shape[-1]
  drop = cfg.dropout_rate > 0
  (cdt, alpha, _, k_src, v_src, bias_p, mask_p, q_seg_b,
   kv_seg_b) = _prepare(cfg, q, k, v, bias, mask, q_seg, kv_seg, plan.kv_chunk)
  # A column of ones makes each tile's P V also return P's row sums (one output).
  # Dropout multiplies P only in P V, so its row sums are kept apart.
  if not drop:
    v_src = jnp.concatenate([v_src, jnp.ones(v_src.shape[:-1] + (1,), cdt)],
                            axis=-1)
  bq = plan.block_q
  # Query tiles are sliced per step from [B, T', N, H] (no blocked copy of q).
  q_src = pad_axis(q, 1, plan.num_q_blocks * bq)
  outs, lses = [], []
  for grp in plan.groups:
    tiles = _Tiles(cfg, grp, k_src=k_src, v_src=v_src, bias=bias_p, mask=mask_p,
                   q_seg=q_seg_b, kv_seg=kv_seg_b, batch=b, chunk=plan.kv_chunk,
                   bitmaps=plan.chunk_bitmaps, mod=mod, seed=seed)
    lists = grp.fwd
    ku, gu = tiles.ku, tiles.gu
    lanes = lists.order.shape[1]
    xs = _lists_xs(lists)
    row_shape = (lanes, b, ku, gu, bq)
    if sinks is not None:
      sink = sinks.astype(cdt)[jnp.asarray(grp.heads)].reshape(ku, gu)
      m0 = jnp.broadcast_to(sink[None, None, :, :, None], row_shape)
      l0 = jnp.ones(row_shape, cdt)
    else:
      m0 = jnp.full(row_shape, -jnp.inf, cdt)
      l0 = jnp.zeros(row_shape, cdt)
    if drop:
      o0 = (jnp.zeros((lanes, b, ku, gu * bq, hv), cdt), l0)
    else:
      o0 = (jnp.concatenate([jnp.zeros((lanes, b, ku, gu * bq, hv), cdt),
                             l0.reshape(lanes, b, ku, gu * bq, 1)], axis=-1), None)

    def group_step(_, x, tiles=tiles, m0=m0, o0=o0, lists=lists, grp=grp):
      rows = x['rows']
      qt = _q_tiles(q_src, rows, grp, bq).astype(cdt) * jnp.asarray(
          alpha, cdt)  # [C, B, Ku, gu * bq, H]

      def body(carry, cols, bitmap_ids, valid):
        # o: [C, B, Ku, gu * bq, Hv + 1], row sums in the last column; with dropout
        # o: [C, B, Ku, gu * bq, Hv] and the row sums l [C, B, Ku, gu, bq].
        m, (o, l) = carry
        kt = tiles.kv(tiles.k_src, cols)  # [C, B, Ku, W, H]
        vt = tiles.kv(tiles.v_src, cols)  # [C, B, Ku, W, Hv (+ 1)]
        fused = cfg.fused and not drop
        if fused:
          m_t, a = _fused_tile(tiles, qt, kt, vt, rows, cols, bitmap_ids, valid)
        else:
          s, _, _ = tiles.scores(qt, kt, rows, cols, bitmap_ids, valid)
          m_t = s.max(-1)  # [C, B, Ku, gu, bq]
        m_new = jnp.maximum(m, m_t)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        rescale = jnp.exp(m - m_safe)  # of what was accumulated so far
        o = o * _rowwise(rescale)
        if fused:  # a is relative to m_t: exp(m_t - m_safe) is 0 for hidden rows
          return m_new, (o + a * _rowwise(jnp.exp(m_t - m_safe)), None)
        p = jnp.exp(s - m_safe[..., None])  # [C, B, Ku, gu, bq, W]
        if drop:
          l = l * rescale + p.sum(-1)
          p = p * tiles.dropout(rows, cols, cdt)
        pv = _bdot('cbkmj,cbkjv->cbkmv', p.reshape(p.shape[:3] + (-1,) +
                                                    p.shape[-1:]), vt,
                   precision=_PRECISION)  # [C, B, Ku, gu * bq, Hv (+ 1)]
        return m_new, (o + pv, l)

      m, (o, l) = _scan_steps(lists, x, body, (m0, o0))
      if not drop:
        o, l = o[..., :-1], o[..., -1].reshape(m.shape)
      safe = jnp.where(l == 0, 1.0, l)  # NaN stays NaN
      o = o / _rowwise(safe)
      lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(safe))
      return None, (o, lse)

    _, (o, lse) = jax.lax.scan(group_step, None, xs)
    o = _ungroup(o, lists.order, plan.num_q_blocks)  # [nq, B, Ku, gu * bq, Hv]
    lse = _ungroup(lse, lists.order, plan.num_q_blocks)  # [nq, B, Ku, gu, bq]
    nq = plan.num_q_blocks
    outs.append(o.reshape(nq, b, ku * gu, bq, hv))
    lses.append(lse.reshape(nq, b, ku * gu, bq))
  out = _unblocks(_ungroup_heads(outs, plan, 2), t).astype(q.dtype)  # [B, T, N, Hv]
  lse = _ungroup_heads(lses, plan, 2)  # [nq, B, N, bq]
  lse = lse.transpose(1, 2, 0, 3).reshape(b, n, -1)[:, :, :t]  # [B, N, T]
  lse_dtype = jnp.float64 if cdt == jnp.float64 else jnp.float32
  return out, lse.astype(lse_dtype)


def _backward(cfg: _Config, needs: _Needs, q, k, v, bias, sinks, mask, q_seg,
              kv_seg, out, lse, d_out, d_lse, mod=None, seed=None):
  """Blocked backward, recomputing tile by tile.

  Returns (dq, dk, dv, dbias, dsinks, d_mod_floats): the last is the list of the
  score_mod's floating params' gradients (None without a score_mod or its need),
  accumulated per tile in the loop carry.
  """
  if cfg.bwd_plan is not None:
    cfg = dataclasses.replace(cfg, plan=cfg.bwd_plan, bwd_plan=None)
  plan = cfg.plan
  b, t, n, h = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  hv = v.shape[-1]
  bq, bk = plan.block_q, plan.block_kv
  nq, nk = plan.num_q_blocks, plan.num_kv_blocks
  (cdt, alpha, q_blocks, k_blocks, v_blocks, bias_p, mask_p, q_seg_b,
   kv_seg_b) = _prepare(cfg, q, k, v, bias, mask, q_seg, kv_seg)
  d_out = d_out.astype(cdt)
  delta, lse_safe = score_transform.softmax_backward_rows(
      out, d_out, lse, d_lse, cdt, _PRECISION)  # [B, N, T]
  do_blocks = _blocks(d_out, bq, nq)  # [nq + 1, B, N, bq, Hv]
  lse_blocks = _row_blocks(lse_safe, bq, nq, jnp.inf)  # [nq + 1, B, N, bq]
  delta_blocks = _row_blocks(delta, bq, nq, 0)  # [nq + 1, B, N, bq]
  dqs, dk, dv = [], jnp.zeros((b, s_len, kh, h), cdt), jnp.zeros((b, s_len, kh, hv),
                                                                  cdt)
  dbias_parts = []
  drop = cfg.dropout_rate > 0
  with_mod = mod is not None and needs.mod
  dmod = score_transform.zero_float_grads(mod) if with_mod else None
  for grp in plan.groups:
    tiles = _Tiles(cfg, grp, k_src=k_blocks, v_src=v_blocks, bias=bias_p,
                   mask=mask_p, q_seg=q_seg_b, kv_seg=kv_seg_b, batch=b, chunk=1,
                   bitmaps=plan.bitmaps, mod=mod, seed=seed)
    lists = grp.bwd
    ku, gu = tiles.ku, tiles.gu
    qg = _group_q(q_blocks, grp)  # [nq + 1, B, Ku, gu * bq, H]
    dog = _group_q(do_blocks, grp)  # [nq + 1, B, Ku, gu * bq, Hv]
    lseg = _group_rows(lse_blocks, grp)  # [nq + 1, B, Ku, gu, bq]
    deltag = _group_rows(delta_blocks, grp)
    xs = _lists_xs(lists)
    xs['k'] = _regroup(_group_kv(k_blocks, grp), lists.order)  # [G, C, B, Ku, bk, H]
    xs['v'] = _regroup(_group_kv(v_blocks, grp), lists.order)
    with_bias = bias_p is not None and needs.bias
    dbias0 = jnp.zeros(tiles.bias.shape, cdt) if with_bias else None
    # dq is accumulated transposed, [nq + 1, B, Ku, H, gu * bq], so that its dot
    # (like every other one below) reads both operands in the fast layout.
    dq0 = jnp.zeros(qg.shape[:3] + (h, qg.shape[3]), cdt)

    def group_step(carry, x, tiles=tiles, lists=lists, qg=qg, dog=dog,
                   lseg=lseg, deltag=deltag, with_bias=with_bias):
      dq, dbias, dmod = carry
      cols_fixed, kt, vt = x['rows'], x['k'], x['v']
      kt_t = jnp.swapaxes(kt, -1, -2)  # [C, B, Ku, H, bk]

      def body(inner, rows, bitmap_ids, valid):
        dk_acc, dv_acc, dq, dbias, dmod = inner
        qt, dot = qg[rows], dog[rows]  # [C, B, Ku, gu * bq, H / Hv]
        s, tanh, mod_vjp = tiles.scores(
            qt, kt, rows, cols_fixed, bitmap_ids, valid, transposed=True,
            mod_vjp=mod is not None, mod_params=with_mod)  # [C, B, Ku, bk, gu, bq]
        p = jnp.exp(s - lseg[rows][:, :, :, None])
        flat = p.shape[:4] + (-1,)  # [C, B, Ku, bk, gu * bq]
        keep = (tiles.dropout(rows, cols_fixed, cdt, transposed=True) if drop
                else None)
        p_drop = p if keep is None else p * keep
        dv_acc = dv_acc + _bdot('cbkjm,cbkmv->cbkjv', p_drop.reshape(flat), dot,
                                precision=_PRECISION)  # [C, B, Ku, bk, Hv]
        dp = _bdot('cbkjv,cbkmv->cbkjm', vt, dot,
                   precision=_PRECISION).reshape(p.shape)
        if keep is not None:
          dp = dp * keep
        ds = p * (dp - deltag[rows][:, :, :, None])  # d logits (after mod, + bias)
        if with_bias:
          dbias = _add_tiles(dbias, _reduce_to(jnp.moveaxis(ds, 3, -1),
                                               tiles.bias),
                             rows, cols_fixed, bq, bk)
        dz, dmod = score_transform.transform_vjp(ds, cfg.soft_cap, tanh, mod_vjp,
                                                 dmod)
        dz = dz.reshape(flat)
        dk_acc = dk_acc + _bdot('cbkjm,cbkmh->cbkjh', dz, qt,
                                precision=_PRECISION)  # [C, B, Ku, bk, H]
        dq_t = _bdot('cbkhj,cbkjm->cbkhm', kt_t, dz,
                     precision=_PRECISION)  # [C, B, Ku, H, gu * bq]
        for c in range(dq_t.shape[0]):
          cur = jax.lax.dynamic_index_in_dim(dq, rows[c], 0, keepdims=False)
          dq = jax.lax.dynamic_update_index_in_dim(dq, cur + dq_t[c], rows[c], 0)
        return dk_acc, dv_acc, dq, dbias, dmod

      dk0 = jnp.zeros(kt.shape, cdt)
      dv0 = jnp.zeros(vt.shape, cdt)
      dk_acc, dv_acc, dq, dbias, dmod = _scan_steps(lists, x, body,
                                                    (dk0, dv0, dq, dbias, dmod))
      return (dq, dbias, dmod), (dk_acc, dv_acc)

    (dq_g, dbias_g, dmod), (dk_g, dv_g) = jax.lax.scan(
        group_step, (dq0, dbias0, dmod), xs)
    dq_g = jnp.swapaxes(dq_g, -1, -2)  # [nq + 1, B, Ku, gu * bq, H]
    dqs.append(dq_g[:nq].reshape(nq, b, ku * gu, bq, h))
    dk_g = _ungroup(dk_g, lists.order, nk)  # [nk, B, Ku, bk, H]
    dv_g = _ungroup(dv_g, lists.order, nk)
    dk_g = _unblocks(dk_g, s_len)  # [B, S, Ku, H]
    dv_g = _unblocks(dv_g, s_len)
    if grp.all_kv:
      dk, dv = dk + dk_g, dv + dv_g
    else:
      idx = jnp.asarray(grp.kv_heads)
      dk = dk.at[:, :, idx].add(dk_g)
      dv = dv.at[:, :, idx].add(dv_g)
    if with_bias:
      dbias_parts.append(dbias_g)
  dq = _unblocks(_ungroup_heads(dqs, plan, 2), t) * jnp.asarray(alpha, cdt)
  dbias = None
  if bias is not None and needs.bias:
    if bias.shape[1] == 1:
      dbias = functools.reduce(jnp.add, dbias_parts)
    else:
      dbias = _ungroup_heads(dbias_parts, plan, 1)
    dbias = dbias[:, :, :bias.shape[2], :bias.shape[3]].astype(bias.dtype)
  dsinks = None
  if sinks is not None and needs.sinks:
    p_sink = jnp.exp(sinks.astype(cdt)[None, :, None] - lse)  # [B, N, T]
    dsinks = jnp.sum(-p_sink * delta, axis=(0, 2)).astype(sinks.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias,
          dsinks, dmod)


def _reduce_to(ds: jax.Array, bias: jax.Array) -> jax.Array:
  """Sums ds [C, B, Ku, gu, bq, bk] over the broadcast dims of the bias tiles.

  Returns [C, B?, Nu?, bq?, bk?] matching `_Tiles.tile_slices` before the head split.
  """
  c = ds.shape[0]
  bb, nb, tb, sb = bias.shape
  axes = []
  if bb == 1:
    axes.append(1)
  if nb == 1:
    axes += [2, 3]
  if tb == 1:
    axes.append(4)
  if sb == 1:
    axes.append(5)
  red = jnp.sum(ds, axis=tuple(axes), keepdims=True) if axes else ds
  return red.reshape(c, bb, nb, red.shape[4], red.shape[5])


def _tile_start(row, col, step_q: int, step_kv: int):
  """int32 start indices (0, 0, row * step_q, col * step_kv) of a tile."""
  zero = jnp.zeros((), jnp.int32)
  return (zero, zero, row.astype(jnp.int32) * step_q,
          col.astype(jnp.int32) * step_kv)


def _add_tiles(acc: jax.Array, tiles: jax.Array, rows, cols, bq: int,
               bk: int) -> jax.Array:
  """acc[:, :, tile(r, c)] += tiles[lane] for every lane (read-modify-write)."""
  tq, tk = tiles.shape[-2], tiles.shape[-1]
  for c in range(tiles.shape[0]):
    start = _tile_start(rows[c], cols[c], bq if tq > 1 else 0,
                        bk if tk > 1 else 0)
    cur = jax.lax.dynamic_slice(acc, start, tiles.shape[1:])
    acc = jax.lax.dynamic_update_slice(acc, cur + tiles[c], start)
  return acc


def _is_primal(x) -> bool:
  return isinstance(x, jax.custom_derivatives.CustomVJPPrimal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed):
  """(out, lse); `mod` is the ScoreMod pytree (its params are traced inputs)."""
  return _forward(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed)


def _flash_fwd(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed):
  def unwrap(a):
    return jax.tree_util.tree_map(lambda x: x.value, a, is_leaf=_is_primal)

  def perturbed(a):
    return any(x.perturbed for x in jax.tree_util.tree_leaves(a, is_leaf=_is_primal))

  needs = _Needs(bias=perturbed(bias), sinks=perturbed(sinks), mod=perturbed(mod))
  args = [unwrap(a) for a in (q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed)]
  out, lse = _forward(cfg, *args)
  return (out, lse), (needs, args, out, lse)


def _flash_bwd(cfg, res, cts):
  needs, args, out, lse = res
  q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed = args
  d_out, d_lse = cts
  zero = jax.custom_derivatives.SymbolicZero
  if isinstance(d_lse, zero):
    d_lse = None
  if isinstance(d_out, zero):
    d_out = jnp.zeros(out.shape, out.dtype)
  dq, dk, dv, dbias, dsinks, dfloats = _backward(
      cfg, needs, q, k, v, bias, sinks, mask, q_seg, kv_seg, out, lse, d_out, d_lse,
      mod, seed)
  dmod = score_transform.mod_cotangent(mod, dfloats)
  return dq, dk, dv, dbias, dsinks, None, None, None, dmod, None


_flash.defvjp(_flash_fwd, _flash_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnums=(0,))
def _flash_jit(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed):
  return _flash(cfg, q, k, v, bias, sinks, mask, q_seg, kv_seg, mod, seed)
