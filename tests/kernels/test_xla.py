"""Tests of the blocked XLA flash attention (kernels/xla/) against float64 oracles."""

import functools

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from attention.masks import base
from kernels import problem as problem_lib
from kernels import reference
from kernels import xla
from tests import oracles


def _rand(rng, *shape, dtype=np.float64):
  return jnp.asarray(rng.standard_normal(shape).astype(dtype))


_XLA_OPTIONS = ('block_q', 'block_kv', 'kv_chunk', 'lanes', 'bwd_block_q',
                'bwd_block_kv', 'fused')


def _problem(q, k, v, *, scale=None, mask=None, mask_obj=None, q_segment_ids=None,
             kv_segment_ids=None, **kwargs):
  """make_problem from the old keyword arguments (mask_obj, q/kv_segment_ids)."""
  masks = tuple(m for m in (mask_obj, mask) if m is not None)
  segments = (None if q_segment_ids is None else
              (q_segment_ids, kv_segment_ids))
  return problem_lib.make_problem(q, k, v, scale=scale, mask=masks or None,
                                  segment_ids=segments, **kwargs)


def _xla(q, k, v, **kwargs):
  """xla.attention on a problem built from the old keyword arguments."""
  options = {name: kwargs.pop(name) for name in _XLA_OPTIONS if name in kwargs}
  return xla.attention(q, k, v, _problem(q, k, v, **kwargs), **options)


def _ref(q, k, v, **kwargs):
  """The float64 reference on the same problem."""
  return reference.attention(q, k, v, _problem(q, k, v, **kwargs))


def _window(t, s, left):
  """Causal sliding window of `left` + 1 keys: q - left <= k <= q."""
  return base.causal(t, s) & ~base.causal(t, s, offset=-left - 1)


def _dense_visibility(b, n, t, s, *, mask_obj=None, mask=None, q_seg=None,
                      kv_seg=None):
  vis = np.ones((b, n, t, s), bool)
  if mask_obj is not None:
    dense = mask_obj.materialize()
    vis &= dense[None] if dense.ndim == 3 else dense[None, None]
  if mask is not None:
    vis &= np.asarray(mask)
  if q_seg is not None:
    vis &= (np.asarray(q_seg)[:, None, :, None] ==
            np.asarray(kv_seg)[:, None, None, :])
  return vis


def _run(q, k, v, *, impl_kwargs=None, **kwargs):
  """_xla with return_residuals on already-normalised kwargs."""
  kw = dict(scale=1.0 / np.sqrt(q.shape[-1]))
  kw.update(kwargs)
  kw.update(impl_kwargs or {})
  return _xla(q, k, v, return_residuals=True, **kw)


def _check_against_oracles(q, k, v, *, atol=1e-9, impl_kwargs=None, **kwargs):
  out, lse = _run(q, k, v, impl_kwargs=impl_kwargs, **kwargs)
  scale = 1.0 / np.sqrt(q.shape[-1])
  ref_kwargs = {key: val for key, val in kwargs.items()}
  ref_out, ref_lse = _ref(q, k, v, scale=scale,
                                         return_residuals=True, **ref_kwargs)
  b, t, n, _ = q.shape
  vis = _dense_visibility(b, n, t, k.shape[1], mask_obj=kwargs.get('mask_obj'),
                          mask=kwargs.get('mask'),
                          q_seg=kwargs.get('q_segment_ids'),
                          kv_seg=kwargs.get('kv_segment_ids'))
  np_out, np_lse = oracles.numpy_attention(
      q, k, v, scale=scale, bias=kwargs.get('bias'), mask=vis,
      logits_soft_cap=kwargs.get('logits_soft_cap'), sinks=kwargs.get('sinks'))
  for want_out, want_lse in ((ref_out, ref_lse), (np_out, np_lse)):
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=atol,
                               rtol=0)
    np.testing.assert_array_equal(np.isinf(np.asarray(lse)),
                                  np.isinf(np.asarray(want_lse)))
    finite = np.isfinite(np.asarray(want_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite],
                               np.asarray(want_lse)[finite], atol=atol, rtol=0)
  assert not np.isnan(np.asarray(out)).any()
  return out, lse


_T, _S = 45, 37  # not multiples of the test block sizes


