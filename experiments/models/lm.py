"""Decoder-only language model (pre-norm, RoPE, SwiGLU, RMSNorm; LLaMA-style).

Architecture as in "LLaMA: Open and Efficient Foundation Language Models" (Touvron et
al. 2023): token embedding, `depth` pre-norm blocks with rotary attention and a SwiGLU
MLP, a final RMSNorm and an untied output projection. The attention variant, mask and
number of kv heads come from an `AttentionSpec`; the model is always causal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models import layers
from experiments.models import registry


class DecoderLM(nnx.Module):
  """tokens [B, T] int -> (logits [B, T, V] float32, aux losses)."""

  def __init__(self, *, vocab_size: int, dim: int, depth: int, num_heads: int,
               num_kv_heads: int, head_dim: int, mlp_dim: int,
               attention: layers.AttentionSpec, dropout_rate: float = 0.0,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    for name, value in (('vocab_size', vocab_size), ('dim', dim),
                        ('depth', depth), ('num_heads', num_heads),
                        ('num_kv_heads', num_kv_heads),
                        ('head_dim', head_dim), ('mlp_dim', mlp_dim)):
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
    self.dtype = jnp.dtype(dtype)
    self.embed = nnx.Param(
        jax.random.normal(rngs.params(), (vocab_size, dim), jnp.float32),
        logical_axes=('vocab', 'embed'))
    self.encoder = layers.Encoder(
        depth, dim, num_heads, num_kv_heads, head_dim, mlp_dim,
        dataclasses.replace(attention, causal=True), dropout_rate, rngs=rngs)
    self.head = layers.init_param(rngs, (dim, vocab_size), dim,
                              ('embed', 'vocab'))

  def __call__(self, tokens: jax.Array, *,
               dropout_key: jax.Array | None = None
              ) -> tuple[jax.Array, registry.AuxLosses]:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(
          f'tokens must be an int array [B, T], got {tokens.dtype} '
          f'{tuple(tokens.shape)}.')
    x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)  # [B, T, D]
    x, aux = self.encoder(x, dropout_key)
    logits = jnp.einsum('btd,dv->btv', x, self.head[...].astype(self.dtype))
    return logits.astype(jnp.float32), aux  # [B, T, V]
