"""Flow attention causal state: initial state in / final state out, decoding, segments.

Oracles: the definition's loops (`numpy_flow` of test_flowformer) on the full sequence
or on each segment alone, and `numpy_flow_from_state`, plain loops over the prefix-sum
equations started from a given state (float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import flowformer as fl
from tests.attention.linear.test_flowformer import numpy_flow


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _qkv(seed, b=2, t=7, n=2, hk=3, hv=4, kv_heads=None):
  rng = np.random.default_rng(seed)
  kvh = n if kv_heads is None else kv_heads
  return (_rand(rng, b, t, n, hk), _rand(rng, b, t, kvh, hk),
          _rand(rng, b, t, kvh, hv))


def _random_state(seed, b=2, n=2, hk=3, hv=4):
  """A valid state: positive key / query sums and flows, a positive count."""
  rng = np.random.default_rng(seed)
  pos = lambda *s: jnp.asarray(rng.uniform(0.5, 2.0, size=s))
  return fl.FlowState(_rand(rng, b, n, hk, hv), pos(b, n, hk), pos(b, n, hk),
                      pos(b, n, hk), pos(b, n, hk), _rand(rng, b, n),
                      jnp.asarray(rng.uniform(1.0, 4.0, size=(b,))))


def numpy_flow_from_state(q, k, v, s):
  """Loops over the causal equations with every prefix sum started from state s."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = [np.asarray(a, np.float64) for a in s]
  b, t, heads, _ = q.shape
  k, v = (np.repeat(a, heads // a.shape[2], axis=2) for a in (k, v))  # GQA
  out = np.zeros((b, t, heads, v.shape[-1]))
  for bi in range(b):
    for h in range(heads):
      fq, fk, vv = _sig(q[bi, :, h]), _sig(k[bi, :, h]), v[bi, :, h]
      c0 = s[6][bi]
      c = c0 + np.arange(1, t + 1)
      inc = [fq[i] @ (s[1][bi, h] + fk[:i + 1].sum(0)) for i in range(t)]
      og = [fk[i] @ (s[2][bi, h] + fq[:i + 1].sum(0)) for i in range(t)]
      inc_hat = [fq[i] @ (s[3][bi, h] + sum(fk[j] * c[j] / og[j]
                                            for j in range(i + 1))) / c[i]
                 for i in range(t)]
      out_hat = [fk[i] @ (s[4][bi, h] + sum(fq[j] * c[j] / inc[j]
                                            for j in range(i + 1))) / c[i]
                 for i in range(t)]
      comp = [np.exp(out_hat[i]) / (np.exp(s[5][bi, h]) + sum(
          np.exp(out_hat[j]) for j in range(i + 1))) * c[i] for i in range(t)]
      for i in range(t):
        kv = s[0][bi, h] + sum(np.outer(fk[j], comp[j] * vv[j])
                               for j in range(i + 1))
        out[bi, i, h] = _sig(inc_hat[i]) * (fq[i] / inc[i]) @ kv
  return out


SEG = jnp.asarray([[0, 0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5]])


def test_initial_state_is_the_prefix():
  q, k, v = _qkv(0)
  full = numpy_flow(q, k, v, causal=True)
  p = 3
  _, s1 = fl.flow_attention(q[:, :p], k[:, :p], v[:, :p], causal=True,
                            return_state=True)
  np.testing.assert_allclose(s1.k_sum, _sig(np.asarray(k[:, :p])).sum(1),
                             atol=1e-12)
  np.testing.assert_allclose(s1.count, [p, p], atol=0)
  _, s_all = fl.flow_attention(q, k, v, causal=True, return_state=True)
  for fn in (lambda *a, **kw: fl.flow_attention(
                 *a, causal=True, return_state=True, chunk_size=2, **kw),
             fl.recurrent_flow_attention):
    out, s2 = jax.jit(fn)(q[:, p:], k[:, p:], v[:, p:], initial_state=s1)
    np.testing.assert_allclose(out, full[:, p:], atol=1e-12)
    for got, want in zip(s2, s_all):
      np.testing.assert_allclose(got, want, atol=1e-12)


def test_forms_agree_with_state_and_segments_forward_and_gradients():
  q, k, v = _qkv(1, kv_heads=1)
  s0 = _random_state(2)
  want = numpy_flow_from_state(q, k, v, s0)
  rng = np.random.default_rng(3)
  w = _rand(rng, 2, 7, 2, 4)
  ws = jax.tree.map(lambda a: _rand(rng, *a.shape), s0)
  forms = {
      'chunked': lambda *a, **kw: fl.flow_attention(
          *a, causal=True, return_state=True, chunk_size=3, **kw),
      'recurrent': fl.recurrent_flow_attention,
  }
  forms = {name: jax.jit(fn) for name, fn in forms.items()}
  for fn in forms.values():
    np.testing.assert_allclose(fn(q, k, v, initial_state=s0)[0], want,
                               atol=1e-12)

  def loss(fn):
    def f(q, k, v, s):
      out, fin = fn(q, k, v, initial_state=s, segment_ids=SEG)
      return jnp.sum(out * w) + sum(jnp.sum(a * b) for a, b in zip(fin, ws))
    return f

  outs = [fn(q, k, v, initial_state=s0, segment_ids=SEG) for fn in forms.values()]
  for a, e in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(a, e, atol=1e-12)
  # First segment of row 0 from the state; row 1 (one segment) likewise.
  np.testing.assert_allclose(outs[0][0][:, :3], want[:, :3], atol=1e-12)
  np.testing.assert_allclose(outs[0][0][1], want[1], atol=1e-12)
  g1, g2 = (jax.jit(jax.grad(loss(fn), (0, 1, 2, 3)))(q, k, v, s0)
            for fn in forms.values())
  for a, e in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, e, atol=1e-10)
  # The gradient w.r.t. the initial state is a real one (finite differences).
  d = jax.tree.map(lambda a: _rand(rng, *a.shape) * 0.1, s0)
  f = jax.jit(lambda s: loss(forms['chunked'])(q, k, v, s))
  eps = 1e-6
  fd = (f(jax.tree.map(lambda a, b: a + eps * b, s0, d)) -
        f(jax.tree.map(lambda a, b: a - eps * b, s0, d))) / (2 * eps)
  g = sum(jnp.sum(a * b) for a, b in zip(g1[3], d))
  np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_segments_equal_running_each_segment_alone():
  q, k, v = _qkv(4)
  for fn in (lambda *a: fl.flow_attention(*a, causal=True, segment_ids=SEG,
                                          return_state=True, chunk_size=2),
             lambda *a: fl.recurrent_flow_attention(*a, segment_ids=SEG)):
    out, fin = jax.jit(fn)(q, k, v)
    for lo, hi in [(0, 3), (3, 5), (5, 7)]:
      np.testing.assert_allclose(
          out[:1, lo:hi], numpy_flow(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi],
                                     causal=True), atol=1e-12)
    np.testing.assert_allclose(out[1:], numpy_flow(q[1:], k[1:], v[1:],
                                                   causal=True), atol=1e-12)
    _, alone = fl.flow_attention(q[:1, 5:], k[:1, 5:], v[:1, 5:], causal=True,
                                 return_state=True)
    for got, want in zip(fin, alone):
      np.testing.assert_allclose(got[:1], want, atol=1e-12)


