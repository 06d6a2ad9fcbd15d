"""Flax NNX token mixers of the linear family: thin modules owning the parameters.

Each layer projects x [B, T, D] to q, k, v [B, T, N, H] (and GLA's gates), runs one
of the functional forms of `attention.linear` and projects back; parameters carry
`logical_axes` metadata ('embed', 'heads', 'head_dim') for sharding rules. `mode`
picks the form: 'chunked' (training, prefill) or 'recurrent' (decoding); both take an
initial state and return the final state, so

    y, state = layer(prompt, return_state=True)
    y_t, state = layer(x_t, initial_state=state, mode='recurrent', return_state=True)

decodes token by token. Einsum letters: b batch, t position, d model dim, n head,
h head dim, r gate rank.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention.linear import _core
from attention.linear import gla
from attention.linear import lightning
from attention.linear import linear_transformer
from attention.linear import retnet

MODES = ('chunked', 'recurrent')


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
           axes: tuple[str | None, ...]) -> nnx.Param:
  std = 1.0 / math.sqrt(fan_in)
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   logical_axes=axes)


def _positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f'{name} must be a positive int, got {value!r}.')
  return value


class _Projected(nnx.Module):
  """q / k / v / output projections shared by the layers below."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    dim, num_heads, head_dim = (_positive(n, v) for n, v in (
        ('dim', dim), ('num_heads', num_heads), ('head_dim', head_dim)))
    self.num_heads, self.head_dim = num_heads, head_dim
    axes = ('embed', 'heads', 'head_dim')
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wk = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wv = _param(rngs, (dim, num_heads, head_dim), dim, axes)
    self.wo = _param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))

  def _qkv(self, x: jax.Array):
    if x.ndim != 3 or x.shape[-1] != self.wq.shape[0]:
      raise ValueError(f'x must have shape [B, T, {self.wq.shape[0]}], got '
                       f'{tuple(x.shape)}.')
    dt = x.dtype
    proj = lambda w: jnp.einsum('btd,dnh->btnh', x, w[...].astype(dt))
    return proj(self.wq), proj(self.wk), proj(self.wv)  # [B, T, N, H] each

  def _out(self, o: jax.Array, dtype) -> jax.Array:
    return jnp.einsum('btnh,nhd->btd', o.astype(dtype),
                      self.wo[...].astype(dtype))  # [B, T, D]

  @staticmethod
  def _check_mode(mode: str) -> None:
    if mode not in MODES:
      raise ValueError(f'mode must be one of {MODES}, got {mode!r}.')

  @staticmethod
  def _ret(y, state, return_state):
    return (y, state) if return_state else y


class LinearAttention(_Projected):
  """Linear attention (Katharopoulos et al. 2020) with a feature map."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               feature_map: linear_transformer.FeatureMap = 'elu+1',
               normalize: bool = True, causal: bool = True, rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, rngs=rngs)
    linear_transformer.feature_map_fn(feature_map)  # Validates the name.
    self.feature_map, self.normalize, self.causal = feature_map, normalize, causal

  def __call__(self, x: jax.Array, *, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int = _core.DEFAULT_CHUNK_SIZE,
               return_state: bool = False):
    self._check_mode(mode)
    q, k, v = self._qkv(x)
    kw = dict(feature_map=self.feature_map, normalize=self.normalize,
              causal=self.causal, initial_state=initial_state,
              segment_ids=segment_ids)
    if mode == 'chunked':
      o, state = linear_transformer.chunked_linear_attention(
          q, k, v, chunk_size=chunk_size, **kw)
    else:
      o, state = linear_transformer.recurrent_linear_attention(q, k, v, **kw)
    return self._ret(self._out(o, x.dtype), state, return_state)


class LightningAttention(_Projected):
  """Lightning attention (TransNormerLLM) with ALiBi slopes, optionally per layer."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               layer_index: int | None = None, num_layers: int | None = None,
               rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, rngs=rngs)
    self.slopes = tuple(float(s) for s in lightning.lightning_slopes(
        num_heads, layer_index=layer_index, num_layers=num_layers))

  def __call__(self, x: jax.Array, *, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int = _core.DEFAULT_CHUNK_SIZE,
               return_state: bool = False):
    self._check_mode(mode)
    q, k, v = self._qkv(x)
    slopes = jnp.asarray(self.slopes, jnp.float32)
    kw = dict(slopes=slopes, initial_state=initial_state, segment_ids=segment_ids)
    if mode == 'chunked':
      o, state = lightning.chunked_lightning_attention(
          q, k, v, chunk_size=chunk_size, **kw)
    else:
      o, state = lightning.recurrent_lightning_attention(q, k, v, **kw)
    return self._ret(self._out(o, x.dtype), state, return_state)


