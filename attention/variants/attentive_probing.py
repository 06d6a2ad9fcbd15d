"""Efficient probing (EP): multi-query cross-attention over frozen patch tokens.

"Attention, Please! Revisiting Attentive Probing for Masked Image Modeling" (Psomas
et al., 2025). A standard attentive probe is a multi-head cross-attention block
(a learnable query, K = X W_k, V = X W_v, output projection W_o). EP removes the
redundant projections:

* no W_k: the M learnable queries q_m in R^D attend the frozen patch tokens
  themselves, a_m = softmax(q_m X^T / sqrt(D)) (a key projection is absorbed into a
  learnable query: (q W_k^T) X^T);
* no W_o: one value projection W_v: D -> D' (D' = D / d_out) is kept, and its
  output channels are split into M chunks of D' / M, one per query (multi-query:
  every query shares the same keys and values, one head);
* the M outputs o_m = sum_n a_m[n] (X W_v)[n, chunk m] are concatenated to a D'
  vector which a linear classifier reads.

This is the released EP module (poolings/ep.py, num_heads = 1): queries initialised
N(0, 0.02^2), W_v without bias, scale D^{-1/2}. The classifier here is a plain linear
layer (with bias) on the concatenated outputs.

`train_probe` in `experiments/models/attentive_probe.py` trains it on the patch
tokens of a frozen ViT of this codebase.

Einsum letters: b batch, m query, n patch token, d feature dim, c value chunk.
"""

from __future__ import annotations

import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be a positive int, got {type(value).__name__}.')
  if value < 1:
    raise ValueError(f'{name} must be a positive int, got {value}.')
  return int(value)


def efficient_probe_attention(features: jax.Array, queries: jax.Array, *,
                              scale: float | None = None) -> jax.Array:
  """a [B, M, N] = softmax_n(q_m . x_n * scale), keys = the features (no W_k)."""
  _checks.check_array('features', features, ndim=3, floating=True)
  _checks.check_array('queries', queries, ndim=2, floating=True)
  d = features.shape[-1]
  if queries.shape[-1] != d:
    raise ValueError(f'queries must have shape [M, {d}] (the feature dim), got '
                     f'{tuple(queries.shape)}.')
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  else:
    _checks.check_positive('scale', scale, allow_none=False)
  dt = jnp.promote_types(features.dtype, jnp.float32)
  logits = jnp.einsum('md,bnd->bmn', queries.astype(dt),
                      features.astype(dt)) * scale  # [B, M, N]
  return jax.nn.softmax(logits, axis=-1)


def efficient_probe(features: jax.Array, queries: jax.Array, w_v: jax.Array, *,
                    scale: float | None = None) -> jax.Array:
  """EP pooling: concat_m sum_n a_m[n] (X W_v)[n, chunk m] -> [B, D'].

  Args:
    features: [B, N, D] frozen patch tokens.
    queries: [M, D] learnable queries.
    w_v: [D, D'] value projection, D' divisible by M.
    scale: logit scale, default D^{-1/2}.
  """
  attn = efficient_probe_attention(features, queries, scale=scale)  # [B, M, N]
  _checks.check_array('w_v', w_v, ndim=2, floating=True)
  d, m = features.shape[-1], queries.shape[0]
  if w_v.shape[0] != d or w_v.shape[1] % m:
    raise ValueError(f'w_v must have shape [{d}, D\'] with D\' divisible by the '
                     f'{m} queries, got {tuple(w_v.shape)}.')
  b, n, _ = features.shape
  dt = attn.dtype
  v = jnp.einsum('bnd,de->bne', features.astype(dt), w_v.astype(dt))  # [B, N, D']
  v = v.reshape(b, n, m, w_v.shape[1] // m)  # [B, N, M, C]
  out = jnp.einsum('bmn,bnmc->bmc', attn, v)  # [B, M, C]
  return out.reshape(b, w_v.shape[1]).astype(features.dtype)  # [B, D']


class EfficientProbe(nnx.Module):
  """EP head: features [B, N, D] -> logits [B, num_classes].

  Parameters: queries [M, D], w_v [D, D / d_out] and the linear classifier
  [D / d_out, num_classes] + bias; (D / d_out) must be divisible by M.
  """

  def __init__(self, dim: int, num_classes: int, *, num_queries: int = 4,
               d_out: int = 1, rngs: nnx.Rngs):
    dim = _positive_int('dim', dim)
    num_classes = _positive_int('num_classes', num_classes)
    m = _positive_int('num_queries', num_queries)
    d_out = _positive_int('d_out', d_out)
    if dim % d_out or (dim // d_out) % m:
      raise ValueError(f'dim / d_out must be an int divisible by num_queries; got '
                       f'dim={dim}, d_out={d_out}, num_queries={m}.')
    width = dim // d_out
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (m, dim),
                                                      jnp.float32))
    self.w_v = nnx.Param(dim ** -0.5 * jax.random.normal(rngs.params(),
                                                         (dim, width), jnp.float32))
    self.w_cls = nnx.Param(width ** -0.5 * jax.random.normal(
        rngs.params(), (width, num_classes), jnp.float32))
    self.b_cls = nnx.Param(jnp.zeros((num_classes,), jnp.float32))

  def pool(self, features: jax.Array) -> jax.Array:
    return efficient_probe(features, self.queries[...], self.w_v[...])  # [B, D']

  def __call__(self, features: jax.Array) -> jax.Array:
    pooled = self.pool(features)
    logits = jnp.einsum('be,ec->bc', pooled.astype(jnp.float32),
                        self.w_cls[...]) + self.b_cls[...]
    return logits  # [B, classes]
