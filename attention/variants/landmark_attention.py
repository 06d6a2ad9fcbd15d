"""Landmark attention (Mohtashami & Jaggi, 2023).

"Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023), following the authors' code (github.com/epfml/landmark-attention,
`models/landmark.py`: `landmark_grouped_softmax` and the mask set-up before it).

Layout. A landmark token follows every block of `block_size` regular tokens
(`insert_landmarks`), so the augmented sequence has period P = block_size + 1 and
position j is a landmark iff j % P == block_size; block(j) = j // P (a landmark
belongs to the block it closes; a trailing partial block has no landmark).

Grouped softmax (training; causal). For query i with current block c = block(i),
logits s_ij = scale * q_i . k_j:

    current group   G_i = {j <= i regular, block(j) = c}  U  {landmarks of blocks < c}
    P_i(j)          = exp(s_ij) / sum_{j' in G_i} exp(s_ij')              (j in G_i)
    W_ij = P_i(j)                                         j regular in block c, j <= i
    W_ij = exp(s_ij) / sum_{j' regular in g} exp(s_ij') * P_i(landmark of g)
                                                          j regular in a block g < c
    W_ij = 0                                              j a landmark, or j > i
    out_i = sum_j W_ij v_j

The landmark of the current block is in no group (the code masks it, "even if we are
processing the landmark token itself"); each row of W sums to 1. Training uses this
dense [T, T] form (the paper's non-fused path); the authors' group dropout is not
implemented.

Retrieval (inference). Each query (or each q block of `query_block` tokens, which
must divide P, scored by the sum of its tokens' scores) ranks the landmarks of the
blocks before its own by s(q, k_landmark), keeps the `top_k` best plus its own block
(always), and attends with ONE ordinary softmax to the regular tokens of those blocks
(causal inside; landmark keys hidden: `LandmarkCausal`). The block choice is a traced
`attention.masks.DynamicBlockMask` (`top_k_blocks`, kv blocks of P tokens), so
`attention.dot_product_attention` runs it on every implementation; Pallas tile rules
apply to P (e.g. block_size = 63 gives P = 64) and to query_block. The paper
retrieves per token (query_block = 1, the default) and per head.

Einsum letters: b batch, t/s positions, n query heads, k kv heads, h head dim,
g blocks, p position in a block, d model dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api
from attention.masks import base as masks_base
from attention.masks import dynamic
from attention.routing import _common
from attention.routing.seer_attention import rope

MODES = ('train', 'retrieve')


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# ------------------------------------------------------------------------ layout --


def augmented_length(seq_len: int, block_size: int) -> int:
  """T + floor(T / block_size): the length after inserting the landmarks."""
  seq_len = _common.check_int('seq_len', seq_len)
  block_size = _common.check_int('block_size', block_size)
  return seq_len + seq_len // block_size


def landmark_layout(length: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(block int32 [L], is_landmark bool [L]) of an augmented sequence of length L."""
  length = _common.check_int('length', length)
  block_size = _common.check_int('block_size', block_size)
  j = np.arange(length)
  period = block_size + 1
  return (j // period).astype(np.int32), (j % period) == block_size


def _regular_index(seq_len: int, block_size: int) -> np.ndarray:
  """int [T]: the augmented position of each regular token."""
  t = np.arange(seq_len)
  return t + t // block_size


def insert_landmarks(tokens: jax.Array, *, block_size: int, landmark_id: int
                     ) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """Inserts a landmark token after every full block (the paper's data layout).

  Args:
    tokens: int [B, T].
    block_size: regular tokens per block (the paper uses 50).
    landmark_id: the landmark token id (an extra vocabulary entry).

  Returns:
    (tokens [B, L], positions int32 [L] = 0 .. L - 1 (the augmented positions the
    paper's training uses for RoPE), is_landmark bool [L]).
  """
  _checks.check_array('tokens', tokens, ndim=2)
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise TypeError(f'tokens must have an integer dtype, got {tokens.dtype}.')
  block_size = _common.check_int('block_size', block_size)
  landmark_id = _common.check_int('landmark_id', landmark_id, 0)
  b, t = tokens.shape
  length = augmented_length(t, block_size)
  _, is_lm = landmark_layout(length, block_size)
  out = jnp.full((b, length), landmark_id, tokens.dtype)
  out = out.at[:, _regular_index(t, block_size)].set(tokens)
  return out, np.arange(length, dtype=np.int32), is_lm


def insert_landmark_vectors(x: jax.Array, landmark: jax.Array, *, block_size: int,
                            add_block_mean: bool = False) -> jax.Array:
  """x [B, T, D] with a landmark vector after every full block -> [B, L, D].

  The landmark's vector is `landmark` [D] (plus the mean of its block's vectors
  when `add_block_mean`: see `LandmarkAttention`).
  """
  _checks.check_array('x', x, ndim=3, floating=True)
  _checks.check_array('landmark', landmark, ndim=1, floating=True)
  b, t, d = x.shape
  if landmark.shape[0] != d:
    raise ValueError(f'landmark must have shape [D] = [{d}], got '
                     f'{list(landmark.shape)}.')
  block_size = _common.check_int('block_size', block_size)
  length = augmented_length(t, block_size)
  nfull = t // block_size
  lm = jnp.broadcast_to(landmark.astype(x.dtype), (b, nfull, d))
  if add_block_mean and nfull:
    blocks = x[:, :nfull * block_size].reshape(b, nfull, block_size, d)
    lm = lm + jnp.mean(blocks, axis=2)  # [B, G, D]
  out = jnp.zeros((b, length, d), x.dtype)
  out = out.at[:, _regular_index(t, block_size)].set(x)
  lm_pos = np.arange(nfull) * (block_size + 1) + block_size
  return out.at[:, lm_pos].set(lm)


def remove_landmarks(y: jax.Array, *, block_size: int) -> jax.Array:
  """y [B, L, ...] -> [B, T, ...]: the regular positions only."""
  length = y.shape[1]
  block_size = _common.check_int('block_size', block_size)
  _, is_lm = landmark_layout(length, block_size)
  return y[:, np.flatnonzero(~is_lm)]


# ------------------------------------------------------------ grouped softmax --


def _masked_softmax(s: jax.Array, valid: Any, axis: int = -1) -> jax.Array:
  """Softmax over the valid entries (rows with none: zeros, no NaN)."""
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=axis, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.exp(s - m)
  z = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def grouped_softmax(logits: jax.Array, *, block_size: int) -> jax.Array:
  """The landmark grouped-softmax weights W [B, N, L, L] (module docstring).

  Args:
    logits: floating [B, N, L, L], s_ij of the augmented sequence (scaled; entries
      hidden by causality or the groups are ignored, whatever their value).
    block_size: regular tokens per block.
  """
  _checks.check_array('logits', logits, ndim=4, floating=True)
  length = logits.shape[-1]
  if logits.shape[-2] != length:
    raise ValueError(f'logits must be square [B, N, L, L] (self-attention), got '
                     f'{list(logits.shape)}.')
  block_size = _common.check_int('block_size', block_size)
  period = block_size + 1
  blk, is_lm = landmark_layout(length, block_size)
  qb, kb = blk[:, None], blk[None, :]
  causal = np.tril(np.ones((length, length), bool))
  current = causal & ~is_lm[None, :] & (kb == qb)  # [L, L]
  past_lm = is_lm[None, :] & (kb < qb)
  p_cur = _masked_softmax(logits, current | past_lm)  # [B, N, L, L]

  ng = _ceil_div(length, period)
  pad = ng * period - length
  widths = [(0, 0)] * 3 + [(0, pad)]
  s_blk = jnp.pad(logits, widths).reshape(logits.shape[:3] + (ng, period))
  g = np.arange(ng)
  within = ((g[None, :, None] < blk[:, None, None]) &
            (np.arange(period)[None, None, :] < block_size))  # [L, G, P]
  p_blk = _masked_softmax(s_blk, within)  # [B, N, L, G, P]
  gate = jnp.pad(p_cur, widths).reshape(p_cur.shape[:3] + (ng, period))
  gate = gate[..., block_size]  # [B, N, L, G]: P_i(landmark of g)
  w_past = (p_blk * gate[..., None]).reshape(logits.shape[:3] + (ng * period,))
  return jnp.where(current, p_cur, 0.0) + w_past[..., :length]


def landmark_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                       block_size: int, scale: float | None = None) -> jax.Array:
  """Causal landmark attention with the grouped softmax (training form), dense.

  Args:
    query: [B, L, N, H]; key: [B, L, K, H]; value: [B, L, K, H_v], over the
      augmented sequence (landmarks at j % (block_size + 1) == block_size).
    block_size: regular tokens per block.
    scale: logits scale, default 1 / sqrt(H).

  Returns:
    out [B, L, N, H_v] in query's dtype (O(L^2) memory).
  """
  b, length, n, kh, h = _common.check_qk(query, key, value)
  _checks.check_positive('scale', scale)
  scale = 1.0 / np.sqrt(h) if scale is None else float(scale)
  dt = jnp.promote_types(query.dtype, jnp.float32)
  k = jnp.repeat(key, n // kh, axis=2).astype(dt)
  v = jnp.repeat(value, n // kh, axis=2).astype(dt)
  logits = jnp.einsum('btnh,bsnh->bnts', query.astype(dt), k) * scale  # [B, N, L, L]
  w = grouped_softmax(logits, block_size=block_size)
  out = jnp.einsum('bnts,bsnh->btnh', w, v)  # [B, L, N, H_v]
  return out.astype(query.dtype)


# --------------------------------------------------------------------- retrieval --


@dataclasses.dataclass(frozen=True, eq=False)
class LandmarkCausal(masks_base.Mask):
  """k <= q and k is not a landmark (k % period != period - 1)."""
  shape: tuple[int, int]
  period: int

  def _predicate(self, q, k, h):
    return (k <= q) & (k % self.period != self.period - 1)


def _check_query_block(query_block: Any, period: int) -> int:
  query_block = _common.check_int('query_block', query_block)
  if period % query_block:
    raise ValueError(f'query_block must divide block_size + 1 ({period}) so a q '
                     f'block lies in one landmark block, got {query_block}.')
  return query_block


def landmark_block_scores(query: jax.Array, key: jax.Array, *, block_size: int,
                          query_block: int = 1) -> jax.Array:
  """Retrieval scores float32 [B, N, nq, nk], stop_gradient'ed.

  S[jq, g] = sum_{t in q block jq} scale * q_t . k_{landmark of g} for the blocks g
  before the q block's own block, -inf otherwise (the own block is always kept).
  nq = ceil(L / query_block), nk = ceil(L / (block_size + 1)).
  """
  b, length, n, kh, h = _common.check_qk(query, key)
  block_size = _common.check_int('block_size', block_size)
  period = block_size + 1
  query_block = _check_query_block(query_block, period)
  query = jax.lax.stop_gradient(query).astype(jnp.float32)
  key = jax.lax.stop_gradient(key).astype(jnp.float32)
  nk = _ceil_div(length, period)
  nq = _ceil_div(length, query_block)
  lm_pos = np.arange(nk) * period + block_size
  exists = lm_pos < length
  k_lm = key[:, np.minimum(lm_pos, length - 1)]  # [B, nk, K, H]
  k_lm = jnp.repeat(k_lm, n // kh, axis=2)  # [B, nk, N, H]
  q = jnp.pad(query, [(0, 0), (0, nq * query_block - length), (0, 0), (0, 0)])
  q_sum = q.reshape(b, nq, query_block, n, h).sum(2)  # [B, nq, N, H]
  scores = jnp.einsum('bjnh,bgnh->bnjg', q_sum, k_lm) / np.sqrt(h)  # [B, N, nq, nk]
  own = (np.arange(nq) * query_block) // period  # [nq]
  eligible = (np.arange(nk)[None, :] < own[:, None]) & exists[None, :]
  return jnp.where(eligible, scores, -jnp.inf)


def landmark_retrieval_mask(query: jax.Array, key: jax.Array, *, block_size: int,
                            top_k: int, query_block: int = 1
                            ) -> dynamic.DynamicBlockMask:
  """The retrieved blocks: the own block + the top_k best earlier blocks, per q block.

  Ties go to the lower block index; a q block with fewer earlier blocks lists them
  all. Inner mask: `LandmarkCausal` (causal, landmark keys hidden).
  """
  scores = landmark_block_scores(query, key, block_size=block_size,
                                 query_block=query_block)
  top_k = _common.check_int('top_k', top_k, 0)
  length = query.shape[1]
  period = block_size + 1
  nq, nk = scores.shape[-2:]
  own = (np.arange(nq) * query_block) // period
  always = np.zeros((1, 1, nq, nk), bool)
  always[0, 0, np.arange(nq), own] = True
  return dynamic.top_k_blocks(
      scores, min(top_k + 1, nk), q_len=length, kv_len=length,
      block_q=query_block, block_kv=period, always=jnp.asarray(always),
      inner=LandmarkCausal((length, length), period))


def landmark_retrieval_attention(query: jax.Array, key: jax.Array,
                                 value: jax.Array, *, block_size: int, top_k: int,
                                 query_block: int = 1, scale: float | None = None,
                                 implementation: str | None = None,
                                 return_mask: bool = False) -> Any:
  """Inference form: one softmax over the retrieved blocks + the own block.

  Args:
    query, key, value: [B, L, N | K, H] over the augmented sequence.
    block_size: regular tokens per block; top_k: earlier blocks retrieved.
    query_block: queries sharing one retrieval (divides block_size + 1; 1 = the
      paper's per-token retrieval).
    scale, implementation: as `attention.dot_product_attention`.
    return_mask: also return the DynamicBlockMask.

  Returns:
    out [B, L, N, H_v] (and the mask).
  """
  _common.check_qk(query, key, value)
  mask = landmark_retrieval_mask(query, key, block_size=block_size, top_k=top_k,
                                 query_block=query_block)
  out = api.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                  implementation=implementation)  # [B, L, N, H_v]
  return (out, mask) if return_mask else out


# ----------------------------------------------------------------------- module --


class LandmarkAttention(nnx.Module):
  """Causal self-attention layer x [B, T, D] -> [B, T, D] with landmark tokens.

  The model's sequence carries no landmark tokens (a token mixer cannot lengthen
  it), so the layer inserts them: the vector of the landmark closing block g is a
  learned embedding plus the mean of the block's inputs (in the paper the landmark
  is a vocabulary token whose hidden state summarises its block through the earlier
  layers; a single layer gets that summary from the mean instead). q, k, v with RoPE
  at the augmented positions; mode 'train' runs the grouped softmax, 'retrieve' the
  top-k block retrieval; the landmark positions are dropped from the output. A
  model that inserts landmark tokens itself (`insert_landmarks`) uses the pure
  functions directly.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, block_size: int,
               top_k: int = 2, mode: str = 'train', query_block: int = 1,
               rope_base: float | None = 10000.0,
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, v in (('dim', dim), ('num_heads', num_heads), ('head_dim', head_dim),
                    ('block_size', block_size)):
      _common.check_int(name, v)
    self.block_size = int(block_size)
    self.top_k = _common.check_int('top_k', top_k, 0)
    self.query_block = _check_query_block(query_block, self.block_size + 1)
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')
    self.mode = mode
    self.rope_base, self.implementation = rope_base, implementation
    p = lambda shape, fan, axes: _common.lecun_param(rngs, shape, fan, axes)
    self.wq = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wk = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wv = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wo = p((num_heads, head_dim, dim), num_heads * head_dim,
                ('heads', 'head_dim', 'embed'))
    self.landmark = p((dim,), dim, ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {self.mode!r}.')
    dtype = x.dtype
    xa = insert_landmark_vectors(x, self.landmark[...], block_size=self.block_size,
                                 add_block_mean=True)  # [B, L, D]
    q = jnp.einsum('btd,dnh->btnh', xa, self.wq[...].astype(dtype))  # [B, L, N, H]
    k = jnp.einsum('btd,dnh->btnh', xa, self.wk[...].astype(dtype))  # [B, L, N, H]
    v = jnp.einsum('btd,dnh->btnh', xa, self.wv[...].astype(dtype))  # [B, L, N, H]
    if self.rope_base is not None:
      pos = jnp.arange(xa.shape[1])
      q = rope(q, pos, self.rope_base).astype(dtype)
      k = rope(k, pos, self.rope_base).astype(dtype)
    if self.mode == 'train':
      out = landmark_attention(q, k, v, block_size=self.block_size)
    else:
      out = landmark_retrieval_attention(
          q, k, v, block_size=self.block_size, top_k=self.top_k,
          query_block=self.query_block, implementation=self.implementation)
    y = jnp.einsum('btnh,nhd->btd', out, self.wo[...].astype(dtype))  # [B, L, D]
    return remove_landmarks(y, block_size=self.block_size)


def registry_layer(dim: int, num_heads: int, head_dim: int, *, grid: Any,
                   causal: bool, rngs: nnx.Rngs, block_size: int = 16,
                   top_k: int = 2) -> LandmarkAttention:
  """The registry layer 'landmark': causal LM, grouped softmax (mode 'train').

  block_size 16 (the paper's 50 would leave the presets' T = 32 .. 256 with at most
  five blocks); switch `layer.mode = 'retrieve'` for top-k retrieval at inference.
  """
  del grid
  if not causal:
    raise ValueError("attention layer 'landmark' is causal only (a language-model "
                     'layer); got causal=False.')
  return LandmarkAttention(dim, num_heads, head_dim, block_size=block_size,
                           top_k=top_k, rngs=rngs)
