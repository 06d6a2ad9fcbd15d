"""Every registered attention variant and layer trains: the loss of the smallest model
built by the training binary's `build_model` falls over a few optimizer steps.

The names come from the registry at collection time, so variants and layers added
later are covered without touching this file. Causal-capable names train the decoder
LM; layers that need a token grid (non-causal) train the ViT. The objective is the
trainer's: cross-entropy plus the sum of the auxiliary losses the layers return.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attention import registry
from experiments import models
from experiments.configs import lm as lm_configs
from experiments.configs import vit as vit_configs

# The smallest model: dim 8, depth 1, 2 heads of 4; T = 16 tokens (LM) or a 4 x 4
# patch grid (ViT, 8 x 8 images, patch 2); batch 2; 6 Adam steps.
_SIZES = dict(dim=8, depth=1, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=8)
_STEPS = 6
_VOCAB, _CLASSES, _IMAGE = 8, 4, (8, 8, 1)
# Fast XLA:CPU compilation: the test's cost is compiling one training scan per name.
_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                     'xla_llvm_disable_expensive_passes': True}

_RNG = np.random.default_rng(0)
_TOKENS = jnp.asarray(_RNG.integers(0, _VOCAB, (2, 17)))
_IMAGES = jnp.asarray(_RNG.normal(size=(2,) + _IMAGE), jnp.float32)
_LABELS = jnp.asarray(_RNG.integers(0, _CLASSES, (2,)))


# The dense oracle compiles fastest at these sizes (the blocked kernels' loops and
# custom VJPs dominate a 16-token model's compile); 'flow' has no naive form.
_NO_REFERENCE = ('flow',)


def _implementation(name):
  return None if name in _NO_REFERENCE else 'reference'


def _lm(name):
  config = lm_configs.get_config('tiny')
  config.model.update(_SIZES)
  config.model.attention.variant = name
  config.model.attention.implementation = _implementation(name)
  return models.build_model(config.model, vocab_size=_VOCAB)


def _vit(name):
  config = vit_configs.get_config('tiny')
  config.model.update(dict(_SIZES, patch_size=2))
  config.model.attention.variant = name
  config.model.attention.implementation = _implementation(name)
  return models.build_model(config.model, num_classes=_CLASSES,
                            image_shape=_IMAGE)


def _objective(logits, aux, labels):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce + sum(aux.values(), jnp.zeros((), jnp.float32))


def _lm_loss(model):
  logits, aux = model(_TOKENS[:, :-1])
  return _objective(logits, aux, _TOKENS[:, 1:])


def _vit_loss(model):
  logits, aux = model(_IMAGES)
  return _objective(logits, aux, _LABELS)


def _model_and_loss(name):
  """The LM when the name runs causally without a grid, else the ViT."""
  try:
    return 'lm', _lm(name), _lm_loss
  except ValueError as lm_error:  # Non-causal / grid-only layers refuse the LM.
    try:
      return 'vit', _vit(name), _vit_loss
    except ValueError as vit_error:
      raise ValueError(f'{name!r} builds neither the LM ({lm_error}) nor the ViT '
                       f'({vit_error}).') from vit_error


def _train_losses(model, batch_loss):
  """Losses of `_STEPS` Adam steps, all in one compiled scan."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(3e-2)

  def run(params):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(
          lambda p: batch_loss(nnx.merge(graphdef, p, rest)))(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss
    return jax.lax.scan(step, (params, opt.init(params)), None,
                        length=_STEPS)[1]

  compiled = jax.jit(run).lower(params).compile(_COMPILER_OPTIONS)
  return np.asarray(compiled(params))


@pytest.mark.parametrize(
    'name', sorted(registry.available_variants() + registry.available_layers()))
def test_every_registered_name_trains(name):
  kind, model, batch_loss = _model_and_loss(name)
  if registry.is_layer(name):  # The block's attention slot holds the layer.
    assert isinstance(model.encoder.blocks[0].attn, models.layers.TokenMixer)
  else:
    assert model.encoder.blocks[0].attn.spec.variant == name
  losses = _train_losses(model, batch_loss)
  assert losses.shape == (_STEPS,) and np.all(np.isfinite(losses)), (kind, losses)
  assert losses[-1] < 0.9 * losses[0], (kind, losses)
