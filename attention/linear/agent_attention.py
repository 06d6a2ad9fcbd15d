"""Agent attention: softmax attention through n << T agent tokens.

"Agent Attention: On the Integration of Softmax and Linear Attention" (Han, Ye, Han,
Pan, Zheng, Song, Huang; ECCV 2024). Agent tokens A = pool(Q) (adaptive average
pooling of the queries over the token grid, e.g. to 7x7) first aggregate the values,
then broadcast them back to every query:

    V_A = softmax(A K^T / sqrt(d) + B1) V              # agent aggregation  [n, V]
    O   = softmax(Q A^T / sqrt(d) + B2) V_A + DWC(V)   # agent broadcast    [T, V]

with agent biases B1 [n, T] and B2 [T, n] and a 3x3 depthwise convolution of V on the
grid (DWC, restoring feature diversity). Cost O(T n d): linear in T for fixed n.

`agent_attention` is the parameter-free core (agents pooled from the queries or
given, dense biases optional); `AgentAttention` is the layer that owns the
projections, the decomposed agent biases and the DWC.

Einsum letters: b batch, t / s query / key position, a agent, n head, k key feature,
v value feature, d model dim, y / x grid row / column.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention import _checks
from attention.linear import _grid


def pool_agents(query: jax.Array, agent_grid: Sequence[int],
                grid: Sequence[int] | None = None) -> jax.Array:
  """Agent tokens by adaptive average pooling of the queries.

  Args:
    query: [B, T, N, K].
    agent_grid: the pooled grid, e.g. (7, 7) (2D) or (n,) (a 1D sequence).
    grid: the token grid of the T queries (default (T,), a 1D sequence).

  Returns:
    [B, prod(agent_grid), N, K], PyTorch AdaptiveAvgPool bins.
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  t = query.shape[1]
  grid = _grid.check_grid((t,) if grid is None else grid, t)
  agent_grid = _grid.check_dims('agent_grid', agent_grid)
  pool = _grid.grid_pool_matrix(grid, agent_grid)  # [A, T]
  dtype = _grid.compute_dtype(query)
  return jnp.einsum('at,btnk->bank', jnp.asarray(pool, dtype),
                    query.astype(dtype)).astype(query.dtype)  # [B, A, N, K]


def _check_bias(name, bias, batch, shape, names):
  """None, or broadcastable to `shape` ([N, ., .]) or to [B] + `shape`."""
  if bias is None:
    return None
  _checks.check_array(name, bias, floating=True)
  if bias.ndim == 3:
    _checks.check_broadcastable(name, bias.shape, shape, names)
    return bias
  if bias.ndim == 4:
    _checks.check_broadcastable(name, bias.shape, (batch,) + shape,
                                f'[B] + {names}')
    return bias
  raise ValueError(f'{name} must have rank 3 ({names}) or 4 ([B] + {names}), got '
                   f'shape {tuple(bias.shape)}.')


def agent_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    agents: jax.Array | None = None,
                    agent_grid: Sequence[int] | None = None,
                    grid: Sequence[int] | None = None,
                    agent_bias: jax.Array | None = None,
                    query_bias: jax.Array | None = None,
                    scale: float | None = None) -> jax.Array:
  """O = softmax(Q A^T c + B2) softmax(A K^T c + B1) V (no DWC; see the layer).

  Args:
    query: [B, T, N, K].
    key: [B, T, N_kv, K].
    value: [B, T, N_kv, V].
    agents: [B, A, N, K] agent tokens; if None, `pool_agents(query, agent_grid,
      grid)`.
    agent_grid: the pooled agent grid (when `agents` is None), e.g. (7, 7).
    grid: the token grid of T (default (T,)).
    agent_bias: B1, broadcastable to [N, A, T] (or [B, N, A, T]): agent -> key.
    query_bias: B2, broadcastable to [N, T, A] (or [B, N, T, A]): query -> agent.
    scale: c, default K ** -0.5.

  Returns:
    out [B, T, N, V].
  """
  q, k, v, out_dtype = _grid.check_qkv(query, key, value)
  b, t, n, hk = q.shape
  c = _grid.check_scale(scale, hk)
  if agents is None:
    if agent_grid is None:
      raise ValueError('agent_grid is required when agents is None (e.g. '
                       'agent_grid=(7, 7) with grid=(14, 14), or (n,) for 1D).')
    a = pool_agents(q, agent_grid, grid)  # [B, A, N, K]
  else:
    _checks.check_array('agents', agents, ndim=4, floating=True)
    if agents.shape[0] != b or agents.shape[2:] != (n, hk):
      raise ValueError(f'agents must have shape [{b}, A, {n}, {hk}] [B, A, N, K], '
                       f'got {tuple(agents.shape)}.')
    a = agents.astype(q.dtype)
  na = a.shape[1]
  b1 = _check_bias('agent_bias', agent_bias, b, (n, na, t), '[N, A, T]')
  b2 = _check_bias('query_bias', query_bias, b, (n, t, na), '[N, T, A]')
  z1 = jnp.einsum('bank,bsnk->bnas', a, k) * c  # [B, N, A, S]
  if b1 is not None:
    z1 = z1 + b1.astype(q.dtype)
  agent_v = jnp.einsum('bnas,bsnv->banv', jax.nn.softmax(z1, axis=-1),
                       v)  # [B, A, N, V]
  z2 = jnp.einsum('btnk,bank->bnta', q, a) * c  # [B, N, T, A]
  if b2 is not None:
    z2 = z2 + b2.astype(q.dtype)
  out = jnp.einsum('bnta,banv->btnv', jax.nn.softmax(z2, axis=-1),
                   agent_v)  # [B, T, N, V]
  return out.astype(out_dtype)


