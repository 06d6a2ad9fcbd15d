"""Landmark attention vs float64 loops: the layout, the grouped softmax of the paper,
top-k retrieval by brute force, retrieved attention == the dense-mask oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.variants import landmark_attention as la
from tests import oracles


def _is_lm(j, b):
  return j % (b + 1) == b


def _loops_weights(s, b):
  """W [L, L] of one (batch, head) row block by the paper's definition (loops)."""
  length = s.shape[0]
  w = np.zeros_like(s)
  for i in range(length):
    c = i // (b + 1)
    group = [j for j in range(i + 1)
             if (not _is_lm(j, b) and j // (b + 1) == c) or
             (_is_lm(j, b) and j // (b + 1) < c)]
    z = sum(np.exp(s[i, j]) for j in group)
    p = {j: np.exp(s[i, j]) / z for j in group}
    for j in range(i + 1):
      g = j // (b + 1)
      if _is_lm(j, b):
        continue
      if g == c:
        w[i, j] = p[j]
      else:
        members = [t for t in range(g * (b + 1), g * (b + 1) + b)]
        zg = sum(np.exp(s[i, t]) for t in members)
        w[i, j] = np.exp(s[i, j]) / zg * p[g * (b + 1) + b]
  return w


def test_insert_landmarks_layout():
  tokens = jnp.arange(1, 12)[None]  # T = 11, block 3: landmarks after 3, 6, 9
  out, pos, is_lm = la.insert_landmarks(tokens, block_size=3, landmark_id=99)
  np.testing.assert_array_equal(
      np.asarray(out[0]), [1, 2, 3, 99, 4, 5, 6, 99, 7, 8, 9, 99, 10, 11])
  np.testing.assert_array_equal(pos, np.arange(14))
  np.testing.assert_array_equal(np.flatnonzero(is_lm), [3, 7, 11])
  x = jnp.arange(11.0)[None, :, None]
  xa = la.insert_landmark_vectors(x, jnp.asarray([100.0]), block_size=3,
                                  add_block_mean=True)
  np.testing.assert_allclose(np.asarray(xa[0, [3, 7, 11], 0]), [101, 104, 107])
  np.testing.assert_array_equal(
      np.asarray(la.remove_landmarks(xa, block_size=3)), np.asarray(x))


# 14: a partial last block; 12: ends with a landmark.
@pytest.mark.parametrize('length', [14, 12])
def test_grouped_softmax_equals_the_definition(length):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(1, 2, length, length)) * 2
  with jax.enable_x64(True):
    w = np.asarray(la.grouped_softmax(jnp.asarray(s), block_size=3))
  for n in range(2):
    np.testing.assert_allclose(w[0, n], _loops_weights(s[0, n], 3), atol=1e-12)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)


def test_landmark_attention_fwd_and_grads_equal_loops():
  rng = np.random.default_rng(1)
  b, length, block = 1, 11, 2
  q = rng.normal(size=(b, length, 2, 4))
  k, v = (rng.normal(size=(b, length, 1, 4)) for _ in range(2))  # GQA
  dout = rng.normal(size=(b, length, 2, 4))

  def np_out(q, k, v):
    out = np.zeros((b, length, 2, 4))
    for n in range(2):
      s = q[0, :, n] @ k[0, :, 0].T / 2.0
      out[0, :, n] = _loops_weights(s, block) @ v[0, :, 0]
    return out

  fn = lambda q, k, v: la.landmark_attention(q, k, v, block_size=block)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)

  with jax.enable_x64(True):
    got, grads = jax.jit(fwd_bwd)(q, k, v)
  np.testing.assert_allclose(np.asarray(got), np_out(q, k, v), atol=1e-12)
  eps = 1e-6  # central differences of the loop oracle at a few coordinates
  for arg, g in zip(range(3), grads):
    for idx in [(0, 9, 0, 1), (0, 4, 0, 2)]:
      args = [q.copy(), k.copy(), v.copy()]
      args[arg][idx] += eps
      up = (np_out(*args) * dout).sum()
      args[arg][idx] -= 2 * eps
      down = (np_out(*args) * dout).sum()
      np.testing.assert_allclose(float(g[idx]), (up - down) / (2 * eps),
                                 atol=1e-6)


