"""SeerAttention gates distilled from a frozen `DecoderLM` of this codebase.

"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024)
trains only the AttnGates, one per layer, to match the block-pooled attention map of
the frozen model. Here:

* `decoder_lm_qk(model, tokens)`: per layer (pre-RoPE q, k, post-RoPE q, k) of a
  trained `DecoderLM` whose layers are `layers.Attention` (softmax-family variants).
* `distill_decoder_lm(model, batches, ...)`: builds the gates and trains them with
  `attention.routing.train_attn_gates` (the model's parameters are only read).
* `decoder_lm_sparse_logits(model, gates, tokens, top_k=)`: the model's forward with
  each layer's attention restricted to the blocks its gate picks (row top-k).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention.routing import seer_attention
from experiments.models import layers
from experiments.models import lm


def _check_model(model: Any) -> None:
  if not isinstance(model, lm.DecoderLM):
    raise TypeError(f'model must be a DecoderLM, got {type(model).__name__}.')
  for i, block in enumerate(model.encoder.blocks):
    if not isinstance(block.attn, layers.Attention):
      raise ValueError(f'model layer {i} must be a softmax attention layer '
                       f'(layers.Attention), got {type(block.attn).__name__}.')


def _projections(attn: layers.Attention, h: jax.Array):
  dtype = h.dtype
  q = jnp.einsum('btd,dnh->btnh', h, attn.wq[...].astype(dtype))  # [B, T, N, H]
  k = jnp.einsum('btd,dkh->btkh', h, attn.wk[...].astype(dtype))  # [B, T, K, H]
  v = jnp.einsum('btd,dkh->btkh', h, attn.wv[...].astype(dtype))  # [B, T, K, H]
  if attn.spec.rope_base is None:
    return q, k, v, q, k
  pos = jnp.arange(h.shape[1])
  return (q, k, v, layers.rope(q, pos, attn.spec.rope_base),
          layers.rope(k, pos, attn.spec.rope_base))


def decoder_lm_qk(model: lm.DecoderLM, tokens: jax.Array
                 ) -> list[seer_attention.LayerQK]:
  """Per layer (q, k, q_rope, k_rope) of the frozen model on tokens [B, T]
  (stop_gradient'ed; the layers run exactly as in `model(tokens)`)."""
  _check_model(model)
  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)  # [B, T, D]
  out = []
  for block in model.encoder.blocks:
    q, k, _, q_rope, k_rope = _projections(block.attn, block.attn_norm(x))
    out.append(tuple(jax.lax.stop_gradient(a) for a in (q, k, q_rope, k_rope)))
    x, _ = block(x, None)
  return out


def make_gates(model: lm.DecoderLM, *, block_size: int, gate_dim: int | None = None,
               rope_base: float | None = None, seed: int = 0
              ) -> list[seer_attention.AttnGate]:
  """One AttnGate per layer of `model` (gate_dim default: min(128, head_dim))."""
  _check_model(model)
  rngs = nnx.Rngs(seed)
  gates = []
  for block in model.encoder.blocks:
    _, n, h = block.attn.wq.shape
    kh = block.attn.wk.shape[1]
    gates.append(seer_attention.AttnGate(
        n, kh, h, block_size=block_size, gate_dim=gate_dim or min(128, h),
        rope_base=rope_base, rngs=rngs))
  return gates


def distill_decoder_lm(model: lm.DecoderLM, batches: Callable[[int], jax.Array], *,
                       block_size: int, num_steps: int, learning_rate: float = 1e-3,
                       gate_dim: int | None = None, rope_base: float | None = None,
                       skip_fraction: float = 0.25, seed: int = 0
                      ) -> tuple[list[seer_attention.AttnGate], np.ndarray]:
  """Trains one AttnGate per layer on the frozen model; returns (gates, losses).

  batches: step -> tokens [B, T] (T a multiple of block_size).
  """
  gates = make_gates(model, block_size=block_size, gate_dim=gate_dim,
                     rope_base=rope_base, seed=seed)
  graphdef, state = nnx.split(model)
  qk = jax.jit(lambda s, t: decoder_lm_qk(nnx.merge(graphdef, s), t))
  return seer_attention.train_attn_gates(
      gates, lambda i: qk(state, batches(i)), num_steps=num_steps,
      learning_rate=learning_rate, skip_fraction=skip_fraction)


def decoder_lm_sparse_logits(model: lm.DecoderLM,
                             gates: Sequence[seer_attention.AttnGate],
                             tokens: jax.Array, *, top_k: int,
                             implementation: str | None = None) -> jax.Array:
  """logits [B, T, V] of `model` with SeerAttention block-sparse attention: each
  layer attends to its gate's row top-k blocks (own block kept, causal inside)."""
  _check_model(model)
  spec = model.encoder.blocks[0].attn.spec
  if spec.sinks or spec.logits_soft_cap is not None or spec.mask != 'none':
    raise ValueError('model must use plain causal attention (no sinks, soft-cap or '
                     f'mask) for the gated forward, got {spec}.')
  if len(gates) != len(model.encoder.blocks):
    raise ValueError(f'gates must hold one AttnGate per layer '
                     f'({len(model.encoder.blocks)}), got {len(gates)}.')
  x = jnp.take(model.embed[...], tokens, axis=0).astype(model.dtype)  # [B, T, D]
  for block, gate in zip(model.encoder.blocks, gates):
    attn = block.attn
    q, k, v, q_rope, k_rope = _projections(attn, block.attn_norm(x))
    scores = gate(q, k, causal=True)
    out = seer_attention.seer_sparse_attention(
        q_rope, k_rope, v, scores, block_size=gate.block_size, top_k=top_k,
        causal=True, implementation=implementation)  # [B, T, N, H]
    x = x + jnp.einsum('btnh,nhd->btd', out.astype(x.dtype),
                       attn.wo[...].astype(x.dtype))  # [B, T, D]
    x = x + block.mlp(block.mlp_norm(x))
  x = model.encoder.norm(x)
  logits = jnp.einsum('btd,dv->btv', x, model.head[...].astype(x.dtype))
  return logits.astype(jnp.float32)  # [B, T, V]
