"""naive == recurrent == chunked for the linear family, against a NumPy definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import linear
from tests.attention.linear import helpers

VARIANTS = ('linear', 'lightning', 'retention', 'gla_head', 'gla_key')


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(rng, b=2, t=13, n=4, kh=2, hk=4, hv=3, dtype=np.float64):
  q = helpers.rand(rng, b, t, n, hk, dtype=dtype)
  k = helpers.rand(rng, b, t, kh, hk, dtype=dtype)
  v = helpers.rand(rng, b, t, kh, hv, dtype=dtype)
  s0 = helpers.rand(rng, b, n, hk, hv, dtype=dtype)
  return q, k, v, s0


def _kw(name, s0, seg):
  kw = dict(initial_state=s0, segment_ids=seg)
  if name == 'linear':  # The decayed forms have no feature map / denominator.
    kw.update(feature_map='identity', normalize=False)
  return kw


@pytest.mark.parametrize('name', VARIANTS)
def test_naive_matches_numpy_definition(name):
  rng = np.random.default_rng(0)
  q, k, v, s0 = _inputs(rng)
  seg = jnp.asarray([[0] * 6 + [3] * 7, [1] * 2 + [0] * 4 + [1] * 7])
  extra, g = helpers.extra_for(name, rng, 2, 13, 4, 4)
  naive, _, _ = helpers.forms(name, jit=True)
  out, final = naive(q, k, v, extra, **_kw(name, s0, seg))
  rep = lambda a: np.repeat(np.asarray(a), 2, axis=2)
  ref, ref_final = helpers.numpy_recurrence(
      q, rep(k), rep(v), g, scale=0.5, initial_state=s0, segment_ids=seg)
  np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(final, ref_final, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('t,chunk', [(13, 4), (9, 64)])
def test_forms_agree_forward_and_gradients_float64(name, t, chunk):
  rng = np.random.default_rng(t + chunk)
  q, k, v, s0 = _inputs(rng, t=t)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(2, t)), axis=1))
  extra, _ = helpers.extra_for(name, rng, 2, t, 4, 4)
  w_out = helpers.rand(rng, 2, t, 4, 3)
  w_state = helpers.rand(rng, 2, 4, 4, 3)
  naive, recurrent, chunked = helpers.forms(name)

  def loss(fn, q, k, v, s0, extra, **kw):
    out, final = fn(q, k, v, extra, **_kw(name, s0, seg), **kw)
    return jnp.sum(out * w_out) + jnp.sum(final * w_state), (out, final)

  argnums = (1, 2, 3, 4) + ((5,) if extra is not None else ())
  results = [jax.jit(jax.value_and_grad(
      lambda *a, fn=fn, kw=kw: loss(fn, *a, **kw), tuple(i - 1 for i in argnums),
      has_aux=True))(q, k, v, s0, extra)
             for fn, kw in ((naive, {}), (recurrent, {}),
                            (chunked, dict(chunk_size=chunk)))]
  (_, (out0, fin0)), grads0 = results[0]
  for (_, (out, fin)), grads in results[1:]:
    np.testing.assert_allclose(out, out0, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(fin, fin0, rtol=1e-10, atol=1e-11)
    for g, g0 in zip(grads, grads0):
      np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-10)


def _max_err(a, golden):
  return float(jnp.max(jnp.abs(a.astype(jnp.float64) - golden)))


@pytest.mark.parametrize('name', VARIANTS)
def test_float32_three_way(name):
  rng = np.random.default_rng(7)
  t = 37
  q, k, v, s0 = _inputs(rng, t=t, hk=8, hv=8)
  extra, _ = helpers.extra_for(name, rng, 2, t, 4, 8)
  naive, recurrent, chunked = helpers.forms(name, jit=True)
  gold, gold_final = naive(q, k, v, extra, **_kw(name, s0, None))
  f32 = lambda a: None if a is None else a.astype(jnp.float32)
  args32 = (f32(q), f32(k), f32(v), f32(extra))
  kw32 = _kw(name, f32(s0), None)
  ref, ref_final = naive(*args32, **kw32)
  assert ref.dtype == jnp.float32
  floor = helpers.FLOOR[jnp.float32] * float(jnp.max(jnp.abs(gold)))
  fudge = helpers.FUDGE[jnp.float32]
  for fn, kw in ((recurrent, {}), (chunked, dict(chunk_size=16)),
                 (chunked, dict(chunk_size=5))):
    out, final = fn(*args32, **kw32, **kw)
    assert out.dtype == jnp.float32
    assert _max_err(out, gold) <= fudge * max(_max_err(ref, gold), floor)
    assert _max_err(final, gold_final) <= fudge * max(
        _max_err(ref_final, gold_final), floor)


@pytest.mark.parametrize('name', VARIANTS)
def test_chunked_prefill_then_decoding_equals_full_output(name):
  rng = np.random.default_rng(3)
  t, split = 23, 14
  q, k, v, _ = _inputs(rng, t=t)
  extra, _ = helpers.extra_for(name, rng, 2, t, 4, 4)
  naive, recurrent, chunked = helpers.forms(name, jit=True)
  kw = _kw(name, None, None)
  full, full_final = naive(q, k, v, extra, **kw)
  cut = lambda a, s: a if a is None or a.ndim == 1 else a[:, s]
  out, state = chunked(q[:, :split], k[:, :split], v[:, :split],
                       cut(extra, slice(0, split)), chunk_size=4, **kw)
  outs = [out]
  for i in range(split, t):
    s = slice(i, i + 1)
    kw['initial_state'] = state
    o, state = recurrent(q[:, s], k[:, s], v[:, s], cut(extra, s), **kw)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-11,
                             atol=1e-12)
  np.testing.assert_allclose(state, full_final, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('name', VARIANTS)
@pytest.mark.parametrize('form', [0, 1, 2])
def test_segment_reset_is_exact(name, form):
  rng = np.random.default_rng(5)
  t = 19
  q, k, v, s0 = _inputs(rng, b=1, t=t)
  extra, _ = helpers.extra_for(name, rng, 1, t, 4, 4)
  fn = helpers.forms(name, jit=True)[form]
  kw = dict(chunk_size=4) if form == 2 else {}
  seg = jnp.asarray([[2] * 7 + [5] * 12])
  out, final = fn(q, k, v, extra, **_kw(name, s0, seg), **kw)
  # Changing the first segment leaves the second one bit-for-bit unchanged.
  noise = jnp.where(jnp.arange(t)[None, :, None, None] < 7, 3.0, 0.0)
  out2, final2 = fn(q + noise, k - noise[:, :, :2], v + noise[:, :, :2, :3],
                    extra, **_kw(name, 2 * s0, seg), **kw)
  np.testing.assert_array_equal(out2[:, 7:], out[:, 7:])
  np.testing.assert_array_equal(final2, final)
  # And the second segment equals that sequence on its own (no initial state).
  cut = lambda a: a if a is None or a.ndim == 1 else a[:, 7:]
  alone, alone_final = fn(q[:, 7:], k[:, 7:], v[:, 7:], cut(extra),
                          **_kw(name, None, None), **kw)
  np.testing.assert_allclose(out[:, 7:], alone, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(final, alone_final, rtol=1e-12, atol=1e-12)


def test_strong_gates_stay_finite_in_float32():
  # Cumulative log-decays reach -1200 inside one chunk: exp(-G_s) would overflow.
  rng = np.random.default_rng(11)
  t = 24
  q, k, v, s0 = (a.astype(jnp.float32) for a in _inputs(rng, t=t))
  for shape in ((2, t, 4), (2, t, 4, 4)):
    g = -jnp.asarray(rng.uniform(0.0, 100.0, size=shape), jnp.float32)
    out, final = jax.jit(linear.chunked_gated_linear_attention,
                         static_argnames='chunk_size')(
                             q, k, v, g, initial_state=s0, chunk_size=24)
    ref, ref_final = helpers.numpy_recurrence(
        q, np.repeat(k, 2, 2), np.repeat(v, 2, 2), g, scale=0.5,
        initial_state=s0)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(final, ref_final, rtol=1e-4, atol=1e-4)
    grads = jax.jit(jax.grad(lambda g: jnp.sum(
        linear.chunked_gated_linear_attention(q, k, v, g, chunk_size=24)[0])))(g)
    assert bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.parametrize('name', VARIANTS)
def test_bfloat16_three_way(name):
  # bf16 inputs, f32 accumulation: chunked's error vs the float64 naive form within
  # a small factor of the bf16 naive form's own error.
  rng = np.random.default_rng(17)
  t = 45
  q, k, v, s0 = _inputs(rng, t=t, hk=8, hv=8)
  extra, _ = helpers.extra_for(name, rng, 2, t, 4, 8)
  naive, recurrent, chunked = helpers.forms(name, jit=True)
  bf = lambda a: None if a is None else a.astype(jnp.bfloat16)
  # The golden form sees the same bf16-rounded inputs, in float64.
  q, k, v, s0 = (bf(a).astype(jnp.float64) for a in (q, k, v, s0))
  extra = None if extra is None else bf(extra).astype(jnp.float64)
  gold, gold_final = naive(q, k, v, extra, **_kw(name, s0, None))
  args = (bf(q), bf(k), bf(v), bf(extra))
  kw = _kw(name, bf(s0), None)
  ref, ref_final = naive(*args, **kw)
  assert ref.dtype == jnp.bfloat16
  floor = helpers.FLOOR[jnp.bfloat16] * float(jnp.max(jnp.abs(gold)))
  fudge = helpers.FUDGE[jnp.bfloat16]
  for fn, kw2 in ((recurrent, {}), (chunked, {}), (chunked, dict(chunk_size=7))):
    out, final = fn(*args, **kw, **kw2)
    assert out.dtype == jnp.bfloat16
    assert _max_err(out, gold) <= fudge * max(_max_err(ref, gold), floor)
    assert _max_err(final, gold_final) <= fudge * max(
        _max_err(ref_final, gold_final), floor)
