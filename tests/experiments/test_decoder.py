"""CausalDecoder: forward vs a NumPy float64 decoder, hooks, mesh, trainer import."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from attention import interventions as interventions_lib
from experiments import models
from experiments import sharding
from experiments.models import decoder as decoder_lib
from experiments.models import generation

V = 37


def llama_config(**kw) -> decoder_lib.DecoderConfig:
  base = dict(vocab_size=V, dim=24, depth=2, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=40, norm='rms', norm_eps=1e-5,
              mlp='swiglu', positions='rope', rope_theta=500.0)
  base.update(kw)
  return decoder_lib.DecoderConfig(**base)


def gpt2_config(**kw) -> decoder_lib.DecoderConfig:
  base = dict(vocab_size=V, dim=16, depth=2, num_heads=2, num_kv_heads=2,
              head_dim=8, mlp_dim=32, norm='layer', norm_eps=1e-5,
              mlp='gelu_tanh', positions='learned', max_positions=32,
              qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
              # The dense path compiles fastest; LLAMA covers the blocked one.
              implementation='reference')
  base.update(kw)
  return decoder_lib.DecoderConfig(**base)


def abstract(config) -> decoder_lib.CausalDecoder:
  """The model's structure (shapes, logical axes) without initialising it."""
  return nnx.eval_shape(lambda: decoder_lib.CausalDecoder(config,
                                                          rngs=nnx.Rngs(0)))


def randomized(config, seed=0) -> decoder_lib.CausalDecoder:
  """A model whose every parameter (norms and biases too) is random (NumPy)."""
  model = abstract(config)
  state = nnx.state(model, nnx.Param)
  rng = np.random.default_rng(seed)

  def draw(x):
    if len(x.shape) >= 2:
      value = rng.normal(size=x.shape) / math.sqrt(x.shape[0])
    else:  # Norm scales around 1 (LayerNorm biases and the rest around 0).
      value = 0.3 * rng.normal(size=x.shape)
    return jnp.asarray(value, jnp.float32)

  pure = jax.tree.map(draw, nnx.to_pure_dict(state))
  for block in pure['blocks'].values():
    for norm in ('attn_norm', 'mlp_norm'):
      block[norm]['scale'] = block[norm]['scale'] + 1.0
  if 'final_norm' in pure:
    pure['final_norm']['scale'] = pure['final_norm']['scale'] + 1.0
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


# ----------------------------------------------------------------------------
# The NumPy float64 oracle: the decoder equations written out directly.
# ----------------------------------------------------------------------------