def _mask_cases():
  rng = np.random.default_rng(7)
  t = s = _T
  head_dep = rng.random((4, t, s)) < 0.4
  # Heads {0, 2, 3} share a structure (an irregular GQA group: kv head 0 serves one
  # of them, kv head 1 two) and head 1 differs.
  head_dep[2] = head_dep[3] = head_dep[0]
  head_dep[1] = np.tril(np.ones((t, s), bool))
  chunk = (np.arange(t)[:, None] // 16) == (np.arange(s)[None, :] // 16)
  return {
      'none': None,
      'causal': base.causal(t, s),
      'causal_bottom_right': base.causal(t, s, offset=3),
      'sliding_window': _window(t, s, 9),
      'chunked_causal': base.from_array(chunk) & base.causal(t, s),
      'prefix_or_causal': base.causal(t, s) | ~base.causal(t, s, offset=-s + 5),
      'not_causal': ~base.causal(t, s),
      'head_dependent': base.from_array(head_dep),
      'head_dependent_and_causal': base.from_array(head_dep) | base.causal(t, s),
  }


@pytest.mark.parametrize('name', list(_mask_cases()))
def test_masks_match_oracles(name):
  mask_obj = _mask_cases()[name]
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    q = _rand(rng, 2, _T, 4, 8)
    k = _rand(rng, 2, _T, 2, 8)
    v = _rand(rng, 2, _T, 2, 5)
    _check_against_oracles(q, k, v, mask_obj=mask_obj,
                           impl_kwargs=dict(block_q=16, block_kv=8))


@hypothesis.settings(max_examples=6)
@hypothesis.given(
    b=st.integers(1, 2), t=st.integers(1, 40), s=st.integers(1, 40),
    kv_heads=st.integers(1, 2), group=st.sampled_from([1, 2, 3]),
    h=st.sampled_from([4, 8]), block_q=st.sampled_from([8, 16, 24]),
    block_kv=st.sampled_from([8, 16, 32]), causal=st.booleans(),
    bias_dims=st.tuples(*[st.booleans()] * 4), soft_cap=st.booleans(),
    sinks=st.booleans(), lanes=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16))
def test_random_shapes_match_oracles(b, t, s, kv_heads, group, h, block_q,
                                     block_kv, causal, bias_dims, soft_cap, sinks,
                                     lanes, seed):
  rng = np.random.default_rng(seed)
  n = kv_heads * group
  with jax.enable_x64(True):
    q = _rand(rng, b, t, n, h)
    k = _rand(rng, b, s, kv_heads, h)
    v = _rand(rng, b, s, kv_heads, 3)
    full = (b, n, t, s)
    bias_shape = tuple(d if keep else 1 for d, keep in zip(full, bias_dims))
    _check_against_oracles(
        q, k, v, bias=_rand(rng, *bias_shape),
        mask_obj=base.causal(t, s) if causal else None,
        logits_soft_cap=1.7 if soft_cap else None,
        sinks=_rand(rng, n) if sinks else None,
        impl_kwargs=dict(block_q=block_q, block_kv=block_kv, lanes=lanes))


@pytest.mark.parametrize('impl_kwargs, bias_t', [
    (dict(block_q=8, block_kv=16, kv_chunk=1, lanes=2), 1),
    (dict(block_q=8, block_kv=8, kv_chunk=3, lanes=1), 29),  # chunked forward
    (dict(block_q=8, block_kv=8, kv_chunk=3, lanes=3), 29),
])
def test_segments_dense_mask_cross_attention(impl_kwargs, bias_t):
  rng = np.random.default_rng(2)
  b, t, s, n, kh = 2, 29, 51, 6, 3
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 8)
    q_seg = jnp.asarray(rng.integers(0, 3, (b, t)))
    kv_seg = jnp.asarray(rng.integers(0, 3, (b, s)))
    mask = jnp.asarray(rng.random((b, 1, t, s)) < 0.7)
    _check_against_oracles(
        q, k, v, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        mask_obj=_window(t, s, 20), bias=_rand(rng, 1, n, bias_t, s),
        impl_kwargs=impl_kwargs)


def _grads(impl, q, k, v, bias, sinks, **kwargs):
  def loss(q, k, v, bias, sinks):
    out, lse = impl(q, k, v, bias=bias, sinks=sinks, return_residuals=True,
                    **kwargs)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * jnp.cos(out)) + 0.3 * jnp.sum(lse_term * lse_term)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, bias, sinks)


