"""Transformer building blocks (Flax NNX): thin modules that own parameters.

Every parameter carries `logical_axes` metadata (names such as 'embed', 'heads',
'mlp', 'vocab'); `experiments.sharding` maps them to mesh axes by rules. The math is
plain JAX; attention goes through `experiments.models.registry` (and so through
`attention.dot_product_attention` for the softmax family).

Einsum letters: b batch, t position, d model dim, n query heads, k kv heads, h head dim,
f MLP hidden dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models import registry


def init_param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
           logical_axes: tuple[str | None, ...]) -> nnx.Param:
  """A normal parameter with std 1/sqrt(fan_in) (LeCun normal)."""
  std = 1.0 / math.sqrt(fan_in)
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=logical_axes)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity when `key` is None or rate == 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def fold_key(key: jax.Array | None, index: int) -> jax.Array | None:
  return None if key is None else jax.random.fold_in(key, index)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm ("Root Mean Square Layer Normalization", 2019)."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32),
                           logical_axes=('norm',))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...]).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding (RoFormer, Su et al. 2021), rotate-half layout.

  Args:
    x: [B, T, N, H] with H even.
    positions: [T] integer positions.
    base: wavelength base (10000 in the paper).
  """
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {h}.')
  freqs = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))
  angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]  # [T, H/2]
  sin = jnp.sin(angles)[None, :, None, :]  # [1, T, 1, H/2]
  cos = jnp.cos(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """How a layer attends: registry names and options (see `registry`).

  Attributes:
    variant: a name in `registry.available_variants()`, or a token-mixer layer in
      `registry.available_layers()` (used in place of the attention layer).
    mask: a mask spec string (`registry.make_mask`), e.g. 'sliding_window:64,0',
      'none'; plain 'causal' is stored as causal=True with no mask.
    causal: also apply k <= q (decoders); ANDed with `mask`.
    sinks: learnable per-head sink logits (StreamingLLM / gpt-oss).
    logits_soft_cap: tanh soft-cap of the logits (Gemma 2), or None.
    implementation: `attention.dot_product_attention` implementation, None = best.
    rope_base: RoPE base, or None for no rotary embedding.
    grid: the token grid (e.g. (14, 14)) for grid layers; the ViT fills it in.
  """
  variant: str = 'softmax'
  mask: str = registry.NO_MASK
  causal: bool = False
  sinks: bool = False
  logits_soft_cap: float | None = None
  implementation: str | None = None
  rope_base: float | None = 10000.0
  grid: tuple[int, ...] | None = None

  def __post_init__(self):
    registry.check_name(self.variant)  # A variant or a layer.
    if registry.parse_mask_spec(self.mask) == ('causal', (), {}):
      # The plain causal mask is causality itself: every variant and layer takes
      # it as `causal` (a linear-time variant has no mask argument to give it to).
      object.__setattr__(self, 'mask', registry.NO_MASK)
      object.__setattr__(self, 'causal', True)
    if registry.is_layer(self.variant) and (
        self.mask != registry.NO_MASK or self.sinks or
        self.logits_soft_cap is not None):
      raise ValueError(
          f'attention layer {self.variant!r} takes no mask, sinks or '
          f'logits_soft_cap (got mask={self.mask!r}, sinks={self.sinks}, '
          f'logits_soft_cap={self.logits_soft_cap}).')
    registry.parse_mask_spec(self.mask)
    if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
      raise ValueError(
          f'logits_soft_cap must be positive or None, got {self.logits_soft_cap}.')
    if self.rope_base is not None and not self.rope_base > 0:
      raise ValueError(f'rope_base must be positive or None, got {self.rope_base}.')


class Attention(nnx.Module):
  """Multi-head self-attention layer: projections around a registry variant."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, spec: AttentionSpec, *, rngs: nnx.Rngs):
    if num_heads % num_kv_heads:
      raise ValueError(
          f'num_heads ({num_heads}) must be a multiple of num_kv_heads '
          f'({num_kv_heads}).')
    self.spec = spec
    self.num_heads = num_heads
    self.wq = init_param(rngs, (dim, num_heads, head_dim), dim,
                     ('embed', 'heads', 'head_dim'))
    self.wk = init_param(rngs, (dim, num_kv_heads, head_dim), dim,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wv = init_param(rngs, (dim, num_kv_heads, head_dim), dim,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wo = init_param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))
    self.sinks = (nnx.Param(jnp.zeros((num_heads,), jnp.float32),
                            logical_axes=('heads',)) if spec.sinks else None)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, registry.AuxLosses]:
    """x [B, T, D] -> ([B, T, D], aux losses of the variant)."""
    dtype = x.dtype
    t = x.shape[1]
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dtype))  # [B, T, N, H]
    k = jnp.einsum('btd,dkh->btkh', x, self.wk[...].astype(dtype))  # [B, T, K, H]
    v = jnp.einsum('btd,dkh->btkh', x, self.wv[...].astype(dtype))  # [B, T, K, H]
    if self.spec.rope_base is not None:
      positions = jnp.arange(t)
      q = rope(q, positions, self.spec.rope_base)
      k = rope(k, positions, self.spec.rope_base)
    mask = registry.make_mask(self.spec.mask, q_len=t, kv_len=t,
                              num_heads=self.num_heads)
    out, aux = registry.get_variant(self.spec.variant)(
        q, k, v, mask=mask, is_causal=self.spec.causal,
        sinks=None if self.sinks is None else self.sinks[...],
        logits_soft_cap=self.spec.logits_soft_cap,
        implementation=self.spec.implementation)  # [B, T, N, H]
    y = jnp.einsum('btnh,nhd->btd', out.astype(dtype),
                   self.wo[...].astype(dtype))  # [B, T, D]
    return y, aux


class TokenMixer(nnx.Module):
  """A registry layer (`registry.make_layer`) in the attention slot: x -> (y, aux).

  A layer returns y [B, T, D], or (y, aux_losses) when it trains a side objective (a
  router's distillation or balance loss); the trainer adds the aux losses to its loss.
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int,
               spec: AttentionSpec, *, rngs: nnx.Rngs, layer_index: int = 0):
    self.layer = registry.make_layer(spec.variant, dim, num_heads, head_dim,
                                     grid=spec.grid, causal=spec.causal,
                                     rngs=rngs, layer_index=layer_index,
                                     implementation=spec.implementation)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, registry.AuxLosses]:
    out = self.layer(x)
    if isinstance(out, tuple):
      if len(out) != 2 or not isinstance(out[1], dict):
        raise TypeError(
            f'attention layer {type(self.layer).__name__} must return y or (y, '
            f'aux_losses: dict), got a tuple of {len(out)}.')
      return out
    return out, {}


