"""Flow attention (Flowformer): linear attention with flow conservation.

"Flowformer: Linearizing Transformers with Conservation Flows" (Wu, Wu, Wang, Long;
ICML 2022). Queries are sinks, keys are sources, phi = sigmoid. With n queries and m
keys:

    I_i = phi(Q_i) . sum_j phi(K_j)                 incoming flow of sink i
    O_j = phi(K_j) . sum_i phi(Q_i)                 outgoing flow of source j
    Ihat_i = phi(Q_i) . sum_j phi(K_j) / O_j        conserved incoming flow
    Ohat_j = phi(K_j) . sum_i phi(Q_i) / I_i        conserved outgoing flow
    R = sigmoid(Ihat * n / m) * [(phi(Q) / I) (phi(K)^T (softmax_j(Ohat) * m * V))]

(sink allocation times the source-competed values aggregated by the normalised kernel).
Causal form (the paper's code for autoregressive tasks): every sum over keys / queries
becomes a prefix sum up to position t, and the conserved flows are normalised by the
number of positions c_t = t + 1:

    I_t = phi(Q_t) . sum_{j<=t} phi(K_j),     O_t = phi(K_t) . sum_{i<=t} phi(Q_i)
    Ihat_t = phi(Q_t) . sum_{j<=t} phi(K_j) c_j / O_j / c_t
    Ohat_t = phi(K_t) . sum_{i<=t} phi(Q_i) c_i / I_i / c_t
    comp_t = exp(Ohat_t) / sum_{j<=t} exp(Ohat_j) * c_t      (causal softmax * count)
    R_t = sigmoid(Ihat_t) * (phi(Q_t) / I_t) sum_{j<=t} phi(K_j)^T (comp_j V_j)

Exactly these equations: the paper's code adds eps = 1e-6 to the kernels and clamps
Ohat to [-1, 1] "for stability"; neither is applied here (phi = sigmoid > 0, so no
division by zero). The causal prefix product runs through the chunked linear-attention
form (O(T) memory).

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, d model dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from attention.linear import _grid
from attention.linear import linear_transformer


def flow_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                   causal: bool = False, chunk_size: int = 64) -> jax.Array:
  """Flow attention (non-causal, or causal with prefix sums).

  Args:
    query: [B, T, N, K] (n = T sinks).
    key: [B, S, N_kv, K] (m = S sources; S == T when causal).
    value: [B, S, N_kv, V].
    causal: the prefix-sum form normalised by position.
    chunk_size: chunk of the causal prefix product.

  Returns:
    out [B, T, N, V].
  """
  _grid.check_bool('causal', causal)
  q, k, v, out_dtype = _grid.check_qkv(query, key, value, same_length=causal)
  fq, fk = jax.nn.sigmoid(q), jax.nn.sigmoid(k)  # [B, T, N, K], [B, S, N, K]
  n_q, m_k = fq.shape[1], fk.shape[1]
  if not causal:
    inc = jnp.einsum('btnk,bnk->btn', fq, fk.sum(1))  # [B, T, N] I
    out = jnp.einsum('bsnk,bnk->bsn', fk, fq.sum(1))  # [B, S, N] O
    inc_hat = jnp.einsum('btnk,bnk->btn', fq, jnp.einsum(
        'bsnk,bsn->bnk', fk, 1.0 / out))  # [B, T, N]
    out_hat = jnp.einsum('bsnk,bnk->bsn', fk, jnp.einsum(
        'btnk,btn->bnk', fq, 1.0 / inc))  # [B, S, N]
    alloc = jax.nn.sigmoid(inc_hat * (n_q / m_k))  # [B, T, N]
    comp = jax.nn.softmax(out_hat, axis=1) * m_k  # [B, S, N]
    kv = jnp.einsum('bsnk,bsnv->bnkv', fk, v * comp[..., None])  # [B, N, K, V]
    r = jnp.einsum('btnk,bnkv->btnv', fq / inc[..., None], kv)  # [B, T, N, V]
    return (r * alloc[..., None]).astype(out_dtype)
  count = jnp.arange(1, n_q + 1, dtype=fq.dtype)[None, :, None]  # [1, T, 1]
  inc = jnp.einsum('btnk,btnk->btn', fq, jnp.cumsum(fk, 1))  # [B, T, N]
  out = jnp.einsum('btnk,btnk->btn', fk, jnp.cumsum(fq, 1))  # [B, T, N]
  inc_hat = jnp.einsum('btnk,btnk->btn', fq, jnp.cumsum(
      fk * (count / out)[..., None], 1)) / count  # [B, T, N]
  out_hat = jnp.einsum('btnk,btnk->btn', fk, jnp.cumsum(
      fq * (count / inc)[..., None], 1)) / count  # [B, T, N]
  alloc = jax.nn.sigmoid(inc_hat)  # [B, T, N]
  comp = jnp.exp(out_hat - jax.lax.cumlogsumexp(out_hat, axis=1)) * count
  r, _ = linear_transformer.chunked_linear_attention(  # [B, T, N, V]
      fq / inc[..., None], fk, v * comp[..., None], feature_map='identity',
      normalize=False, causal=True, scale=1.0, chunk_size=chunk_size)
  return (r * alloc[..., None]).astype(out_dtype)


class FlowAttention(nnx.Module):
  """Flow attention layer (Flowformer): q / k / v / output projections only."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               causal: bool = False, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f'{name} must be a positive int, got {val!r}.')
    self.causal = _grid.check_bool('causal', causal)
    init = lambda shape, fan_in, axes: nnx.Param(
        jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(fan_in),
        logical_axes=axes)
    axes = ('embed', 'heads', 'head_dim')
    self.wq = init((dim, num_heads, head_dim), dim, axes)
    self.wk = init((dim, num_heads, head_dim), dim, axes)
    self.wv = init((dim, num_heads, head_dim), dim, axes)
    self.wo = init((num_heads, head_dim, dim), num_heads * head_dim,
                   ('heads', 'head_dim', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D]."""
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    o = flow_attention(proj(self.wq), proj(self.wk), proj(self.wv),
                       causal=self.causal)  # [B, T, N, H]
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
