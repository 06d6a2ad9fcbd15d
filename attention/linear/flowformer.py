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

State (`FlowState`): the causal form's prefix sums (of phi(K), phi(Q), the two
conserved flows, the prefix product phi(K)^T (comp V)), the log-sum-exp of Ohat and
the position count c. The causal forms take it as `initial_state` (the count then
continues from it) and return the state after the last token (`return_state=True`;
`recurrent_flow_attention`, a `lax.scan` for decoding, always does), so chunked
prefill followed by token-by-token decoding reproduces the full causal output.
`segment_ids` [B, T] pack variable-length sequences: wherever the id changes every
sum restarts from zero and c from 1 (the initial state belongs to the first segment).

Einsum letters: b batch, t / s query / key position, n head, k key feature, v value
feature, d model dim.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from flax import nnx

from attention.linear import _grid
from attention.linear import _prefix
from attention.linear import layers
from attention.linear import linear_transformer


class FlowState(NamedTuple):
  """Prefix sums of the causal flow form (in the compute dtype)."""
  kv: jax.Array  # [B, N, K, V] sum_j phi(K_j) (comp_j V_j)^T
  k_sum: jax.Array  # [B, N, K] sum_j phi(K_j)
  q_sum: jax.Array  # [B, N, K] sum_i phi(Q_i)
  k_flow: jax.Array  # [B, N, K] sum_j phi(K_j) c_j / O_j
  q_flow: jax.Array  # [B, N, K] sum_i phi(Q_i) c_i / I_i
  lse: jax.Array  # [B, N] log sum_j exp(Ohat_j)
  count: jax.Array  # [B] positions seen (a float)


def _prepare(query, key, value, causal, initial_state, segment_ids,
             return_state):
  _grid.check_bool('causal', causal)
  _grid.check_bool('return_state', return_state)
  q, k, v, out_dtype = _grid.check_qkv(query, key, value, same_length=causal)
  b, t, n, hk = q.shape
  hv = v.shape[-1]
  s0 = _prefix.check_state(
      initial_state, FlowState,
      dict(kv=(b, n, hk, hv), k_sum=(b, n, hk), q_sum=(b, n, hk),
           k_flow=(b, n, hk), q_flow=(b, n, hk), lse=(b, n), count=(b,)),
      q.dtype, causal)
  reset = _prefix.check_segments(segment_ids, b, t, causal)
  return jax.nn.sigmoid(q), jax.nn.sigmoid(k), v, out_dtype, s0, reset


def flow_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                   causal: bool = False, chunk_size: int = 64,
                   initial_state: FlowState | None = None,
                   segment_ids: jax.Array | None = None,
                   return_state: bool = False) -> Any:
  """Flow attention (non-causal, or causal with prefix sums).

  Args:
    query: [B, T, N, K] (n = T sinks).
    key: [B, S, N_kv, K] (m = S sources; S == T when causal).
    value: [B, S, N_kv, V].
    causal: the prefix-sum form normalised by position.
    chunk_size: chunk of the causal prefix product.
    initial_state: a `FlowState` of earlier tokens (causal only): its sums start the
      prefix sums of the first segment and its count the positions c_t.
    segment_ids: [B, T] ints (causal only); every prefix sum, and the position
      count, restarts wherever the id changes.
    return_state: also return the state after the last token (None if non-causal).

  Returns:
    out [B, T, N, V], or (out, final FlowState | None) with return_state.
  """
  fq, fk, v, out_dtype, s0, reset = _prepare(query, key, value, causal,
                                             initial_state, segment_ids,
                                             return_state)
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
    res = (r * alloc[..., None]).astype(out_dtype)
    return (res, None) if return_state else res
  init = (lambda name: None) if s0 is None else (lambda name: getattr(s0, name))
  scan = lambda x, name, **kw: _prefix.segment_scan(x, reset, init(name), **kw)
  count = scan(jnp.ones(fq.shape[:2], fq.dtype), 'count')[..., None]  # [B, T, 1]
  k_sum, q_sum = scan(fk, 'k_sum'), scan(fq, 'q_sum')  # [B, T, N, K] each
  inc = jnp.einsum('btnk,btnk->btn', fq, k_sum)  # [B, T, N]
  out = jnp.einsum('btnk,btnk->btn', fk, q_sum)  # [B, T, N]
  k_flow = scan(fk * (count / out)[..., None], 'k_flow')  # [B, T, N, K]
  q_flow = scan(fq * (count / inc)[..., None], 'q_flow')  # [B, T, N, K]
  inc_hat = jnp.einsum('btnk,btnk->btn', fq, k_flow) / count  # [B, T, N]
  out_hat = jnp.einsum('btnk,btnk->btn', fk, q_flow) / count  # [B, T, N]
  alloc = jax.nn.sigmoid(inc_hat)  # [B, T, N]
  lse = scan(out_hat, 'lse', op=jnp.logaddexp)  # [B, T, N]
  comp = jnp.exp(out_hat - lse) * count  # [B, T, N]
  r, kv = linear_transformer.chunked_linear_attention(  # [B, T, N, V]
      fq / inc[..., None], fk, v * comp[..., None], feature_map='identity',
      normalize=False, causal=True, scale=1.0, chunk_size=chunk_size,
      initial_state=init('kv'),
      segment_ids=None if reset is None else _prefix.runs_from_resets(reset))
  res = (r * alloc[..., None]).astype(out_dtype)
  if not return_state:
    return res
  return res, FlowState(kv, k_sum[:, -1], q_sum[:, -1], k_flow[:, -1],
                        q_flow[:, -1], lse[:, -1], count[:, -1, 0])