_GRAD_CASES = {
    'gqa_causal_bias_sinks_softcap': dict(
        kv_heads=2, n=4, t=40, s=40, bias_shape=(1, 4, 40, 40), causal=True,
        soft_cap=2.0, block=(16, 8), lanes=None, head_dependent=False,
        segments=False),
    'head_dependent_segments_cross': dict(
        kv_heads=2, n=4, t=24, s=33, bias_shape=(2, 4, 1, 33), causal=False,
        soft_cap=None, block=(8, 16), lanes=2, head_dependent=True,
        segments=True),
    'mqa_window_row_bias': dict(
        kv_heads=1, n=3, t=37, s=37, bias_shape=(2, 3, 37, 1), causal=True,
        soft_cap=None, block=(8, 8), lanes=3, head_dependent=False,
        segments=False),
}


@pytest.mark.parametrize('name', list(_GRAD_CASES))
def test_gradients_match_reference(name):
  c = _GRAD_CASES[name]
  rng = np.random.default_rng(3)
  b, t, s, n, kh = 2, c['t'], c['s'], c['n'], c['kv_heads']
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 6)
    bias = _rand(rng, *c['bias_shape'])
    sinks = _rand(rng, n)
    kwargs = dict(scale=0.4, logits_soft_cap=c['soft_cap'])
    if c['head_dependent']:
      masks = rng.random((n, t, s)) < 0.5
      masks[0, 3:6] = False  # rows that see nothing
      masks[2] = masks[3] = masks[0]  # irregular GQA group {0, 2, 3}
      masks[1] = np.tril(np.ones((t, s), bool))
      kwargs['mask_obj'] = base.from_array(masks)
    elif c['causal']:
      kwargs['mask_obj'] = (_window(t, s, 12) if name.startswith('mqa')
                            else base.causal(t, s))
    if c['segments']:
      kwargs['q_segment_ids'] = jnp.asarray(rng.integers(0, 2, (b, t)))
      kwargs['kv_segment_ids'] = jnp.asarray(rng.integers(0, 2, (b, s)))
    impl = functools.partial(_xla, block_q=c['block'][0],
                             block_kv=c['block'][1], lanes=c['lanes'])
    got = _grads(impl, q, k, v, bias, sinks, **kwargs)
    want = _grads(_ref, q, k, v, bias, sinks, **kwargs)
    for name_, g, w in zip(('dq', 'dk', 'dv', 'dbias', 'dsinks'), got, want):
      assert g.shape == w.shape, name_
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-9,
                                 rtol=1e-9, err_msg=name_)


def test_fully_masked_rows_zero_output_and_grads():
  rng = np.random.default_rng(4)
  t = s = 32
  dense = np.tril(np.ones((t, s), bool))
  dense[5] = False
  dense[20:24] = False
  mask_obj = base.from_array(dense)
  q, k, v = (_rand(rng, 1, t, 2, 8, dtype=np.float32) for _ in range(3))

  def loss(q, k, v):
    out = _xla(q, k, v, scale=0.3, mask_obj=mask_obj, block_q=8,
                        block_kv=8)
    return jnp.sum(out), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2),
                                               has_aux=True))(q, k, v)
  _, lse = _xla(q, k, v, scale=0.3, mask_obj=mask_obj, block_q=8,
                         block_kv=8, return_residuals=True)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
  for row in (5, 20, 21, 22, 23):
    np.testing.assert_array_equal(np.asarray(out)[0, row], 0.0)
    np.testing.assert_array_equal(np.asarray(grads[0])[0, row], 0.0)
    assert np.isneginf(np.asarray(lse)[0, :, row]).all()
  # sum(out) has d/dv summed over keys = (rows that see something) * H_v per head.
  np.testing.assert_allclose(np.asarray(grads[2]).sum(axis=(0, 1, 3)),
                             np.full(2, (t - 5) * 8.0), rtol=1e-5)


def test_bfloat16_close_to_float32_reference():
  rng = np.random.default_rng(5)
  t = 64
  q, k, v = (_rand(rng, 2, t, 4, 16, dtype=np.float32) for _ in range(3))
  mask_obj = base.causal(t)
  want = _ref(q, k, v, scale=0.25, mask_obj=mask_obj)
  got = _xla(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                      v.astype(jnp.bfloat16), scale=0.25, mask_obj=mask_obj,
                      block_q=16, block_kv=32)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                             atol=3e-2)
  grad = jax.jit(jax.grad(lambda q: jnp.sum(_xla(
      q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), scale=0.25,
      mask_obj=mask_obj, block_q=16, block_kv=32).astype(jnp.float32))))(
          q.astype(jnp.bfloat16))
  want_grad = jax.jit(jax.grad(lambda q: jnp.sum(_ref(
      q, k, v, scale=0.25, mask_obj=mask_obj))))(q)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float32), np.asarray(want_grad),
                             atol=6e-2)


