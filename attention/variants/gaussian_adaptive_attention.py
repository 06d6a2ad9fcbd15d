"""Gaussian adaptive attention (GAAM; Ioannides, Chadha & Elkins, 2024).

"Gaussian Adaptive Attention is All You Need: Robust Contextual Representations
Across Multiple Modalities" (arXiv:2401.11143). Per head, with a learnable mean
offset delta and a learnable scaled variance xi > 0, over the normalisation axis
(N entries x_1 .. x_N):

    mu      = (1/N) sum_j x_j
    sigma^2 = (1/N) sum_j x_j^2 - mu^2
    x_norm  = (x - (mu + delta)) / sqrt(sigma^2 + eps)
    G(x)    = exp(-x_norm^2 / (2 xi))
    y       = x (.) G(x)

Multi-head GAAM gives every head its own (delta, xi) and concatenates the heads; here
the heads are the N axis of the [B, T, N, H] layout.

Readings where the paper and its code (github.com/gioannides/Gaussian-Adaptive-
Attention) leave room:
* sigma^2 is the population variance as in the paper's equation (the code's
  torch.var is the unbiased one).
* y = x (.) G as the paper's equation; `normalize=True` divides G by its sum over the
  axis as the code does (`mixture /= mixture.sum(norm_axis)`).
* xi: the code writes 2 c^2 in the exponent; the module learns c with xi = c^2
  (positive, initial c = 2 as the code's `initial_c`); the pure function takes xi.
* One Gaussian per head (the code also has mixtures of several per head).
* Axis: 'feature' (the H entries of a head within each token: token-local, so
  causal for free) or 'time' (each feature over the sequence, the code's
  norm_axis=1 on [B, T, D]; `causal=True` uses prefix statistics mu_t, sigma_t^2
  over s <= t so no token sees the future).
* As a token-mixing layer (`GAAMAttention`, registry 'gaam') GAAM recalibrates
  q and k per head over their features before causal softmax attention: the
  paper combines GAAM with (grouped-query) dot-product attention in its
  pre-trained-model experiments; this placement is this file's reading.

Einsum letters: b batch, t/s positions, n heads, h head dim, d model dim.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api
from attention.routing import _common
from attention.routing.seer_attention import rope

AXES = ('feature', 'time')


def _check_params(x, mean_offset, variance_scale):
  _checks.check_array('x', x, ndim=4, floating=True)
  n = x.shape[2]
  for name, p in (('mean_offset', mean_offset), ('variance_scale', variance_scale)):
    _checks.check_array(name, p, ndim=1, floating=True)
    if p.shape[0] != n:
      raise ValueError(f'{name} must have shape [N] = [{n}] (one per head), got '
                       f'{list(p.shape)}.')


def gaussian_adaptive_weights(x: jax.Array, mean_offset: jax.Array,
                              variance_scale: jax.Array, *, axis: str = 'feature',
                              causal: bool = False, normalize: bool = False,
                              eps: float = 1e-8) -> jax.Array:
  """G(x) [B, T, N, H] (float32 or wider) of the module docstring's equations.

  Args:
    x: [B, T, N, H].
    mean_offset: delta [N]; variance_scale: xi [N] (> 0).
    axis: 'feature' (statistics over H per token and head) or 'time' (over T per
      head and feature).
    causal: with axis 'time', prefix statistics over s <= t.
    normalize: divide G by its sum over the axis (the reference code).
    eps: the variance floor.
  """
  _check_params(x, mean_offset, variance_scale)
  if axis not in AXES:
    raise ValueError(f'axis must be one of {AXES}, got {axis!r}.')
  if causal and axis == 'time' and normalize:
    raise ValueError('normalize must be False with causal=True and axis="time" '
                     '(a sum over time would see the future).')
  _checks.check_positive('eps', eps, allow_none=False)
  dt = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(dt)
  delta = mean_offset.astype(dt)[:, None]  # [N, 1]
  xi = variance_scale.astype(dt)[:, None]
  if axis == 'feature':
    mu = jnp.mean(x, axis=-1, keepdims=True)  # [B, T, N, 1]
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
  elif causal:
    count = jnp.arange(1, x.shape[1] + 1, dtype=dt)[None, :, None, None]
    mu = jnp.cumsum(x, axis=1) / count  # [B, T, N, H]
    var = jnp.maximum(jnp.cumsum(jnp.square(x), axis=1) / count - jnp.square(mu),
                      0.0)
  else:
    mu = jnp.mean(x, axis=1, keepdims=True)  # [B, 1, N, H]
    var = jnp.mean(jnp.square(x - mu), axis=1, keepdims=True)
  x_norm = (x - (mu + delta)) / jnp.sqrt(var + eps)
  g = jnp.exp(-jnp.square(x_norm) / (2.0 * xi))
  if normalize:
    red = -1 if axis == 'feature' else 1
    g = g / jnp.maximum(jnp.sum(g, axis=red, keepdims=True), eps)
  return g


def gaussian_adaptive_attention(x: jax.Array, mean_offset: jax.Array,
                                variance_scale: jax.Array, **kwargs) -> jax.Array:
  """y = x (.) G(x) [B, T, N, H] in x's dtype (kwargs: `gaussian_adaptive_weights`)."""
  g = gaussian_adaptive_weights(x, mean_offset, variance_scale, **kwargs)
  return (x.astype(g.dtype) * g).astype(x.dtype)


