"""SeerAttention's AttnGate, target, KL loss and gate distillation vs NumPy float64."""

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import routing
from attention.routing import seer_attention as seer
from experiments import models
from experiments.models import layers
from experiments.models import seer_distill
from tests.attention.routing import _check


def _np_rope(x, pos, base):
  h = x.shape[-1] // 2
  ang = pos[:, None] * base ** (-np.arange(h) / h)  # [T, H/2]
  c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
  x1, x2 = x[..., :h], x[..., h:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _np_gate(q, k, wk, wq, b, rope_base):
  """S = Q~ K~^T / sqrt(d) + block-causal, written from the paper's equations."""
  bsz, t, n, h = q.shape
  nb, g = t // b, n // k.shape[2]
  qb = q.reshape(bsz, nb, b, n, h)
  kb = k.reshape(bsz, nb, b, k.shape[2], h)
  k_pool = np.concatenate([kb.max(2), kb.min(2), kb.mean(2)], -1)  # [B, n, K, 3H]
  q_t = np.stack([qb.mean(2)[:, :, i] @ wq[i] for i in range(n)], 2)  # [B,n,N,D]
  k_t = np.stack([k_pool[:, :, i // g] @ wk[i] for i in range(n)], 2)
  if rope_base is not None:
    pos = np.arange(nb) * b
    q_t, k_t = _np_rope(q_t, pos, rope_base), _np_rope(k_t, pos, rope_base)
  s = np.einsum('bind,bjnd->bnij', q_t, k_t) / np.sqrt(wk.shape[-1])
  return np.where(np.tril(np.ones((nb, nb), bool)), s, -np.inf)


def _np_target(q, k, b):
  """Dense float64 causal attention map, max-pooled over b x b tiles, rows -> 1."""
  bsz, t, n, h = q.shape
  kr = np.repeat(k, n // k.shape[2], axis=2)
  logits = np.einsum('btnh,bsnh->bnts', q, kr) / np.sqrt(h)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  tiles = p.reshape(bsz, n, t // b, b, t // b, b).max(axis=(3, 5))
  return tiles / tiles.sum(-1, keepdims=True)


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape)


@pytest.mark.parametrize('rope_base', [None, 100.0])
def test_gate_scores_equal_the_equations_in_float64(rope_base):
  q, k = _rand(0, 2, 32, 4, 8), _rand(1, 2, 32, 2, 8)  # GQA 4:2
  wk, wq = _rand(2, 4, 24, 6), _rand(3, 4, 8, 6)
  with jax.enable_x64(True):
    got = jax.jit(lambda *a: seer.attn_gate_scores(
        *a[:2], wk=a[2], wq=a[3], block_size=8, rope_base=rope_base))(q, k, wk, wq)
  np.testing.assert_allclose(got, _np_gate(q, k, wk, wq, 8, rope_base), rtol=1e-10,
                             atol=1e-12)


def test_target_equals_dense_pooled_map_and_never_builds_t_by_s():
  q, k = _rand(4, 1, 32, 2, 4), _rand(5, 1, 32, 1, 4)
  with jax.enable_x64(True):
    got = jax.jit(lambda q, k: seer.attention_block_target(q, k, block_size=8))(q, k)
  np.testing.assert_allclose(got, _np_target(q, k, 8), rtol=1e-10, atol=1e-12)
  # Blockwise: at T = S = 512 no intermediate (the lse kernel included, at the
  # 'xla' implementation's tiles) has T * S elements.
  t = 512
  spec = jax.ShapeDtypeStruct((1, t, 1, 8), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda q, k: seer.attention_block_target(
      q, k, block_size=16, implementation='xla'))(spec, spec)

  def sizes(jx):
    for eqn in jx.eqns:
      for v in eqn.outvars:
        yield int(np.prod(getattr(v.aval, 'shape', ())))
      for p in eqn.params.values():
        for sub in p if isinstance(p, (list, tuple)) else [p]:
          inner = getattr(sub, 'jaxpr', sub)
          if hasattr(inner, 'eqns'):
            yield from sizes(inner)

  biggest = max(sizes(jaxpr.jaxpr))
  assert 16 * t <= biggest < t * t  # the per-q-block step is there; T x S is not


def test_kl_loss_equals_numpy_formula():
  g = np.abs(_rand(6, 2, 2, 8, 8)) * np.tril(np.ones((8, 8)))
  g /= g.sum(-1, keepdims=True)
  s = np.where(np.tril(np.ones((8, 8), bool)), _rand(7, 2, 2, 8, 8), -np.inf)
  for skip in (0.25, 0.5, 0.0):
    start = int(np.floor(skip * 8))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide='ignore', invalid='ignore'):
      kl = np.where(g > 0, g * np.log(g / p), 0.0)
    want = kl[:, :, start:].sum(-1).mean()
    got = seer.seer_kl_loss(jnp.asarray(g, jnp.float32), jnp.asarray(s, jnp.float32),
                            skip_fraction=skip)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _brute_select(s, top_k=None, tau=None, last=0):
  n = s.shape[-1]
  out = np.zeros(s.shape, bool)
  for pos in np.ndindex(*s.shape[:2]):
    for i in range(n):
      row = s[pos][i]
      keep = [i]
      if top_k is not None:
        keep += sorted((j for j in range(i)), key=lambda j: (-row[j], j))[:top_k - 1]
      else:
        p = np.exp(row[:i + 1] - row[:i + 1].max())
        keep += [j for j in range(i + 1) if p[j] / p.sum() > tau]
      if i >= n - last:
        keep = range(i + 1)
      out[pos][i, list(keep)] = True
  return out


def test_selection_equals_brute_force_and_density_rule():
  s = np.where(np.tril(np.ones((6, 6), bool)),
               np.round(_rand(8, 2, 3, 6, 6), 1), -np.inf).astype(np.float32)
  geo = dict(block_size=4, q_len=24)
  for kw, brute in (({'top_k': 1}, {'top_k': 1}), ({'top_k': 3}, {'top_k': 3}),
                    ({'threshold': 0.2}, {'tau': 0.2}),
                    ({'top_k': 2, 'dense_last_rows': 2}, {'top_k': 2, 'last': 2})):
    m = jax.jit(lambda s: seer.seer_mask(s, **geo, **kw))(jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(m.block_matrix()),
                                  _brute_select(s, **brute), err_msg=str(kw))
  assert [seer.top_k_for_density(nz, 8) for nz in (0.05, 0.5, 0.75, 1.0)] == [1, 2,
                                                                             4, 8]


def test_sparse_attention_equals_float64_dense_reference_fwd_and_grads():
  q, k, v = _rand(9, 1, 24, 2, 4), _rand(10, 1, 24, 1, 4), _rand(11, 1, 24, 1, 4)
  scores = jnp.where(jnp.tril(jnp.ones((6, 6), bool)),
                     jnp.asarray(_rand(12, 1, 2, 6, 6)), -jnp.inf)
  with jax.enable_x64(True):
    m = seer.seer_mask(scores, block_size=4, q_len=24, top_k=2)
    dense = np.asarray(m.materialize(2)) & np.tril(np.ones((24, 24), bool))
  fn = lambda q, k, v: seer.seer_sparse_attention(
      q, k, v, scores, block_size=4, top_k=2, implementation='reference')
  _check.assert_matches_dense_oracle(fn, q, k, v, dense)


def _tiny_lm(seed=0):
  spec = layers.AttentionSpec(variant='softmax')
  return models.DecoderLM(vocab_size=11, dim=16, depth=2, num_heads=2,
                          num_kv_heads=1, head_dim=8, mlp_dim=32, attention=spec,
                          rngs=nnx.Rngs(seed))


def test_gate_distillation_on_a_frozen_lm_trains_only_the_gates():
  model = _tiny_lm()
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 2, 32)))
  layer_qk = jax.jit(seer_distill.decoder_lm_qk)(model, tokens[0])
  gates = seer_distill.make_gates(model, block_size=8, gate_dim=8)
  # The gradient is taken wrt the gates' parameters only, and reaches all of them.
  loss, grads = jax.jit(seer.gate_value_and_grad)(gates, layer_qk)
  gate_params = nnx.state(seer._Gates(gates), nnx.Param)
  assert jax.tree.structure(grads) == jax.tree.structure(gate_params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  trained, losses = seer_distill.distill_decoder_lm(
      model, lambda i: tokens[i % 2], block_size=8, num_steps=8,
      learning_rate=3e-2, gate_dim=8)
  assert losses.shape == (8,) and np.isclose(losses[0], loss, rtol=1e-4)
  assert losses[-2:].mean() < 0.8 * losses[:2].mean()
  after = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, before, after)  # frozen
  # With every block kept, the gated forward is the model's own forward.
  full, dense = jax.jit(lambda t: (seer_distill.decoder_lm_sparse_logits(
      model, trained, t, top_k=4), model(t)[0]))(tokens[0])
  np.testing.assert_allclose(full, dense, rtol=1e-4, atol=1e-5)


def test_no_retrace_and_layer_module():
  layer = routing.SeerAttention(16, 2, 8, block_size=8, top_k=2, rngs=nnx.Rngs(0))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(x):
    return layer(x), layer.gate_loss(x)

  chex.clear_trace_counter()
  for seed in range(3):
    y, loss = run(jax.random.normal(jax.random.PRNGKey(seed), (1, 32, 16)))
    assert y.shape == (1, 32, 16) and np.isfinite(loss)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 16))
  graphdef, params = nnx.split(layer)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(
      params)
  assert not np.any(np.asarray(grads['gate']['wk'][...]))  # LM loss skips the gate
  assert np.any(np.asarray(grads['wq'][...]))


