"""MoBA against brute-force NumPy routing, the paper's per-token form and float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import routing
from attention.routing import moba
from experiments.models import registry
from tests.attention.routing import _check


_mask = jax.jit(moba.moba_mask, static_argnames=('block_size', 'top_k', 'heads'))
_attend = jax.jit(moba.moba_attention,
                  static_argnames=('block_size', 'top_k', 'heads', 'implementation'))


def _qkv(seed, b=2, t=40, n=4, kh=2, h=8):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, t, n, h)), rng.normal(size=(b, t, kh, h)),
          rng.normal(size=(b, t, kh, h)))


def _brute_blocks(q, k, block, top_k, heads):
  """bool [B, Hm, n, n]: own block + the top_k - 1 best past blocks (loops)."""
  b, t, n_heads, _ = q.shape
  kh = k.shape[2]
  g = n_heads // kh
  n = -(-t // block)
  mean = lambda x, i, h: x[:, i * block:(i + 1) * block, h].mean(1)  # [B, H]
  rows = n_heads if heads == 'query' else kh
  out = np.zeros((b, rows, n, n), bool)
  for bi in range(b):
    for r in range(rows):
      q_heads = [r] if heads == 'query' else list(range(r * g, (r + 1) * g))
      kv = r // g if heads == 'query' else r
      for j in range(n):
        score = {i: sum(float(mean(q, j, qh)[bi] @ mean(k, i, kv)[bi])
                        for qh in q_heads) for i in range(j)}
        order = sorted(score, key=lambda i: (-score[i], i))  # stable: lower first
        for i in [j] + order[:top_k - 1]:
          out[bi, r, j, i] = True
  return out


@pytest.mark.parametrize('heads', ['query', 'kv'])
@pytest.mark.parametrize('t,block', [(40, 8), (37, 8)])  # 37: partial last block
def test_selection_equals_brute_force(heads, t, block):
  q, k, _ = _qkv(0, t=t)
  n = -(-t // block)
  for top_k in (1, 3, n):
    m = _mask(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
              block_size=block, top_k=top_k, heads=heads)
    assert m.kv_indices.shape == (2, 4 if heads == 'query' else 2, n, top_k)
    np.testing.assert_array_equal(np.asarray(m.block_matrix()),
                                  _brute_blocks(q, k, block, top_k, heads))


@pytest.mark.parametrize('heads', ['query', 'kv'])
def test_attention_equals_float64_dense_reference_fwd_and_grads(heads):
  q, k, v = _qkv(1, b=1, t=24, n=4, kh=2, h=4)
  block, top_k = 6, 2
  with jax.enable_x64(True):
    m = _mask(jnp.asarray(q), jnp.asarray(k), block_size=block, top_k=top_k,
              heads=heads)
    dense = np.asarray(m.materialize(4)) & np.tril(np.ones((24, 24), bool))
  np.testing.assert_array_equal(  # The routing itself, by brute force.
      np.asarray(m.block_matrix()), _brute_blocks(q, k, block, top_k, heads))
  fn = lambda q, k, v: moba.moba_attention(
      q, k, v, block_size=block, top_k=top_k, heads=heads,
      implementation='reference')
  _check.assert_matches_dense_oracle(fn, q, k, v, dense)


def _per_token_moba(q, k, v, block, top_k):
  """The paper's form per query token (NumPy float64): gate s_i = <q_t, mean K[I_i]>
  over the blocks ending before t's block, top_k - 1 of them plus t's own block
  (causal), one softmax over the union. Returns (out, chosen bool [B, N, T, n])."""
  b, t, n_heads, h = q.shape
  g = n_heads // k.shape[2]
  n = -(-t // block)
  out = np.zeros((b, t, n_heads, v.shape[-1]))
  chosen = np.zeros((b, n_heads, t, n), bool)
  for bi in range(b):
    for hd in range(n_heads):
      kk, vv = k[bi, :, hd // g], v[bi, :, hd // g]
      k_bar = [kk[i * block:(i + 1) * block].mean(0) for i in range(n)]
      for ti in range(t):
        own = ti // block
        gate = {i: float(q[bi, ti, hd] @ k_bar[i]) for i in range(own)}
        pick = [own] + sorted(gate, key=lambda i: (-gate[i], i))[:top_k - 1]
        chosen[bi, hd, ti, pick] = True
        keys = [s for s in range(ti + 1) if s // block in pick]
        logits = np.array([q[bi, ti, hd] @ kk[s] for s in keys]) / np.sqrt(h)
        p = np.exp(logits - logits.max())
        out[bi, ti, hd] = (p / p.sum()) @ vv[keys]
  return out, chosen


def test_per_token_paper_form_equals_per_block_when_tokens_agree_else_differs():
  block, top_k = 4, 2
  q, k, v = _qkv(2, b=1, t=16, n=2, kh=1, h=4)
  fn = lambda q, k, v: np.asarray(_attend(
      q, k, v, block_size=block, top_k=top_k, implementation='reference'))
  with jax.enable_x64(True):
    # (a) Tokens of a q block are positive multiples of one direction: every
    # token picks what its block picks, so both granularities give the same output.
    rng = np.random.default_rng(3)
    direction = np.repeat(rng.normal(size=(1, 4, 1, 2, 4)), block, axis=2)
    q_same = (direction * rng.uniform(0.5, 2.0, size=(1, 4, block, 2, 1))
              ).reshape(1, 16, 2, 4)
    want, _ = _per_token_moba(q_same, k, v, block, top_k)
    np.testing.assert_allclose(fn(q_same, k, v), want, atol=1e-12)
    # (b) Random queries: rows whose per-token choice equals the block's agree
    # exactly; the others differ (the per-block reading is not the paper's).
    got = fn(q, k, v)
    m = _mask(jnp.asarray(q), jnp.asarray(k), block_size=block, top_k=top_k)
  want, chosen = _per_token_moba(q, k, v, block, top_k)
  per_block = np.repeat(np.asarray(m.block_matrix()), block, axis=2)  # [B,N,T,n]
  agree = np.all(chosen == per_block, axis=-1)  # [B, N, T]
  assert 0 < np.sum(~agree) < agree.size
  err = np.abs(got - want).max(-1).transpose(0, 2, 1)  # [B, N, T]
  assert err[agree].max() < 1e-12
  assert err[~agree].min() > 1e-6


def test_gate_has_no_gradient_and_module_matches_function():
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(4, b=1, t=16, n=2, kh=2))
  g = jax.jit(jax.grad(lambda q, k: jnp.sum(moba.moba_block_scores(
      q, k, block_size=4).clip(-1e9, 1e9)), argnums=(0, 1)))(q, k)
  assert all(not np.any(np.asarray(x)) for x in g)
  layer = routing.MoBA(block_size=4, top_k=2)
  np.testing.assert_array_equal(jax.jit(layer)(q, k, v),
                                _attend(q, k, v, block_size=4, top_k=2))


def test_no_retrace_when_only_data_changes():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(q, k, v):
    return moba.moba_attention(q, k, v, block_size=8, top_k=2)

  chex.clear_trace_counter()
  for seed in range(3):
    q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(seed, b=1, t=32, n=2, kh=1))
    assert run(q, k, v).shape == (1, 32, 2, 8)


def test_bad_input_names_the_argument():
  q, k, v = (jnp.asarray(x, jnp.float32) for x in _qkv(0, b=1, t=16, n=2, kh=1))
  call = lambda **kw: moba.moba_attention(**{**dict(
      query=q, key=k, value=v, block_size=4, top_k=2), **kw})
  for kw, match in (({'top_k': 0}, 'top_k'), ({'top_k': 5}, r'top_k must be in \[1, 4\]'),
                    ({'block_size': 0}, 'block_size'), ({'heads': 'x'}, 'heads'),
                    ({'key': k[:, :8]}, 'key length'), ({'key': k[0]}, 'key must have rank'),
                    ({'value': v[:, :, :, :2].repeat(2, 1)}, 'value length')):
    with pytest.raises(ValueError, match=match):
      call(**kw)
  with pytest.raises(ValueError, match='causal only'):
    registry.get_variant('moba')(q, k, v, mask=None, is_causal=False, sinks=None,
                                 logits_soft_cap=None, implementation=None)
