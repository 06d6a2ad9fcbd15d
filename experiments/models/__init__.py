"""Models for the training binary: decoder LM and ViT, attention by registry name."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from experiments.models import layers
from experiments.models import registry
from experiments.models.lm import DecoderLM
from experiments.models.vit import ViT

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def attention_spec(config: Any) -> layers.AttentionSpec:
  """`layers.AttentionSpec` from a `config.model.attention` ConfigDict."""
  return layers.AttentionSpec(
      variant=config.variant, mask=config.mask, sinks=config.sinks,
      logits_soft_cap=config.logits_soft_cap,
      implementation=config.implementation, rope_base=config.rope_base)


def build_model(config: Any, *, vocab_size: int | None = None,
                num_classes: int | None = None,
                image_shape: tuple[int, int, int] | None = None,
                seed: int = 0) -> DecoderLM | ViT:
  """Builds `config.model` ('lm' or 'vit'); sizes the data decides are passed in.

  Args:
    config: the `model` ConfigDict of an `experiments/configs` file.
    vocab_size: vocabulary size (language models).
    num_classes: number of classes (ViT).
    image_shape: (height, width, channels) (ViT, square images).
    seed: parameter initialisation seed.
  """
  if config.dtype not in DTYPES:
    raise ValueError(
        f'model.dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}.')
  common = dict(
      dim=config.dim, depth=config.depth, num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
      mlp_dim=config.mlp_dim, attention=attention_spec(config.attention),
      dropout_rate=config.dropout_rate, dtype=DTYPES[config.dtype],
      rngs=nnx.Rngs(params=seed))
  if config.kind == 'lm':
    if vocab_size is None:
      raise ValueError('vocab_size is required for model.kind="lm".')
    return DecoderLM(vocab_size=vocab_size, **common)
  if config.kind == 'vit':
    if num_classes is None or image_shape is None:
      raise ValueError('num_classes and image_shape are required for "vit".')
    h, w, c = image_shape
    if h != w:
      raise ValueError(f'ViT needs square images, got {image_shape}.')
    return ViT(image_size=h, patch_size=config.patch_size, channels=c,
               num_classes=num_classes, **common)
  raise ValueError(f'model.kind must be "lm" or "vit", got {config.kind!r}.')


__all__ = ['DecoderLM', 'ViT', 'attention_spec', 'build_model', 'layers',
           'registry']
