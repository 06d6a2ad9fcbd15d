"""InLine causal state: initial state in / final state out, decoding, segment resets.

Oracles: the definition's loops (`numpy_inline` of test_inline_attention) on the full
sequence or on each segment alone, and the naive quadratic form with its explicit
state term (float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.linear import inline_attention as inl
from tests.attention.linear.test_inline_attention import numpy_inline


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def _qkv(seed, b=2, t=7, n=2, hk=3, hv=4, kv_heads=None):
  rng = np.random.default_rng(seed)
  kvh = n if kv_heads is None else kv_heads
  return (_rand(rng, b, t, n, hk), _rand(rng, b, t, kvh, hk),
          _rand(rng, b, t, kvh, hv))


def _random_state(seed, b=2, n=2, hk=3, hv=4):
  rng = np.random.default_rng(seed)
  return inl.InLineState(_rand(rng, b, n, hk, hv), _rand(rng, b, n, hk),
                         _rand(rng, b, n, hv),
                         jnp.asarray(rng.uniform(1.0, 4.0, size=(b,))))


def numpy_state(k, v):
  """The sums of the definition over all tokens of k, v [B, T, N, *]."""
  k, v = np.asarray(k), np.asarray(v)
  return (np.einsum('btnk,btnv->bnkv', k, v), k.sum(1), v.sum(1),
          np.full((k.shape[0],), float(k.shape[1])))


SEG = jnp.asarray([[0, 0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 5]])


def test_initial_state_is_the_prefix_and_final_state_its_sums():
  q, k, v = _qkv(0)
  full = numpy_inline(q, k, v, causal=True)
  p = 3
  _, s1 = jax.jit(lambda *a: inl.naive_inline_attention(
      *a, causal=True, return_state=True))(q[:, :p], k[:, :p], v[:, :p])
  for got, want in zip(s1, numpy_state(k[:, :p], v[:, :p])):
    np.testing.assert_allclose(got, want, atol=1e-12)
  for fn in (lambda *a, **kw: inl.naive_inline_attention(
                 *a, causal=True, return_state=True, **kw),
             lambda *a, **kw: inl.inline_attention(
                 *a, causal=True, return_state=True, chunk_size=2, **kw),
             inl.recurrent_inline_attention):
    out, s2 = jax.jit(fn)(q[:, p:], k[:, p:], v[:, p:], initial_state=s1)
    np.testing.assert_allclose(out, full[:, p:], atol=1e-12)
    for got, want in zip(s2, numpy_state(k, v)):
      np.testing.assert_allclose(got, want, atol=1e-12)


def test_forms_agree_with_state_and_segments_forward_and_gradients():
  q, k, v = _qkv(1, kv_heads=1)
  s0 = _random_state(2)
  rng = np.random.default_rng(3)
  w = _rand(rng, 2, 7, 2, 4)
  ws = jax.tree.map(lambda a: _rand(rng, *a.shape), s0)
  forms = {
      'naive': lambda *a, s: inl.naive_inline_attention(
          *a, causal=True, initial_state=s, segment_ids=SEG, return_state=True),
      'chunked': lambda *a, s: inl.inline_attention(
          *a, causal=True, initial_state=s, segment_ids=SEG, return_state=True,
          chunk_size=3),
      'recurrent': lambda *a, s: inl.recurrent_inline_attention(
          *a, initial_state=s, segment_ids=SEG),
  }

  def loss(fn):
    def f(q, k, v, s):
      out, fin = fn(q, k, v, s=s)
      return jnp.sum(out * w) + sum(jnp.sum(a * b) for a, b in zip(fin, ws))
    return f

  forms = {name: jax.jit(fn) for name, fn in forms.items()}
  want_out = forms['naive'](q, k, v, s=s0)
  want_grad = jax.jit(jax.grad(loss(forms['naive']), (0, 1, 2, 3)))(q, k, v, s0)
  # Outputs, final states and gradients (q, k, v, every state field) agree.
  for name in ('chunked', 'recurrent'):
    got = forms[name](q, k, v, s=s0)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want_out)):
      np.testing.assert_allclose(a, e, atol=1e-12, err_msg=name)
    grads = jax.jit(jax.grad(loss(forms[name]), (0, 1, 2, 3)))(q, k, v, s0)
    for a, e in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(a, e, atol=1e-10, err_msg=name)
  # The gradient w.r.t. the initial state is a real one (finite differences).
  d = jax.tree.map(lambda a: _rand(rng, *a.shape), s0)
  f = jax.jit(lambda s: loss(forms['naive'])(q, k, v, s))
  eps = 1e-6
  fd = (f(jax.tree.map(lambda a, b: a + eps * b, s0, d)) -
        f(jax.tree.map(lambda a, b: a - eps * b, s0, d))) / (2 * eps)
  g = sum(jnp.sum(a * b) for a, b in zip(want_grad[3], d))
  np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_segments_equal_running_each_segment_alone():
  q, k, v = _qkv(4)
  bounds = [(0, 3), (3, 5), (5, 7)]
  for fn in (lambda *a: inl.inline_attention(*a, causal=True, segment_ids=SEG,
                                             return_state=True, chunk_size=2),
             lambda *a: inl.recurrent_inline_attention(*a, segment_ids=SEG)):
    out, fin = jax.jit(fn)(q, k, v)
    for lo, hi in bounds:
      np.testing.assert_allclose(
          out[:1, lo:hi], numpy_inline(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi],
                                       causal=True), atol=1e-12)
    np.testing.assert_allclose(out[1:], numpy_inline(q[1:], k[1:], v[1:],
                                                     causal=True), atol=1e-12)
    for got, want in zip(fin, numpy_state(k[:1, 5:], v[:1, 5:])):
      np.testing.assert_allclose(got[:1], want, atol=1e-12)


def test_chunked_prefill_then_token_by_token_decoding():
  q, k, v = _qkv(5, t=9)
  full = numpy_inline(q, k, v, causal=True)
  p = 5
  outs, state = [], None
  out, state = inl.inline_attention(q[:, :p], k[:, :p], v[:, :p], causal=True,
                                    chunk_size=2, return_state=True)
  outs.append(out)
  step = jax.jit(inl.recurrent_inline_attention)
  for t in range(p, 9):
    out, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                      initial_state=state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-12)


def test_layer_decode_mode():
  layer = inl.InLineAttention(8, 2, 4, causal=True, local=False,
                              rngs=nnx.Rngs(0))
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
    inl.inline_attention(q, k, v, initial_state=s0)
  with pytest.raises(ValueError, match='segment_ids requires causal'):
    inl.naive_inline_attention(q, k, v, segment_ids=SEG)
  with pytest.raises(ValueError, match=r'initial_state\.k_sum must have shape'):
    inl.recurrent_inline_attention(q, k, v, initial_state=s0._replace(
        k_sum=s0.k_sum[:, :1]))
  with pytest.raises(ValueError, match='initial_state must be a InLineState'):
    inl.inline_attention(q, k, v, causal=True, initial_state=s0.kv)
  with pytest.raises(TypeError, match=r'initial_state\.count must have a floating'):
    inl.inline_attention(q, k, v, causal=True, initial_state=s0._replace(
        count=jnp.ones((2,), jnp.int32)))
  with pytest.raises(ValueError, match='segment_ids must have shape'):
    inl.recurrent_inline_attention(q, k, v, segment_ids=SEG[:, :5])
  with pytest.raises(TypeError, match='segment_ids must have an integer'):
    inl.inline_attention(q, k, v, causal=True, segment_ids=SEG * 1.0)
  with pytest.raises(TypeError, match='return_state'):
    inl.inline_attention(q, k, v, return_state=1)
  with pytest.raises(ValueError, match='chunk_size'):
    inl.inline_attention(q, k, v, causal=True, chunk_size=0)
  layer = inl.InLineAttention(8, 2, 4, local=False, rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(9), 2, 6, 8)
  with pytest.raises(ValueError, match='mode must be one of'):
    layer(x, mode='scan')
  with pytest.raises(ValueError, match="mode='recurrent' requires causal"):
    layer(x, mode='recurrent')
