"""Blocked forms of the interventions: nothing of size T x S is ever built.

The edited attention is assembled from exact pieces:

  1. `attention.dot_product_attention(..., score_mod=..., return_residuals=True)` (the
     blocked online-softmax kernel) gives out and the log-sum-exp lse [B, N, T]. Its
     score_mod applies the site's visibility (positions, padding, window) and every
     logit edit that is elementwise (temperature, knockout, column re-weighting as
     + log c_j), as FlexAttention's score_mod does ("FlexAttention", Dong et al. 2024).
  2. Key-set masses and partial outputs are attention with other values:
     sum_j A_ij w_j for any per-key weights w is the kernel run on values w, so
     [v * 1_S, 1_S, ...] as extra value channels give sum_{j in S} A_ij v_j and
     sum_{j in S} A_ij in one more (differentiable) kernel call (`weighted`).
  3. Column sums of A (ACT's sink scores) come from a second pass over query blocks
     of <= `block` rows (`column_sums`): each block recomputes its logits
     [B, N, block, S] and exp(logits - lse) for its rows only, accumulated in a scan.

Einsum letters: b batch, t query position, s key position, k kv head, g query heads
per kv head (N = K * G), n query head, h head dim, v value dim, c value channel.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from attention import api
from attention.interventions import base
from kernels import problem as problem_lib

__all__ = ['BlockedContext', 'SiteMod', 'column_sums', 'map_query_blocks']

_PRECISION = jax.lax.Precision.HIGHEST


def visible_at(site_arrays: Sequence[Any], window: int | None, b, q_idx,
               kv_idx) -> jax.Array:
  """Visibility at broadcast int32 indices from (q_pos, kv_pos, kv_valid, q_valid)."""
  q_pos, kv_pos, kv_valid, q_valid = site_arrays
  qp = q_pos[b, q_idx]
  kp = kv_pos[b, kv_idx]
  vis = (kp <= qp) & kv_valid[b, kv_idx]
  if window is not None:
    vis = vis & (qp - kp < window)
  if q_valid is not None:
    vis = vis & q_valid[b, q_idx]
  return vis


def site_arrays(site: base.AttentionSite) -> tuple[Any, ...]:
  return (site.q_positions, site.kv_positions, site.kv_valid, site.q_valid)


@dataclasses.dataclass(frozen=True)
class SiteMod:
  """The score_mod of an edited call: logit edits in order, then the visibility.

  Static (hashable) so equal sites share one compiled kernel; its params are
  (site arrays, the leaves of the logit-editing interventions).
  """
  window: int | None
  num_heads: int
  treedef: Any  # of the tuple of logit-editing interventions

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    arrays, leaves = params
    ivs = jax.tree_util.tree_unflatten(self.treedef, leaves)
    for iv in ivs:
      score = iv.logit_mod(score, b, h, q_idx, kv_idx, self.num_heads)
    vis = visible_at(arrays, self.window, b, q_idx, kv_idx)
    return jnp.where(vis, score, jnp.asarray(-jnp.inf, score.dtype))


def make_score_mod(site: base.AttentionSite, logit_ivs: Sequence[base.Intervention],
                   num_heads: int) -> problem_lib.ScoreMod:
  leaves, treedef = jax.tree_util.tree_flatten(tuple(logit_ivs))
  fn = SiteMod(window=site.window, num_heads=num_heads, treedef=treedef)
  return problem_lib.ScoreMod(fn=fn, params=(site_arrays(site), leaves),
                              name='attend')


def repeat_kv(x: jax.Array, num_heads: int) -> jax.Array:
  """[B, S, K, D] -> [B, S, N, D] (query head n reads kv head n // (N // K))."""
  return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def map_query_blocks(fn: Callable[..., Any], block: int, length: int,
                     *row_arrays: tuple[jax.Array, int, Any],
                     reduce: bool = False, init: Any = None) -> Any:
  """Applies `fn(q_idx [bq] int32, *blocks)` to blocks of <= `block` query rows.

  `row_arrays` are (array, axis, pad_value): each is padded along `axis` to a
  multiple of the block and cut into blocks (fn receives the block in place of the
  axis). Without `reduce`, fn's outputs are stacked per block: [num_blocks, ...]
  for the caller to reassemble. With `reduce`, they are summed over blocks (a scan
  carry starting at `init`), so only one block's work is alive at a time. q_idx is
  clamped to length - 1 in the padding rows (their pad values must make them
  contribute nothing).
  """
  bq = min(block, length)
  nb = -(-length // bq)
  padded = nb * bq
  xs = []
  for arr, axis, value in row_arrays:
    pad = [(0, 0)] * arr.ndim
    pad[axis] = (0, padded - length)
    a = jnp.pad(arr, pad, constant_values=value) if padded != length else arr
    shape = a.shape[:axis] + (nb, bq) + a.shape[axis + 1:]
    xs.append(jnp.moveaxis(a.reshape(shape), axis, 0))
  starts = jnp.arange(nb, dtype=jnp.int32) * bq

  def rows(start):
    return jnp.minimum(start + jnp.arange(bq, dtype=jnp.int32), length - 1)

  if reduce:
    def step(carry, x):
      start, blocks = x[0], x[1:]
      out = fn(rows(start), *blocks)
      return jax.tree_util.tree_map(jnp.add, carry, out), None

    total, _ = jax.lax.scan(step, init, (starts, *xs))
    return total
  return jax.lax.map(lambda x: fn(rows(x[0]), *x[1:]), (starts, *xs))


def scaled_logits(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
  """scale q k^T of all queries or a block: [B, T, N, H] x [B, S, K, H] -> [B, N, T, S].

  GQA: query head n reads kv head n // (N // K).
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
  z = jnp.einsum('btkgh,bskh->bkgts', qg, k, precision=_PRECISION)  # [B, K, G, T, S]
  return z.reshape(b, n, t, k.shape[1]) * jnp.asarray(scale, z.dtype)


def column_sums(q: jax.Array, k: jax.Array, lse: jax.Array, mod: problem_lib.ScoreMod,
                site: base.AttentionSite, *, block: int = 256
                ) -> tuple[jax.Array, jax.Array]:
  """(sum_i A_ij [B, N, S], number of queries that see key j [B, 1, S]).

  A q-block pass: each block of <= `block` rows recomputes its logits and
  exp(logits - lse) (rows that see nothing: lse = -inf gives 0). No gradient (the
  sums feed a threshold).
  """
  q, k, lse, mod = jax.tree_util.tree_map(jax.lax.stop_gradient, (q, k, lse, mod))
  b, t, n, _ = q.shape
  s = k.shape[1]
  cdt = jnp.promote_types(q.dtype, jnp.float32)
  q, k, lse = q.astype(cdt), k.astype(cdt), lse.astype(cdt)
  lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse)  # [B, N, T]
  bi = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
  hi = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
  kv = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
  arrays = site_arrays(site)

  def fn(rows, q_blk, lse_blk, real):
    qi = rows[None, None, :, None]
    z = mod(scaled_logits(q_blk, k, site.scale), bi, hi, qi, kv)  # [B, N, bq, S]
    p = jnp.exp(z - lse_blk[..., None])  # [B, N, bq, S]; padding rows: lse = +inf
    vis = visible_at(arrays, site.window, bi, qi, kv) & real[None, None, :, None]
    return p.sum(2), vis.sum(2, dtype=jnp.int32)  # [B, N, S], [B, 1, S]

  real = jnp.ones((t,), bool)
  init = (jnp.zeros((b, n, s), cdt), jnp.zeros((b, 1, s), jnp.int32))
  return map_query_blocks(fn, block, t, (q, 1, 0), (lse_safe, 2, jnp.inf),
                          (real, 0, False), reduce=True, init=init)


@dataclasses.dataclass(frozen=True)
class BlockedContext:
  """What a blocked probability edit can use (no T x S array inside).

  Attributes:
    q, k, v: the call's inputs [B, T, N, H], [B, S, K, H], [B, S, K, Hv].
    site: the AttentionSite.
    mod: the score_mod (logit edits + visibility) of the kernel pass.
    out: the (unedited by probability edits) output [B, T, N, Hv] in float32.
    lse: its log-sum-exp [B, N, T].
    block: query rows per block of the second pass.
    implementation: the dot_product_attention implementation.
  """
  q: jax.Array
  k: jax.Array
  v: jax.Array
  site: base.AttentionSite
  mod: problem_lib.ScoreMod
  out: jax.Array
  lse: jax.Array
  block: int
  implementation: str | None

  @property
  def num_heads(self) -> int:
    return self.q.shape[2]

  def column_sums(self) -> tuple[jax.Array, jax.Array]:
    """(sum_i A_ij [B, N, S], count of queries seeing key j [B, 1, S]); no grad."""
    return column_sums(self.q, self.k, self.lse, self.mod, self.site,
                       block=self.block)

  def weighted(self, values: jax.Array) -> jax.Array:
    """sum_j A_ij values_j with the call's probabilities: [B, S, K|N, C] -> [B, T, N, C].

    `values` per kv head (K, shared by the query heads of a group, as v) or per
    query head (N; `repeat_kv` makes them from v). One kernel pass.
    """
    n, kh = self.num_heads, self.k.shape[2]
    if values.shape[2] not in (kh, n):
      raise ValueError(f'values must have {kh} (kv) or {n} (query) heads, got '
                       f'{values.shape[2]}.')
    dt = values.dtype
    k = self.k if values.shape[2] == kh else repeat_kv(self.k, n)
    return api.dot_product_attention(
        self.q.astype(dt), k.astype(dt), values, scale=self.site.scale,
        score_mod=self.mod, implementation=self.implementation)

  def diagonal_values(self) -> tuple[jax.Array, jax.Array]:
    """(v at the key with the query's own position [B, T, N, Hv], found [B, T]).

    The identity map I of SoftPAG: key j with kv_pos[j] == q_pos[i] and visible
    (the mean over such keys if several); `found` is False where there is none.
    A q-block pass over [B, block, S] match tables (no heads).
    """
    b, t, n, _ = self.q.shape
    s, kh, hv = self.v.shape[1], self.v.shape[2], self.v.shape[3]
    arrays = site_arrays(self.site)
    bi = jnp.arange(b, dtype=jnp.int32)[:, None, None]
    kv = jnp.arange(s, dtype=jnp.int32)[None, None, :]
    v = self.v.astype(jnp.promote_types(self.v.dtype, jnp.float32))

    def fn(rows):
      qi = rows[None, :, None]
      match = visible_at(arrays, self.site.window, bi, qi, kv) & (
          arrays[1][bi, kv] == arrays[0][bi, qi])  # [B, bq, S]
      cnt = match.sum(-1)  # [B, bq]
      w = match / jnp.maximum(cnt, 1)[..., None].astype(v.dtype)
      vd = jnp.einsum('bts,bskv->btkv', w, v, precision=_PRECISION)  # [B, bq, K, Hv]
      return vd, cnt > 0

    nb_out = map_query_blocks(fn, self.block, t)
    vd, found = nb_out  # [nb, B, bq, K, Hv], [nb, B, bq]
    nb, _, bq = found.shape
    vd = jnp.moveaxis(vd, 0, 1).reshape(b, nb * bq, kh, hv)[:, :t]
    found = jnp.moveaxis(found, 0, 1).reshape(b, nb * bq)[:, :t]
    return repeat_kv(vd, n), found