@pytest.mark.parametrize('implementation', ['xla', 'xla_8x8_chunk2'])
def test_no_recompilation_same_shapes_and_mask(implementation):
  rng = np.random.default_rng(6)
  t = 48
  q, k, v = (_rand(rng, 1, t, 2, 8, dtype=np.float32) for _ in range(3))
  chex.clear_trace_counter()  # counters are per code location, shared by params
  api.register_implementation('xla_8x8_chunk2', type('Impl', (), {
      'attention': staticmethod(functools.partial(
          xla.attention, block_q=8, block_kv=8, kv_chunk=2))}))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, k, v):
    return api.dot_product_attention(q, k, v, mask=_window(t, t, 7),
                                     implementation=implementation)

  first = f(q, k, v)
  second = f(q + 1.0, k, v)
  assert first.shape == second.shape
  # Un-jitted calls reuse the cached plan, hence the compiled inner computation.
  plan_a = xla._make_plan(_window(t, t, 7), 2, 2, 48, 48, 2, None)  # pylint: disable=protected-access
  plan_b = xla._make_plan(_window(t, t, 7), 2, 2, 48, 48, 2, None)  # pylint: disable=protected-access
  assert plan_a is plan_b
  traces = []

  @chex.assert_max_traces(n=1)
  def g(q):
    traces.append(1)
    return jnp.sum(api.dot_product_attention(q, k, v, is_causal=True,
                                             implementation='xla'))

  jax.jit(jax.grad(g))(q)
  assert len(traces) == 1


def test_dispatch_prefers_xla_on_cpu():
  rng = np.random.default_rng(8)
  q = _rand(rng, 1, 16, 2, 8, dtype=np.float32)
  got = api.dot_product_attention(q, q, q, is_causal=True)
  want = api.dot_product_attention(q, q, q, is_causal=True,
                                   implementation='reference')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  fn = api._select(None, 'cpu', (q, q, q), problem_lib.make_problem(  # pylint: disable=protected-access
      q, q, q, is_causal=True))
  assert fn is xla.attention


def test_block_override_via_partial_registration():
  rng = np.random.default_rng(9)
  q, k, v = (_rand(rng, 1, 30, 2, 8, dtype=np.float32) for _ in range(3))
  api.register_implementation('xla_8x16', type('Impl', (), {
      'attention': staticmethod(functools.partial(xla.attention, block_q=8,
                                                  block_kv=16))}))
  got = api.dot_product_attention(q, k, v, is_causal=True,
                                  implementation='xla_8x16')
  want = api.dot_product_attention(q, k, v, is_causal=True,
                                   implementation='reference')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_only_active_tiles_visited_and_bitmaps_only_in_partial_tiles():
  t = 100
  mask_obj = _window(t, t, 20)
  plan = xla._make_plan(mask_obj, 2, 1, 16, 16, 2, 1)  # pylint: disable=protected-access
  from attention.masks import block as masks_block  # pylint: disable=g-import-not-at-top
  bm = masks_block.compile_mask(mask_obj, 16, 16)
  (grp,) = plan.groups
  for lists, state in ((grp.fwd, bm.block_state[0]), (grp.bwd, bm.block_state[0].T)):
    rows = lists.order[:, 0]
    for g, r in enumerate(rows):
      full = set(lists.full_cols[g, :lists.full_trips[g], 0].tolist())
      part = set(lists.part_cols[g, :lists.part_trips[g], 0].tolist())
      assert full == set(np.nonzero(state[r] == base.FULL)[0].tolist())
      assert part == set(np.nonzero(state[r] == base.PARTIAL)[0].tolist())
  active = int((bm.block_state != base.EMPTY).sum())
  assert int(grp.fwd.full_trips.sum() + grp.fwd.part_trips.sum()) == active
  assert active < bm.block_state.size / 2


