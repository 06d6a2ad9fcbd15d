"""MoH (Jin et al. 2024) against direct NumPy float64 implementations of its equations."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.variants import mixture_of_heads as moh
from experiments import models
from experiments.configs import lm as lm_configs
from experiments.configs import vit as vit_configs
from experiments.models import layers


# ----- NumPy oracles -----------------------------------------------------------------


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_topk_mask(p, k):
  order = np.argsort(-p, axis=-1, kind='stable')[..., :k]
  mask = np.zeros(p.shape, bool)
  np.put_along_axis(mask, order, True, axis=-1)
  return mask


def np_gates(x, w_r, w_s, w_h, h_s, k):
  """Eq. 5 with the released constants, token by token."""
  b, t, _ = x.shape
  e = w_r.shape[1]
  gates = np.zeros((b, t, h_s + e))
  p_all, sel_all = np.zeros((b, t, e)), np.zeros((b, t, e), bool)
  for bi in range(b):
    for ti in range(t):
      xt = x[bi, ti]
      p = np_softmax(xt @ w_r)
      top = np.argsort(-p, kind='stable')[:k]
      g_r = np.zeros(e)
      g_r[top] = k * p[top] / p[top].sum()
      p_all[bi, ti], sel_all[bi, ti, top] = p, True
      if h_s == 0:
        gates[bi, ti] = g_r
        continue
      g_s = np.ones(1) if h_s == 1 else h_s * np_softmax(xt @ w_s)
      a = 2 * np_softmax(xt @ w_h)
      gates[bi, ti] = np.concatenate([a[0] * g_s, a[1] * g_r])
  return gates, p_all, sel_all


def np_load_balance(p, sel):
  e = p.shape[-1]
  big_p = p.reshape(-1, e).mean(0)
  f = sel.reshape(-1, e).mean(0)
  return e * e * np.mean(big_p * f)


def np_attention(q, k, v, causal=False, sinks=None):
  """[B, T, N, H] softmax attention, GQA by n // (N // K), float64."""
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for ni in range(n):
    s = np.einsum('bth,bsh->bts', q[:, :, ni], k[:, :, ni // g]) / math.sqrt(h)
    if causal:
      s = np.where(np.tril(np.ones((t, k.shape[1]), bool)), s, -np.inf)
    m = s.max(-1, keepdims=True)
    if sinks is not None:
      m = np.maximum(m, sinks[ni])
    w = np.exp(s - m)
    den = w.sum(-1, keepdims=True) + (0 if sinks is None else np.exp(sinks[ni] - m))
    out[:, :, ni] = np.einsum('bts,bsv->btv', w / den, v[:, :, ni // g])
  return out


def _rand(rng, *shape):
  return rng.normal(size=shape)


# ----- gates, load balance, plain MHA --------------------------------------------------


@pytest.mark.parametrize('h_s,e,k', [(0, 4, 2), (1, 3, 2), (3, 5, 3)])
def test_gates_equal_numpy_equations(h_s, e, k):
  rng = np.random.default_rng(h_s)
  x, w_r = _rand(rng, 2, 5, 6), _rand(rng, 6, e)
  w_s, w_h = _rand(rng, 6, max(h_s, 1)), _rand(rng, 6, 2)
  want, p, sel = np_gates(x, w_r, w_s, w_h, h_s, k)
  with jax.enable_x64(True):
    r = moh.moh_gates(jnp.asarray(x), jnp.asarray(w_r), jnp.asarray(w_s),
                      jnp.asarray(w_h) if h_s else None, num_shared_heads=h_s,
                      top_k=k)
    np.testing.assert_allclose(r.gates, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r.probs, p, rtol=1e-12)
    np.testing.assert_array_equal(r.selected, sel)
    np.testing.assert_allclose(r.load_balance, np_load_balance(p, sel), rtol=1e-12)
  # Each token: routed gates sum to a2 * k, shared to a1 * h_s.
  assert np.all(np.sum(want[..., h_s:] != 0, -1) == k)


def test_load_balance_formula_and_uniform_value():
  rng = np.random.default_rng(1)
  p = np_softmax(_rand(rng, 3, 7, 5))
  sel = np_topk_mask(p, 2)
  with jax.enable_x64(True):
    got = moh.load_balance_loss(jnp.asarray(p), jnp.asarray(sel))
    np.testing.assert_allclose(got, np_load_balance(p, sel), rtol=1e-12)
    # Perfectly balanced routing: P_i = 1/E, f_i = k/E -> L_b = k.
    uni = jnp.full((1, 10, 5), 0.2)
    sel_u = jnp.asarray(np.eye(5, dtype=bool)[np.arange(10) % 5] |
                        np.eye(5, dtype=bool)[(np.arange(10) + 1) % 5])[None]
    np.testing.assert_allclose(moh.load_balance_loss(uni, sel_u), 2.0, rtol=1e-12)


def test_all_heads_uniform_weights_is_multi_head_attention():
  """k = E and zero routers: every gate is 1, MoH = plain MHA (float64)."""
  rng = np.random.default_rng(2)
  b, t, n, kv, h, d, h_s = 2, 6, 6, 3, 4, 8, 2
  x = _rand(rng, b, t, d)
  q, k, v = _rand(rng, b, t, n, h), _rand(rng, b, t, kv, h), _rand(rng, b, t, kv, h)
  with jax.enable_x64(True):
    r = moh.moh_gates(jnp.asarray(x), jnp.zeros((d, n - h_s)), jnp.zeros((d, h_s)),
                      jnp.zeros((d, 2)), num_shared_heads=h_s, top_k=n - h_s)
    np.testing.assert_allclose(r.gates, 1.0, rtol=1e-14)
    for causal in (False, True):
      out = jax.jit(lambda *a, c=causal: moh.mixture_of_heads_attention(
          *a, is_causal=c, implementation='reference'))(
              jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), r.gates)
      np.testing.assert_allclose(out, np_attention(q, k, v, causal), rtol=1e-10,
                                 atol=1e-12)


# ----- head skipping -------------------------------------------------------------------


def _skip_case(rng, b=2, t=24, n=5, kv=5, h=4, h_s=1, k=2):
  q, key, v = _rand(rng, b, t, n, h), _rand(rng, b, t, kv, h), _rand(rng, b, t, kv, h)
  _, _, g_r = (np.asarray(a) for a in
               moh.routed_head_gates(jnp.asarray(_rand(rng, b, t, n - h_s)), k))
  gates = np.concatenate([rng.uniform(0.5, 1.5, (b, t, h_s)), g_r], -1)
  return q, key, v, gates


@pytest.mark.parametrize('causal,n,kv,h_s,sinks', [
    (False, 5, 5, 1, False), (True, 5, 5, 1, False),  # MHA
    (True, 6, 2, 2, True),  # GQA, shared heads = a kv group, sinks
    (False, 6, 3, 1, True)])  # GQA, split group (kv heads gathered per head)
def test_head_skipping_equals_masked_dense(causal, n, kv, h_s, sinks):
  rng = np.random.default_rng(n + kv + h_s + causal)
  k = 2
  q, key, v, gates = _skip_case(rng, n=n, kv=kv, h_s=h_s, k=k)
  s = rng.normal(size=(n,)) if sinks else None
  t = q.shape[1]
  with jax.enable_x64(True):
    out, stats = jax.jit(lambda q, k, v, g, s: moh.head_skipping_attention(
        q, k, v, g, sinks=s, num_shared_heads=h_s, budget=t, is_causal=causal,
        implementation='reference', block_size=8))(
            jnp.asarray(q), jnp.asarray(key), jnp.asarray(v), jnp.asarray(gates),
            None if s is None else jnp.asarray(s))
  want = np_attention(q, key, v, causal, s) * gates[..., None]
  np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
  assert int(stats['overflow']) == 0
  np.testing.assert_array_equal(stats['kept'], gates[..., h_s:] != 0)


def test_head_skipping_overflow_drops_lowest_gates_and_counts():
  rng = np.random.default_rng(7)
  h_s, k, budget = 1, 2, 7
  q, key, v, gates = _skip_case(rng, t=20, n=5, h_s=h_s, k=k)
  out, stats = jax.jit(lambda *a: moh.head_skipping_attention(
      *a, num_shared_heads=h_s, budget=budget, is_causal=True, block_size=4))(
          *(jnp.asarray(a, jnp.float32) for a in (q, key, v, gates)))
  g_r = gates[..., h_s:]
  on = g_r != 0
  count = on.sum(1)  # [B, E]
  np.testing.assert_array_equal(stats['overflow_per_head'],
                                np.maximum(count - budget, 0))
  assert int(stats['overflow']) == np.maximum(count - budget, 0).sum() > 0
  kept = np.zeros_like(on)
  for bi in range(g_r.shape[0]):
    for e in range(g_r.shape[2]):
      order = np.argsort(np.where(on[bi, :, e], -g_r[bi, :, e], np.inf),
                         kind='stable')[:budget]
      kept[bi, order[on[bi, order, e]], e] = True
  np.testing.assert_array_equal(stats['kept'], kept)
  eff = gates.copy()
  eff[..., h_s:] *= kept
  want = np_attention(q, key, v, True) * eff[..., None]
  np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)  # float32, 'xla'
  assert stats['skipped_fraction'] == pytest.approx(1 - (20 + 4 * 7) / (5 * 20))


def test_layer_skip_mode_equals_dense_mode_and_default_budget():
  layer = moh.MixtureOfHeadsAttention(16, 4, 4, num_shared_heads=1, top_k=2,
                                      num_kv_heads=2, causal=True, budget=12,
                                      implementation='reference', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 12, 16))
  y, aux = nnx.jit(lambda m, x: m(x))(layer, x)
  y_skip, aux_skip = nnx.jit(lambda m, x: m(x, skip_heads=True))(layer, x)
  np.testing.assert_allclose(y_skip, y, rtol=2e-5, atol=2e-5)
  assert set(aux) == {'moh_load_balance'} and aux_skip == {}
  np.testing.assert_allclose(aux['moh_load_balance'],
                             0.01 * layer.routing(x).load_balance, rtol=1e-6)
  assert moh.default_budget(4096, 6, 3) == 2048
  assert moh.default_budget(10, 3, 2, capacity_factor=1.25) == 9


# ----- parameter-free router -------------------------------------------------------------


def test_query_norm_router_equals_formula():
  rng = np.random.default_rng(3)
  q = _rand(rng, 2, 7, 6, 4)
  h_s, k = 2, 2
  norms = np.linalg.norm(q[:, :, h_s:], axis=-1)
  logits = norms / norms.std(-1, ddof=1, keepdims=True)
  sel = np_topk_mask(np_softmax(logits), k)
  with jax.enable_x64(True):
    np.testing.assert_allclose(moh.query_norm_logits(jnp.asarray(q), h_s), logits,
                               rtol=1e-12)
    r = moh.query_norm_gates(jnp.asarray(q), num_shared_heads=h_s, top_k=k)
  np.testing.assert_array_equal(r.gates[..., :h_s], 1.0)
  np.testing.assert_array_equal(r.gates[..., h_s:], sel.astype(float))
  # Equal norms (std 0) never give NaN.
  flat = moh.query_norm_logits(jnp.ones((1, 2, 4, 3)), 1)
  assert np.all(np.isfinite(flat))


def test_converted_multi_head_layer():
  """k = E: the converted layer is the trained MHA layer; k < E: binary query-norm
  gates on its heads."""
  spec = layers.AttentionSpec(causal=True, implementation='reference')
  mha = layers.Attention(16, 4, 2, 4, spec, rngs=nnx.Rngs(0))
  params = {n: getattr(mha, n) for n in ('wq', 'wk', 'wv', 'wo')}
  x = jax.random.normal(jax.random.key(2), (2, 10, 16))
  call = nnx.jit(lambda m, x: m(x)[0])
  full = moh.from_multi_head_attention(params, num_shared_heads=1, top_k=3,
                                       causal=True, implementation='reference')
  np.testing.assert_allclose(call(full, x), call(mha, x), rtol=1e-5, atol=1e-5)
  conv = moh.from_multi_head_attention(params, num_shared_heads=1, top_k=1,
                                       causal=True, budget=10,  # no overflow
                                       implementation='reference')
  q, k, v = conv.qkv(x)
  qn = np.asarray(q, np.float64)
  norms = np.linalg.norm(qn[:, :, 1:], axis=-1)
  sel = np_topk_mask(np_softmax(norms / norms.std(-1, ddof=1, keepdims=True)), 1)
  gates = np.concatenate([np.ones((2, 10, 1)), sel], -1)
  qr, kr = moh._rope(q, 10000.0), moh._rope(k, 10000.0)
  heads = np_attention(np.asarray(qr, np.float64), np.asarray(kr, np.float64),
                       np.asarray(v, np.float64), True) * gates[..., None]
  want = np.einsum('btnv,nvd->btd', heads, np.asarray(mha.wo[...], np.float64))
  np.testing.assert_allclose(call(conv, x), want, rtol=2e-5, atol=2e-5)
  y_skip, aux = nnx.jit(lambda m, x: m(x, skip_heads=True))(conv, x)
  np.testing.assert_allclose(y_skip, want, rtol=2e-5, atol=2e-5)
  assert aux == {}


# ----- gradients -------------------------------------------------------------------------


def test_gradients_reach_routers_and_load_balance_only_w_r():
  layer = moh.MixtureOfHeadsAttention(12, 6, 4, num_shared_heads=2, top_k=2,
                                      implementation='reference', rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (2, 8, 12))
  r = jax.random.normal(jax.random.key(4), (2, 8, 12))
  graphdef, params = nnx.split(layer, nnx.Param)

  def task(p):
    return jnp.sum(nnx.merge(graphdef, p)(x)[0] * r)

  g_task = jax.jit(jax.grad(task))(params)
  for name in ('w_r', 'w_s', 'w_h', 'wq', 'wo'):
    assert float(jnp.max(jnp.abs(g_task[name][...]))) > 0, name
  # L_b depends on the routers only through p = softmax(W_r x).
  w = (params['w_r'][...], params['w_s'][...], params['w_h'][...])
  g_bal = jax.jit(jax.grad(lambda w: moh.moh_gates(x, *w, num_shared_heads=2,
                                                   top_k=2).load_balance))(w)
  assert float(jnp.max(jnp.abs(g_bal[0]))) > 0
  assert float(jnp.max(jnp.abs(g_bal[1]))) == float(jnp.max(jnp.abs(g_bal[2]))) == 0
  # L_b's gradient w.r.t. the router logits is E^2 / E * f_i / N_tok through P.
  with jax.enable_x64(True):
    logits = jax.random.normal(jax.random.key(5), (1, 6, 4), jnp.float64)

    def lb(z):
      p, sel, _ = moh.routed_head_gates(z, 2)
      return moh.load_balance_loss(p, sel)

    p, sel, _ = moh.routed_head_gates(logits, 2)
    f = np.asarray(sel, np.float64).reshape(-1, 4).mean(0)
    dp = 4 * f / 6  # dL/dp_ti = E^2 / E * f_i / T
    pn = np.asarray(p)
    want = pn * (dp - np.sum(pn * dp, -1, keepdims=True))  # softmax vjp
    np.testing.assert_allclose(jax.jit(jax.grad(lb))(logits), want, rtol=1e-10)


# ----- bad input ---------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
  x, w_r = jnp.ones((1, 4, 8)), jnp.ones((8, 3))
  with pytest.raises(ValueError, match='top_k'):
    moh.moh_gates(x, w_r, None, None, num_shared_heads=0, top_k=0)
  with pytest.raises(ValueError, match='top_k'):
    moh.moh_gates(x, w_r, None, None, num_shared_heads=0, top_k=4)
  with pytest.raises(ValueError, match='num_shared_heads'):
    moh.MixtureOfHeadsAttention(8, 4, 2, num_shared_heads=5, top_k=1,
                                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='top_k'):
    moh.MixtureOfHeadsAttention(8, 4, 2, num_shared_heads=1, top_k=4,
                                rngs=nnx.Rngs(0))
  q = jnp.ones((1, 4, 3, 2))
  with pytest.raises(ValueError, match='budget'):
    moh.head_skipping_attention(q, q, q, jnp.ones((1, 4, 3)), num_shared_heads=1,
                                budget=0)
  with pytest.raises(ValueError, match='budget'):
    moh.MixtureOfHeadsAttention(8, 4, 2, num_shared_heads=1, top_k=1, budget=0,
                                rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='gates'):
    moh.head_skipping_attention(q, q, q, jnp.ones((1, 4, 2)), num_shared_heads=1,
                                budget=2)


# ----- the registered layer -------------------------------------------------------------


def test_registered_moh_in_the_lm_and_vit():
  """The 'moh' layer in both models: the LM returns the load-balance aux loss, the
  ViT's is non-causal (training through the registry: test_registry_training)."""
  config = lm_configs.get_config('tiny')
  config.model.attention.variant = 'moh'
  config.model.attention.implementation = 'reference'
  config.model.update(dict(num_heads=4, num_kv_heads=4, head_dim=8, depth=1))
  model = models.build_model(config.model, vocab_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (2, 16)))
  logits, aux = model(tokens)
  assert set(aux) == {'moh_load_balance'} and float(aux['moh_load_balance']) > 0
  assert logits.shape == (2, 16, 16) and np.all(np.isfinite(logits))
  config = vit_configs.get_config('tiny')
  config.model.attention.variant = 'moh'
  config.model.depth = 1
  model = models.build_model(config.model, num_classes=4, image_shape=(16, 16, 1))
  assert not model.encoder.blocks[0].attn.layer.causal