def recurrent_flow_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             *, initial_state: FlowState | None = None,
                             segment_ids: jax.Array | None = None
                            ) -> tuple[jax.Array, FlowState]:
  """The causal form as a `lax.scan` over tokens (decoding, one token at a time).

  Arguments as `flow_attention` (causal). Returns (out [B, T, N, V], the `FlowState`
  after the last token).
  """
  fq, fk, v, out_dtype, s0, reset = _prepare(query, key, value, True,
                                             initial_state, segment_ids, False)
  b, t, n, hk = fq.shape
  hv = v.shape[-1]
  if s0 is None:
    z = lambda *shape: jnp.zeros((b,) + shape, fq.dtype)
    s0 = FlowState(z(n, hk, hv), z(n, hk), z(n, hk), z(n, hk), z(n, hk),
                   jnp.full((b, n), -jnp.inf, fq.dtype), z())
  if reset is None:
    reset = jnp.zeros((b, t), bool)

  def step(state, inp):
    qt, kt, vt, rt = inp  # [B, N, K], [B, N, K], [B, N, V], [B]
    empty = lambda a, e: jnp.where(rt.reshape((b,) + (1,) * (a.ndim - 1)), e, a)
    st = FlowState(*(empty(a, -jnp.inf if name == 'lse' else 0.0)
                     for name, a in zip(FlowState._fields, state)))
    cnt = (st.count + 1.0)[:, None]  # [B, 1] c_t
    k_sum, q_sum = st.k_sum + kt, st.q_sum + qt  # [B, N, K]
    inc = jnp.einsum('bnk,bnk->bn', qt, k_sum)  # [B, N] I_t
    out = jnp.einsum('bnk,bnk->bn', kt, q_sum)  # [B, N] O_t
    k_flow = st.k_flow + kt * (cnt / out)[..., None]
    q_flow = st.q_flow + qt * (cnt / inc)[..., None]
    inc_hat = jnp.einsum('bnk,bnk->bn', qt, k_flow) / cnt  # [B, N]
    out_hat = jnp.einsum('bnk,bnk->bn', kt, q_flow) / cnt  # [B, N]
    lse = jnp.logaddexp(st.lse, out_hat)  # [B, N]
    comp = jnp.exp(out_hat - lse) * cnt  # [B, N]
    kv = st.kv + jnp.einsum('bnk,bnv->bnkv', kt, vt * comp[..., None])
    o = jnp.einsum('bnk,bnkv->bnv', qt / inc[..., None], kv) * jax.nn.sigmoid(
        inc_hat)[..., None]  # [B, N, V]
    return FlowState(kv, k_sum, q_sum, k_flow, q_flow, lse, cnt[:, 0]), o

  tm = lambda a: jnp.moveaxis(a, 1, 0)
  final, out = lax.scan(step, s0, (tm(fq), tm(fk), tm(v), tm(reset)))
  return jnp.moveaxis(out, 0, 1).astype(out_dtype), final


class FlowAttention(layers._Projected):  # pylint: disable=protected-access
  """Flow attention layer (Flowformer): q / k / v / output projections only."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               causal: bool = False, rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, rngs=rngs)  # wq, wk, wv, wo
    self.causal = _grid.check_bool('causal', causal)

  def __call__(self, x: jax.Array, *, initial_state: FlowState | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int = 64, return_state: bool = False) -> Any:
    """x [B, T, D] -> [B, T, D] (and the final `FlowState` with return_state).

    As the layers of `attention.linear.layers`: `mode` 'chunked' (training,
    prefill) or 'recurrent' (decoding; causal only); `initial_state`, `segment_ids`
    need causal=True.
    """
    self._check_mode(mode)
    if mode == 'recurrent' and not self.causal:
      raise ValueError("mode='recurrent' requires causal=True.")
    dt = x.dtype
    q, k, v = self._qkv(x)  # [B, T, N, H]
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if mode == 'recurrent':
      o, state = recurrent_flow_attention(q, k, v, **kw)  # [B, T, N, H]
    else:
      o, state = flow_attention(q, k, v, causal=self.causal,
                                chunk_size=chunk_size, return_state=True,
                                **kw)  # [B, T, N, H]
    return self._ret(self._out(o, dt), state, return_state)  # [B, T, D]