def np_inv_freq(h, theta, scaling):
  out = []
  for i in range(h // 2):
    f = theta ** (-2.0 * i / h)
    kind = None if scaling is None else scaling.get('rope_type')
    if kind == 'linear':
      f /= scaling['factor']
    elif kind == 'llama3':
      old = scaling['original_max_position_embeddings']
      lo, hi = scaling['low_freq_factor'], scaling['high_freq_factor']
      wavelen = 2 * math.pi / f
      if wavelen > old / lo:  # low frequency: interpolated
        f /= scaling['factor']
      elif wavelen >= old / hi:  # medium: smooth blend
        s = (old / wavelen - lo) / (hi - lo)
        f = (1 - s) * f / scaling['factor'] + s * f
    out.append(f)
  return np.array(out)


def np_decoder(c, p, tokens, positions, valid):
  """Logits [B, T, V] float64 of the decoder with parameters p (pure dict)."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  b, t = tokens.shape
  n, kh, h = c.num_heads, c.num_kv_heads, c.head_dim

  def norm(x, q):
    if c.norm == 'rms':
      return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * q[
          'scale']
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + c.norm_eps) * q['scale'] + q['bias']

  def rope(x):  # x [B, T, heads, H]
    inv = np_inv_freq(h, c.rope_theta, c.rope_scaling)
    out = np.empty_like(x)
    for bi in range(b):
      for ti in range(t):
        for i in range(h // 2):
          a = positions[bi, ti] * inv[i]
          x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + h // 2]
          out[bi, ti, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
          out[bi, ti, :, i + h // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out

  x = p['embed']['embedding'][tokens]
  if c.positions == 'learned':
    x = x + p['pos_embed']['embedding'][positions]
  for li in range(c.depth):
    blk = p['blocks'][li]
    a = blk['attn']
    y = norm(x, blk['attn_norm'])
    q = np.einsum('btd,dnh->btnh', y, a['wq'])
    k = np.einsum('btd,dkh->btkh', y, a['wk'])
    v = np.einsum('btd,dkh->btkh', y, a['wv'])
    if c.qkv_bias:
      q, k, v = q + a['bq'], k + a['bk'], v + a['bv']
    if c.qk_norm:
      q, k = norm(q, a['q_norm']), norm(k, a['k_norm'])
    if c.positions == 'rope':
      q, k = rope(q), rope(k)
    out = np.zeros((b, t, n, h))
    window = c.sliding_window if (c.window_layers is None or
                                  li in c.window_layers) else None
    for bi in range(b):
      for ni in range(n):
        ki = ni // (n // kh)
        for i in range(t):
          seen = [j for j in range(t) if valid[bi, i] and valid[bi, j] and
                  positions[bi, j] <= positions[bi, i] and
                  (window is None or positions[bi, i] - positions[bi, j] < window)]
          if not seen:
            continue
          s = np.array([q[bi, i, ni] @ k[bi, j, ki] for j in seen]) / math.sqrt(h)
          w = np.exp(s - s.max())
          w /= w.sum()
          out[bi, i, ni] = sum(wj * v[bi, j, ki] for wj, j in zip(w, seen))
    z = np.einsum('btnh,nhd->btd', out, a['wo'])
    if c.out_bias:
      z = z + a['bo']
    x = x + z
    y = norm(x, blk['mlp_norm'])
    m = blk['mlp']
    if c.mlp == 'swiglu':
      g = y @ m['w_gate'] + (m['b_gate'] if c.mlp_bias else 0)
      u = y @ m['w_up'] + (m['b_up'] if c.mlp_bias else 0)
      z = (g / (1 + np.exp(-g)) * u) @ m['w_down'] + (
          m['b_down'] if c.mlp_bias else 0)
    else:
      f = y @ m['w_in'] + m['b_in']
      f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
      z = f @ m['w_out'] + m['b_out']
    x = x + z
  if c.final_norm:
    x = norm(x, p['final_norm'])
  head = p['embed']['embedding'].T if c.tie_embeddings else p['lm_head']
  return x @ head


def params_of(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def tokens_for(b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V, jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, mask, interventions, record):
  out = nnx.merge(graphdef, state)(
      tokens, positions=positions, attention_mask=mask,
      interventions=interventions, record=record)
  return out.logits, out.records


def forward(model, tokens, positions=None, mask=None, *, interventions=(),
            record=None, records=False):
  """The jitted forward's logits (and records)."""
  g, st = nnx.split(model)
  logits, recs = _forward(g, st, tokens, positions, mask, tuple(interventions),
                          record)
  return (logits, recs) if records else logits


LLAMA_CASES = {
    'gqa_window_llama3_bias_mlpbias': dict(
        sliding_window=3, qkv_bias=True, mlp_bias=True,
        rope_scaling={'rope_type': 'llama3', 'factor': 4.0,
                      'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                      'original_max_position_embeddings': 16}),
    'qk_norm_window_on_layer_1': dict(sliding_window=2, window_layers=(1,),
                                      qk_norm=True),
    'mqa_linear_tied_nofinal': dict(
        num_kv_heads=1, tie_embeddings=True, final_norm=False,
        rope_scaling={'type': 'linear', 'factor': 2.0}),
}
# The Llama-like model most tests share (GQA, window, biases, llama3 RoPE), so the
# tests of both files reuse one set of compiled functions.
LLAMA = llama_config(**LLAMA_CASES['gqa_window_llama3_bias_mlpbias'])
B, T = 4, 8
# Rows: plain, left-padded by 3, fully padded, one real token.
MASK = np.array([[1] * 8, [0] * 3 + [1] * 5, [0] * 8, [0] * 7 + [1]], bool)
# As MASK but every row has a real token (generate's prompts).
GEN_MASK = np.array([[1] * 8, [0] * 3 + [1] * 5, [1] * 8, [0] * 7 + [1]], bool)


def left_pad_positions(mask):
  """cumsum(mask) - 1, pads at 1 (as Hugging Face's generate), in NumPy."""
  return np.where(mask, np.cumsum(mask, axis=1) - 1, 1).astype(np.int32)


@pytest.mark.parametrize('case', sorted(LLAMA_CASES))
def test_llama_forward_matches_numpy(case):
  c = llama_config(**LLAMA_CASES[case])
  model = randomized(c)
  tokens = tokens_for(B, T)
  positions = left_pad_positions(MASK)
  positions[0] += 5  # Any positions, not only arange.
  got = forward(model, tokens, jnp.asarray(positions), jnp.asarray(MASK))
  want = np_decoder(c, params_of(model), np.asarray(tokens), positions, MASK)
  assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if c.window_layers is not None:  # The oracle sees the per-layer window.
    every = dataclasses.replace(c, window_layers=None)
    assert np.abs(np_decoder(every, params_of(model), np.asarray(tokens),
                             positions, MASK) - want).max() > 1e-2
    # The hook point (recorded layers) keeps each layer's own window.
    logits, recs = forward(model, tokens, jnp.asarray(positions),
                           jnp.asarray(MASK), record=interventions_lib.Record(
                               probs=True), records=True)
    np.testing.assert_allclose(logits, got, rtol=1e-5, atol=1e-5)
    far = np.asarray(positions)[:, :, None] - np.asarray(positions)[:, None] >= 2
    assert (np.asarray(recs[1]['probs'])[np.broadcast_to(
        far[:, None], recs[1]['probs'].shape)] == 0).all()
    assert np.asarray(recs[0]['probs'])[np.broadcast_to(
        far[:, None] & MASK[:, None, :, None] & MASK[:, None, None], recs[0][
            'probs'].shape)].min() > 0
  if c == LLAMA:
    # Default positions / no mask: the fast causal (+ sliding-window Mask) path.
    want = np_decoder(c, params_of(model), np.asarray(tokens),
                      np.broadcast_to(np.arange(T), (B, T)), np.ones((B, T), bool))
    np.testing.assert_allclose(forward(model, tokens), want, rtol=1e-4,
                               atol=1e-4)


def test_gpt2_forward_matches_numpy():
  c = gpt2_config()
  model = randomized(c)
  tokens = tokens_for(B, T, seed=3)
  positions = np.broadcast_to(np.arange(T), (B, T)).astype(np.int32)
  got = forward(model, tokens, None, jnp.asarray(MASK))  # Default positions.
  want = np_decoder(c, params_of(model), np.asarray(tokens), positions, MASK)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  params = params_of(model)
  assert 'lm_head' not in params
  assert params['pos_embed']['embedding'].shape == (32, 16)
  assert set(params['blocks'][0]['attn']) == {'wq', 'wk', 'wv', 'wo', 'bq', 'bk',
                                              'bv', 'bo'}
  assert set(params['blocks'][0]['mlp']) == {'w_in', 'b_in', 'w_out', 'b_out'}
  assert set(params['blocks'][0]['attn_norm']) == {'scale', 'bias'}


def test_parameter_tree_and_logical_axes():
  state = nnx.state(abstract(llama_config(qkv_bias=True)), nnx.Param)
  shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
  assert shapes['embed'] == {'embedding': (V, 24)}
  assert shapes['lm_head'] == (24, V)
  assert shapes['final_norm'] == {'scale': (24,)}
  assert shapes['blocks'][1] == {
      'attn_norm': {'scale': (24,)}, 'mlp_norm': {'scale': (24,)},
      'attn': {'wq': (24, 4, 8), 'wk': (24, 2, 8), 'wv': (24, 2, 8),
               'wo': (4, 8, 24), 'bq': (4, 8), 'bk': (2, 8), 'bv': (2, 8)},
      'mlp': {'w_gate': (24, 40), 'w_up': (24, 40), 'w_down': (40, 24)}}
  axes = jax.tree.leaves(jax.tree.map(
      lambda v: v.get_metadata()['logical_axes'], state,
      is_leaf=lambda x: isinstance(x, nnx.Variable)), is_leaf=lambda x: isinstance(
          x, tuple))
  assert len(axes) == len(jax.tree.leaves(state))
  assert set(a for t in axes for a in t) <= {
      'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm'}


def test_rope_inv_freq_matches_numpy():
  for scaling in (None, {'rope_type': 'default'},
                  {'rope_type': 'linear', 'factor': 3.0},
                  {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                   'high_freq_factor': 4.0,
                   'original_max_position_embeddings': 64}):
    checked = decoder_lib.DecoderConfig(
        vocab_size=4, dim=4, depth=1, num_heads=1, num_kv_heads=1, head_dim=32,
        mlp_dim=4, rope_scaling=scaling).rope_scaling
    got = decoder_lib.rope_inv_freq(32, 10000.0, checked)
    np.testing.assert_allclose(got, np_inv_freq(32, 10000.0, checked),
                               rtol=1e-6)


def test_gradients_match_finite_differences():
  model = randomized(dataclasses.replace(LLAMA, implementation='reference'))
  tokens = tokens_for(B, T)
  positions = jnp.asarray(left_pad_positions(MASK))
  g, st = nnx.split(model)
  rng = np.random.default_rng(1)
  direction = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), st)

  def loss(state):
    logits = nnx.merge(g, state)(tokens, positions=positions,
                                 attention_mask=jnp.asarray(MASK)).logits
    return jnp.sum(jnp.sin(logits) * MASK[..., None])

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  _, grads = value_and_grad(st)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(grads))
  dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grads),
                                            jax.tree.leaves(direction)))
  eps = 1e-3
  shift = lambda s: jax.tree.map(lambda x, d: x + s * eps * d, st, direction)
  numeric = (value_and_grad(shift(1.0))[0] -
             value_and_grad(shift(-1.0))[0]) / (2 * eps)
  np.testing.assert_allclose(dot, numeric, rtol=2e-2)


