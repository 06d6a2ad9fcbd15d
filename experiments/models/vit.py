"""Vision Transformer encoder for image classification.

"An Image is Worth 16x16 Words" (Dosovitskiy et al. 2021): non-overlapping patches are
linearly embedded, a learned position embedding is added, pre-norm transformer blocks
(here with SwiGLU MLPs and RMSNorm) encode them, the tokens are mean-pooled ("global
average pooling", as in the paper's GAP variant) and a linear head classifies.
Attention variant and mask come from an `AttentionSpec` (bidirectional by default).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.models import layers
from experiments.models import registry


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] in row-major patch order."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


class ViT(nnx.Module):
  """images [B, H, W, C] float -> (logits [B, classes] float32, aux losses)."""

  def __init__(self, *, image_size: int, patch_size: int, channels: int,
               num_classes: int, dim: int, depth: int, num_heads: int,
               num_kv_heads: int, head_dim: int, mlp_dim: int,
               attention: layers.AttentionSpec, dropout_rate: float = 0.0,
               dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
    for name, value in (('image_size', image_size), ('patch_size', patch_size),
                        ('channels', channels), ('num_classes', num_classes),
                        ('dim', dim), ('depth', depth)):
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
    if image_size % patch_size:
      raise ValueError(
          f'image_size ({image_size}) must be a multiple of patch_size '
          f'({patch_size}).')
    self.image_size, self.patch_size, self.channels = (image_size, patch_size,
                                                       channels)
    self.dtype = jnp.dtype(dtype)
    num_patches = (image_size // patch_size) ** 2
    patch_dim = patch_size * patch_size * channels
    self.patch_embed = layers.init_param(rngs, (patch_dim, dim), patch_dim,
                                     ('patch', 'embed'))
    self.pos_embed = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (num_patches, dim)),
        logical_axes=('seq', 'embed'))
    if attention.grid is None:  # Grid layers (agent, focal, ...) see the patches.
      side = image_size // patch_size
      attention = dataclasses.replace(attention, grid=(side, side))
    self.encoder = layers.Encoder(depth, dim, num_heads, num_kv_heads,
                                  head_dim, mlp_dim, attention, dropout_rate,
                                  rngs=rngs)
    self.head = layers.init_param(rngs, (dim, num_classes), dim,
                              ('embed', 'classes'))

  def __call__(self, images: jax.Array, *,
               dropout_key: jax.Array | None = None
              ) -> tuple[jax.Array, registry.AuxLosses]:
    expected = (self.image_size, self.image_size, self.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f'images must have shape [B, {expected[0]}, {expected[1]}, '
          f'{expected[2]}], got {tuple(images.shape)}.')
    x = patchify(images.astype(self.dtype), self.patch_size)  # [B, P, p*p*C]
    x = jnp.einsum('bpc,cd->bpd', x, self.patch_embed[...].astype(self.dtype))
    x = x + self.pos_embed[...].astype(self.dtype)[None]  # [B, P, D]
    x, aux = self.encoder(x, dropout_key)
    pooled = jnp.mean(x, axis=1)  # [B, D]
    logits = jnp.einsum('bd,dc->bc', pooled, self.head[...].astype(self.dtype))
    return logits.astype(jnp.float32), aux  # [B, classes]
