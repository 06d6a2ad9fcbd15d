"""InLine / Agent / Flow / LightNet / FocalNet / GLA through the model registry: tiny
ViT and decoder forward + gradient, and the registry variants equal the library."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.linear import flowformer
from attention.linear import inline_attention
from attention.linear import lightnet
from experiments import models
from experiments.models import layers
from experiments.models import registry


def _vit(variant):
  return models.ViT(image_size=8, patch_size=2, channels=1, num_classes=3,
                    dim=8, depth=1, num_heads=2, num_kv_heads=2, head_dim=4,
                    mlp_dim=8, attention=layers.AttentionSpec(
                        variant=variant, rope_base=None), rngs=nnx.Rngs(0))


def _lm(variant):
  return models.DecoderLM(vocab_size=7, dim=8, depth=1, num_heads=2,
                          num_kv_heads=2, head_dim=4, mlp_dim=8,
                          attention=layers.AttentionSpec(variant=variant),
                          rngs=nnx.Rngs(0))


VIT = ['inline_local', 'agent', 'focal_modulation', 'lightnet_layer', 'inline',
       'flow', 'lightnet']
LM = ['lightnet_layer', 'gla', 'inline', 'flow', 'lightnet']


def test_tiny_vit_and_decoder_forward_and_gradient():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)),
                       jnp.float32)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 7, (2, 6)))
  changed = tokens.at[:, 4:].set((tokens[:, 4:] + 1) % 7)

  @jax.jit
  def run(images, tokens):
    out = {}
    for name in VIT:
      model = _vit(name)
      logits, aux = model(images)
      grads = nnx.grad(lambda m: jnp.mean(m(images)[0] ** 2))(model)
      out[f'vit:{name}'] = (logits, aux, jax.tree.leaves(grads))
    for name in LM:
      model = _lm(name)
      logits, aux = model(tokens)
      grads = nnx.grad(lambda m: jnp.mean(m(tokens[:2])[0] ** 2))(model)
      out[f'lm:{name}'] = (logits, aux, jax.tree.leaves(grads))
    return out

  out = run(images, jnp.concatenate([tokens, changed]))
  for key, (logits, aux, grads) in out.items():
    assert aux == {}, key
    assert np.all(np.isfinite(logits)), key
    assert all(np.all(np.isfinite(g)) for g in grads), key
    assert sum(np.any(g != 0) for g in grads) >= len(grads) - 1, key
    if key.startswith('lm:'):  # Causal: positions < 4 ignore tokens 4...
      np.testing.assert_allclose(logits[:2, :4], logits[2:, :4], atol=1e-5,
                                 err_msg=key)
      assert not np.allclose(logits[:2, 4:], logits[2:, 4:]), key


@pytest.mark.parametrize('causal', [False, True])
def test_registry_variants_equal_the_library(causal):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4))) for _ in range(3))
    opts = dict(mask=None, sinks=None, logits_soft_cap=None, is_causal=causal)
    pairs = [
        ('inline', None, inline_attention.inline_attention(q, k, v,
                                                           causal=causal)),
        ('inline', 'reference', inline_attention.naive_inline_attention(
            q, k, v, causal=causal)),
        ('flow', None, flowformer.flow_attention(q, k, v, causal=causal)),
        ('lightnet', None, lightnet.lightnet_attention(
            jax.nn.silu(q), k, v, causal=causal)[0]),
        ('lightnet', 'reference', lightnet.naive_lightnet_attention(
            jax.nn.silu(q), k, v, causal=causal)),
    ]
    for name, impl, want in pairs:
      got, aux = registry.get_variant(name)(q, k, v, implementation=impl, **opts)
      np.testing.assert_allclose(got, want, atol=1e-12, err_msg=name)
      assert aux == {}


def test_bad_names_and_options():
  assert {'inline', 'flow', 'lightnet'} <= set(registry.available_variants())
  assert {'agent', 'focal_modulation', 'gla', 'inline_local',
          'lightnet_layer'} <= set(registry.available_layers())
  with pytest.raises(ValueError, match='variant must be one of .* or a layer'):
    layers.AttentionSpec(variant='agnet')
  with pytest.raises(ValueError, match='takes no mask'):
    layers.AttentionSpec(variant='agent', mask='sliding_window:4,0')
  # Plain 'causal' is causality (causal=True), which agent attention refuses.
  assert layers.AttentionSpec(variant='agent', mask='causal').causal
  with pytest.raises(ValueError, match='non-causal'):
    nnx.eval_shape(lambda: _lm('agent'))
  with pytest.raises(ValueError, match='causal only'):
    nnx.eval_shape(lambda: _vit('gla'))
  with pytest.raises(ValueError, match='needs the token grid'):
    registry.make_layer('focal_modulation', 8, 2, 4, grid=None, causal=False,
                        rngs=nnx.Rngs(0))
  q = jnp.ones((1, 4, 2, 4))
  opts = dict(mask=None, sinks=None, logits_soft_cap=None, is_causal=False)
  with pytest.raises(ValueError, match='implementation must be one of'):
    registry.get_variant('flow')(q, q, q, implementation='reference', **opts)
  with pytest.raises(ValueError, match='takes no sinks'):
    registry.get_variant('inline')(q, q, q, implementation=None,
                                   **{**opts, 'sinks': jnp.zeros(2)})
  with pytest.raises(TypeError, match='factory must be callable'):
    registry.register_layer('x', 3)


class _AuxLayer(nnx.Module):
  """A toy layer with a side objective: y = w x, aux = {'toy': sum(w^2)}."""

  def __init__(self, dim, *, rngs):
    del rngs
    self.w = nnx.Param(jnp.full((dim,), 0.5, jnp.float32))

  def __call__(self, x):
    return x * self.w[...], {'toy': jnp.sum(self.w[...] ** 2)}


def test_layer_aux_losses_reach_the_model_and_bad_returns_raise(monkeypatch):
  # Registered for this test only (other tests iterate over the registry).
  monkeypatch.setitem(registry._LAYERS, 'toy_aux',  # pylint: disable=protected-access
                      lambda d, n, h, *, grid, causal, rngs: _AuxLayer(d, rngs=rngs))
  model = models.DecoderLM(vocab_size=7, dim=8, depth=2, num_heads=2,
                           num_kv_heads=2, head_dim=4, mlp_dim=8,
                           attention=layers.AttentionSpec(variant='toy_aux'),
                           rngs=nnx.Rngs(0))
  _, aux = model(jnp.zeros((1, 4), jnp.int32))
  # Two layers, each 8 * 0.25: summed over layers as the trainer's aux term.
  np.testing.assert_allclose(sum(jnp.sum(v) for v in aux.values()), 4.0, rtol=1e-6)
  monkeypatch.setitem(registry._LAYERS, 'toy_bad',  # pylint: disable=protected-access
                      lambda d, n, h, *, grid, causal, rngs: (lambda x: (x, x, x)))
  bad = layers.TokenMixer(8, 2, 4, layers.AttentionSpec(variant='toy_bad'),
                          rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r'must return y or \(y, aux_losses'):
    bad(jnp.zeros((1, 4, 8)))


def test_layers_take_the_models_implementation():
  spec = layers.AttentionSpec(variant='moh', causal=True, implementation='reference')
  mixer = layers.TokenMixer(16, 4, 4, spec, rngs=nnx.Rngs(0))
  assert mixer.layer.implementation == 'reference'
  spec = layers.AttentionSpec(variant='moh', causal=True)
  assert layers.TokenMixer(16, 4, 4, spec, rngs=nnx.Rngs(0)).layer.implementation is None