class GaussianAdaptiveAttention(nnx.Module):
  """Multi-head GAAM: learnable delta [N] (init 0) and c [N] (xi = c^2, init c)."""

  def __init__(self, num_heads: int, *, axis: str = 'feature', causal: bool = False,
               normalize: bool = False, initial_c: float = 2.0, eps: float = 1e-8):
    num_heads = _common.check_int('num_heads', num_heads)
    if axis not in AXES:
      raise ValueError(f'axis must be one of {AXES}, got {axis!r}.')
    _checks.check_positive('initial_c', initial_c, allow_none=False)
    self.axis, self.causal, self.normalize, self.eps = axis, causal, normalize, eps
    self.mean_offset = nnx.Param(jnp.zeros((num_heads,), jnp.float32),
                                 logical_axes=('heads',))
    self.c = nnx.Param(jnp.full((num_heads,), float(initial_c), jnp.float32),
                       logical_axes=('heads',))

  def __call__(self, x: jax.Array) -> jax.Array:
    return gaussian_adaptive_attention(
        x, self.mean_offset[...], jnp.square(self.c[...]), axis=self.axis,
        causal=self.causal, normalize=self.normalize, eps=self.eps)


class GAAMAttention(nnx.Module):
  """Self-attention layer x [B, T, D] -> [B, T, D] with GAAM on q and k per head.

  q = GAAM_q(x W_q), k = GAAM_k(x W_k) over each head's features (token-local),
  then RoPE and softmax attention (causal or not) through
  `attention.dot_product_attention`.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *, causal: bool,
               rope_base: float | None = 10000.0,
               implementation: str | None = None, rngs: nnx.Rngs):
    for name, v in (('dim', dim), ('num_heads', num_heads), ('head_dim', head_dim)):
      _common.check_int(name, v)
    self.causal, self.rope_base = bool(causal), rope_base
    self.implementation = implementation
    p = lambda shape, fan, axes: _common.lecun_param(rngs, shape, fan, axes)
    self.wq = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wk = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wv = p((dim, num_heads, head_dim), dim, ('embed', 'heads', 'head_dim'))
    self.wo = p((num_heads, head_dim, dim), num_heads * head_dim,
                ('heads', 'head_dim', 'embed'))
    self.gaam_q = GaussianAdaptiveAttention(num_heads)
    self.gaam_k = GaussianAdaptiveAttention(num_heads)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dtype))  # [B, T, N, H]
    k = jnp.einsum('btd,dnh->btnh', x, self.wk[...].astype(dtype))  # [B, T, N, H]
    v = jnp.einsum('btd,dnh->btnh', x, self.wv[...].astype(dtype))  # [B, T, N, H]
    q, k = self.gaam_q(q), self.gaam_k(k)
    if self.rope_base is not None:
      pos = jnp.arange(x.shape[1])
      q = rope(q, pos, self.rope_base).astype(dtype)
      k = rope(k, pos, self.rope_base).astype(dtype)
    out = api.dot_product_attention(q, k, v, is_causal=self.causal,
                                    implementation=self.implementation)
    return jnp.einsum('btnh,nhd->btd', out, self.wo[...].astype(dtype))  # [B, T, D]


def registry_layer(dim: int, num_heads: int, head_dim: int, *, grid: Any,
                   causal: bool, rngs: nnx.Rngs) -> GAAMAttention:
  """The registry layer 'gaam' (LM or ViT: causal as the model asks)."""
  del grid
  return GAAMAttention(dim, num_heads, head_dim, causal=causal, rngs=rngs)