# ----------------------------------------------------------------------------
# Hook points: interventions and records.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ZeroHeads(interventions_lib.Intervention):
  """Test intervention: the selected heads' outputs become zero."""
  stage = 'output'
  blocked = 'output'

  def edit_output(self, out, site):
    return self.select_heads(jnp.zeros_like(out), out, axis=2)


def test_records_and_identity_hooks_leave_logits_unchanged():
  model = randomized(LLAMA)
  tokens = tokens_for(B, T)
  positions = left_pad_positions(MASK)
  args = (model, tokens, jnp.asarray(positions), jnp.asarray(MASK))
  fast = forward(*args)
  record = interventions_lib.Record(probs=True, logits=True, head_outputs=True,
                                    hidden=True)
  logits, records = forward(*args, record=record, records=True)
  np.testing.assert_allclose(logits, fast, rtol=1e-5, atol=1e-5)
  assert sorted(records) == [0, 1]
  visible = np.asarray(decoder_lib.visibility(
      jnp.asarray(positions), jnp.asarray(positions), jnp.asarray(MASK), 3,
      jnp.asarray(MASK)))
  for layer in (0, 1):
    r = records[layer]
    assert set(r) == {'probs', 'logits', 'head_outputs', 'hidden'}
    assert r['probs'].shape == r['logits'].shape == (B, 4, T, T)
    assert r['head_outputs'].shape == (B, T, 4, 8)
    assert r['hidden'].shape == (B, T, 24)
    probs = np.asarray(r['probs'])
    np.testing.assert_array_equal(probs[~np.broadcast_to(visible, probs.shape)],
                                  0.0)
    np.testing.assert_allclose(probs.sum(-1), np.broadcast_to(
        MASK[:, None, :], (B, 4, T)).astype(float), atol=1e-5)
    assert np.isfinite(np.asarray(r['head_outputs'])).all()
  # The layer-0 input is the token embedding.
  np.testing.assert_allclose(
      records[0]['hidden'], params_of(model)['embed']['embedding'][tokens],
      rtol=1e-6)
  # An identity intervention on layer 1 and a record of layer 1 only.
  logits, records = forward(
      *args, interventions=[interventions_lib.Intervention(layers=(1,))],
      record=interventions_lib.Record(layers=(1,), head_outputs=True),
      records=True)
  np.testing.assert_allclose(logits, fast, rtol=1e-5, atol=1e-5)
  assert list(records) == [1] and list(records[1]) == ['head_outputs']


