"""AnchorAttention: difference-aware stripe sparsity for causal pre-filling.

"AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity" (Zhang
et al., 2025). Training-free. Queries are processed in groups of `group_size` (2048)
and sub-blocks of `sub_block` (128):

1. Anchor: a_i = max_j q_i . k_j * scale over the initial keys (j < num_init) and the
   query's own group (causal), the near-maximum score of the row.
2. Difference-aware stripes: per sub-block, q- = mean of its queries, a- = mean of
   their anchors; key j (before the group, outside the initial keys) is a stripe of
   the group if q- . k_j * scale + theta >= a- for ANY sub-block of the group.
3. Attention over init + local + stripes.

Fit to the DynamicBlockMask structure: a query block is a group (block_q =
group_size), its kv list the key blocks (block_kv) that hold an initial, local or
stripe key, per query head (Hm = N), inner mask causal. With block_kv = 1 (the
default) the lists are the exact stripe sets (token granular); a larger block_kv
lists every block holding a selected key (a superset at key-block granularity).

Left out: the paper's online-softmax state resumption (init + local first, stripe
keys gathered 128 at a time and the softmax resumed) -- one softmax over the union
gives the same result without double counting keys that are both initial and
stripes; and its fused discrete-KV-loading kernel.

Einsum letters: b batch, g group, u sub-block, t / s query / key position, n head,
h head dim.
"""

from __future__ import annotations

import math
from typing import Any

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


def _check(query, key, group_size, sub_block, num_init):
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  b, t, n, h = query.shape
  if key.shape[0] != b or key.shape[1] != t or key.shape[3] != h:
    raise ValueError(f'key must have shape [B, T, K, H] = [{b}, {t}, K, {h}] '
                     f'(causal self-attention), got {list(key.shape)}.')
  if key.shape[2] < 1 or n % key.shape[2]:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads '
                     f'({key.shape[2]}).')
  group_size = _int('group_size', group_size, 1)
  sub_block = _int('sub_block', sub_block, 1)
  num_init = _int('num_init', num_init, 0)
  if t % group_size:
    raise ValueError(f'group_size ({group_size}) must divide the sequence length '
                     f'({t}).')
  if group_size % sub_block:
    raise ValueError(f'sub_block ({sub_block}) must divide group_size ({group_size}).')
  return b, t, n, h, group_size, sub_block, num_init


def anchors(query: jax.Array, key: jax.Array, *, group_size: int, num_init: int,
            scale: float | None = None) -> jax.Array:
  """float [B, N, T]: a_i = max over init + own-group keys (causal) of q_i . k_j scale."""
  b, t, n, h, group_size, _, num_init = _check(query, key, group_size, 1, num_init)
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  q = query.astype(dtype)
  k = jnp.repeat(key, n // key.shape[2], axis=2).astype(dtype)
  ni = min(num_init, t)
  init = jnp.einsum('btnh,bsnh->bnts', q, k[:, :ni]) * scale  # [B, N, T, init]
  init = jnp.where(np.arange(ni)[None] <= np.arange(t)[:, None], init, -jnp.inf)
  g = t // group_size
  qg = q.reshape(b, g, group_size, n, h)
  kg = k.reshape(b, g, group_size, n, h)
  local = jnp.einsum('bgtnh,bgsnh->bngts', qg, kg) * scale  # [B, N, G, g, g]
  tri = np.tril(np.ones((group_size, group_size), bool))
  local = jnp.max(jnp.where(tri, local, -jnp.inf), -1).reshape(b, n, t)
  return jnp.maximum(local, jnp.max(init, -1, initial=-jnp.inf))


def stripe_keys(query: jax.Array, key: jax.Array, *, group_size: int = 2048,
                sub_block: int = 128, num_init: int = 2048, theta: float = 12.0,
                scale: float | None = None) -> jax.Array:
  """bool [B, N, G, S]: the stripe keys of each query group (detached).

  Key j is a stripe of group g if j < g * group_size (before the group),
  j >= num_init (not initial) and q-_u . k_j * scale + theta >= a-_u for some
  sub-block u of the group.
  """
  b, t, n, h, group_size, sub_block, num_init = _check(query, key, group_size,
                                                       sub_block, num_init)
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise TypeError(f'theta must be a float, got {type(theta).__name__}.')
  scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
  query, key = jax.lax.stop_gradient(query), jax.lax.stop_gradient(key)
  a = anchors(query, key, group_size=group_size, num_init=num_init, scale=scale)
  dtype = jnp.promote_types(query.dtype, jnp.float32)
  g, nu = t // group_size, group_size // sub_block
  q_mean = jnp.mean(query.astype(dtype).reshape(b, g, nu, sub_block, n, h), 3)
  a_mean = jnp.mean(a.reshape(b, n, g, nu, sub_block), -1)  # [B, N, G, U]
  k = jnp.repeat(key, n // key.shape[2], axis=2).astype(dtype)
  s = jnp.einsum('bgunh,bsnh->bngus', q_mean, k) * scale  # [B, N, G, U, S]
  hit = jnp.any(s + theta >= a_mean[..., None], axis=3)  # [B, N, G, S]
  j = np.arange(t)[None, :]
  eligible = (j < np.arange(g)[:, None] * group_size) & (j >= num_init)  # [G, S]
  return hit & eligible


def anchor_mask(query: jax.Array, key: jax.Array, *, group_size: int = 2048,
                sub_block: int = 128, num_init: int = 2048, theta: float = 12.0,
                block_kv: int = 1, scale: float | None = None
                ) -> masks.DynamicBlockMask:
  """AnchorAttention's selection as a DynamicBlockMask (block_q = group_size, Hm = N).

  Listed: the key blocks holding an initial key, a key of the own group or a stripe
  key; inner mask causal. Exact at block_kv = 1.
  """
  b, t, n, _, group_size, sub_block, num_init = _check(query, key, group_size,
                                                       sub_block, num_init)
  block_kv = _int('block_kv', block_kv, 1)
  stripes = stripe_keys(query, key, group_size=group_size, sub_block=sub_block,
                        num_init=num_init, theta=theta, scale=scale)
  g = t // group_size
  j = np.arange(t)[None, :]
  base = (j < num_init) | (j // group_size == np.arange(g)[:, None])  # [G, S]
  keys = stripes | base  # [B, N, G, S]
  nk = -(-t // block_kv)
  keys = jnp.pad(keys, ((0, 0), (0, 0), (0, 0), (0, nk * block_kv - t)))
  blocks = jnp.any(keys.reshape(b, n, g, nk, block_kv), -1)  # [B, N, G, nk]
  return masks.from_block_matrix(blocks, q_len=t, kv_len=t, block_q=group_size,
                                 block_kv=block_kv, inner=masks.causal(t, t))


def anchor_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                     implementation: str | None = None, **selection: Any
                     ) -> jax.Array:
  """Causal attention over `anchor_mask(query, key, **selection)`: [B, T, N, H_v]."""
  mask = anchor_mask(query, key, **selection)
  return attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=mask, scale=selection.get('scale'),
      implementation=implementation)