def test_chunked_prefill_then_token_by_token_decoding():
  q, k, v = _qkv(5, t=9)
  full = numpy_flow(q, k, v, causal=True)
  p = 5
  out, state = fl.flow_attention(q[:, :p], k[:, :p], v[:, :p], causal=True,
                                 chunk_size=2, return_state=True)
  outs = [out]
  step = jax.jit(fl.recurrent_flow_attention)
  for t in range(p, 9):
    out, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                      initial_state=state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-12)


def test_layer_decode_mode():
  layer = fl.FlowAttention(8, 2, 4, causal=True, rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(6), 2, 6, 8)
  call = nnx.jit(lambda m, x: m(x))
  want = call(layer, x)
  y, state = nnx.jit(lambda m, x: m(x, return_state=True))(layer, x[:, :4])
  ys = [y]
  step = nnx.jit(lambda m, x, s: m(x, initial_state=s, mode='recurrent',
                                   return_state=True))
  for t in (4, 5):
    y, state = step(layer, x[:, t:t + 1], state)
    ys.append(y)
  np.testing.assert_allclose(jnp.concatenate(ys, 1), want, atol=1e-12)
  seg = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 2)
  packed = nnx.jit(lambda m, x, seg: m(x, segment_ids=seg, mode='recurrent'))(
      layer, x, seg)
  np.testing.assert_allclose(packed[:, 2:], call(layer, x[:, 2:]), atol=1e-12)
  graphdef, params = nnx.split(layer, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(
      x, segment_ids=seg) ** 2)))(params)
  assert all(np.any(g != 0) for g in jax.tree.leaves(grads))


def test_bad_inputs():
  q, k, v = _qkv(7)
  s0 = _random_state(8)
  with pytest.raises(ValueError, match='initial_state requires causal'):
    fl.flow_attention(q, k, v, initial_state=s0)
  with pytest.raises(ValueError, match='segment_ids requires causal'):
    fl.flow_attention(q, k, v, segment_ids=SEG)
  with pytest.raises(ValueError, match=r'initial_state\.lse must have shape'):
    fl.recurrent_flow_attention(q, k, v, initial_state=s0._replace(
        lse=s0.lse[..., None]))
  with pytest.raises(ValueError, match='initial_state must be a FlowState'):
    fl.flow_attention(q, k, v, causal=True, initial_state=s0[:3])
  with pytest.raises(ValueError, match='segment_ids must have shape'):
    fl.recurrent_flow_attention(q, k, v, segment_ids=SEG[:1])
  with pytest.raises(TypeError, match='segment_ids must have an integer'):
    fl.flow_attention(q, k, v, causal=True, segment_ids=SEG * 1.0)
  with pytest.raises(ValueError, match='chunk_size'):
    fl.flow_attention(q, k, v, causal=True, chunk_size=-1)
  layer = fl.FlowAttention(8, 2, 4, rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(9), 2, 6, 8)
  with pytest.raises(ValueError, match='mode must be one of'):
    layer(x, mode='scan')
  with pytest.raises(ValueError, match="mode='recurrent' requires causal"):
    layer(x, mode='recurrent')
