"""Sparsifiner: instance-dependent attention connectivity from a low-rank predictor.

"Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision
Transformers" (Wei et al., CVPR 2023). Per head, a lightweight connectivity predictor
approximates the attention map at low rank:

    q' = q W_q, k' = k W_k            (head_dim -> rank, rank = head_dim / 2)
    K_d = k'^T P                      (P: T x M, M = ceil(T / 6) token basis)
    C = softmax(q' K_d)               [T, M]
    A^ = C U^T                        (U: T x M)              [T, T]

At evaluation U is pruned (|U| <= 0.02 -> 0) and C keeps its top-8 entries per row
(`sparse=True`). The connectivity mask M keeps the top ceil(keep_ratio T) entries of
each row of A^ (keep_ratio 0.25; ties to the lower key index), the CLS row dense,
detached; attention is the softmax masked by M. Stage 1 trains only the predictor
with the distillation loss 0.01 * sum (A^ - A_teacher)^2 against the (detached)
dense attention map (`connectivity_loss`); stage 2 freezes it and trains the model
(with the paper's CE + KL + token MSE losses, not included here).

Granularity: M is token granular and is MATERIALIZED as a dense boolean
[B, N, T, T] mask (fine for ViT sizes, T = 197), handed to
`attention.dot_product_attention`; it is not expressed through blocks (at 25%
unstructured density nearly every tile holds a kept entry). Here W_q, W_k
([head_dim, rank]) and P, U ([T, M]) are shared by the heads. Not included: the
paper's token-sparsity combination and its sparse kernels.

Einsum letters: b batch, n head, t / s query / key token, h head dim, r rank,
m basis.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import attention as attention_api
from attention import _checks


def _int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def connectivity_scores(query: jax.Array, key: jax.Array, w_q: jax.Array,
                        w_k: jax.Array, p: jax.Array, u: jax.Array, *,
                        sparse: bool = False, prune: float = 0.02,
                        basis_top_k: int = 8) -> jax.Array:
  """float [B, N, T, S]: the predicted attention A^ = softmax(q' k'^T P) U^T.

  Args:
    query: [B, T, N, H]; key [B, S, N, H].
    w_q, w_k: [H, rank].
    p, u: [S, M] token bases.
    sparse: evaluation form (prune |U| <= prune, top-`basis_top_k` of C per row).
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  b, t, n, h = query.shape
  if key.shape[0] != b or key.shape[2:] != (n, h):
    raise ValueError(f'key must have shape [B, S, N, H] = [{b}, S, {n}, {h}], got '
                     f'{list(key.shape)}.')
  s = key.shape[1]
  for name, w in (('w_q', w_q), ('w_k', w_k)):
    _checks.check_array(name, w, ndim=2, floating=True)
    if w.shape[0] != h:
      raise ValueError(f'{name} must have shape [H, rank] = [{h}, rank], got '
                       f'{list(w.shape)}.')
  if w_q.shape != w_k.shape:
    raise ValueError(f'w_k must have the shape of w_q {list(w_q.shape)}, got '
                     f'{list(w_k.shape)}.')
  for name, x in (('p', p), ('u', u)):
    _checks.check_array(name, x, ndim=2, floating=True)
    if x.shape[0] != s or x.shape != p.shape:
      raise ValueError(f'{name} must have shape [S, M] = [{s}, {p.shape[1]}], got '
                       f'{list(x.shape)}.')
  qr = jnp.einsum('btnh,hr->bntr', query, w_q)  # [B, N, T, R]
  kr = jnp.einsum('bsnh,hr->bnsr', key, w_k)  # [B, N, S, R]
  k_d = jnp.einsum('bnsr,sm->bnrm', kr, p)  # [B, N, R, M]
  c = jax.nn.softmax(jnp.einsum('bntr,bnrm->bntm', qr, k_d), axis=-1)  # [B, N, T, M]
  if sparse:
    top = min(_int('basis_top_k', basis_top_k, 1), c.shape[-1])
    c = jnp.where(row_top_k_mask(c, top), c, 0.0)
    u = jnp.where(jnp.abs(u) > prune, u, 0.0)
  return jnp.einsum('bntm,sm->bnts', c, u)  # [B, N, T, S]


def row_top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """bool [..., S]: the k largest entries of each row (ties to the lower index)."""
  k = _int('k', k, 1)
  if k > scores.shape[-1]:
    raise ValueError(f'k must be in [1, {scores.shape[-1]}], got {k}.')
  values, idx = jax.lax.top_k(scores, k)
  thr, last = values[..., -1:], idx[..., -1:]
  col = jnp.arange(scores.shape[-1])
  return (scores > thr) | ((scores == thr) & (col <= last))


