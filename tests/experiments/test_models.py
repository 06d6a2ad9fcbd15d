"""Tests of experiments.models: registry, layers against float64 NumPy oracles."""

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import masks
from attention import registry as attention_registry
from experiments import models
from experiments.models import layers
from experiments.models import registry
from experiments.models import vit as vit_lib


def _jit_build_apply(build, *args, **kwargs):
  """Builds the module and applies it inside one jit (one compile, no eager ops).

  Returns (outputs, module) with the module's parameters set to the built values.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(build))

  @jax.jit
  def run(*a):
    module = build()
    return module(*a, **kwargs), nnx.state(module)
  out, state = run(*args)
  return out, nnx.merge(graphdef, state)


def _np_attention(x, wq, wk, wv, wo, *, causal, sinks=None, cap=None,
                  rope_base=None, visible=None):
  """Float64 NumPy oracle of `layers.Attention` (naive loops over heads)."""
  x = np.asarray(x, np.float64)
  q = np.einsum('btd,dnh->btnh', x, wq)
  k = np.einsum('btd,dkh->btkh', x, wk)
  v = np.einsum('btd,dkh->btkh', x, wv)
  b, t, n, h = q.shape
  kh = k.shape[2]
  if rope_base is not None:
    def rot(z):
      freqs = rope_base ** (-np.arange(h // 2) / (h // 2))
      ang = np.arange(t)[:, None] * freqs[None]
      c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
      z1, z2 = z[..., :h // 2], z[..., h // 2:]
      return np.concatenate([z1 * c - z2 * s, z2 * c + z1 * s], -1)
    q, k = rot(q), rot(k)
  out = np.zeros((b, t, n, h))
  for head in range(n):
    kv = head // (n // kh)
    logits = np.einsum('bth,bsh->bts', q[:, :, head], k[:, :, kv]) / np.sqrt(h)
    if cap is not None:
      logits = cap * np.tanh(logits / cap)
    allowed = np.ones((t, t), bool)
    if causal:
      allowed &= np.tril(np.ones((t, t), bool))
    if visible is not None:
      allowed &= visible
    logits = np.where(allowed[None], logits, -np.inf)
    m = np.maximum(logits.max(-1, keepdims=True), -1e300)
    if sinks is not None:
      m = np.maximum(m, sinks[head])
    e = np.exp(logits - m)
    denom = e.sum(-1, keepdims=True)
    if sinks is not None:
      denom = denom + np.exp(sinks[head] - m)
    probs = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    out[:, :, head] = np.einsum('bts,bsh->bth', probs, v[:, :, kv])
  return np.einsum('btnh,nhd->btd', out, wo)


@hypothesis.settings(max_examples=4)
@hypothesis.given(
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1)]), causal=st.booleans(),
    sinks=st.booleans(), cap=st.sampled_from([None, 2.0]),
    rope=st.sampled_from([None, 100.0]), seed=st.integers(0, 1000))
def test_attention_layer_matches_float64_oracle(heads, causal, sinks, cap,
                                                rope, seed):
  n, kh = heads
  spec = layers.AttentionSpec(causal=causal, sinks=sinks, logits_soft_cap=cap,
                              rope_base=rope, implementation='reference')
  x = jax.random.normal(jax.random.key(seed), (2, 6, 8))

  def build():
    layer = layers.Attention(8, n, kh, 4, spec, rngs=nnx.Rngs(seed))
    if sinks:
      layer.sinks[...] = jnp.linspace(-1.0, 1.0, n)
    return layer
  (y, aux), layer = _jit_build_apply(build, x)
  assert aux == {}
  want = _np_attention(
      x, *(np.asarray(p[...], np.float64)
           for p in (layer.wq, layer.wk, layer.wv, layer.wo)),
      causal=causal, cap=cap, rope_base=rope,
      sinks=None if not sinks else np.asarray(layer.sinks[...], np.float64))
  np.testing.assert_allclose(np.asarray(y), want, rtol=2e-4, atol=2e-5)


def test_attention_layer_mask_from_registry_and_gradients():
  spec = layers.AttentionSpec(mask='causal:offset=-1', rope_base=None,
                              implementation='reference')
  x = jax.random.normal(jax.random.key(1), (1, 5, 8))
  (y, _), layer = _jit_build_apply(
      lambda: layers.Attention(8, 2, 2, 4, spec, rngs=nnx.Rngs(0)), x)
  visible = masks.causal(5, offset=-1).materialize()
  weights = [np.asarray(p[...], np.float64)
             for p in (layer.wq, layer.wk, layer.wv, layer.wo)]
  # Row 0 sees nothing: the oracle gives zeros there, as the API promises.
  want = _np_attention(x, *weights, causal=False, visible=visible)
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5)
  # Gradient w.r.t. the input against central finite differences (float64 oracle).
  graphdef, state = nnx.split(layer)
  g = jax.jit(jax.grad(
      lambda z: jnp.sum(nnx.merge(graphdef, state)(z)[0] ** 2)))(x)
  def oracle(z):
    return np.sum(_np_attention(z, *weights, causal=False,
                                visible=visible) ** 2)
  eps, x64 = 1e-4, np.asarray(x, np.float64)
  for idx in [(0, 1, 3), (0, 4, 0), (0, 0, 7)]:
    d = np.zeros_like(x64)
    d[idx] = eps
    fd = (oracle(x64 + d) - oracle(x64 - d)) / (2 * eps)
    np.testing.assert_allclose(float(g[idx]), fd, rtol=1e-2, atol=1e-3)


def test_rope_is_relative():
  # q_i . k_j after RoPE depends only on i - j (RoFormer's defining property).
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  rope = jax.jit(lambda z: layers.rope(jnp.tile(z, (1, 12, 1, 1)),
                                       jnp.arange(12), 10.0)[0, :, 0])
  rq, rk = np.asarray(rope(q), np.float64), np.asarray(rope(k), np.float64)

  def score(i, j):
    return float(np.dot(rq[i], rk[j]))
  assert score(5, 2) == pytest.approx(score(9, 6), rel=1e-5)
  assert score(3, 3) == pytest.approx(
      float(np.dot(np.asarray(q[0, 0, 0]), np.asarray(k[0, 0, 0]))), rel=1e-5)
  with pytest.raises(ValueError, match='even head_dim'):
    layers.rope(jnp.ones((1, 2, 1, 3)), jnp.arange(2), 10.0)


def _tiny_lm(**spec_kwargs):
  spec = layers.AttentionSpec(implementation='reference', **spec_kwargs)
  return models.DecoderLM(vocab_size=11, dim=16, depth=2, num_heads=4,
                          num_kv_heads=2, head_dim=4, mlp_dim=32,
                          attention=spec, rngs=nnx.Rngs(0))


def test_lm_is_causal_and_validates():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 10)))
  changed = tokens.at[:, 6:].set((tokens[:, 6:] + 1) % 11)
  (logits, aux), model = _jit_build_apply(
      lambda: _tiny_lm(sinks=True, logits_soft_cap=5.0),
      jnp.concatenate([tokens, changed]))
  assert logits.shape == (4, 10, 11) and logits.dtype == jnp.float32
  assert aux == {}
  # Changing tokens 6.. leaves the logits of positions < 6 bit-identical.
  np.testing.assert_array_equal(np.asarray(logits[:2, :6]),
                                np.asarray(logits[2:, :6]))
  assert not np.allclose(logits[:2, 6:], logits[2:, 6:])
  with pytest.raises(ValueError, match='tokens must be an int array'):
    model(jnp.ones((2, 10)))
  with pytest.raises(ValueError, match='num_heads .* multiple of num_kv_heads'):
    nnx.eval_shape(lambda: models.DecoderLM(
        vocab_size=11, dim=16, depth=1, num_heads=3, num_kv_heads=2,
        head_dim=4, mlp_dim=8, attention=layers.AttentionSpec(),
        rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='vocab_size must be a positive int'):
    nnx.eval_shape(lambda: models.DecoderLM(
        vocab_size=0, dim=16, depth=1, num_heads=2, num_kv_heads=2,
        head_dim=4, mlp_dim=8, attention=layers.AttentionSpec(),
        rngs=nnx.Rngs(0)))


def test_lm_dropout_uses_key_and_bfloat16_gives_float32_logits():
  def build():
    return models.DecoderLM(vocab_size=7, dim=8, depth=1, num_heads=2,
                            num_kv_heads=2, head_dim=4, mlp_dim=8,
                            attention=layers.AttentionSpec(),
                            dropout_rate=0.5, dtype=jnp.bfloat16,
                            rngs=nnx.Rngs(0))

  @jax.jit
  def run(tokens):
    m = build()
    return [m(tokens, dropout_key=k)[0] for k in
            (jax.random.key(0), jax.random.key(1), jax.random.key(0), None)]
  a, b, c, d = run(jnp.zeros((1, 4), jnp.int32))
  assert a.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
  assert not np.allclose(a, b) and not np.allclose(a, d)


def test_patchify_matches_loops_and_vit_shapes():
  images = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  got = np.asarray(vit_lib.patchify(jnp.asarray(images), 2))
  want = np.stack([np.stack([images[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(-1)
                             for i in range(2) for j in range(3)])
                   for b in range(2)])
  np.testing.assert_array_equal(got, want)

  def build(image_size=8):
    return models.ViT(image_size=image_size, patch_size=4, channels=1,
                      num_classes=3, dim=16, depth=1, num_heads=2,
                      num_kv_heads=1, head_dim=8, mlp_dim=16,
                      attention=layers.AttentionSpec(rope_base=None),
                      rngs=nnx.Rngs(0))
  (logits, aux), model = _jit_build_apply(build, jnp.ones((5, 8, 8, 1)))
  assert logits.shape == (5, 3) and aux == {}
  with pytest.raises(ValueError, match=r'images must have shape \[B, 8, 8, 1\]'):
    model(jnp.ones((5, 8, 8, 3)))
  with pytest.raises(ValueError, match='multiple of patch_size'):
    nnx.eval_shape(lambda: build(9))


def test_registry_masks_by_name():
  assert 'causal' in registry.available_masks()
  assert 'none' in registry.available_masks()
  assert registry.make_mask('none', q_len=4, kv_len=4, num_heads=2) is None
  m = registry.make_mask('causal', q_len=4, kv_len=6, num_heads=2)
  np.testing.assert_array_equal(m.materialize(),
                                np.arange(6)[None] <= np.arange(4)[:, None])
  m = registry.make_mask('causal:2', q_len=4, kv_len=4, num_heads=2)
  assert m == masks.causal(4, 4, offset=2)
  assert registry.parse_mask_spec('w:3, None, right=0') == ('w', (3, None),
                                                            {'right': 0})
  # Generators of attention.masks resolve by name; sizes come from the model.
  q, k = np.arange(6)[:, None], np.arange(6)[None, :]
  for spec, predicate in (('sliding_window:2,0', (k <= q) & (k >= q - 2)),
                          ('sliding_window:left=1,right=1', abs(q - k) <= 1),
                          ('chunked_causal:3', (q // 3 == k // 3) & (k <= q)),
                          ('prefix_lm:2', (k <= q) | (k < 2))):
    np.testing.assert_array_equal(
        registry.make_mask(spec, q_len=6, kv_len=6, num_heads=2).materialize(),
        predicate, err_msg=spec)
  with pytest.raises(ValueError, match=r"mask must be one of \(.*'causal'"):
    registry.make_mask('sliding_windw:4', q_len=4, kv_len=4, num_heads=2)
  with pytest.raises(ValueError, match='Python literals'):
    registry.make_mask('causal:offset=x+', q_len=4, kv_len=4, num_heads=2)
  with pytest.raises(ValueError, match='set by the model'):
    registry.make_mask('causal:q_len=3', q_len=4, kv_len=4, num_heads=2)
  with pytest.raises(ValueError, match='does not match attention.masks.causal'):
    registry.make_mask('causal:bogus=1', q_len=4, kv_len=4, num_heads=2)
  with pytest.raises(ValueError, match='"none" takes no arguments'):
    registry.make_mask('none:1', q_len=4, kv_len=4, num_heads=2)
  with pytest.raises(ValueError, match='non-empty str'):
    registry.parse_mask_spec('')


def test_registry_variants():
  names = registry.available_variants()
  assert names == tuple(sorted(names))
  assert {'flow', 'inline', 'lightnet', 'lightning', 'linear', 'retention',
          'softmax', 'moba', 'minference'} <= set(names)
  # The library's registry is the one the models resolve names with.
  assert registry.get_variant('moba') is attention_registry.get_variant('moba')
  with pytest.raises(ValueError, match=r"variant must be one of \(.*'flow', "
                     r".*'softmax'.*\), got 'softmaks'"):
    registry.get_variant('softmaks')
  with pytest.raises(ValueError, match='variant must be one of'):
    layers.AttentionSpec(variant='nope')
  with pytest.raises(TypeError, match='fn must be callable'):
    registry.register_variant('x', 3)
  with pytest.raises(ValueError, match='without ":"'):
    registry.register_variant('a:b', registry.softmax_attention)


def test_registered_variant_aux_losses_are_summed_over_layers(monkeypatch):
  # A variant returning an auxiliary loss: the encoder sums it over its blocks.
  def with_aux(query, key, value, **kwargs):
    out, _ = registry.softmax_attention(query, key, value, **kwargs)
    return out, {'balance': jnp.mean(query ** 2)}
  monkeypatch.setitem(registry._VARIANTS, 'with_aux', with_aux)  # pylint: disable=protected-access

  @jax.jit
  def run(tokens):
    model = _tiny_lm(variant='with_aux')
    _, aux = model(tokens)
    x = jnp.take(model.embed[...], tokens, axis=0)
    expected = []
    for block in model.encoder.blocks:
      h = block.attn_norm(x)
      q = layers.rope(jnp.einsum('btd,dnh->btnh', h, block.attn.wq[...]),
                      jnp.arange(4), 10000.0)
      expected.append(jnp.mean(q ** 2))
      x, _ = block(x, None)
    return aux['balance'], expected
  total, per_layer = run(jnp.zeros((1, 4), jnp.int32))
  assert len(per_layer) == 2
  assert float(total) == pytest.approx(sum(map(float, per_layer)), rel=1e-5)


def test_build_model_from_config():
  from experiments.configs import lm, vit  # pylint: disable=g-import-not-at-top
  model = nnx.eval_shape(
      lambda: models.build_model(lm.get_config('tiny').model, vocab_size=9))
  assert isinstance(model, models.DecoderLM)
  assert model.embed.get_value().shape == (9, 32)
  model = nnx.eval_shape(lambda: models.build_model(
      vit.get_config('tiny').model, num_classes=4, image_shape=(16, 16, 1)))
  assert isinstance(model, models.ViT)
  assert model.head.get_value().shape == (32, 4)
  with pytest.raises(ValueError, match='vocab_size is required'):
    models.build_model(lm.get_config('tiny').model)
  with pytest.raises(ValueError, match='square images'):
    models.build_model(vit.get_config('tiny').model, num_classes=4,
                       image_shape=(16, 8, 1))


def test_mask_spec_positional_arguments_never_bind_keyword_only_parameters():
  # sliding_window(q_len, left, right=0, *, kv_len=None, offset=0): 99 must not
  # become `offset` (a window with no visible pair).
  with pytest.raises(ValueError, match=r"sliding_window takes at most 2 "
                     r"positional arguments \(left, right\), got 3.*offset"):
    registry.make_mask('sliding_window:4,0,99', q_len=8, kv_len=8, num_heads=2)
  # By name it still works.
  m = registry.make_mask('sliding_window:4,0,offset=1', q_len=8, kv_len=8,
                         num_heads=2)
  assert m == masks.sliding_window(8, 4, 0, offset=1)


def test_mask_that_hides_a_whole_row_is_rejected_at_model_construction():
  # No visible key in some rows (a causal model's row must see its own token).
  for spec, causal in (('sliding_window:4,0,offset=99', True),
                       ('causal:-3', True),
                       ('sliding_window:0,0,offset=2', True),
                       ('sliding_window:0,0,offset=20', False)):
    with pytest.raises(ValueError, match=r'query row'):
      registry.check_mask_rows(spec, q_len=8, kv_len=8, num_heads=2,
                               causal=causal)
  registry.check_mask_rows('sliding_window:2,0', q_len=8, kv_len=8,
                           num_heads=2, causal=True)
  registry.check_mask_rows('sliding_window:2,2', q_len=8, kv_len=8,
                           num_heads=2, causal=False)
  registry.check_mask_rows('none', q_len=8, kv_len=8, num_heads=2, causal=True)
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  config = lm.get_config('tiny')
  config.model.attention.mask = 'sliding_window:4,0,offset=99'
  with pytest.raises(ValueError, match=r'model.attention.mask.*query row'):
    train_lib.Trainer(config, train_lib.data_lib.make_source(
        config.data, seed=0).info)