def test_head_output_intervention_equals_zeroed_output_projection():
  model = randomized(LLAMA)
  tokens = tokens_for(B, T, seed=4)
  edited = forward(model, tokens, interventions=[ZeroHeads(layers=(1,),
                                                           heads=(0, 3))])
  params = params_of(model)
  positions = np.broadcast_to(np.arange(T), (B, T))
  want = np_decoder(LLAMA, params, np.asarray(tokens), positions,
                    np.ones((B, T), bool))
  wo = np.array(params['blocks'][1]['attn']['wo'])
  wo[[0, 3]] = 0.0
  params['blocks'][1]['attn']['wo'] = wo
  zeroed = np_decoder(LLAMA, params, np.asarray(tokens), positions,
                      np.ones((B, T), bool))
  np.testing.assert_allclose(edited, zeroed, rtol=1e-4, atol=1e-4)
  assert np.abs(zeroed - want).max() > 1e-2  # The edit changes the logits.


@functools.partial(jax.jit, static_argnums=0)
def _decode_with_record(graphdef, state, tokens, cache, token, record):
  model = nnx.merge(graphdef, state)
  cache = model(tokens, cache=cache).cache
  return decoder_lib.decode_step(model, token, cache, record=record)


def test_records_while_decoding():
  model = randomized(LLAMA)
  g, st = nnx.split(model)
  out = _decode_with_record(g, st, tokens_for(B, 3), model.init_cache(B, 6),
                            jnp.arange(B), interventions_lib.Record(probs=True))
  probs = out.records[0]['probs']
  assert probs.shape == (B, 4, 1, 6) and out.logits.shape == (B, 1, V)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probs[..., 0], 0.0)  # Outside the window of 3.
  np.testing.assert_array_equal(probs[..., 4:], 0.0)  # Unwritten slots.
  assert (probs[..., 1:4] > 0).all()
  assert int(out.cache.length) == 4