def decomposed_bias(axis_terms: Sequence[jax.Array]) -> jax.Array:
  """Sums per-axis bias terms into a dense grid bias (the paper's ah + aw form).

  Args:
    axis_terms: one [N, A, G_i] array per grid axis i (position on that axis).

  Returns:
    [N, A, prod(G)]: bias[n, a, (p_1, ..., p_m)] = sum_i axis_terms[i][n, a, p_i].
  """
  nd = len(axis_terms)
  total = 0.0
  for i, term in enumerate(axis_terms):
    shape = list(term.shape[:2]) + [1] * nd
    shape[2 + i] = term.shape[2]
    total = total + term.reshape(shape)  # [N, A, G_1, ..., G_m] (broadcast)
  grid = tuple(t.shape[2] for t in axis_terms)
  total = jnp.broadcast_to(total, axis_terms[0].shape[:2] + grid)
  return total.reshape(axis_terms[0].shape[:2] + (math.prod(grid),))


def _param(rngs, shape, std, axes):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class AgentAttention(nnx.Module):
  """Agent attention layer (Han et al. 2024) on a token grid.

  Owns q / k / v / output projections, the agent biases in the paper's decomposed
  form (B1[n, a, (y, x)] = ah[n, a, y] + aw[n, a, x], B2[n, (y, x), a] = ha[n, y, a] +
  wa[n, x, a]; one term per grid axis, so 1D sequences work too) and the depthwise
  conv of V (kernel `kernel_size` per axis, with bias). Not included: the paper's
  additional agent-resolution bias (a [N, A, 7, 7] table bilinearly interpolated to the
  grid) -- the decomposed per-axis terms are the whole bias here.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               grid: Sequence[int], agent_grid: Sequence[int] = (7, 7),
               kernel_size: int = 3, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim)):
      if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise ValueError(f'{name} must be a positive int, got {val!r}.')
    if grid is None:
      raise ValueError('grid is required, e.g. grid=(14, 14) (or (T,) for 1D).')
    self.grid = _grid.check_dims('grid', grid)
    self.agent_grid = _grid.check_dims('agent_grid', agent_grid)
    _grid.grid_pool_matrix(self.grid, self.agent_grid)  # Validates the pairing.
    self.kernel_size = _grid.check_kernel_size('kernel_size', kernel_size)
    self.num_heads, self.head_dim = num_heads, head_dim
    na = math.prod(self.agent_grid)
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim),
                     (num_heads * head_dim) ** -0.5, ('heads', 'head_dim', 'embed'))
    self.agent_bias = nnx.List([
        _param(rngs, (num_heads, na, g), 0.02, ('heads', None, None))
        for g in self.grid])  # ah, aw: [N, A, G_i]
    self.query_bias = nnx.List([
        _param(rngs, (num_heads, na, g), 0.02, ('heads', None, None))
        for g in self.grid])  # ha, wa (stored [N, A, G_i], used transposed)
    taps = (self.kernel_size,) * len(self.grid)
    self.dwc_kernel = _param(rngs, (*taps, num_heads * head_dim),
                             self.kernel_size ** (-len(self.grid) / 2),
                             (None,) * len(self.grid) + ('heads',))
    self.dwc_bias = nnx.Param(jnp.zeros((num_heads * head_dim,), jnp.float32),
                              logical_axes=('heads',))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, T, D] -> [B, T, D] with T = prod(grid)."""
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    _grid.check_grid(self.grid, x.shape[1])
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)  # [B, T, N, H]
    b1 = decomposed_bias([p[...] for p in self.agent_bias])  # [N, A, T]
    b2 = jnp.swapaxes(decomposed_bias([p[...] for p in self.query_bias]), 1,
                      2)  # [N, T, A]
    o = agent_attention(q, k, v, agent_grid=self.agent_grid, grid=self.grid,
                        agent_bias=b1, query_bias=b2)  # [B, T, N, H]
    b, t, n, h = v.shape
    dwc = _grid.depthwise_conv(v.reshape(b, t, n * h),
                               self.dwc_kernel[...].astype(dt), self.grid)
    o = o + (dwc + self.dwc_bias[...].astype(dt)).reshape(b, t, n, h)
    return jnp.einsum('btnh,nhd->btd', o.astype(dt),
                      self.wo[...].astype(dt))  # [B, T, D]