def test_distill_layer_returns_its_gate_loss_which_trains_only_the_gate():
  layer = routing.SeerAttention(16, 2, 8, block_size=8, top_k=2, distill_weight=10.0,
                                rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 16))
  y, aux = layer(x)
  np.testing.assert_allclose(aux['seer_gate_kl'], 10.0 * layer.gate_loss(x),
                             rtol=1e-5)
  graphdef, params = nnx.split(layer)
  grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p)(x)[1]['seer_gate_kl']))(
      params)
  assert np.any(np.asarray(grads['gate']['wk'][...]))
  assert not np.any(np.asarray(grads['wq'][...]))  # the target is detached
  with pytest.raises(ValueError, match='distill_weight'):
    routing.SeerAttention(16, 2, 8, distill_weight=-1.0, rngs=nnx.Rngs(0))


def test_bad_input_names_the_argument():
  q = jnp.zeros((1, 24, 2, 4))
  wk = jnp.zeros((2, 12, 4))
  s = jnp.zeros((1, 2, 6, 6))
  cases = (
      (lambda: seer.attn_gate_scores(q, q, wk=wk, block_size=5), 'block_size'),
      (lambda: seer.attn_gate_scores(q, q, wk=wk[:, :6], block_size=4), 'wk'),
      (lambda: seer.attn_gate_scores(q, q, wk=jnp.zeros((2, 12, 6)), block_size=4),
       'wq must be given'),
      (lambda: seer.seer_mask(s, block_size=4, q_len=24, top_k=0), 'top_k'),
      (lambda: seer.seer_mask(s, block_size=4, q_len=24, top_k=7), 'top_k'),
      (lambda: seer.seer_mask(s, block_size=4, q_len=24), 'exactly one'),
      (lambda: seer.seer_mask(s[:, :, :5], block_size=4, q_len=24, top_k=2),
       'scores must have shape'),
      (lambda: seer.attention_block_target(q, q[:, :, :1, :3], block_size=4),
       'key head_dim'),
      (lambda: seer.seer_kl_loss(s, s[:, :1]), 'same shape'),
      (lambda: seer.seer_kl_loss(s, s, skip_fraction=1.0), 'skip_fraction'),
      (lambda: seer.top_k_for_density(0.0, 8), 'density'),
  )
  for call, match in cases:
    with pytest.raises(ValueError, match=match):
      call()