def _brute_retrieval(q, k, block, top_k, query_block):
  """bool [B, N, nq, nk]: own block + top_k best earlier blocks (loops)."""
  bsz, length, n, h = q.shape
  rep = n // k.shape[2]
  period = block + 1
  nk = -(-length // period)
  nq = -(-length // query_block)
  out = np.zeros((bsz, n, nq, nk), bool)
  for bi in range(bsz):
    for ni in range(n):
      for jq in range(nq):
        rows = range(jq * query_block, min((jq + 1) * query_block, length))
        own = (jq * query_block) // period
        score = {}
        for g in range(own):
          lm = g * period + block
          score[g] = sum(float(q[bi, t, ni] @ k[bi, lm, ni // rep]) for t in rows)
        order = sorted(score, key=lambda g: (-score[g], g))
        for g in [own] + order[:top_k]:
          out[bi, ni, jq, g] = True
  return out


@pytest.mark.parametrize('query_block', [1, 4])
def test_retrieval_selection_equals_brute_force(query_block):
  rng = np.random.default_rng(2)
  block, length = 3, 22  # P = 4, six blocks (the last partial, no landmark)
  q = rng.normal(size=(2, length, 2, 4)).astype(np.float32)
  k = rng.normal(size=(2, length, 1, 4)).astype(np.float32)
  for top_k in (0, 2, 5):
    m = jax.jit(lambda q, k, top_k=top_k: la.landmark_retrieval_mask(
        q, k, block_size=block, top_k=top_k, query_block=query_block))(q, k)
    np.testing.assert_array_equal(np.asarray(m.block_matrix()),
                                  _brute_retrieval(q, k, block, top_k, query_block))


@pytest.mark.parametrize('implementation', ['reference', 'xla'])
def test_retrieved_attention_equals_dense_mask_oracle(implementation):
  rng = np.random.default_rng(3)
  block, length, top_k = 3, 18, 1
  q = rng.normal(size=(1, length, 2, 4))
  k, v = (rng.normal(size=(1, length, 1, 4)) for _ in range(2))
  period = block + 1
  blocks = _brute_retrieval(q, k, block, top_k, 1)  # [B, N, T, nk]
  dense = np.repeat(blocks, period, axis=-1)[..., :length]
  j = np.arange(length)
  dense &= (j[None, :] <= j[:, None]) & (j % period != block)[None, :]
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=dense)
  dout = rng.normal(size=want.shape)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=0.5, mask=dense)
  fn = lambda q, k, v: la.landmark_retrieval_attention(
      q, k, v, block_size=block, top_k=top_k, implementation=implementation)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)

  with jax.enable_x64(True):
    got, grads = jax.jit(fwd_bwd)(q, k, v)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-9)
  for g, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(np.asarray(g), ref[name], atol=1e-9, err_msg=name)


def test_layer_modes_and_bad_input():
  layer = la.LandmarkAttention(8, 2, 4, block_size=3, top_k=1,
                               rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 10, 8)), jnp.float32)
  call = nnx.jit(lambda m, x: m(x))
  y = call(layer, x)
  assert y.shape == (2, 10, 8) and np.all(np.isfinite(np.asarray(y)))
  # Causal: the first block's outputs do not depend on later tokens.
  y2 = call(layer, x.at[:, 5:].set(0.0))
  np.testing.assert_allclose(np.asarray(y2[:, :3]), np.asarray(y[:, :3]), atol=1e-6)
  layer.mode = 'retrieve'
  y3 = call(layer, x)
  assert y3.shape == (2, 10, 8) and np.all(np.isfinite(np.asarray(y3)))
  with pytest.raises(ValueError, match='mode'):
    la.LandmarkAttention(8, 2, 4, block_size=3, mode='eval', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='query_block'):
    la.landmark_block_scores(x[..., None], x[..., None], block_size=3,
                             query_block=3)
  with pytest.raises(ValueError, match='block_size'):
    la.insert_landmarks(jnp.zeros((1, 4), jnp.int32), block_size=0, landmark_id=1)
  with pytest.raises(TypeError, match='tokens'):
    la.insert_landmarks(jnp.zeros((1, 4)), block_size=2, landmark_id=1)
  with pytest.raises(ValueError, match='logits'):
    la.grouped_softmax(jnp.zeros((1, 1, 4, 5)), block_size=2)
  with pytest.raises(ValueError, match='causal'):
    la.registry_layer(8, 2, 4, grid=None, causal=False, rngs=nnx.Rngs(0))


def _train_tiny_lm(variant, steps=5):
  """Losses of `steps` Adam steps of a one-block LM using registry `variant`."""
  import optax
  from experiments import models
  from experiments.configs import lm as lm_configs
  config = lm_configs.get_config('tiny')
  config.model.update(dict(dim=16, depth=1, num_heads=2, num_kv_heads=2,
                           head_dim=8, mlp_dim=32))
  config.model.attention.variant = variant
  model = models.build_model(config.model, vocab_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 33)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(1e-2)
  state = opt.init(params)

  def loss_fn(p):
    logits, aux = nnx.merge(graphdef, p, rest)(tokens[:, :-1])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    return ce.mean() + sum(aux.values())

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return np.asarray(losses)


def test_registry_layer_trains_in_a_tiny_lm():
  from attention import registry
  assert 'landmark' in registry.available_layers()
  losses = _train_tiny_lm('landmark')  # T = 32: two blocks of 16 + landmarks
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
