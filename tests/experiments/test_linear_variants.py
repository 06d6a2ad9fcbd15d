"""The linear family through the model registry: a tiny decoder LM end to end."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import linear
from experiments import models
from experiments.models import layers
from experiments.models import registry


def _lm(variant, implementation=None):
  spec = layers.AttentionSpec(variant=variant, implementation=implementation)
  return models.DecoderLM(vocab_size=11, dim=16, depth=2, num_heads=4,
                          num_kv_heads=2, head_dim=4, mlp_dim=32,
                          attention=spec, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('variant', ['linear', 'lightning', 'retention'])
def test_tiny_decoder_forward_and_gradient_via_registry(variant):
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 9)))
  changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % 11)

  @jax.jit
  def run(tokens):
    model = _lm(variant)
    ref_model = _lm(variant, 'reference')  # Same init: the naive form.
    logits, aux = model(tokens)
    ref_logits, _ = ref_model(tokens)
    loss = lambda m: jnp.mean(m(tokens[:2])[0] ** 2)
    grads = nnx.grad(loss)(model)
    return logits, aux, ref_logits, jax.tree.leaves(grads)

  logits, aux, ref_logits, grads = run(jnp.concatenate([tokens, changed]))
  assert logits.shape == (4, 9, 11) and aux == {}
  np.testing.assert_allclose(logits, ref_logits, rtol=2e-4, atol=2e-5)
  # Causal: changing tokens 5.. leaves the logits of positions < 5 unchanged.
  np.testing.assert_allclose(logits[:2, :5], logits[2:, :5], rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(logits[:2, 5:], logits[2:, 5:])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_registry_variant_matches_library_and_rejects_softmax_options():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 6, 4, 4)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 4)), jnp.float32)
          for _ in range(2))
  opts = dict(mask=None, sinks=None, logits_soft_cap=None, implementation=None)
  out, _ = registry.get_variant('linear')(q, k, v, is_causal=False, **opts)
  np.testing.assert_allclose(
      out, linear.naive_linear_attention(q, k, v, causal=False)[0], rtol=1e-5,
      atol=1e-6)
  with pytest.raises(ValueError, match="'lightning' is causal only"):
    registry.get_variant('lightning')(q, k, v, is_causal=False, **opts)
  with pytest.raises(ValueError, match="'retention' takes no sinks"):
    registry.get_variant('retention')(q, k, v, is_causal=True,
                                      **dict(opts, sinks=jnp.zeros(4)))
  with pytest.raises(ValueError, match='implementation must be one of'):
    registry.get_variant('linear')(q, k, v, is_causal=True,
                                   **dict(opts, implementation='cudnn'))


@pytest.mark.parametrize('variant', ['linear', 'flow', 'gla'])
def test_lm_default_causal_mask_spec_works_with_maskless_variants(variant):
  """The LM preset's default mask 'causal' is causality, not a mask argument."""
  from experiments.configs import lm as lm_configs  # pylint: disable=g-import-not-at-top
  import experiments.models as models_lib  # pylint: disable=g-import-not-at-top
  config = lm_configs.get_config('tiny')
  assert config.model.attention.mask == 'causal'
  config.model.attention.variant = variant
  model = models_lib.build_model(config.model, vocab_size=11)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 9)))
  logits, _ = model(tokens)
  # Causal: changing a later token leaves earlier logits unchanged.
  logits2, _ = model(tokens.at[:, 6].set((tokens[:, 6] + 1) % 11))
  np.testing.assert_allclose(logits[:, :6], logits2[:, :6], atol=1e-5)
  assert not np.allclose(logits[:, 6:], logits2[:, 6:])
