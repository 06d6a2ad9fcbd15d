"""DCAL around a ViT of this codebase: SA, GLCA and PWCA branches.

"Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification" (Zhu et al., CVPR 2022); the attention functions live in
`attention.variants.dual_cross_attention`.

`DCALViT(vit, num_classes, r_ratio)` holds the ViT (its L self-attention blocks, the
SA branch) and one extra GLCA block with its own weights and classifier (the paper
uses M = 1 GLCA block, not sharing weights with SA):

* SA: the ViT's forward (checked equal to `vit(images)` in the tests), recording
  each block's attention probabilities (dense; ViT token counts are small).
* GLCA: the rollout over the L blocks scores the tokens (mean over query rows, as the
  ViT is mean pooled: no CLS token), the top R = ceil(r_ratio T) tokens (10% for
  FGVC in the paper) query all tokens of the last block's output x_L: x_g =
  x_L[top R] + GLCA(norm(x_L)), then x_g + MLP(norm(x_g)), mean-pooled into its own
  classifier.
* PWCA (training only; shares the SA weights): every block runs again with the
  queries of image b attending the concatenated keys / values of image b and of its
  partner image (the partner's keys / values come from its SA-branch tokens at the
  same depth), read by the ViT's head.

`dcal_loss` is the paper's uncertainty-weighted sum of the three cross-entropies;
inference (`predict`) adds the SA and GLCA class probabilities, as the paper does.
The ViT's blocks must be softmax attention layers (`layers.Attention`, no mask).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from attention.variants import dual_cross_attention as dca
from experiments.models import layers
from experiments.models import vit as vit_lib


def _check_vit(vit) -> None:
  if not isinstance(vit, vit_lib.ViT):
    raise TypeError(f'vit must be an experiments.models.vit.ViT, got '
                    f'{type(vit).__name__}.')
  for i, block in enumerate(vit.encoder.blocks):
    attn = block.attn
    if (not isinstance(attn, layers.Attention) or attn.spec.variant != 'softmax'
        or attn.spec.mask != 'none' or attn.spec.causal or attn.sinks is not None
        or attn.spec.logits_soft_cap is not None):
      raise ValueError(f'vit block {i} must be plain softmax attention (variant '
                       f"'softmax', no mask / sinks / soft-cap), got "
                       f'{type(attn).__name__} {getattr(attn, "spec", None)}.')


def _qkv(attn: layers.Attention, h: jax.Array):
  dt = h.dtype
  n, kh = attn.wq.shape[1], attn.wk.shape[1]
  q = jnp.einsum('btd,dnh->btnh', h, attn.wq[...].astype(dt))  # [B, T, N, H]
  k = jnp.einsum('btd,dkh->btkh', h, attn.wk[...].astype(dt))  # [B, T, K, H]
  v = jnp.einsum('btd,dkh->btkh', h, attn.wv[...].astype(dt))  # [B, T, K, H]
  if attn.spec.rope_base is not None:
    pos = jnp.arange(h.shape[1])
    q = layers.rope(q, pos, attn.spec.rope_base)
    k = layers.rope(k, pos, attn.spec.rope_base)
  return q, jnp.repeat(k, n // kh, axis=2), jnp.repeat(v, n // kh, axis=2)


def _softmax_attention(q, k, v):
  """Dense attention with its probabilities: ([B, T, N, H], [B, N, T, S])."""
  logits = jnp.einsum('btnh,bsnh->bnts', q.astype(jnp.float32),
                      k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
  p = jax.nn.softmax(logits, axis=-1)  # [B, N, T, S]
  return jnp.einsum('bnts,bsnh->btnh', p, v.astype(jnp.float32)).astype(q.dtype), p


def _out(attn: layers.Attention, o: jax.Array) -> jax.Array:
  return jnp.einsum('btnh,nhd->btd', o.astype(o.dtype),
                    attn.wo[...].astype(o.dtype))  # [B, T, D]


def _embed(vit: vit_lib.ViT, images: jax.Array) -> jax.Array:
  x = vit_lib.patchify(images.astype(vit.dtype), vit.patch_size)
  x = jnp.einsum('bpc,cd->bpd', x, vit.patch_embed[...].astype(vit.dtype))
  return x + vit.pos_embed[...].astype(vit.dtype)[None]  # [B, P, D]


def _head(vit: vit_lib.ViT, x: jax.Array) -> jax.Array:
  pooled = jnp.mean(vit.encoder.norm(x), axis=1)  # [B, D]
  return jnp.einsum('bd,dc->bc', pooled,
                    vit.head[...].astype(x.dtype)).astype(jnp.float32)


class DCALViT(nnx.Module):
  """A ViT with DCAL's GLCA block and PWCA branch (see the module docstring)."""

  def __init__(self, vit: vit_lib.ViT, num_classes: int, *, r_ratio: float = 0.1,
               rngs: nnx.Rngs):
    _check_vit(vit)
    if not isinstance(r_ratio, (int, float)) or not 0 < r_ratio <= 1:
      raise ValueError(f'r_ratio must be in (0, 1], got {r_ratio!r}.')
    self.vit, self.r_ratio = vit, float(r_ratio)
    a0 = vit.encoder.blocks[0].attn
    dim, n, h = a0.wq.shape
    spec = layers.AttentionSpec(rope_base=a0.spec.rope_base)
    self.glca_norm = layers.RMSNorm(dim)
    self.glca = layers.Attention(dim, n, n, h, spec, rngs=rngs)
    self.glca_mlp_norm = layers.RMSNorm(dim)
    self.glca_mlp = layers.SwiGLU(dim, vit.encoder.blocks[0].mlp.w_up.shape[1],
                                  rngs=rngs)
    self.glca_final_norm = layers.RMSNorm(dim)
    self.glca_head = layers.init_param(rngs, (dim, num_classes), dim,
                                       ('embed', 'classes'))
    self.log_vars = nnx.Param(jnp.zeros((3,), jnp.float32))

  def self_attention(self, images: jax.Array):
    """SA branch: (logits [B, C], per-block inputs [L+1 x [B, T, D]], maps)."""
    x = _embed(self.vit, images)
    states, maps = [x], []
    for block in self.vit.encoder.blocks:
      o, p = _softmax_attention(*_qkv(block.attn, block.attn_norm(x)))
      x = x + _out(block.attn, o)
      x = x + block.mlp(block.mlp_norm(x))
      states.append(x)
      maps.append(p)
    return _head(self.vit, x), states, maps

  def global_local(self, x_last: jax.Array, maps) -> jax.Array:
    """GLCA branch logits [B, C] from the last SA tokens and the SA maps."""
    t = x_last.shape[1]
    r = max(1, math.ceil(self.r_ratio * t))
    idx = dca.select_top_r(dca.token_scores(dca.attention_rollout(maps)), r)
    q, k, v = _qkv(self.glca, self.glca_norm(x_last))
    o = dca.global_local_cross_attention(q, k, v, idx)  # [B, R, N, H]
    xg = jnp.take_along_axis(x_last, idx[:, :, None], axis=1) + _out(self.glca, o)
    xg = xg + self.glca_mlp(self.glca_mlp_norm(xg))
    pooled = jnp.mean(self.glca_final_norm(xg), axis=1)
    return jnp.einsum('bd,dc->bc', pooled,
                      self.glca_head[...].astype(xg.dtype)).astype(jnp.float32)

  def pair_wise(self, states, partner: jax.Array) -> jax.Array:
    """PWCA branch logits [B, C]; image b's distractor is image partner[b]."""
    x = states[0]
    for i, block in enumerate(self.vit.encoder.blocks):
      q, k, v = _qkv(block.attn, block.attn_norm(x))
      _, k2, v2 = _qkv(block.attn, block.attn_norm(states[i][partner]))
      o = dca.pairwise_cross_attention(q, k, v, k2, v2)
      x = x + _out(block.attn, o)
      x = x + block.mlp(block.mlp_norm(x))
    return _head(self.vit, x)

  def __call__(self, images: jax.Array, partner: jax.Array | None = None
              ) -> dict[str, jax.Array]:
    """{'sa', 'glca'} logits, plus 'pwca' when `partner` [B] (training) is given."""
    sa, states, maps = self.self_attention(images)
    out = {'sa': sa, 'glca': self.global_local(states[-1], maps)}
    if partner is not None:
      if partner.shape != (images.shape[0],):
        raise ValueError(f'partner must have shape [B] = ({images.shape[0]},), got '
                         f'{tuple(partner.shape)}.')
      out['pwca'] = self.pair_wise(states, partner)
    return out

  def predict(self, images: jax.Array) -> jax.Array:
    """Inference: softmax(SA) + softmax(GLCA) class scores [B, C]."""
    out = self(images)
    return jax.nn.softmax(out['sa']) + jax.nn.softmax(out['glca'])


def dcal_loss(model: DCALViT, images: jax.Array, labels: jax.Array,
              partner: jax.Array) -> jax.Array:
  """The uncertainty-weighted sum of the SA, GLCA and PWCA cross-entropies (the
  PWCA branch is trained with image 1's label)."""
  out = model(images, partner)
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  losses = jnp.stack([ce(out['sa']), ce(out['glca']), ce(out['pwca'])])
  return dca.uncertainty_weighted_loss(losses, model.log_vars[...])