def connectivity_mask(approx: jax.Array, *, keep_ratio: float = 0.25,
                      cls_token: bool = True) -> jax.Array:
  """bool [B, N, T, S]: row top-ceil(keep_ratio S) of A^ (detached), CLS row dense."""
  if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)):
    raise TypeError(f'keep_ratio must be a float, got {type(keep_ratio).__name__}.')
  if not 0.0 < keep_ratio <= 1.0:
    raise ValueError(f'keep_ratio must be in (0, 1], got {keep_ratio}.')
  if not isinstance(cls_token, bool):
    raise TypeError(f'cls_token must be a bool, got {type(cls_token).__name__}.')
  _checks.check_array('approx', approx, ndim=4, floating=True)
  s = approx.shape[-1]
  mask = row_top_k_mask(jax.lax.stop_gradient(approx), math.ceil(keep_ratio * s))
  if cls_token:
    mask = mask.at[:, :, 0].set(True)
  return mask


def teacher_attention(query: jax.Array, key: jax.Array,
                      scale: float | None = None) -> jax.Array:
  """float [B, N, T, S]: the dense attention map softmax(q k^T scale), detached."""
  scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
  logits = jnp.einsum('btnh,bsnh->bnts', query, key) * scale
  return jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))


def connectivity_loss(approx: jax.Array, teacher: jax.Array,
                      weight: float = 0.01) -> jax.Array:
  """Stage-1 distillation: weight * sum (A^ - A_teacher)^2 (teacher detached)."""
  if tuple(approx.shape) != tuple(teacher.shape):
    raise ValueError(f'teacher must have the shape of approx {list(approx.shape)}, '
                     f'got {list(teacher.shape)}.')
  diff = approx - jax.lax.stop_gradient(teacher)
  return weight * jnp.sum(diff * diff)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
           axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


class Sparsifiner(nnx.Module):
  """Sparsifiner attention layer x [B, T, D] -> [B, T, D] with its predictor.

  `layer(x)` runs the masked attention; `layer(x, return_loss=True)` also returns
  the stage-1 distillation loss of the predictor against the layer's own dense
  attention (detached), the only gradient the predictor receives (the mask carries
  none). `sparse=True` is the evaluation form of the predictor.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, num_tokens: int,
               keep_ratio: float = 0.25, rank: int | None = None,
               basis: int | None = None, cls_token: bool = True,
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, val in (('dim', dim), ('num_heads', num_heads),
                      ('head_dim', head_dim), ('num_tokens', num_tokens)):
      _int(name, val, 1)
    rank = max(1, head_dim // 2) if rank is None else _int('rank', rank, 1)
    basis = math.ceil(num_tokens / 6) if basis is None else _int('basis', basis, 1)
    connectivity_mask(jnp.zeros((1, 1, 1, 1)), keep_ratio=keep_ratio,
                      cls_token=cls_token)  # Validates the options.
    self.keep_ratio, self.cls_token = keep_ratio, cls_token
    self.num_tokens, self.implementation = num_tokens, implementation
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim ** -0.5, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim),
                     (num_heads * head_dim) ** -0.5, ('heads', 'head_dim', 'embed'))
    self.pred_q = _param(rngs, (head_dim, rank), head_dim ** -0.5, ('head_dim', None))
    self.pred_k = _param(rngs, (head_dim, rank), head_dim ** -0.5, ('head_dim', None))
    self.basis_p = _param(rngs, (num_tokens, basis), num_tokens ** -0.5, (None, None))
    self.basis_u = _param(rngs, (num_tokens, basis), basis ** -0.5, (None, None))

  def __call__(self, x: jax.Array, *, sparse: bool = False,
               return_loss: bool = False):
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0] or x.shape[1] != self.num_tokens:
      raise ValueError(f'x must have shape [B, {self.num_tokens}, '
                       f'{self.wq.shape[0]}], got {tuple(x.shape)}.')
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    q, k, v = proj(self.wq), proj(self.wk), proj(self.wv)  # [B, T, N, H]
    approx = connectivity_scores(
        jax.lax.stop_gradient(q), jax.lax.stop_gradient(k), self.pred_q[...],
        self.pred_k[...], self.basis_p[...], self.basis_u[...], sparse=sparse)
    mask = connectivity_mask(approx, keep_ratio=self.keep_ratio,
                             cls_token=self.cls_token)
    o = attention_api.dot_product_attention(  # [B, T, N, H]
        q, k, v, mask=mask, implementation=self.implementation)
    y = jnp.einsum('btnh,nhd->btd', o.astype(dt), self.wo[...].astype(dt))  # [B, T, D]
    if not return_loss:
      return y
    return y, connectivity_loss(approx, teacher_attention(q, k))
