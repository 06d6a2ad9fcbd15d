"""CausalDecoder: forward vs a NumPy float64 decoder, trainer import, mesh, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from experiments import sharding
from experiments.models import decoder as decoder_lib
from experiments.models import layers
from experiments.models import lm as lm_lib

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
              qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)
  base.update(kw)
  return decoder_lib.DecoderConfig(**base)


def randomized(config, seed=0) -> decoder_lib.CausalDecoder:
  """A model whose every parameter (norms and biases too) is random."""
  model = decoder_lib.CausalDecoder(config, rngs=nnx.Rngs(seed))
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_pure_dict(state)
  leaves, tree = jax.tree.flatten(flat)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  new = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.replace_by_pure_dict(state, jax.tree.unflatten(tree, new))
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
    if c.positions == 'rope':
      q, k = rope(q), rope(k)
    out = np.zeros((b, t, n, h))
    for bi in range(b):
      for ni in range(n):
        ki = ni // (n // kh)
        for i in range(t):
          seen = [j for j in range(t) if valid[bi, j] and
                  positions[bi, j] <= positions[bi, i] and
                  (c.sliding_window is None or
                   positions[bi, i] - positions[bi, j] < c.sliding_window)]
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


LLAMA_CASES = {
    'gqa_window_llama3_bias_mlpbias': dict(
        sliding_window=3, qkv_bias=True, mlp_bias=True,
        rope_scaling={'rope_type': 'llama3', 'factor': 4.0,
                      'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                      'original_max_position_embeddings': 16}),
    'mqa_linear_tied_nofinal': dict(
        num_kv_heads=1, tie_embeddings=True, final_norm=False,
        rope_scaling={'type': 'linear', 'factor': 2.0}),
}


@pytest.mark.parametrize('case', sorted(LLAMA_CASES))
def test_llama_forward_matches_numpy(case):
  c = llama_config(**LLAMA_CASES[case])
  model = randomized(c)
  tokens = tokens_for(3, 9)
  # Row 0 plain, row 1 left-padded (HF generate positions), row 2 fully padded.
  mask = np.ones((3, 9), bool)
  mask[1, :3] = False
  mask[2] = False
  positions = np.stack([np.arange(9), np.maximum(np.cumsum(mask[1]) - 1, 0),
                        np.arange(9) + 5]).astype(np.int32)
  out = model(tokens, positions=jnp.asarray(positions),
              attention_mask=jnp.asarray(mask))
  want = np_decoder(c, params_of(model), np.asarray(tokens), positions, mask)
  assert out.logits.dtype == jnp.float32 and out.cache is None
  assert out.records == {}
  np.testing.assert_allclose(out.logits, want, rtol=1e-4, atol=1e-4)
  # Default positions / no mask: the fast causal path.
  plain = model(tokens)
  want = np_decoder(c, params_of(model), np.asarray(tokens),
                    np.broadcast_to(np.arange(9), (3, 9)), np.ones((3, 9), bool))
  np.testing.assert_allclose(plain.logits, want, rtol=1e-4, atol=1e-4)


def test_gpt2_forward_matches_numpy():
  c = gpt2_config()
  model = randomized(c)
  tokens = tokens_for(2, 7, seed=3)
  mask = np.ones((2, 7), bool)
  mask[1, :2] = False
  positions = np.broadcast_to(np.arange(7), (2, 7)).astype(np.int32)
  out = model(tokens, attention_mask=jnp.asarray(mask))
  want = np_decoder(c, params_of(model), np.asarray(tokens), positions, mask)
  np.testing.assert_allclose(out.logits, want, rtol=1e-4, atol=1e-4)
  assert 'lm_head' not in params_of(model)
  assert params_of(model)['pos_embed']['embedding'].shape == (32, 16)


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
