"""MoBA: Mixture of Block Attention for long-context LLMs (Lu et al., 2025).

The keys are split into blocks I_i = [i b, (i + 1) b). The gate of a query q and
block i is the unscaled inner product with the block's mean key,

    s_i(q) = <q, mean_{j in I_i} K_j>        (post-RoPE q and K, as given),

a block is eligible only if it ends before the query's own block (future blocks get
-inf), the query's own block is always taken (and counts toward k) with a causal mask
inside it, and the output is ONE softmax over the union of the chosen blocks. No
gradient flows through the gate or the top-k: the indices are integers and the gate
scores are `stop_gradient`'ed; the model learns through the attention itself.

Granularity (what this file implements). The paper selects per query TOKEN; the
kernel format (`attention.masks.DynamicBlockMask`) holds one kv-block list per query
BLOCK of b tokens (block_q = block_kv = b). Each q block j is routed with the sum of
its tokens' gates,

    S[j, i] = sum_{t in I_j} s_i(q_t) = |I_j| <mean_{t in I_j} q_t, mean K[I_i]>,

so "the q block's mean query" and "the sum of per-token gates" are the same reading
(they differ by the positive factor |I_j|, which a top-k ignores). Every token of
block j has the same eligible set {i < j} and the same forced block j, so the two
granularities agree whenever the tokens of a q block would pick the same blocks (e.g.
top_k >= j + 1); in general they differ (tests/attention/routing/test_moba.py
implements the per-token paper form directly and shows both).

GQA: heads='query' (default, as the paper: one gate per attention head; K-bar of the
head's kv head) or heads='kv' (one list per kv head, the gate summed over the query
heads sharing it, so the kernel can share K/V tiles across the group).

Einsum letters: b batch, t positions, n query heads, k kv heads, h head dim.
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import api
from attention.masks import base as masks_base
from attention.masks import dynamic
from attention.routing import _common


def moba_block_scores(query: jax.Array, key: jax.Array, *, block_size: int,
                      heads: str = 'query') -> jax.Array:
  """The MoBA gate per (q block, kv block), float32 [B, Hm, n, n], stop_gradient'ed.

  S[j, i] = <mean q over block j, mean K over block i> for past blocks i < j and
  -inf otherwise (the own block j is not scored: it is always taken).

  Args:
    query: [B, T, N, H] (post-RoPE, as attention sees it).
    key: [B, T, K, H].
    block_size: b >= 1 (the last block may be partial).
    heads: 'query' (Hm = N) or 'kv' (Hm = K), see the module docstring.
  """
  _common.check_qk(query, key)
  block_size = _common.check_int('block_size', block_size)
  heads = _common.check_heads(heads)
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  q_bar = _common.block_mean(query, block_size)  # [B, n, N, H]
  k_bar = _common.block_mean(key, block_size)  # [B, n, K, H]
  scores = _common.pair_scores(q_bar, k_bar, heads)  # [B, Hm, n, n]
  n = q_bar.shape[1]
  past = np.tril(np.ones((n, n), bool), -1)  # block i ends before block j starts
  return jnp.where(past, scores, -jnp.inf)


def moba_mask(query: jax.Array, key: jax.Array, *, block_size: int, top_k: int,
              heads: str = 'query',
              inner: masks_base.Mask | None = None) -> dynamic.DynamicBlockMask:
  """MoBA's routing: per q block the own block plus the top_k - 1 best past blocks.

  Ties go to the lower block index. `inner` is an optional static Mask applied
  inside the chosen blocks (the causal mask is added by `moba_attention`).

  Raises:
    ValueError: top_k outside [1, number of blocks], bad shapes or block size.
  """
  scores = moba_block_scores(query, key, block_size=block_size, heads=heads)
  t = query.shape[1]
  n = scores.shape[-1]
  top_k = _common.check_int('top_k', top_k)
  if top_k > n:
    raise ValueError(f'top_k must be in [1, {n}] (the number of blocks of '
                     f'block_size={block_size} in T={t}), got {top_k}.')
  return dynamic.top_k_blocks(scores, top_k, q_len=t, kv_len=t, block_q=block_size,
                              block_kv=block_size, always=jnp.eye(n, dtype=bool),
                              inner=inner)


def moba_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                   block_size: int, top_k: int, heads: str = 'query',
                   mask: masks_base.Mask | None = None,
                   sinks: jax.Array | None = None,
                   logits_soft_cap: float | None = None,
                   implementation: str | None = None,
                   return_mask: bool = False) -> Any:
  """Causal MoBA attention: one softmax over the routed blocks (Lu et al., 2025).

  Args:
    query: [B, T, N, H]; key: [B, T, K, H]; value: [B, T, K, H_v] (post-RoPE).
    block_size: b; top_k: blocks per q block including the own one, in [1, n].
    heads: 'query' or 'kv' (the routing granularity under GQA).
    mask: optional extra static Mask (T, T), ANDed token by token.
    sinks, logits_soft_cap, implementation: as `attention.dot_product_attention`.
    return_mask: also return the DynamicBlockMask.

  Returns:
    out [B, T, N, H_v] (and the mask if `return_mask`).
  """
  _common.check_qk(query, key, value)
  routed = moba_mask(query, key, block_size=block_size, top_k=top_k, heads=heads)
  out = api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=routed if mask is None else (routed, mask),
      is_causal=True, sinks=sinks, logits_soft_cap=logits_soft_cap,
      implementation=implementation)
  return (out, routed) if return_mask else out


class MoBA(nnx.Module):
  """MoBA attention as an NNX module (no parameters; holds the routing config)."""

  def __init__(self, *, block_size: int, top_k: int, heads: str = 'query',
               implementation: str | None = None):
    self.block_size = _common.check_int('block_size', block_size)
    self.top_k = _common.check_int('top_k', top_k)
    self.heads = _common.check_heads(heads)
    self.implementation = implementation

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               mask: masks_base.Mask | None = None) -> jax.Array:
    return moba_attention(query, key, value, block_size=self.block_size,
                          top_k=self.top_k, heads=self.heads, mask=mask,
                          implementation=self.implementation)


def default_block_size(seq_len: int, num_blocks: int = 8) -> int:
  """ceil(T / num_blocks): the registry's block size when none is configured."""
  return max(1, _common.ceil_div(seq_len, num_blocks))


