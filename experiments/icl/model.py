"""One layer of multi-head attention for in-context regression (pure functions).

The model of He, Pan, Chen, Yang, "In-Context Linear Regression Demystified" (ICML
2025, arXiv 2503.12734), Eq. (2.2):

    f(Z, z_q) = sum_h O_h V_h Z softmax(Z^T K_h^T Q_h z_q / sqrt(D)),   D = d + T,

with Q_h, K_h, V_h in R^{DxD} and O_h in R^{TxD}; the query attends to the L context
tokens only; no MLP, LayerNorm, residual or bias. Several models ("groups" of heads,
e.g. H = 1, 2, 4, 8) are stored as one stack of N = sum(H) heads so that one program
trains all of them on the same batches; Adam is elementwise and the loss is a sum of
per-model losses, so this is exactly independent training.

Parameters are a dict of arrays: Q, K, V [N, D, D] (row = output feature, as
`torch.nn.Linear.weight` per head) and O [N, T, D].
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import linear

# Einsum letters: b batch, l context position, n head, m model (group of heads),
# i/j token feature (D), t output (task).

PROJECTIONS = ('folded', 'tokens')


def _check_heads(heads: Sequence[int]) -> tuple[int, ...]:
  heads = tuple(heads)
  if not heads or any(isinstance(h, bool) or not isinstance(h, (int, np.integer))
                      or h < 1 for h in heads):
    raise ValueError(f'heads must be a non-empty sequence of positive ints, got '
                     f'{heads!r}.')
  return tuple(int(h) for h in heads)


def group_matrix(heads: Sequence[int]) -> np.ndarray:
  """[N, M] 0/1 matrix: head n belongs to model m."""
  heads = _check_heads(heads)
  g = np.zeros((sum(heads), len(heads)), np.float32)
  start = 0
  for m, h in enumerate(heads):
    g[start:start + h, m] = 1.0
    start += h
  return g


def head_slices(heads: Sequence[int]) -> list[slice]:
  """Per model, the slice of its heads in the stacked parameters."""
  heads = _check_heads(heads)
  offsets = np.concatenate([[0], np.cumsum(heads)])
  return [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:])]


def init_params(key: jax.Array, heads: Sequence[int], token_dim: int,
                out_dim: int = 1, dtype=jnp.float32) -> dict[str, jax.Array]:
  """PyTorch-default init (`nn.Linear`: U(-1/sqrt(fan_in), 1/sqrt(fan_in))).

  q/k/v projections have fan_in D; the output projection of a model with H heads has
  fan_in H * D (as `nn.Linear(H * D, T)` in the authors' code).
  """
  heads = _check_heads(heads)
  if token_dim < 2 or out_dim < 1:
    raise ValueError(f'token_dim must be >= 2 and out_dim >= 1, got '
                     f'token_dim={token_dim}, out_dim={out_dim}.')
  n, dd = sum(heads), token_dim
  kq, kk, kv, ko = jax.random.split(key, 4)
  b_in = 1.0 / math.sqrt(dd)
  b_out = np.concatenate([np.full(h, 1.0 / math.sqrt(h * dd)) for h in heads])
  u = lambda k, shape: jax.random.uniform(k, shape, dtype, -1.0, 1.0)
  return {
      'Q': b_in * u(kq, (n, dd, dd)),
      'K': b_in * u(kk, (n, dd, dd)),
      'V': b_in * u(kv, (n, dd, dd)),
      'O': jnp.asarray(b_out, dtype)[:, None, None] * u(ko, (n, out_dim, dd)),
  }


def _check_inputs(params, context, query, mask):
  for name in ('Q', 'K', 'V', 'O'):
    if name not in params:
      raise ValueError(f'params must contain {name!r}, got keys {sorted(params)}.')
  n, dd = params['Q'].shape[0], params['Q'].shape[-1]
  if context.ndim != 3 or context.shape[-1] != dd:
    raise ValueError(f'context must have shape [B, L, {dd}], got '
                     f'{tuple(context.shape)}.')
  if query.shape != (context.shape[0], dd):
    raise ValueError(f'query must have shape {(context.shape[0], dd)}, got '
                     f'{tuple(query.shape)}.')
  if mask is not None and mask.shape != context.shape[:2]:
    raise ValueError(f'mask must have shape {tuple(context.shape[:2])} [B, L], '
                     f'got {tuple(mask.shape)}.')
  return n, dd


def _combine(params, head_out, heads):
  """Per-head attended tokens [B, N, D] -> model outputs [B, M, T]."""
  ov = jnp.einsum('nti,nij->ntj', params['O'], params['V'])  # [N, T, D] = O_h V_h
  per_head = jnp.einsum('ntj,bnj->bnt', ov, head_out)  # [B, N, T]
  g = jnp.asarray(group_matrix(heads), per_head.dtype)
  return jnp.einsum('bnt,nm->bmt', per_head, g)  # [B, M, T]


def _folded_query(params, query):
  """K_h^T Q_h z_q [B, N, D]: the logit z_q^T Q_h^T K_h z_l as a dot with z_l."""
  kq = jnp.einsum('nji,njk->nik', params['K'], params['Q'])  # [N, D, D] = K^T Q
  return jnp.einsum('nik,bk->bni', kq, query)  # [B, N, D]


def softmax_forward(params: dict[str, jax.Array], context: jax.Array,
                    query: jax.Array, heads: Sequence[int], *,
                    mask: jax.Array | None = None, projection: str = 'folded',
                    implementation: str | None = 'reference') -> jax.Array:
  """Multi-head softmax attention predictions [B, M, T] (one row per model).

  Attention runs through `attention.dot_product_attention` with the query token as a
  length-1 query and the context as keys/values. `projection='tokens'` projects
  every context token per head (keys K_h z_l, values V_h z_l: [B, L, N, D]);
  `'folded'` uses associativity: the logit z_q^T Q_h^T K_h z_l is the dot product of
  the folded query K_h^T Q_h z_q with the raw token, and V_h commutes with the
  attention average, so attention runs multi-query over the shared raw tokens and
  O_h V_h (one [T, D] row per head) is applied to the [B, N, D] result (same
  function, D times fewer flops; K_h^T Q_h and O_h V_h are formed once per call).

  Args:
    params: Q, K, V [N, D, D], O [N, T, D].
    context: [B, L, D] tokens.
    query: [B, D] query token.
    heads: heads per model, summing to N.
    mask: optional [B, L] bool, True for context positions that exist (evaluation
      of shorter prompts padded to a common length).
    projection: 'folded' or 'tokens'.
    implementation: forwarded to `dot_product_attention`.
  """
  heads = _check_heads(heads)
  n, dd = _check_inputs(params, context, query, mask)
  if sum(heads) != n:
    raise ValueError(f'heads must sum to the number of stacked heads ({n}), got '
                     f'{heads!r}.')
  if projection not in PROJECTIONS:
    raise ValueError(f'projection must be one of {PROJECTIONS}, got '
                     f'{projection!r}.')
  scale = 1.0 / math.sqrt(dd)
  attn_mask = None if mask is None else mask[:, None, None, :]  # [B, 1, 1, L]
  if projection == 'folded':
    q_fold = _folded_query(params, query)  # [B, N, D]
    tokens = context[:, :, None, :]  # [B, L, 1, D]
    out = attention.dot_product_attention(
        q_fold[:, None], tokens, tokens, scale=scale, mask=attn_mask,
        implementation=implementation)  # [B, 1, N, D]
    return _combine(params, out[:, 0], heads)
  q = jnp.einsum('nij,bj->bni', params['Q'], query)  # [B, N, D]
  k = jnp.einsum('nij,blj->blni', params['K'], context)  # [B, L, N, D]
  v = jnp.einsum('nij,blj->blni', params['V'], context)  # [B, L, N, D]
  out = attention.dot_product_attention(
      q[:, None], k, v, scale=scale, mask=attn_mask,
      implementation=implementation)[:, 0]  # [B, N, D]
  per_head = jnp.einsum('nti,bni->bnt', params['O'], out)  # [B, N, T]
  g = jnp.asarray(group_matrix(heads), per_head.dtype)
  return jnp.einsum('bnt,nm->bmt', per_head, g)  # [B, M, T]


def linear_forward(params: dict[str, jax.Array], context: jax.Array,
                   query: jax.Array, heads: Sequence[int], *,
                   mask: jax.Array | None = None,
                   normalize: bool = False) -> jax.Array:
  """Linear-attention baseline [B, M, T]: softmax replaced by the identity.

  f = sum_h O_h V_h Z (Z^T K_h^T Q_h z_q) / sqrt(D) (divided by the number of
  context tokens if `normalize`), the one-layer linear transformer contrasted with
  softmax attention for length generalisation in Section 4 of the paper. It is plain
  linear attention (identity feature map, no denominator) of the folded query over
  the raw tokens: `attention.linear.linear_attention` with causal=False, one query
  over the L context tokens (a [B, L] mask zeroes the keys of absent tokens). The
  division by the token count is this model's, not the library's normaliser
  phi(q) . sum phi(k), which with the identity map can be zero or negative.
  """
  heads = _check_heads(heads)
  n, dd = _check_inputs(params, context, query, mask)
  if sum(heads) != n:
    raise ValueError(f'heads must sum to the number of stacked heads ({n}), got '
                     f'{heads!r}.')
  q_fold = _folded_query(params, query)  # [B, N, D]
  tokens = context[:, :, None, :]  # [B, L, 1, D]: one key / value head, shared
  keys = tokens if mask is None else tokens * mask[:, :, None, None].astype(
      tokens.dtype)
  out, _ = linear.linear_attention(
      q_fold[:, None], keys, tokens, feature_map='identity', normalize=False,
      causal=False, scale=1.0 / math.sqrt(dd), implementation='xla')
  out = out[:, 0]  # [B, N, D]
  if normalize:
    count = (jnp.full(context.shape[:1], context.shape[1], out.dtype)
             if mask is None else jnp.sum(mask, axis=1).astype(out.dtype))
    out = out / count[:, None, None]
  return _combine(params, out, heads)


def kq_matrices(params: dict[str, jax.Array]) -> jax.Array:
  """KQ_h = Q_h^T K_h [..., N, D, D]: the logit is z_q^T KQ_h z_l (before scale)."""
  return jnp.einsum('...nji,...njk->...nik', params['Q'], params['K'])


def ov_matrices(params: dict[str, jax.Array]) -> jax.Array:
  """OV_h = O_h V_h [..., N, T, D]."""
  return jnp.einsum('...nti,...nij->...ntj', params['O'], params['V'])


def omega_mu(params: dict[str, jax.Array], d: int) -> tuple[jax.Array, jax.Array]:
  """Per head: omega_h = mean diag of the x-block of KQ_h times 1/sqrt(D), the
  effective coefficient of x_l^T x_q in the logit; mu_h = OV_h[:, d:] ([..., N, T, T],
  squeezed to [..., N] for one task): the y -> output entries."""
  dd = params['Q'].shape[-1]
  kq = kq_matrices(params)
  omega = jnp.mean(jnp.diagonal(kq[..., :d, :d], axis1=-2, axis2=-1), -1)
  omega = omega / math.sqrt(dd)
  mu = ov_matrices(params)[..., :, d:]  # [..., N, T, T]
  if mu.shape[-1] == 1:
    mu = mu[..., 0, 0]
  return omega, mu