# ----------------------------------------------------------------------------
# Sharding: 8 simulated devices equal 1.
# ----------------------------------------------------------------------------


def test_eight_devices_equal_one(cpu_devices):
  tokens = tokens_for(B, T, seed=11)
  positions = jnp.asarray(left_pad_positions(MASK))
  mask = jnp.asarray(MASK)
  single = randomized(LLAMA)
  want_logits = forward(single, tokens, positions, mask)
  want_tokens, want_steps = generation.generate(
      single, tokens, jnp.asarray(GEN_MASK), max_new_tokens=4,
      return_logits=True)

  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}, cpu_devices)
  model = decoder_lib.place_on_mesh(randomized(LLAMA), mesh)
  assert decoder_lib.param_mesh(model) is mesh
  assert model.blocks[0].attn.wq[...].sharding.spec == P('fsdp', 'tensor', None)
  assert model.embed.embedding[...].sharding.spec == P(None, 'fsdp')  # V odd.
  batch = sharding.batch_sharding(mesh, 2)
  args = jax.device_put((tokens, positions, mask), batch)
  np.testing.assert_allclose(forward(model, *args), want_logits, rtol=1e-5,
                             atol=1e-5)
  cache = model.init_cache(B, 12)  # Placed on the parameters' mesh.
  kv_spec = P(('data', 'fsdp'), None, 'tensor', None)
  assert cache.k[0].sharding.spec == kv_spec
  assert cache.kv_valid.sharding.spec == P(('data', 'fsdp'), None)
  # Cached decoding on the mesh (prefill + 3 decode steps inside generate).
  got_tokens, got_steps = generation.generate(
      model, args[0], jax.device_put(jnp.asarray(GEN_MASK), batch),
      max_new_tokens=4, return_logits=True)
  np.testing.assert_array_equal(got_tokens, want_tokens)
  np.testing.assert_allclose(got_steps, want_steps, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# From the trainer's DecoderLM.
# ----------------------------------------------------------------------------


def trainer_model_config(**attention):
  c = ml_collections.ConfigDict(dict(
      kind='lm', dim=16, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
      mlp_dim=32, dropout_rate=0.0, dtype='float32', patch_size=4,
      attention=dict(variant='softmax', mask='causal', sinks=False,
                     logits_soft_cap=None, implementation='reference',
                     rope_base=10000.0)))
  c.attention.update(attention)
  return c


def test_from_trainer_lm_matches_decoder_lm():
  mask, window = 'sliding_window:2,0', 3  # q - 2 <= k <= q: 3 keys visible.
  config = trainer_model_config(mask=mask)
  lm = nnx.eval_shape(lambda: models.build_model(config, vocab_size=V))
  state = nnx.state(lm)
  rng = np.random.default_rng(3)
  params = jax.tree.map(  # Random, norm scales included.
      lambda x: jnp.asarray(rng.normal(size=x.shape) / math.sqrt(x.shape[0]),
                            jnp.float32), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(lm, state)
  # As restored from a checkpoint: list indices may come back as strs.
  params['encoder']['blocks'] = {str(k): v for k, v in
                                 params['encoder']['blocks'].items()}
  model = decoder_lib.from_trainer_lm(params, config)
  assert model.config.sliding_window == window
  assert model.config.norm_eps == 1e-6 and not model.config.tie_embeddings
  assert decoder_lib.config_from_trainer(trainer_model_config(),
                                         V).sliding_window is None
  tokens = tokens_for(2, 8, seed=6)
  g, st = nnx.split(lm)
  want = jax.jit(lambda st, x: nnx.merge(g, st)(x)[0])(st, tokens)
  # The same operations in the same order (RoPE frequencies included): bitwise.
  np.testing.assert_array_equal(forward(model, tokens), want)


def test_from_trainer_lm_rejects_what_it_cannot_represent():
  params = {'embed': np.zeros((V, 16), np.float32)}
  for attention, match in (
      (dict(variant='linear'), "variant 'linear'"),
      (dict(variant='moh'), "variant 'moh'"),
      (dict(sinks=True), 'sinks'),
      (dict(logits_soft_cap=30.0), 'logits_soft_cap'),
      (dict(mask='chunked_causal:chunk=4'), 'chunked_causal')):
    with pytest.raises(ValueError, match=match):
      decoder_lib.from_trainer_lm(params, trainer_model_config(**attention))
  config = trainer_model_config()
  lm = nnx.eval_shape(lambda: models.build_model(config, vocab_size=V))
  bad = nnx.to_pure_dict(nnx.state(lm))
  bad['head'] = np.zeros((16, V + 1), np.float32)
  with pytest.raises(ValueError, match='do not match the model config'):
    decoder_lib.from_trainer_lm(bad, config, vocab_size=V)
  config.kind = 'vit'
  with pytest.raises(ValueError, match='kind must be "lm"'):
    decoder_lib.from_trainer_lm(params, config)


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
  model = randomized(gpt2_config())
  tokens = tokens_for(2, 4)
  cases = (
      (dict(tokens=tokens.astype(jnp.float32)), r'tokens must be an int array'),
      (dict(tokens=tokens[0]), r'tokens must be an int array \[B, T\]'),
      (dict(tokens=tokens + V), r'tokens must be in \[0, vocab_size=37\)'),
      (dict(positions=jnp.zeros((4,), jnp.int32)),
       r'positions must be an int array of shape \(2, 4\)'),
      (dict(positions=jnp.zeros((2, 4))), 'positions must be an int array'),
      (dict(positions=jnp.full((2, 4), 40, jnp.int32)),
       r'positions must be in \[0, 32\)'),
      (dict(attention_mask=jnp.ones((2, 3), bool)),
       r'attention_mask must be a bool / int array of shape \(2, 4\)'),
      (dict(attention_mask=jnp.full((2, 4), 2)), 'attention_mask must hold 0 / 1'),
      (dict(tokens=tokens_for(1, 33)), 'max_positions=32'),
      (dict(interventions=[interventions_lib.Intervention(layers=(2,))]),
       r'Intervention.layers must be in \[0, 2\)'),
      (dict(interventions=[interventions_lib.Intervention(heads=(2,))]),
       r'Intervention.heads must be in \[0, 2\)'),
      (dict(record=interventions_lib.Record(layers=(5,), probs=True)),
       r'record.layers must be in \[0, 2\)'),
  )
  for kwargs, match in cases:
    kwargs = dict(kwargs)
    x = kwargs.pop('tokens', tokens)
    with pytest.raises(ValueError, match=match):
      model(x, **kwargs)
  with pytest.raises(TypeError, match='cache must be a KVCache'):
    model(tokens, cache={'k': ()})


def test_config_validation():
  cases = (
      (dict(num_heads=3), r'num_heads \(3\) must be a multiple of num_kv_heads'),
      (dict(head_dim=7), 'RoPE needs an even head_dim'),
      (dict(dim=0), 'dim must be a positive int'),
      (dict(depth=2.0), 'depth must be a positive int'),
      (dict(norm='batch'), 'norm must be one of'),
      (dict(mlp='relu'), 'mlp must be one of'),
      (dict(positions='alibi'), 'positions must be one of'),
      (dict(norm_eps=0.0), 'norm_eps must be a positive'),
      (dict(rope_theta=-1.0), 'rope_theta must be a positive'),
      (dict(rope_scaling={'rope_type': 'longrope', 'factor': 2.0}),
       'rope_type must be one of'),
      (dict(rope_scaling={'rope_type': 'yarn', 'factor': 2.0}),
       r"rope_scaling\['original_max_position_embeddings'\]"),
      (dict(rope_scaling={'rope_type': 'yarn', 'factor': 2.0,
                          'original_max_position_embeddings': 8,
                          'beta_fast': -1}), r"rope_scaling\['beta_fast'\]"),
      (dict(rope_scaling={'rope_type': 'linear'}), r"rope_scaling\['factor'\]"),
      (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0,
                          'low_freq_factor': 4.0, 'high_freq_factor': 1.0,
                          'original_max_position_embeddings': 64}),
       'high_freq_factor > low_freq_factor'),
      (dict(sliding_window=0), 'sliding_window must be a positive int'),
      (dict(qkv_bias=1), 'qkv_bias must be a bool'),
      (dict(dtype=jnp.int32), 'dtype must be a float dtype'),
  )
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match):
      llama_config(**kwargs)
  with pytest.raises(TypeError, match='config must be a DecoderConfig'):
    decoder_lib.CausalDecoder({'dim': 4}, rngs=nnx.Rngs(0))
  # Hashable (a static attribute of the NNX graph) even with a rope_scaling dict.
  a = llama_config(rope_scaling={'rope_type': 'linear', 'factor': 2.0})
  b = llama_config(rope_scaling={'type': 'linear', 'factor': 2, 'extra': 1})
  assert a == b and hash(a) == hash(b)