def test_automatic_blocks_and_no_t_by_s_intermediates():
  assert xla.default_block_sizes(100, 3000) == (104, 256)
  # Windows get chunks of smaller kv blocks; causal gets 512 x 256, one per step.
  assert xla.tiling_for(4096, 4096, _window(4096, 4096, 60))[2] > 1
  assert xla.tiling_for(4096, 4096, _window(4096, 4096, 511)) == (192, 64, 11)
  assert xla.tiling_for(4096, 4096, base.causal(4096)) == (512, 256, 1)
  assert xla.block_sizes_for(4096, 4096, base.causal(4096)) == (512, 256)
  t = 2048
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)

  def loss(q, k, v):
    return jnp.sum(api.dot_product_attention(q, k, v, is_causal=True,
                                             implementation='xla'))

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q)
  sizes = []

  def visit(jpr):
    for eqn in jpr.eqns:
      for var in eqn.outvars:
        sizes.append(int(np.prod(getattr(var.aval, 'shape', ()))))
      params = list(eqn.params.values())
      while params:
        param = params.pop()
        if isinstance(param, (tuple, list)):
          params.extend(param)
        elif hasattr(param, 'eqns'):
          visit(param)
        elif hasattr(param, 'jaxpr') and hasattr(param.jaxpr, 'eqns'):
          visit(param.jaxpr)

  visit(jaxpr.jaxpr)
  assert max(sizes) < t * t // 4, max(sizes)


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(block_q=0), ValueError, 'block_q'),
    (dict(block_kv=2.5), TypeError, 'block_kv'),
    (dict(lanes=-1), ValueError, 'lanes'),
    (dict(bwd_block_q=True), TypeError, 'bwd_block_q'),
])
def test_bad_options_raise(kwargs, error, match):
  q = jnp.zeros((1, 8, 2, 4))
  problem = problem_lib.make_problem(q, q, q)
  with pytest.raises(error, match=match):
    xla.attention(q, q, q, problem, **kwargs)
  with pytest.raises(TypeError, match='problem'):
    xla.attention(q, q, q, dict(scale=1.0))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(mask=base.causal(9)), ValueError, 'mask'),
    (dict(mask='causal'), TypeError, 'mask'),
    (dict(bias=jnp.zeros((1, 2, 3, 8))), ValueError, 'bias'),
    (dict(mask=jnp.zeros((1, 1, 8, 8))), TypeError, 'mask'),
    (dict(sinks=jnp.zeros((3,))), ValueError, 'sinks'),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), ValueError,
     'q_segment_ids'),
    (dict(scale=-1.0), ValueError, 'scale'),
    (dict(logits_soft_cap=0.0), ValueError, 'logits_soft_cap'),
])
def test_bad_inputs_raise(kwargs, error, match):
  q = jnp.zeros((1, 8, 2, 4))
  call = dict(scale=0.5)
  call.update(kwargs)
  with pytest.raises(error, match=match):
    api.dot_product_attention(q, q, q, implementation='xla', **call)


def test_bad_shapes_raise():
  q = jnp.zeros((1, 8, 3, 4))

  def call(*arrays):
    return api.dot_product_attention(*arrays, scale=1.0, implementation='xla')

  with pytest.raises(ValueError, match='multiple'):
    call(q, jnp.zeros((1, 8, 2, 4)), jnp.zeros((1, 8, 2, 4)))
  with pytest.raises(ValueError, match='key'):
    call(q, jnp.zeros((1, 8, 3, 5)), jnp.zeros((1, 8, 3, 4)))
  with pytest.raises(TypeError, match='query'):
    call(jnp.zeros((1, 8, 3, 4), jnp.int32), q, q)


@pytest.mark.parametrize('call, error, match', [
    (lambda: xla.default_block_sizes(0, 8), ValueError, 'q_len'),
    (lambda: xla.default_block_sizes(8, 2.0), TypeError, 'kv_len'),
    (lambda: xla.block_sizes_for(8, 8, base.causal(9)), ValueError, 'mask_obj'),
    (lambda: xla.block_sizes_for(8, 8, 'causal'), TypeError, 'mask_obj'),
    (lambda: xla.visited_fraction(8, 8, None, num_heads=0), ValueError,
     'num_heads'),
    (lambda: xla.visited_fraction(8, 8, None, block_q=-8, block_kv=8), ValueError,
     'block_q'),
])
def test_helpers_validate_inputs(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_visited_fraction_matches_block_count():
  # 4 x 4 tiles of 8 over a causal 32 x 32 mask: 10 of 16 tiles are active.
  assert xla.visited_fraction(32, 32, base.causal(32), block_q=8,
                              block_kv=8, kv_chunk=1) == 10 / 16
  # Chunks of 4 blocks start at block 0 of every row: the whole area.
  assert xla.visited_fraction(32, 32, base.causal(32), block_q=8,
                              block_kv=8, kv_chunk=4) == 1.0
  assert xla.visited_fraction(32, 32, None, block_q=8, block_kv=8) == 1.0
