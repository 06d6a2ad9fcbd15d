"""Dynamic Mask Attention (DMA): value-derived key importance as bias + top-w keys.

"Trainable Dynamic Mask Sparse Attention" (Shi et al., 2025; flash-dmattn, the Doge
models). Per kv head, each key j gets an importance from its value vector v_j (all
kv heads concatenated, R^{K d}):

    delta_j = exp(A * softplus(v_j W_D))      W_D: K d -> K, A in R^K (init 0)

(the paper's zero-order-hold form; `use_exp=False` gives the newer repository form
delta_j = A * softplus(v_j W_D)). The bias [B, K, 1, S] is broadcast over queries.
When there are more than w keys, each query keeps the top-w keys of the causally
masked bias (detached; ties to the lower key index) and

    logits = q k^T / sqrt(d) + delta   on the kept keys, -inf elsewhere.

W_D and A learn through the bias gradient (the kept set carries none).

Granularity: the kept set is per query and per key (token granular). Here it is
MATERIALIZED as a dense boolean [B, K, T, S] mask (`dma_keep_mask`, O(T S) memory)
and handed to `attention.dot_product_attention` together with the bias. Optionally
(`block_size`) the tiles containing at least one kept key are also listed in a
`DynamicBlockMask` (Hm = K, per kv head), so a block-sparse implementation skips
all-masked tiles as the paper's kernel does; the dense mask still decides inside the
listed tiles. Not included: the paper's fused kernel that selects keys without the
dense mask.

Einsum letters: b batch, s key position, c value feature (all kv heads), k kv head,
t position, d model dim, n query head, h head dim.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention as attention_api
from attention import _checks
from attention import masks


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def dma_bias(value: jax.Array, w_d: jax.Array, a: jax.Array, *,
             use_exp: bool = True) -> jax.Array:
  """float [B, K, 1, S]: delta = exp(A softplus(v W_D)) (or without exp).

  Args:
    value: [B, S, K, H] values.
    w_d: [K * H, K] the importance projection W_D.
    a: [K] the per-head coefficient A.
    use_exp: the paper's exp form (True) or the newer A * softplus(.) (False).
  """
  _checks.check_array('value', value, ndim=4, floating=True)
  b, s, kh, h = value.shape
  _checks.check_array('w_d', w_d, ndim=2, floating=True)
  if tuple(w_d.shape) != (kh * h, kh):
    raise ValueError(f'w_d must have shape [K * H, K] = [{kh * h}, {kh}], got '
                     f'{list(w_d.shape)}.')
  _checks.check_array('a', a, ndim=1, floating=True)
  if a.shape[0] != kh:
    raise ValueError(f'a must have shape [K] = [{kh}], got {list(a.shape)}.')
  if not isinstance(use_exp, bool):
    raise TypeError(f'use_exp must be a bool, got {type(use_exp).__name__}.')
  dtype = jnp.promote_types(value.dtype, jnp.float32)
  dt = jnp.einsum('bsc,ck->bsk', value.reshape(b, s, kh * h).astype(dtype),
                  w_d.astype(dtype))  # [B, S, K]
  delta = a.astype(dtype) * jax.nn.softplus(dt)
  if use_exp:
    delta = jnp.exp(delta)
  return jnp.swapaxes(delta, 1, 2)[:, :, None, :]  # [B, K, 1, S]


def _check_bias(bias: Any) -> jax.Array:
  _checks.check_array('bias', bias, floating=True)
  if bias.ndim != 4 or bias.shape[2] != 1:
    raise ValueError(f'bias must have shape [B, K, 1, S], got {list(bias.shape)}.')
  return bias


def dma_keep_mask(bias: jax.Array, window: int, *, q_len: int,
                  causal: bool = True) -> jax.Array:
  """bool [B, K, T, S]: the keys each query keeps (no gradient).

  Query i keeps the `window` keys of largest bias among those it may see (k <= i
  when causal, top-left aligned as `is_causal`), ties to the lower key index; when
  a query sees at most `window` keys it keeps them all.
  """
  bias = jax.lax.stop_gradient(_check_bias(bias))
  window = _positive_int('window', window)
  q_len = _positive_int('q_len', q_len)
  if not isinstance(causal, bool):
    raise TypeError(f'causal must be a bool, got {type(causal).__name__}.')
  b, kh, _, s = bias.shape
  qi = np.arange(q_len)[:, None]
  kj = np.arange(s)[None, :]
  visible = jnp.asarray(kj <= qi if causal else np.ones((q_len, s), bool))
  if window >= s:
    return jnp.broadcast_to(visible, (b, kh, q_len, s))
  scores = jnp.where(visible, bias, -jnp.inf)  # [B, K, T, S]
  values, idx = jax.lax.top_k(scores, window)  # descending, ties: lower index
  thr = values[..., -1:]  # the w-th largest visible value (-inf: < w visible)
  last = idx[..., -1:]  # the highest-index key selected at the threshold value
  keep = (scores > thr) | ((scores == thr) & (jnp.asarray(kj) <= last))
  return keep & visible


def keep_blocks(keep: jax.Array, block_q: int, block_kv: int,
                budget: int | None = None) -> masks.DynamicBlockMask:
  """The tiles of a [B, K, T, S] keep mask that hold a kept key (DynamicBlockMask)."""
  b, kh, t, s = keep.shape
  block_q, block_kv = _positive_int('block_q', block_q), _positive_int(
      'block_kv', block_kv)
  nq, nk = -(-t // block_q), -(-s // block_kv)
  pad = jnp.pad(keep, ((0, 0), (0, 0), (0, nq * block_q - t), (0, nk * block_kv - s)))
  blocks = jnp.any(pad.reshape(b, kh, nq, block_q, nk, block_kv), axis=(3, 5))
  return masks.from_block_matrix(blocks, q_len=t, kv_len=s, block_q=block_q,
                                 block_kv=block_kv, budget=budget)


def dynamic_mask_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                           bias: jax.Array, *, window: int, causal: bool = True,
                           scale: float | None = None,
                           block_size: int | None = None,
                           implementation: str | None = None) -> jax.Array:
  """DMA: softmax(q k^T scale + bias) over the top-`window` keys of each query.

  Args:
    query: [B, T, N, H]; key [B, S, K, H]; value [B, S, K, H_v] (N a multiple of K).
    bias: [B, K, 1, S] (`dma_bias`), differentiable.
    window: w, the keys kept per query (all kept when a query sees <= w keys).
    causal: k <= q (decoders).
    scale: default 1 / sqrt(H).
    block_size: if given, also pass the kept tiles as a DynamicBlockMask of this
      block size (see the module docstring).
    implementation: passed to `attention.dot_product_attention`.

  Returns:
    [B, T, N, H_v].
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  bias = _check_bias(bias)
  b, t, n, _ = query.shape
  kh, s = key.shape[2], key.shape[1]
  if tuple(bias.shape) != (b, kh, 1, s):
    raise ValueError(f'bias must have shape [B, K, 1, S] = [{b}, {kh}, 1, {s}], got '
                     f'{list(bias.shape)}.')
  if kh < 1 or n % kh:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads ({kh}).')
  keep = dma_keep_mask(bias, window, q_len=t, causal=causal)  # [B, K, T, S]
  rep = n // kh
  mask: Any = jnp.repeat(keep, rep, axis=1)  # [B, N, T, S]
  if block_size is not None:
    block_size = _positive_int('block_size', block_size)
    mask = (mask, keep_blocks(keep, block_size, block_size))
  return attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, bias=jnp.repeat(bias, rep, axis=1), mask=mask,
      is_causal=causal, scale=scale, implementation=implementation)


def rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (RoFormer), rotate-half layout, positions 0..T-1."""
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {h}.')
  freqs = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))
  angles = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * freqs  # [T, H/2]
  sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
           axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class DynamicMaskAttention(nnx.Module):
  """DMA layer x [B, T, D] -> [B, T, D] (the Doge attention block).

  q / k / v / o projections (GQA with `num_kv_heads`), RoPE on q and k
  (`rope_base`, None for none), W_D [K H, K] and A [K] (zeros, as Doge) for the
  bias, and `dynamic_mask_attention` with `window` kept keys per query.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               num_kv_heads: int | None = None, window: int = 2048,
               causal: bool = True, use_exp: bool = True,
               rope_base: float | None = 10000.0, block_size: int | None = None,
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      _positive_int(name, val)
    kh = num_heads if num_kv_heads is None else _positive_int('num_kv_heads',
                                                              num_kv_heads)
    if num_heads % kh:
      raise ValueError(f'num_heads ({num_heads}) must be a multiple of num_kv_heads '
                       f'({kh}).')
    self.window = _positive_int('window', window)
    if not isinstance(causal, bool) or not isinstance(use_exp, bool):
      raise TypeError('causal and use_exp must be bools.')
    if rope_base is not None and not rope_base > 0:
      raise ValueError(f'rope_base must be positive or None, got {rope_base}.')
    self.causal, self.use_exp, self.rope_base = causal, use_exp, rope_base
    self.block_size, self.implementation = block_size, implementation
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5,
                     ('embed', 'heads', 'head_dim'))
    self.wk = _param(rngs, (dim, kh, head_dim), dim ** -0.5,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wv = _param(rngs, (dim, kh, head_dim), dim ** -0.5,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wo = _param(rngs, (num_heads, head_dim, dim),
                     (num_heads * head_dim) ** -0.5, ('heads', 'head_dim', 'embed'))
    self.w_d = _param(rngs, (kh * head_dim, kh), (kh * head_dim) ** -0.5,
                      (None, 'kv_heads'))
    self.a = nnx.Param(jnp.zeros((kh,), jnp.float32), logical_axes=('kv_heads',))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dt))  # [B, T, N, H]
    k = jnp.einsum('btd,dkh->btkh', x, self.wk[...].astype(dt))  # [B, T, K, H]
    v = jnp.einsum('btd,dkh->btkh', x, self.wv[...].astype(dt))  # [B, T, K, H]
    if self.rope_base is not None:
      q, k = rope(q, self.rope_base), rope(k, self.rope_base)
    bias = dma_bias(v, self.w_d[...], self.a[...], use_exp=self.use_exp)
    o = dynamic_mask_attention(q, k, v, bias, window=self.window,
                               causal=self.causal, block_size=self.block_size,
                               implementation=self.implementation)
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