class SwiGLU(nnx.Module):
  """Gated MLP with SiLU ("GLU Variants Improve Transformer", Shazeer 2020)."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.w_gate = init_param(rngs, (dim, hidden), dim, ('embed', 'mlp'))
    self.w_up = init_param(rngs, (dim, hidden), dim, ('embed', 'mlp'))
    self.w_down = init_param(rngs, (hidden, dim), hidden, ('mlp', 'embed'))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    gate = jnp.einsum('btd,df->btf', x, self.w_gate[...].astype(dtype))  # [B, T, F]
    up = jnp.einsum('btd,df->btf', x, self.w_up[...].astype(dtype))  # [B, T, F]
    return jnp.einsum('btf,fd->btd', jax.nn.silu(gate) * up,
                      self.w_down[...].astype(dtype))  # [B, T, D]


class Block(nnx.Module):
  """Pre-norm transformer block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, mlp_dim: int, spec: AttentionSpec,
               dropout_rate: float, *, rngs: nnx.Rngs, layer_index: int = 0):
    self.attn_norm = RMSNorm(dim)
    if registry.is_layer(spec.variant):
      self.attn = TokenMixer(dim, num_heads, head_dim, spec, rngs=rngs,
                             layer_index=layer_index)
    else:
      self.attn = Attention(dim, num_heads, num_kv_heads, head_dim, spec,
                            rngs=rngs)
    self.mlp_norm = RMSNorm(dim)
    self.mlp = SwiGLU(dim, mlp_dim, rngs=rngs)
    self.dropout_rate = dropout_rate

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None
              ) -> tuple[jax.Array, registry.AuxLosses]:
    y, aux = self.attn(self.attn_norm(x))
    x = x + dropout(y, self.dropout_rate, fold_key(dropout_key, 0))
    y = self.mlp(self.mlp_norm(x))
    x = x + dropout(y, self.dropout_rate, fold_key(dropout_key, 1))
    return x, aux


class Encoder(nnx.Module):
  """A stack of `Block`s with a final RMSNorm; sums the blocks' aux losses."""

  def __init__(self, depth: int, dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, mlp_dim: int, spec: AttentionSpec,
               dropout_rate: float, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        Block(dim, num_heads, num_kv_heads, head_dim, mlp_dim, spec,
              dropout_rate, rngs=rngs, layer_index=i) for i in range(depth)])
    self.norm = RMSNorm(dim)

  def __call__(self, x: jax.Array, dropout_key: jax.Array | None
              ) -> tuple[jax.Array, registry.AuxLosses]:
    total: registry.AuxLosses = {}
    for i, block in enumerate(self.blocks):
      x, aux = block(x, fold_key(dropout_key, i))
      for name, value in aux.items():
        total[name] = total.get(name, 0.0) + value
    return self.norm(x), total
