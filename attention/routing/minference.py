"""MInference / MMInference pre-filling patterns as DynamicBlockMasks (training-free).

"MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention" (Jiang et al., NeurIPS 2024) and "MMInference: Accelerating Pre-filling
for Long-Context VLMs via Modality-Aware Permutation Sparse Attention" (Li et al.,
2025). Patterns per head:

* Vertical-slash (VS): the last `last_q` queries (64) attend causally (causal among
  themselves) to all keys, A^ = softmax(Q[-64:] K^T / sqrt(d)). Column score = sum of
  A^ over those rows, slash score of offset o = i - j (o >= 0) = sum of A^ along that
  diagonal. The first `forced_vertical` columns (30) and the `forced_slash` nearest
  diagonals (100, offsets 0..99) are forced (+inf), then the top-`num_vertical`
  columns and top-`num_slash` diagonals are kept (ties: lower column, nearer
  diagonal). Visible: j <= i and (j is a kept column or i - j a kept offset).
* A-shape: sink + local window (static: `a_shape`, `attention.masks.sink_window`).
* Block-sparse: mean-pooled q / k blocks, top-k key blocks per query block.

Granularity: the VS pattern is converted into kv-block lists BLOCK-GRANULARLY: a
slash lists every kv block its diagonal crosses inside a query block, a vertical the
kv block containing the column (for the query blocks that can see it); causality
still applies token by token (inner mask), but the other tokens of a listed block
are visible too, so the visible set is a superset of MInference's token set (its
kernel also expands slashes to 64-key ranges but keeps verticals as token columns).

MMInference's modality-aware permutation (`modality_permutation`): tokens are
stably sorted by modality (text, image, ...), so each modality's tokens are contiguous
and its within-modality lines become dense tiles; attention runs on the permuted
tokens with the permuted causal mask (`attention.masks.permute_mask`) as the inner
mask, and the output is un-permuted. Here one VS pattern is estimated on the
permuted layout from the last queries of EVERY modality segment (the "2D-boundary"
head type, both q and k permuted). Not included: MMInference's offline per-head
pattern search (No / K / Q / 2D boundary, Grid heads with a per-frame stride) and a
separate pattern per modality segment.

Einsum letters: b batch, n head, r estimation row, s key, t position, h head dim.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import attention as attention_api
from attention import _checks
from attention import masks


def _int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def _check_qk(query: Any, key: Any) -> tuple[int, int, int, int]:
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  b, t, n, h = query.shape
  if key.shape[0] != b or key.shape[1] != t or key.shape[3] != h:
    raise ValueError(f'key must have shape [B, T, K, H] = [{b}, {t}, K, {h}] '
                     f'(self-attention pre-filling), got {list(key.shape)}.')
  if key.shape[2] < 1 or n % key.shape[2]:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads '
                     f'({key.shape[2]}).')
  return b, t, n, h


def estimation_rows(q_len: int, last_q: int,
                    segments: Any = None) -> np.ndarray:
  """int64 [R]: the query positions the pattern is estimated from.

  The last `last_q` positions, or with `segments` (a list of (start, end) position
  ranges) the last min(last_q, end - start) positions of each segment.
  """
  last_q = _int('last_q', last_q, 1)
  if segments is None:
    segments = [(0, q_len)]
  rows = [np.arange(max(start, end - last_q), end) for start, end in segments]
  return np.concatenate(rows).astype(np.int64)


def vertical_slash_scores(query: jax.Array, key: jax.Array, *, rows: Any,
                          visible: Any, scale: float | None = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(column scores [B, N, S], slash scores [B, N, T + S - 1]) from rows of A^.

  A^ = softmax over the visible keys of q[rows] k^T scale; column score = sum over
  the rows; the slash score of offset o = i - j is stored at index o + S - 1 (so
  index S - 1 + o, o in [-(S - 1), T - 1]) and sums A^ over the rows along it.

  Args:
    query: [B, T, N, H]; key [B, S, K, H].
    rows: int [R] (static) query positions.
    visible: bool [R, S] (static) which keys each row may see.
  """
  b, t, n, h = _check_qk(query, key)
  s = key.shape[1]
  rows = np.asarray(rows, np.int64)
  visible = np.asarray(visible, bool)
  if visible.shape != (len(rows), s):
    raise ValueError(f'visible must have shape [R, S] = [{len(rows)}, {s}], got '
                     f'{list(visible.shape)}.')
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  q = jax.lax.stop_gradient(query[:, rows]).astype(dtype)  # [B, R, N, H]
  k = jax.lax.stop_gradient(jnp.repeat(key, n // key.shape[2], axis=2)).astype(dtype)
  logits = jnp.einsum('brnh,bsnh->bnrs', q, k) * scale  # [B, N, R, S]
  logits = jnp.where(visible, logits, -jnp.inf)
  m = jnp.max(logits, -1, keepdims=True)
  e = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  probs = e / jnp.maximum(jnp.sum(e, -1, keepdims=True), 1e-30)  # [B, N, R, S]
  columns = jnp.sum(probs, axis=2)  # [B, N, S]
  diag = (rows[:, None] - np.arange(s)[None, :] + s - 1).reshape(-1)  # [R * S]
  slashes = jnp.zeros((b, n, t + s - 1), dtype).at[..., diag].add(
      probs.reshape(b, n, -1))  # [B, N, T + S - 1]
  return columns, slashes


def select_vertical_slash(columns: jax.Array, slashes: jax.Array, *,
                          num_vertical: int, num_slash: int, forced_vertical: Any,
                          forced_slash: Any, eligible_slash: Any = None
                          ) -> tuple[jax.Array, jax.Array]:
  """(kept columns int32 [B, N, v], kept slash indices int32 [B, N, s]).

  `forced_vertical` bool [S] / `forced_slash` bool [T + S - 1] (static) are kept
  first (+inf); `eligible_slash` bool [T + S - 1] (static) marks offsets that may be
  chosen at all. Ties: lower column; for slashes, the nearer diagonal (smaller |o|,
  then o >= 0 first).
  """
  s = columns.shape[-1]
  nd = slashes.shape[-1]
  num_vertical = _int('num_vertical', num_vertical, 1)
  num_slash = _int('num_slash', num_slash, 1)
  if num_vertical > s:
    raise ValueError(f'num_vertical must be in [1, {s}] (the keys), got '
                     f'{num_vertical}.')
  if num_slash > nd:
    raise ValueError(f'num_slash must be in [1, {nd}] (the diagonals), got '
                     f'{num_slash}.')
  col = jnp.where(np.asarray(forced_vertical, bool), jnp.inf, columns)
  _, v_idx = jax.lax.top_k(col, num_vertical)
  # Diagonals ordered nearest first (o = 0, 1, -1, 2, -2, ...; o = index - (S - 1)),
  # so top_k's tie rule (lower position first) prefers the nearer diagonal.
  offsets = np.arange(nd) - (s - 1)
  order = np.lexsort((offsets < 0, np.abs(offsets)))  # |o| ascending, o >= 0 first
  sl = jnp.where(np.asarray(forced_slash, bool), jnp.inf, slashes)
  if eligible_slash is not None:
    sl = jnp.where(np.asarray(eligible_slash, bool), sl, -jnp.inf)
  _, pos = jax.lax.top_k(sl[..., order], num_slash)
  return v_idx.astype(jnp.int32), jnp.asarray(order, jnp.int32)[pos]


def vertical_slash_blocks(columns: jax.Array, slash_offsets: jax.Array, *,
                          q_len: int, kv_len: int, block_q: int, block_kv: int,
                          causal: bool = True) -> jax.Array:
  """bool [B, N, nq, nk]: the kv blocks the kept columns and diagonals touch.

  columns: int [B, N, v] key indices; slash_offsets: int [B, N, s], o = i - j (any
  sign). A diagonal lists, per query block [i0, i1], the kv blocks of j in
  [i0 - o, i1 - o] clipped to [0, S); a column j its kv block, for every query block
  (with `causal`, only those whose last row i1 >= j). O(nq nk) memory (difference
  arrays), so no T x S array.
  """
  nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
  b, n = columns.shape[:2]
  i0 = jnp.arange(nq) * block_q  # [nq]
  i1 = jnp.minimum(i0 + block_q, q_len) - 1
  o = slash_offsets[..., None]  # [B, N, s, 1]
  lo, hi = i0 - o, i1 - o  # [B, N, s, nq]
  ok = (hi >= 0) & (lo <= kv_len - 1)
  lo_b = jnp.clip(lo, 0, kv_len - 1) // block_kv
  hi_b = jnp.clip(hi, 0, kv_len - 1) // block_kv
  qb = jnp.broadcast_to(jnp.arange(nq), lo.shape)
  bi = jnp.arange(b)[:, None, None, None]
  ni = jnp.arange(n)[None, :, None, None]
  diff = jnp.zeros((b, n, nq, nk + 1), jnp.int32)
  diff = diff.at[bi, ni, qb, lo_b].add(ok.astype(jnp.int32))
  diff = diff.at[bi, ni, qb, hi_b + 1].add(-ok.astype(jnp.int32))
  slash = jnp.cumsum(diff, axis=-1)[..., :nk] > 0
  cb = columns // block_kv  # [B, N, v]
  first = (columns // block_q) if causal else jnp.zeros_like(columns)
  vdiff = jnp.zeros((b, n, nq + 1, nk), jnp.int32)
  vdiff = vdiff.at[bi[..., 0], ni[..., 0], first, cb].add(1)
  vert = jnp.cumsum(vdiff, axis=2)[:, :, :nq] > 0
  return slash | vert


def _budget(num_vertical: int, num_slash: int, block_q: int, block_kv: int,
            nk: int) -> int:
  """An upper bound of the listed blocks per query block (so the lists are exact)."""
  per_slash = -(-(block_q - 1) // block_kv) + 1
  return min(nk, num_vertical + num_slash * per_slash)


def vertical_slash_mask(query: jax.Array, key: jax.Array, *, num_vertical: int,
                        num_slash: int, last_q: int = 64, forced_vertical: int = 30,
                        forced_slash: int = 100, block_q: int = 64,
                        block_kv: int = 64, scale: float | None = None
                        ) -> masks.DynamicBlockMask:
  """MInference's causal vertical-slash pattern as a DynamicBlockMask (Hm = N).

  Args:
    query: [B, T, N, H]; key [B, T, K, H] (pre-filling, causal).
    num_vertical, num_slash: kept columns (top-v) and diagonals (top-s), counting
      the forced ones; in [1, T].
    last_q: estimation queries (the last ones, causal among themselves).
    forced_vertical: the first columns always kept (clipped to T).
    forced_slash: the nearest diagonals (offsets 0 .. forced_slash - 1) always kept.
    block_q, block_kv: the block sizes of the lists.
  Returns:
    A DynamicBlockMask with inner = causal and an exact (sufficient) budget.
  """
  b, t, n, _ = _check_qk(query, key)
  last_q = min(_int('last_q', last_q, 1), t)
  for name, v in (('num_vertical', num_vertical), ('num_slash', num_slash)):
    if _int(name, v, 1) > t:
      raise ValueError(f'{name} must be in [1, {t}] (the sequence length), got {v}.')
  forced_vertical = _int('forced_vertical', forced_vertical, 0)
  forced_slash = _int('forced_slash', forced_slash, 0)
  block_q, block_kv = _int('block_q', block_q, 1), _int('block_kv', block_kv, 1)
  rows = estimation_rows(t, last_q)
  visible = np.arange(t)[None, :] <= rows[:, None]
  columns, slashes = vertical_slash_scores(query, key, rows=rows, visible=visible,
                                           scale=scale)
  off = np.arange(2 * t - 1) - (t - 1)
  v_idx, d_idx = select_vertical_slash(
      columns, slashes, num_vertical=num_vertical, num_slash=num_slash,
      forced_vertical=np.arange(t) < forced_vertical,
      forced_slash=(off >= 0) & (off < forced_slash), eligible_slash=off >= 0)
  blocks = vertical_slash_blocks(v_idx, d_idx - (t - 1), q_len=t, kv_len=t,
                                 block_q=block_q, block_kv=block_kv)
  nk = -(-t // block_kv)
  return masks.from_block_matrix(
      blocks, q_len=t, kv_len=t, block_q=block_q, block_kv=block_kv,
      budget=_budget(num_vertical, num_slash, block_q, block_kv, nk),
      inner=masks.causal(t, t))


def vertical_slash_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                             implementation: str | None = None,
                             **pattern: Any) -> jax.Array:
  """Causal attention over `vertical_slash_mask(query, key, **pattern)`: [B, T, N, H_v]."""
  mask = vertical_slash_mask(query, key, **pattern)
  return attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=mask, scale=pattern.get('scale'),
      implementation=implementation)


def a_shape(q_len: int, num_sinks: int = 128, window: int = 3968) -> masks.Mask:
  """MInference's A-shape head: `num_sinks` first keys + a causal local window."""
  return masks.sink_window(q_len, num_sinks, window)


def block_sparse_mask(query: jax.Array, key: jax.Array, *, top_k: int,
                      block_q: int = 64, block_kv: int = 64
                      ) -> masks.DynamicBlockMask:
  """MInference's block-sparse head: mean-pooled q / k blocks, causal top-k kv blocks.

  Block scores are pooled-q . pooled-k (per head, detached); future blocks are not
  eligible and the diagonal block is always kept (it counts toward `top_k`).
  """
  b, t, n, h = _check_qk(query, key)
  block_q, block_kv = _int('block_q', block_q, 1), _int('block_kv', block_kv, 1)
  nq, nk = -(-t // block_q), -(-t // block_kv)
  def pool(x, block, nb):
    x = jax.lax.stop_gradient(x).astype(jnp.promote_types(x.dtype, jnp.float32))
    x = jnp.pad(x, ((0, 0), (0, nb * block - t), (0, 0), (0, 0)))
    counts = np.minimum(block, t - np.arange(nb) * block)[None, :, None, None]
    return jnp.sum(x.reshape(b, nb, block, *x.shape[2:]), 2) / counts
  qp = pool(query, block_q, nq)  # [B, nq, N, H]
  kp = pool(jnp.repeat(key, n // key.shape[2], axis=2), block_kv, nk)  # [B, nk, N, H]
  scores = jnp.einsum('bqnh,bknh->bnqk', qp, kp)  # [B, N, nq, nk]
  q_first = np.arange(nq)[:, None] * block_q
  q_last = np.minimum(q_first + block_q, t) - 1
  k_first = np.arange(nk)[None, :] * block_kv
  k_last = np.minimum(k_first + block_kv, t) - 1
  scores = jnp.where(k_first <= q_last, scores, -jnp.inf)
  always = (k_first <= q_last) & (k_last >= q_first)  # the diagonal blocks
  return masks.top_k_blocks(scores, top_k, q_len=t, kv_len=t, block_q=block_q,
                            block_kv=block_kv, always=always,
                            inner=masks.causal(t, t))


# ----- MMInference: modality-aware permutation -----


def modality_permutation(modality: Any) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """(perm int64 [T], segments) grouping tokens by modality id (stable).

  perm[p] is the original index of the token at permuted position p (the
  `attention.masks.apply_permutation` convention); tokens keep their order within a
  modality; segments[m] = (start, end) positions of the m-th present modality (in
  ascending modality id).
  """
  ids = np.asarray(modality)
  if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer) or
                                            ids.dtype == np.bool_):
    raise ValueError(f'modality must be a non-empty 1-D integer (or bool) array of '
                     f'per-token modality ids, got shape {ids.shape} {ids.dtype}.')
  ids = ids.astype(np.int64)
  perm = np.argsort(ids, kind='stable')
  values, counts = np.unique(ids, return_counts=True)
  ends = np.cumsum(counts)
  return perm, [(int(e - c), int(e)) for e, c in zip(ends, counts)]


def modality_vertical_slash_mask(query: jax.Array, key: jax.Array, modality: Any, *,
                                 num_vertical: int, num_slash: int, last_q: int = 64,
                                 forced_vertical: int = 30, forced_slash: int = 100,
                                 block_q: int = 64, block_kv: int = 64,
                                 scale: float | None = None
                                 ) -> tuple[masks.DynamicBlockMask, np.ndarray]:
  """(DynamicBlockMask on the modality-permuted order, perm).

  query / key [B, T, ., H] in the original order; `modality` int [T] (static). The
  pattern is estimated on the permuted tokens from the last `last_q` queries of each
  modality segment (causal in the ORIGINAL positions), with diagonals of the
  permuted layout (offsets of either sign) and forced columns = the first
  `forced_vertical` ORIGINAL positions (attention sinks). Inner mask: the permuted
  causal mask.
  """
  b, t, n, _ = _check_qk(query, key)
  perm, segments = modality_permutation(modality)
  if len(perm) != t:
    raise ValueError(f'modality must have length T = {t}, got {len(perm)}.')
  nd = 2 * t - 1
  for name, v, top in (('num_vertical', num_vertical, t), ('num_slash', num_slash, nd)):
    if _int(name, v, 1) > top:
      raise ValueError(f'{name} must be in [1, {top}], got {v}.')
  forced_vertical = _int('forced_vertical', forced_vertical, 0)
  forced_slash = _int('forced_slash', forced_slash, 0)
  block_q, block_kv = _int('block_q', block_q, 1), _int('block_kv', block_kv, 1)
  qp, kp = masks.apply_permutation(query, perm), masks.apply_permutation(key, perm)
  rows = estimation_rows(t, last_q, segments)
  visible = perm[None, :] <= perm[rows][:, None]  # causal in original positions
  columns, slashes = vertical_slash_scores(qp, kp, rows=rows, visible=visible,
                                           scale=scale)
  off = np.arange(nd) - (t - 1)
  v_idx, d_idx = select_vertical_slash(
      columns, slashes, num_vertical=num_vertical, num_slash=num_slash,
      forced_vertical=perm < forced_vertical,
      forced_slash=(off >= 0) & (off < forced_slash))
  blocks = vertical_slash_blocks(v_idx, d_idx - (t - 1), q_len=t, kv_len=t,
                                 block_q=block_q, block_kv=block_kv, causal=False)
  mask = masks.from_block_matrix(blocks, q_len=t, kv_len=t, block_q=block_q,
                                 block_kv=block_kv,
                                 inner=masks.permute_mask(masks.causal(t, t), perm))
  return mask, perm


def modality_vertical_slash_attention(query: jax.Array, key: jax.Array,
                                      value: jax.Array, modality: Any, *,
                                      implementation: str | None = None,
                                      **pattern: Any) -> jax.Array:
  """MMInference-style attention: permute by modality, VS pattern, un-permute.

  Returns [B, T, N, H_v] in the original token order.
  """
  mask, perm = modality_vertical_slash_mask(query, key, modality, **pattern)
  qp, kp, vp = (masks.apply_permutation(x, perm) for x in (query, key, value))
  out = attention_api.dot_product_attention(  # [B, T, N, H_v], permuted
      qp, kp, vp, mask=mask, scale=pattern.get('scale'),
      implementation=implementation)
  return masks.invert_permutation(out, perm)


def registry_pattern(q_len: int) -> dict[str, int]:
  """VS settings for a trainer sequence length: MInference's (1000, 6096, 64, 30,
  100, 64-blocks) clipped to what fits T (at least 1/8 of the columns / diagonals)."""
  t = _int('q_len', q_len, 1)
  block = 64 if t >= 512 else max(1, t // 8)
  long = t >= 8192
  return dict(num_vertical=1000 if long else max(1, t // 8),
              num_slash=6096 if long else max(1, t // 8),
              last_q=min(64, t), forced_vertical=min(30, max(1, t // 32)),
              forced_slash=min(100, max(1, t // 16)), block_q=block, block_kv=block)


def make_registry_variant() -> Callable[..., Any]:
  """A model-registry variant `fn(q, k, v, *, mask, is_causal, sinks,
  logits_soft_cap, implementation) -> (out, {})` running the VS pattern.

  Causal only (pre-filling); the pattern settings come from `registry_pattern(T)`;
  a static mask, sinks and soft-capping are applied on top (the mask token by token
  inside the listed blocks).
  """
  def variant(query, key, value, *, mask, is_causal, sinks, logits_soft_cap,
              implementation):
    if not is_causal:
      raise ValueError("attention variant 'minference' is causal only (pre-filling "
                       'patterns); got is_causal=False.')
    dyn = vertical_slash_mask(query, key, **registry_pattern(query.shape[1]))
    out = attention_api.dot_product_attention(  # [B, T, N, H_v]
        query, key, value, mask=dyn if mask is None else (dyn, mask), sinks=sinks,
        logits_soft_cap=logits_soft_cap, implementation=implementation)
    return out, {}

  variant.__doc__ = ('MInference vertical-slash pattern from the last queries '
                     '(registry variant, settings registry_pattern(T)).')
  return variant