def make_registry_variant(block_size: int | None = None, top_k: int = 3,
                          heads: str = 'query', num_blocks: int = 8
                         ) -> Callable[..., Any]:
  """A model-registry variant `fn(q, k, v, *, mask, is_causal, sinks,
  logits_soft_cap, implementation) -> (out, {})` running MoBA.

  block_size None: ceil(T / num_blocks) at call time; top_k is clipped to the number
  of blocks (short sequences attend densely). MoBA is causal only.
  """
  if block_size is not None:
    block_size = _common.check_int('block_size', block_size)
  top_k = _common.check_int('top_k', top_k)
  heads = _common.check_heads(heads)
  num_blocks = _common.check_int('num_blocks', num_blocks)

  def variant(query, key, value, *, mask, is_causal, sinks, logits_soft_cap,
              implementation):
    if not is_causal:
      raise ValueError("attention variant 'moba' is causal only (future blocks are "
                       'never eligible); got is_causal=False.')
    b = block_size or default_block_size(query.shape[1], num_blocks)
    n = _common.ceil_div(query.shape[1], b)
    out = moba_attention(query, key, value, block_size=b, top_k=min(top_k, n),
                         heads=heads, mask=mask, sinks=sinks,
                         logits_soft_cap=logits_soft_cap,
                         implementation=implementation)
    return out, {}

  variant.__doc__ = (f'MoBA (Mixture of Block Attention), top_k={top_k}, '
                     f'block_size={block_size or f"ceil(T / {num_blocks})"} '
                     '(registry variant).')
  return variant
