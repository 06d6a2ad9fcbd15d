"""HyperAttention vs NumPy float64: sortLSH by brute force, the estimator with the
same random draws, the log-sum-exp merge, exactness below the threshold and the
error falling with the budget."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from attention.variants import hyper_attention as ha
from tests import oracles


def _gray_sequence(r):
  """The reflected binary Gray code sequence of r bits (recursive construction)."""
  seq = [0, 1]
  for i in range(1, r):
    seq = seq + [x + 2 ** i for x in reversed(seq)]
  return seq


def _brute_permutation(x, w):
  """[B, N, T]: positions sorted by (Gray rank of the sign pattern, position)."""
  b, t, n, _ = x.shape
  r = w.shape[1]
  rank = {code: i for i, code in enumerate(_gray_sequence(r))}
  out = np.zeros((b, n, t), np.int64)
  for bi in range(b):
    for ni in range(n):
      keys = []
      for ti in range(t):
        code = sum(2 ** j for j in range(r) if float(x[bi, ti, ni] @ w[:, j]) > 0)
        keys.append((rank[code], ti))
      out[bi, ni] = [ti for _, ti in sorted(keys)]
  return out


def test_gray_sequence_neighbours_differ_in_one_bit():
  seq = _gray_sequence(5)
  assert sorted(seq) == list(range(32))
  assert all(bin(a ^ b).count('1') == 1 for a, b in zip(seq, seq[1:]))
  ranks = ha.gray_rank(jnp.asarray(seq, jnp.int32), 5)
  np.testing.assert_array_equal(np.asarray(ranks), np.arange(32))


@pytest.mark.parametrize('r', [1, 3, 6])
def test_sort_lsh_permutation_equals_brute_force(r):
  rng = np.random.default_rng(r)
  x = rng.normal(size=(2, 37, 2, 8)).astype(np.float32)
  w = np.asarray(ha.lsh_projections(jax.random.key(r), 8, r))
  got = np.asarray(ha.sort_lsh_permutation(jnp.asarray(x), jnp.asarray(w)))
  np.testing.assert_array_equal(got, _brute_permutation(x, w))


def test_merge_of_a_key_partition_equals_exact_attention():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 9, 2, 4)) for _ in range(3))
  part = rng.random((2, 2, 9, 9)) < 0.5  # [B, N, T, S]
  part[0, 0, 3] = True  # a row whose second part sees nothing
  o1, l1 = oracles.numpy_attention(q, k, v, scale=0.5, mask=part)
  o2, l2 = oracles.numpy_attention(q, k, v, scale=0.5, mask=~part)
  with jax.enable_x64(True):
    out, lse = ha.merge_attention(*(jnp.asarray(x) for x in (o1, l1, o2, l2)))
  want, want_lse = oracles.numpy_attention(q, k, v, scale=0.5)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-6, rtol=1e-6)
  # Both parts empty: zeros and -inf, never NaN (values and gradients).
  e = jnp.full((1, 1, 2), -jnp.inf)
  o = jnp.ones((1, 2, 1, 3))
  out, lse = ha.merge_attention(o, e, o, e)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  g = jax.grad(lambda a: ha.merge_attention(a, e, a, e)[0].sum())(o)
  assert np.all(np.isfinite(np.asarray(g)))
  with pytest.raises(ValueError, match='out2'):
    ha.merge_attention(o, e, o[:, :1], e[..., :1])


def _np_softmax_part(q, k, v, vis, scale):
  """(out [T, Hv], lse [T]) of one head over the visible keys (float64)."""
  s = (q @ k.T) * scale
  s = np.where(vis, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(s - m)
  z = e.sum(-1)
  out = np.where(z[:, None] > 0, (e @ v) / np.where(z > 0, z, 1)[:, None], 0.0)
  lse = np.where(z > 0, m[:, 0] + np.log(np.where(z > 0, z, 1)), -np.inf)
  return out, lse


def _np_merge(o1, l1, o2, l2):
  lse = np.logaddexp(l1, l2)
  safe = np.where(np.isfinite(lse), lse, 0.0)
  w1, w2 = np.exp(l1 - safe), np.exp(l2 - safe)
  return w1[..., None] * o1 + w2[..., None] * o2, lse


def _np_non_causal(q, k, v, w, sample_key, b, m, min_len, scale):
  """The paper's non-causal estimator, loops over (batch, head), float64.
  q [B, T, N, H]; returns (out [B, T, N, Hv], lse [B, N, T])."""
  bsz, t, n, _ = q.shape
  s = k.shape[1]
  if t <= min_len:
    vis = np.ones((t, s), bool)
    res = [[_np_softmax_part(q[i, :, j], k[i, :, j], v[i, :, j], vis, scale)
            for j in range(n)] for i in range(bsz)]
    out = np.stack([np.stack([r[0] for r in row], 1) for row in res])
    return out, np.stack([np.stack([r[1] for r in row]) for row in res])
  nb = -(-s // b)
  bq = -(-t // nb)
  idx = (np.asarray(jax.random.randint(sample_key, (bsz, n, m), 0, s, jnp.int32))
         if m > 0 and nb > 1 else None)
  out = np.zeros((bsz, t, n, v.shape[-1]))
  lse = np.zeros((bsz, n, t))
  for i in range(bsz):
    for j in range(n):
      qp = _brute_permutation(q[i:i + 1, :, j:j + 1], w)[0, 0]
      kp = _brute_permutation(k[i:i + 1, :, j:j + 1], w)[0, 0]
      qs, ks, vs = q[i, qp, j], k[i, kp, j], v[i, kp, j]
      vis = (np.arange(t)[:, None] // bq) == (np.arange(s)[None, :] // b)
      o, l = _np_softmax_part(qs, ks, vs, vis, scale)
      if idx is not None:
        sel = idx[i, j]
        vis2 = (np.arange(t)[:, None] // bq) != (sel[None, :] // b)
        o2, l2 = _np_softmax_part(qs, ks[sel], vs[sel], vis2, scale)
        o, l = _np_merge(o, l, o2, l2 + np.log(s / m))
      out[i, qp, j] = o
      lse[i, j, qp] = l
  return out, lse


def _np_causal(q, k, v, w, sample_key, b, m, min_len, scale):
  bsz, t, n, _ = q.shape
  if t <= min_len:
    vis = np.tril(np.ones((t, t), bool))
    out = np.zeros(q.shape[:3] + v.shape[-1:])
    lse = np.zeros((bsz, n, t))
    for i, j in itertools.product(range(bsz), range(n)):
      out[i, :, j], lse[i, j] = _np_softmax_part(q[i, :, j], k[i, :, j],
                                                 v[i, :, j], vis, scale)
    return out, lse
  even = t + t % 2
  pad = lambda x: np.pad(x, [(0, 0), (0, even - t), (0, 0), (0, 0)])
  q, k, v = pad(q), pad(k), pad(v)
  h = even // 2
  key_d, key_o = jax.random.split(sample_key)
  fold = lambda x: x.reshape((bsz * 2, h) + x.shape[2:])
  od, ld = _np_causal(fold(q), fold(k), fold(v), w, key_d, b, m, min_len, scale)
  od = od.reshape((bsz, even) + od.shape[2:])
  ld = ld.reshape(bsz, 2, n, h).transpose(0, 2, 1, 3).reshape(bsz, n, even)
  oo, lo = _np_non_causal(q[:, h:], k[:, :h], v[:, :h], w, key_o, b, m, min_len,
                          scale)
  lower, llow = _np_merge(od[:, h:].transpose(0, 2, 1, 3), ld[..., h:],
                          oo.transpose(0, 2, 1, 3), lo)  # [B, N, T, Hv]
  lower = lower.transpose(0, 2, 1, 3)
  return (np.concatenate([od[:, :h], lower], 1)[:, :t],
          np.concatenate([ld[..., :h], llow], -1)[..., :t])


@pytest.mark.parametrize('causal,t,b,m,min_len', [
    (False, 29, 4, 6, 4),  # padded key blocks, sampled residual
    (True, 11, 2, 3, 5),  # odd length padded, one halving
])
def test_estimator_equals_float64_loops_with_the_same_draws(causal, t, b, m,
                                                            min_len):
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, t, 2, 4)) for _ in range(3))
  key = jax.random.key(3)
  w = np.asarray(ha.lsh_projections(jax.random.fold_in(key, 0), 4, 3))
  fn = jax.jit(lambda q, k, v, rng: ha.hyper_attention(
      q, k, v, rng=rng, is_causal=causal, block_size=b, sample_size=m,
      min_seq_len=min_len, num_projs=3, return_residuals=True,
      implementation='reference'))
  with jax.enable_x64(True):
    out, lse = fn(jnp.asarray(q), jnp.asarray(k[:, :, :1]),
                  jnp.asarray(v[:, :, :1]), key)
  fn = _np_causal if causal else _np_non_causal
  kv = lambda x: np.repeat(x[:, :, :1], 2, axis=2)  # GQA: one kv head
  want, want_lse = fn(q, kv(k), kv(v), w, jax.random.fold_in(key, 1), b, m,
                      min_len, 0.5)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), want_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_exact_below_the_threshold_fwd_and_grads(causal):
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(1, 12, 2, 4)) for _ in range(3))
  mask = np.tril(np.ones((12, 12), bool)) if causal else None
  want, _ = oracles.numpy_attention(q, k, v, scale=0.5, mask=mask)
  dout = rng.normal(size=want.shape)
  ref = oracles.numpy_attention_grads(q, k, v, dout, scale=0.5, mask=mask)
  fn = lambda q, k, v: ha.hyper_attention(
      q, k, v, rng=jax.random.key(0), is_causal=causal, block_size=2,
      sample_size=3, min_seq_len=12, num_projs=2, implementation='reference')
  with jax.enable_x64(True):
    def fwd_bwd(q, k, v):
      out, vjp = jax.vjp(fn, q, k, v)
      return out, vjp(dout)
    got, grads = jax.jit(fwd_bwd)(q, k, v)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-9)
  for g, name in zip(grads, ('dq', 'dk', 'dv')):
    np.testing.assert_allclose(np.asarray(g), ref[name], atol=1e-9, err_msg=name)


def test_error_falls_as_the_budget_grows():
  """Mean relative error over fixed seeds strictly falls with (block, samples), and
  one block holding every key is exact."""
  means = []
  for b, m in [(4, 4), (12, 24), (48, 8)]:
    fn = jax.jit(lambda q, k, v, rng, b=b, m=m: ha.hyper_attention(
        q, k, v, rng=rng, block_size=b, sample_size=m, min_seq_len=8,
        num_projs=3, implementation='reference'))
    errs = []
    for seed in range(3):
      q, k, v = ha.clustered_qkv(seed, seq_len=48, num_heads=2, head_dim=8,
                                 num_clusters=6)
      exact = jax.nn.dot_product_attention(q, k, v)
      out = fn(q, k, v, jax.random.key(seed))
      errs.append(float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)))
    means.append(np.mean(errs))
  assert means[0] > means[1] > 0.0, means
  assert means[2] < 1e-6, means
  q, k, v = ha.clustered_qkv(0, seq_len=48, num_heads=2, head_dim=8)
  assert ha.relative_error(q, k, v, rng=jax.random.key(0), relative_to='values',
                           min_seq_len=48) < 1e-6  # below the threshold: exact


def test_bad_input_names_the_argument():
  q = jnp.zeros((1, 8, 2, 4))
  key = jax.random.key(0)
  cases = [
      (dict(block_size=0), 'block_size'),
      (dict(sample_size=-1), 'sample_size'),
      (dict(min_seq_len=0), 'min_seq_len'),
      (dict(num_projs=31), 'num_projs'),
      (dict(scale=-1.0), 'scale'),
  ]
  for kwargs, name in cases:
    with pytest.raises((ValueError, TypeError), match=name):
      ha.hyper_attention(q, q, q, rng=key, **kwargs)
  with pytest.raises(TypeError, match='rng|key'):
    ha.hyper_attention(q, q, q, rng=0)
  with pytest.raises(ValueError, match='multiple of key heads'):
    ha.hyper_attention(q, jnp.zeros((1, 8, 3, 4)), jnp.zeros((1, 8, 3, 4)),
                       rng=key)
  with pytest.raises(ValueError, match='key length'):
    ha.hyper_attention(q, q[:, :4], q[:, :4], rng=key, is_causal=True)
  with pytest.raises(ValueError, match='relative_to'):
    ha.relative_error(q, q, q, rng=key, relative_to='max')
  variant = ha.make_registry_variant()
  with pytest.raises(ValueError, match='mask'):
    variant(q, q, q, mask=np.ones((8, 8), bool), is_causal=True, sinks=None,
            logits_soft_cap=None, implementation=None)


def test_registry_variant_trains_in_a_tiny_lm(monkeypatch):
  """'hyper' through the registry: small settings (exact below 4 tokens, blocks of
  2, 3 samples) so that T = 16 runs the approximate path; the loss falls."""
  import optax
  from flax import nnx
  from attention import registry
  from experiments import models
  from experiments.configs import lm as lm_configs
  assert 'hyper' in registry.available_variants()
  monkeypatch.setitem(registry._VARIANTS, 'hyper', ha.make_registry_variant(
      block_size=2, sample_size=3, min_seq_len=4, num_projs=2))
  config = lm_configs.get_config('tiny')
  config.model.update(dict(dim=16, depth=1, num_heads=2, num_kv_heads=1,
                           head_dim=8, mlp_dim=32))
  config.model.attention.variant = 'hyper'
  config.model.attention.implementation = 'reference'
  model = models.build_model(config.model, vocab_size=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 16, (4, 17)))
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
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
