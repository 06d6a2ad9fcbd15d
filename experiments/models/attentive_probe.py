"""Efficient probing of a frozen ViT of this codebase.

"Attention, Please! Revisiting Attentive Probing for Masked Image Modeling" (Psomas
et al., 2025): the backbone stays frozen; only the EP head
(`attention.variants.attentive_probing.EfficientProbe`) trains, on the patch tokens.

* `vit_patch_tokens(vit, images)`: the encoder's output tokens [B, P, D] (after its
  final norm, before the ViT's mean pooling and head), under stop_gradient.
* `train_probe(vit, probe, batches, ...)`: optax training of the probe's parameters
  only (cross-entropy); the ViT's parameters are only read.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attention.variants import attentive_probing
from experiments.models import vit as vit_lib


def vit_patch_tokens(vit: vit_lib.ViT, images: jax.Array) -> jax.Array:
  """[B, H, W, C] -> the frozen ViT's final patch tokens [B, P, D] (no gradient)."""
  if not isinstance(vit, vit_lib.ViT):
    raise TypeError(f'vit must be an experiments.models.vit.ViT, got '
                    f'{type(vit).__name__}.')
  expected = (vit.image_size, vit.image_size, vit.channels)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f'images must have shape [B, {expected[0]}, {expected[1]}, '
                     f'{expected[2]}], got {tuple(images.shape)}.')
  x = vit_lib.patchify(images.astype(vit.dtype), vit.patch_size)  # [B, P, p*p*C]
  x = jnp.einsum('bpc,cd->bpd', x, vit.patch_embed[...].astype(vit.dtype))
  x = x + vit.pos_embed[...].astype(vit.dtype)[None]  # [B, P, D]
  x, _ = vit.encoder(x, None)
  return jax.lax.stop_gradient(x)


def train_probe(vit: vit_lib.ViT, probe: attentive_probing.EfficientProbe,
                batches: Callable[[int], tuple[jax.Array, jax.Array]], *,
                steps: int, learning_rate: float = 1e-2
               ) -> tuple[attentive_probing.EfficientProbe, np.ndarray]:
  """Trains `probe` on `vit`'s frozen patch tokens; returns (trained probe, losses).

  Args:
    vit: a (trained) ViT; its parameters are read, never updated.
    probe: the EP head, dim = the ViT's width.
    batches: step -> (images [B, H, W, C], integer labels [B]).
    steps: optimisation steps (Adam, `learning_rate`).
  """
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}.')
  if not isinstance(probe, attentive_probing.EfficientProbe):
    raise TypeError(f'probe must be an EfficientProbe, got {type(probe).__name__}.')
  vit_graph, vit_state = nnx.split(vit)
  graphdef, params = nnx.split(probe)
  opt = optax.adam(learning_rate)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, vit_state, images, labels):
    tokens = vit_patch_tokens(nnx.merge(vit_graph, vit_state), images)

    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(steps):
    images, labels = batches(i)
    params, opt_state, loss = step(params, opt_state, vit_state, images, labels)
    losses.append(float(loss))
  return nnx.merge(graphdef, params), np.asarray(losses)


__all__ = ['train_probe', 'vit_patch_tokens']