class Retention(_Projected):
  """RetNet's retention with fixed multi-scale decays (projections only)."""

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, rngs=rngs)
    self.gammas = tuple(float(g) for g in retnet.retention_gammas(num_heads))

  def __call__(self, x: jax.Array, *, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int = _core.DEFAULT_CHUNK_SIZE,
               return_state: bool = False):
    self._check_mode(mode)
    q, k, v = self._qkv(x)
    kw = dict(gammas=jnp.asarray(self.gammas, jnp.float32),
              initial_state=initial_state, segment_ids=segment_ids)
    if mode == 'chunked':
      o, state = retnet.chunked_retention(q, k, v, chunk_size=chunk_size,
                                             **kw)
    else:
      o, state = retnet.recurrent_retention(q, k, v, **kw)
    return self._ret(self._out(o, x.dtype), state, return_state)


class GatedLinearAttention(_Projected):
  """GLA (Yang et al. 2024): low-rank gate alpha_t = sigmoid(x W1 W2 + b)^(1/tau).

  `per_key=True` gives one decay per key dimension ([B, T, N, H] gates, the paper's
  choice), else one per head.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               per_key: bool = True, gate_rank: int = 16, tau: float = 16.0,
               rngs: nnx.Rngs):
    super().__init__(dim, num_heads, head_dim, rngs=rngs)
    _positive('gate_rank', gate_rank)
    if not tau > 0:
      raise ValueError(f'tau must be positive, got {tau}.')
    self.per_key, self.tau = per_key, tau
    width = head_dim if per_key else 1
    self.w_gate1 = _param(rngs, (dim, gate_rank), dim, ('embed', None))
    self.w_gate2 = _param(rngs, (gate_rank, num_heads, width), gate_rank,
                          (None, 'heads', 'head_dim'))
    self.b_gate = nnx.Param(jnp.zeros((num_heads, width), jnp.float32),
                            logical_axes=('heads', 'head_dim'))

  def log_gates(self, x: jax.Array) -> jax.Array:
    """[B, T, N, H] (per key) or [B, T, N] (per head) log-decays, float32."""
    x32 = x.astype(jnp.float32)
    low = jnp.einsum('btd,dr->btr', x32, self.w_gate1[...])  # [B, T, R]
    logits = jnp.einsum('btr,rnh->btnh', low, self.w_gate2[...]) + self.b_gate[...]
    g = gla.gla_log_gates(logits, self.tau)  # [B, T, N, H or 1]
    return g if self.per_key else g[..., 0]

  def __call__(self, x: jax.Array, *, initial_state: jax.Array | None = None,
               segment_ids: jax.Array | None = None, mode: str = 'chunked',
               chunk_size: int | None = None, return_state: bool = False):
    self._check_mode(mode)
    q, k, v = self._qkv(x)
    g = self.log_gates(x)
    kw = dict(initial_state=initial_state, segment_ids=segment_ids)
    if mode == 'chunked':
      o, state = gla.chunked_gated_linear_attention(q, k, v, g,
                                                    chunk_size=chunk_size, **kw)
    else:
      o, state = gla.recurrent_gated_linear_attention(q, k, v, g, **kw)
    return self._ret(self._out(o, x.dtype), state, return_state)
