"""Pallas block-sparse flash attention (TPU Mosaic / GPU Triton) in interpret mode.

Oracles: the float64 dense reference (`attention.reference`) for outputs, lse and
gradients (q, k, v, sinks; the loss also weights lse, so the lse cotangent path is
checked), JAX's splash attention (interpret mode) on masks both express, brute-force
block tables for the static plan, and cross-platform lowering to Mosaic / Triton IR.
Interpret mode compiles slowly on CPU, so each case checks many features at once.
"""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np
import pytest

from attention import api
from attention.masks import base
from kernels.pallas import common
from kernels.pallas import gpu as pallas_gpu
from kernels.pallas import tpu as pallas_tpu
from tests import oracles

IMPLS = ('pallas_tpu', 'pallas_gpu')
# Interpret-mode programs are large; LLVM -O0 cuts their CPU compile time ~40%
# (numerics unchanged: XLA CPU does not use fast-math either way).
_jit = functools.partial(
    jax.jit, compiler_options={'xla_backend_optimization_level': 0})
MODULES = {'pallas_tpu': pallas_tpu, 'pallas_gpu': pallas_gpu}


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _inputs(seed, b, t, s, n, kh, h, hv, dtype):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (b, s, kh, h), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (b, s, kh, hv), jnp.float32).astype(dtype)
  w_out = jax.random.normal(ks[3], (b, t, n, hv), jnp.float64)
  w_lse = jax.random.normal(ks[4], (b, n, t), jnp.float64)
  sinks = jax.random.normal(ks[5], (n,), jnp.float32)
  return q, k, v, w_out, w_lse, sinks


def _value_and_grads(impl, q, k, v, sinks, bias, w_out, w_lse, **kw):
  """(out, lse, dq, dk, dv[, dsinks][, dbias]) of a loss weighting out and lse.

  `mask` in `kw` is passed as a traced argument (the kernels' dynamic-mask path);
  `static_mask` is closed over, so it stays concrete (compiled into the BlockMask).
  """
  mask = kw.pop('mask', None)
  static_mask = kw.pop('static_mask', None)
  if isinstance(mask, base.Mask):  # Mask objects are static by nature
    static_mask, mask = mask, None

  def loss(q, k, v, sinks, bias, mask):
    out, lse = api.dot_product_attention(
        q, k, v, sinks=sinks, bias=bias,
        mask=static_mask if mask is None else mask, return_residuals=True,
        implementation=impl, **kw)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    val = (jnp.sum(out.astype(jnp.float64) * w_out) +
           jnp.sum(finite.astype(jnp.float64) * w_lse))
    return val, (out, lse)

  argnums = tuple(i for i, x in enumerate((q, k, v, sinks, bias))
                  if x is not None)
  fn = _jit(jax.grad(loss, argnums=argnums, has_aux=True))
  grads, (out, lse) = fn(q, k, v, sinks, bias, mask)
  return (out, lse) + tuple(grads)


def _golden(q, k, v, sinks, bias, w_out, w_lse, **kw):
  up = lambda x: None if x is None else x.astype(jnp.float64)
  return _value_and_grads('reference', up(q), up(k), up(v), up(sinks),
                          up(bias), w_out, w_lse, **kw)


def _err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  both_inf = np.isneginf(a) & np.isneginf(b)
  diff = np.abs(np.where(both_inf, 0.0, a) - np.where(both_inf, 0.0, b))
  return float(np.max(diff, initial=0.0))


def _assert_close(got, want, dtype, same_dtype=None):
  """float32: absolute tolerance vs the float64 golden; bfloat16: the three-way check
  (kernel error within 2x the bfloat16 reference's error plus a small floor)."""
  assert len(got) == len(want)
  names = ('out', 'lse', 'dq', 'dk', 'dv', 'dsinks/dbias', 'dbias')
  for i, (name, g, w) in enumerate(zip(names, got, want)):
    assert not np.any(np.isnan(np.asarray(g, np.float64))), name
    np.testing.assert_array_equal(np.isneginf(np.asarray(g, np.float64)),
                                  np.isneginf(np.asarray(w)), err_msg=name)
    scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(w), w, 0)))))
    if dtype == jnp.float32:
      assert _err(g, w) <= 2e-5 * scale, (name, _err(g, w), scale)
    else:
      ref_err = _err(same_dtype[i], w)
      assert _err(g, w) <= 2.0 * ref_err + 1e-2 * scale, (
          name, _err(g, w), ref_err, scale)


def _neighborhood(side, radius):
  """2D neighborhood attention on a side x side image: |dr|, |dc| <= radius."""
  r, c = np.divmod(np.arange(side * side), side)
  return ((np.abs(r[:, None] - r[None, :]) <= radius) &
          (np.abs(c[:, None] - c[None, :]) <= radius))


def _per_head_masks(t):
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  causal = k <= q
  strided = causal & ((q - k) % 4 == 0)  # strided heads (Sparse Transformer)
  window = causal & (q - k < 48)  # sliding window
  neighborhood = _neighborhood(int(np.sqrt(t)), 2)
  late = causal & (q >= 40)  # rows 0..39 see nothing
  return np.stack([strided, window, neighborhood, late])


# ------------------------------------------------------------------ kernel vs reference


@pytest.mark.parametrize('impl', IMPLS)
def test_causal_gqa_softcap_sinks_documents_padding(impl):
  """Causal AND documents (segment ids) AND a traced per-batch mask array, GQA 2:1,
  soft-cap, sinks, T=200 (padded to the block grid)."""
  b, t, n, kh, h = 2, 200, 4, 2, 64
  q, k, v, w_out, w_lse, sinks = _inputs(0, b, t, t, n, kh, h, h, jnp.float32)
  seg = jnp.asarray(np.stack([np.repeat([0, 1, 2], [70, 60, 70]),
                              np.repeat([0, 1], [150, 50])]), jnp.int32)
  per_batch = np.random.default_rng(0).random((b, 1, t, t)) < 0.8
  kw = dict(is_causal=True, logits_soft_cap=4.0, segment_ids=seg,
            mask=jnp.asarray(per_batch))
  got = _value_and_grads(impl, q, k, v, sinks, None, w_out, w_lse, **kw)
  want = _golden(q, k, v, sinks, None, w_out, w_lse, **kw)
  _assert_close(got, want, jnp.float32)


@pytest.mark.parametrize('impl', IMPLS)
def test_per_head_masks_mqa(impl):
  """Strided / sliding-window / 2D-neighborhood / empty-row heads; MQA (K=1);
  a per-head additive bias (its gradient included)."""
  b, t, n, kh, h = 1, 256, 4, 1, 64
  q, k, v, w_out, w_lse, _ = _inputs(1, b, t, t, n, kh, h, 32, jnp.float32)
  bias = jax.random.normal(jax.random.PRNGKey(9), (1, n, t, t), jnp.float32)
  dense = _per_head_masks(t)
  kw = dict(mask=base.from_array(dense), scale=0.3)
  got = _value_and_grads(impl, q, k, v, None, bias, w_out, w_lse, **kw)
  want = _golden(q, k, v, None, bias, w_out, w_lse, **kw)
  _assert_close(got, want, jnp.float32)
  # Rows that see nothing: zero output, lse = -inf, zero gradient (and no NaN).
  assert np.all(np.asarray(got[0])[:, :40, 3] == 0)
  assert np.all(np.isneginf(np.asarray(got[1])[:, 3, :40]))
  assert np.all(np.asarray(got[2])[:, :40, 3] == 0)
  # Independent NumPy oracle for the forward pass.
  out_np, lse_np = oracles.numpy_attention(q, k, v, scale=0.3, bias=bias,
                                           mask=dense[None])
  assert _err(got[0], out_np) <= 2e-5 and _err(got[1], lse_np) <= 2e-5


@pytest.mark.parametrize('impl', IMPLS)
def test_cross_attention_window_dense_array_bfloat16(impl):
  """T != S, a concrete dense `mask` array compiled into the BlockMask (bottom-right
  sliding window), a per-batch head-shared bias, bfloat16."""
  b, t, s, n, kh, h = 2, 128, 384, 2, 2, 128
  q, k, v, w_out, w_lse, sinks = _inputs(2, b, t, s, n, kh, h, h, jnp.bfloat16)
  bias = jax.random.normal(jax.random.PRNGKey(8), (b, 1, t, s)).astype(
      jnp.bfloat16)
  qi, ki = np.arange(t)[:, None] + (s - t), np.arange(s)[None, :]
  window = jnp.asarray(((ki <= qi) & (qi - ki < 100))[None, None])
  kw = dict(static_mask=window, scale=0.1)
  got = _value_and_grads(impl, q, k, v, sinks, bias, w_out, w_lse, **kw)
  want = _golden(q, k, v, sinks, bias, w_out, w_lse, **kw)
  same = _value_and_grads('reference', q, k, v, sinks, bias, w_out, w_lse,
                          **kw)
  assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.bfloat16
  _assert_close(got, want, jnp.bfloat16, same)


@pytest.mark.slow
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('ratio', [1, 2, 4])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sweep_gqa_ratios_dtypes(impl, ratio, dtype):
  b, t, n, h = 1, 256, 4, 128
  q, k, v, w_out, w_lse, sinks = _inputs(3, b, t, t, n, n // ratio, h, h, dtype)
  dense = _per_head_masks(t)
  kw = dict(mask=base.from_array(dense) & base.causal(t), logits_soft_cap=8.0)
  got = _value_and_grads(impl, q, k, v, sinks, None, w_out, w_lse, **kw)
  want = _golden(q, k, v, sinks, None, w_out, w_lse, **kw)
  same = (None if dtype == jnp.float32 else
          _value_and_grads('reference', q, k, v, sinks, None, w_out, w_lse,
                           **kw))
  _assert_close(got, want, dtype, same)


@pytest.mark.slow
@pytest.mark.parametrize('impl', IMPLS)
@pytest.mark.parametrize('t,s,n,kh,h,hv,mask', [
    (1, 300, 2, 1, 8, 24, None),  # decoding one query; tiny head dim
    (300, 1, 2, 2, 16, 16, None),  # a single key
    (70, 130, 4, 2, 32, 48, base.causal(70, 130)),  # top-left causal, T < S
    (130, 70, 3, 1, 32, 48, base.causal(130, 70, offset=-60)),  # empty rows
])
def test_edge_shapes(impl, t, s, n, kh, h, hv, mask):
  q, k, v, w_out, w_lse, _ = _inputs(6, 1, t, s, n, kh, h, hv, jnp.float32)
  got = _value_and_grads(impl, q, k, v, None, None, w_out, w_lse, mask=mask)
  want = _golden(q, k, v, None, None, w_out, w_lse, mask=mask)
  _assert_close(got, want, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize('impl', IMPLS)
@hypothesis.settings(max_examples=6)
@hypothesis.given(data=st.data())
def test_random_masks_property(impl, data):
  """Random per-head masks (EMPTY / PARTIAL / FULL tiles), lengths, head ratios,
  tiles and options against the float64 reference."""
  draw = data.draw
  small = impl == 'pallas_gpu'
  t = draw(st.integers(1, 96 if small else 300), label='t')
  s = draw(st.integers(1, 96 if small else 300), label='s')
  kh = draw(st.sampled_from([1, 2]), label='kh')
  n = kh * draw(st.sampled_from([1, 2]), label='group')
  density = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]), label='density')
  seed = draw(st.integers(0, 2**16), label='seed')
  rng = np.random.default_rng(seed)
  # Block-structured randomness so that whole tiles are empty or full too.
  coarse = rng.random((n, -(-t // 16), -(-s // 16))) < density
  dense = np.repeat(np.repeat(coarse, 16, 1), 16, 2)[:, :t, :s]
  dense &= rng.random((n, t, s)) < draw(st.sampled_from([0.7, 1.0]))
  kw = dict(mask=base.from_array(dense))
  if draw(st.booleans(), label='soft_cap'):
    kw['logits_soft_cap'] = 3.0
  if t == s and draw(st.booleans(), label='segments'):
    kw['segment_ids'] = jnp.asarray(
        np.sort(rng.integers(0, 3, (1, t))), jnp.int32)
  use_sinks = draw(st.booleans(), label='sinks')
  q, k, v, w_out, w_lse, sinks = _inputs(seed, 1, t, s, n, kh, 16, 16,
                                         jnp.float32)
  sinks = sinks if use_sinks else None
  sizes = (pallas_gpu.BlockSizes(block_q=draw(st.sampled_from([16, 32])),
                                 block_kv=draw(st.sampled_from([16, 32])))
           if small else pallas_tpu.BlockSizes())
  name = f'{impl}_test_blocks'
  api.register_implementation(name, _with_blocks(MODULES[impl], sizes))
  try:
    got = _value_and_grads(name, q, k, v, sinks, None, w_out, w_lse, **kw)
  finally:
    api._REGISTRY.pop(name)  # pylint: disable=protected-access
  want = _golden(q, k, v, sinks, None, w_out, w_lse, **kw)
  _assert_close(got, want, jnp.float32)


def _with_blocks(module, sizes):
  """An implementation object running `module.attention` with given tiles."""

  class Impl:
    attention = staticmethod(functools.partial(module.attention,
                                               block_sizes=sizes))

  return Impl


# ------------------------------------------------------------------ vs splash attention


def test_matches_splash_attention():
  """Both kernels agree with JAX splash attention (interpret) on Causal / Local
  heads: the TPU kernel in output and gradients, the GPU kernel in output (its
  gradients are checked against the float64 reference on the same masks)."""
  t, n, h = 256, 2, 128
  q, k, v, w_out, _, _ = _inputs(4, 1, t, t, n, n, h, h, jnp.float32)
  local = splash.LocalMask((t, t), window_size=(64, 0), offset=0)
  heads = splash.MultiHeadMask([splash.CausalMask((t, t)), local])
  sizes = splash.BlockSizes(block_q=128, block_kv=128, block_q_dkv=128,
                            block_kv_dkv=128, block_q_dq=128, block_kv_dq=128)
  kernel = splash.make_splash_mha_single_device(heads, block_sizes=sizes,
                                                interpret=True)
  scale = 1.0 / np.sqrt(h)

  def splash_loss(q, k, v):
    out = jax.vmap(kernel)((q * scale).transpose(0, 2, 1, 3),
                           k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
    out = out.transpose(0, 2, 1, 3)  # [B, T, N, H]
    return jnp.sum(out * w_out.astype(jnp.float32)), out

  qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
  ours_mask = base.from_array(np.stack([ki <= qi, (ki <= qi) & (qi - ki <= 64)]))

  def ours_loss(impl, q, k, v):
    out = api.dot_product_attention(q, k, v, mask=ours_mask, implementation=impl)
    return jnp.sum(out * w_out.astype(jnp.float32)), out

  want = _jit(jax.grad(splash_loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  got = _jit(jax.grad(functools.partial(ours_loss, 'pallas_tpu'),
                         argnums=(0, 1, 2), has_aux=True))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert _err(g, w) <= 2e-5 * max(1.0, float(jnp.max(jnp.abs(w))))
  gpu_out = _jit(functools.partial(ours_loss, 'pallas_gpu'))(q, k, v)[1]
  assert _err(gpu_out, want[1]) <= 2e-5


# ------------------------------------------------------------------ static plan


@hypothesis.given(
    t=st.integers(1, 40), s=st.integers(1, 40), n=st.integers(1, 3),
    bq=st.sampled_from([4, 8, 16]), bk=st.sampled_from([4, 8]),
    seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_plan_tables_match_brute_force(t, s, n, bq, bk, seed, density):
  """Per-head lists hold exactly the non-empty tiles; fetch indices follow them."""
  rng = np.random.default_rng(seed)
  dense = rng.random((n, t, s)) < density
  dense[:, :, :] &= rng.random((n, 1, s)) < 0.8  # some empty columns / tiles
  plan = common.make_plan(base.from_array(dense), bq, bk, n)
  nq, nk = -(-t // bq), -(-s // bk)
  padded = np.zeros((n, nq * bq, nk * bk), bool)
  padded[:, :t, :s] = dense
  tiles = padded.reshape(n, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)
  anyv, allv = tiles.any((3, 4)), tiles.all((3, 4))
  for h in range(n):
    u = plan.head_map[h]
    for i in range(nq):
      cnt = plan.kv_counts[u, i]
      listed = plan.kv_indices[u, i, :cnt]
      np.testing.assert_array_equal(listed, np.nonzero(anyv[h, i])[0])
      for j, kb in enumerate(listed):
        part = plan.kv_part[u, i, j]
        assert (part < 0) == allv[h, i, kb]
        if part >= 0:
          np.testing.assert_array_equal(plan.partial_masks[part],
                                        tiles[h, i, kb])
          assert plan.kv_fetch[u, i, j] == part
      if cnt:  # padding repeats the last block and the last fetched bitmap
        assert np.all(plan.kv_indices[u, i, cnt:] == listed[-1])
        assert np.all(plan.kv_fetch[u, i, cnt:] == plan.kv_fetch[u, i, cnt - 1])
    for kb in range(nk):
      cnt = plan.q_counts[u, kb]
      np.testing.assert_array_equal(plan.q_indices[u, kb, :cnt],
                                    np.nonzero(anyv[h, :, kb])[0])


def test_full_mask_block_classes_exact():
  mask = common.FullMask((10, 7))
  plan = common.make_plan(mask, 4, 4, 2)
  np.testing.assert_array_equal(plan.block_mask.materialize(),
                                np.ones((1, 10, 7), bool))
  assert plan.kv_counts.shape == (1, 3)  # one table row shared by both heads
  np.testing.assert_array_equal(plan.head_map, [0, 0])
  assert plan.kv_part[0, 0, 0] == -1 and plan.has_partial


# ------------------------------------------------------------------ dispatch and errors


def _kwargs(**over):
  kw = dict(scale=1.0, bias=None, mask=None, mask_obj=None,
            logits_soft_cap=None, sinks=None, q_segment_ids=None,
            kv_segment_ids=None, return_residuals=False)
  kw.update(over)
  return kw


def _qkv(t, s=None, n=1):
  return (jnp.zeros((1, t, n, 8), jnp.float32),
          jnp.zeros((1, s or t, 1, 8), jnp.float32),
          jnp.zeros((1, s or t, 1, 8), jnp.float32))


def test_automatic_selection_prefers_pallas_on_accelerators():
  bias_kw = _kwargs(bias=jnp.zeros((1, 1, 4, 4)))
  for kw in (_kwargs(), bias_kw):
    assert api._select(None, 'tpu', _qkv(4), kw) is pallas_tpu.attention
    assert api._select(None, 'gpu', _qkv(4), kw) is pallas_gpu.attention
  assert api._select(None, 'cpu', _qkv(4), _kwargs()) is not pallas_tpu.attention


def test_static_and_dynamic_mask_arrays():
  """Concrete batch-free mask arrays join the BlockMask; others become a -inf bias."""
  b, n, t, s = 2, 3, 5, 6
  rng = np.random.default_rng(0)
  shared = rng.random((1, n, t, s)) < 0.5
  obj = base.causal(t, s)
  assert common.static_mask_array(jnp.asarray(shared))
  assert common.logits_bias(None, jnp.asarray(shared), (b, n, t, s)) is None
  combined = common.effective_mask(obj, jnp.asarray(shared), t, s, n)
  np.testing.assert_array_equal(combined.materialize(),
                                shared[0] & obj.materialize()[None])
  row = rng.random((1, 1, 1, s)) < 0.5  # broadcast over heads and queries
  np.testing.assert_array_equal(
      common.effective_mask(None, jnp.asarray(row), t, s, n).materialize(),
      np.broadcast_to(row[0, 0], (t, s)))
  per_batch = rng.random((b, 1, t, s)) < 0.5
  bias = rng.normal(size=(1, n, t, s)).astype(np.float32)
  assert not common.static_mask_array(jnp.asarray(per_batch))
  got = common.logits_bias(jnp.asarray(bias), jnp.asarray(per_batch),
                           (b, n, t, s))
  np.testing.assert_array_equal(got, np.where(per_batch, bias, -np.inf))
  assert isinstance(common.effective_mask(None, jnp.asarray(per_batch), t, s, n),
                    common.FullMask)


@pytest.mark.parametrize('impl', IMPLS)
def test_hardware_only_errors_and_bad_arguments(impl, monkeypatch):
  q = jnp.ones((1, 128, 2, 16), jnp.float32)
  with pytest.raises(TypeError, match='block_sizes'):
    MODULES[impl].attention(q, q, q, scale=1.0, block_sizes=(128, 128))
  with pytest.raises(TypeError, match='interpret must be a bool or None'):
    MODULES[impl].attention(q, q, q, scale=1.0, interpret='yes')
  if impl == 'pallas_tpu':
    with pytest.raises(ValueError, match='float64'):
      pallas_tpu.attention(q.astype(jnp.float64), q, q, scale=1.0,
                           interpret=False)
    monkeypatch.setattr(pallas_tpu, 'SMEM_TABLE_BUDGET', 16)
    with pytest.raises(ValueError, match='bytes of SMEM'):
      pallas_tpu.attention(q, q, q, scale=1.0, interpret=False)


def test_tpu_smem_budget_steers_dispatch(monkeypatch):
  """On a TPU backend, tables over the SMEM budget: explicit use raises, None falls
  back (lengths known from the mask, segment ids or bias)."""
  kw = _kwargs(mask_obj=base.causal(1024))
  qkv = _qkv(1024)
  assert pallas_tpu.unsupported(*qkv, **kw) is None  # CPU: interpret runs all
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert pallas_tpu.unsupported(*qkv, **kw) is None  # 8 x 8 tiles fit
  q64 = tuple(x.astype(jnp.float64) for x in qkv)  # the file runs under x64
  assert 'float64' in pallas_tpu.unsupported(*q64, **kw)
  monkeypatch.setattr(pallas_tpu, 'SMEM_TABLE_BUDGET', 64)
  seg = jnp.zeros((1, 1024), jnp.int32)
  for case in (kw, _kwargs(q_segment_ids=seg, kv_segment_ids=seg),
               _kwargs(bias=jnp.zeros((1, 1, 1024, 1024))), _kwargs()):
    assert 'bytes of SMEM' in pallas_tpu.unsupported(*qkv, **case)
    assert api._select(None, 'tpu', qkv, case) is not pallas_tpu.attention
    with pytest.raises(ValueError, match="pallas_tpu.*bytes of SMEM"):
      api._select('pallas_tpu', 'tpu', qkv, case)


def test_block_size_validation():
  with pytest.raises(ValueError, match='block_q must be a positive multiple of 128'):
    pallas_tpu.BlockSizes(block_q=64)
  with pytest.raises(ValueError, match='block_kv must be a positive multiple of 128'):
    pallas_tpu.BlockSizes(block_kv=200)
  with pytest.raises(TypeError, match='block_q must be a positive int'):
    pallas_tpu.BlockSizes(block_q=128.0)
  with pytest.raises(ValueError, match='block_q must be a power of two'):
    pallas_gpu.BlockSizes(block_q=48)
  with pytest.raises(ValueError, match=r'block_kv must be >= 16'):
    pallas_gpu.BlockSizes(block_kv=8)
  with pytest.raises(ValueError, match='num_warps must be a power of two'):
    pallas_gpu.BlockSizes(num_warps=3)


@pytest.mark.parametrize('impl', IMPLS)
def test_explicit_block_sizes_and_default_interpret_on_cpu(impl):
  """Non-default tiles give the same answer (interpret is chosen on CPU); eager
  calls with an equal configuration reuse the compiled kernels."""
  b, t, n, h = 1, 96, 2, 16
  q, k, v, _, _, _ = _inputs(5, b, t, t, n, n, h, h, jnp.float32)
  sizes = (pallas_tpu.BlockSizes(block_q=256, block_kv=128)
           if impl == 'pallas_tpu' else
           pallas_gpu.BlockSizes(block_q=32, block_kv=16, num_warps=4))
  call = lambda: MODULES[impl].attention(
      q, k, v, scale=0.25, mask_obj=base.causal(t), block_sizes=sizes)
  got = call()
  compiled = common.run._cache_size()  # pylint: disable=protected-access
  np.testing.assert_array_equal(call(), got)  # same mask and options:
  assert common.run._cache_size() == compiled  # no new trace or compile
  want = _jit(functools.partial(api.dot_product_attention, scale=0.25,
                               is_causal=True, implementation='reference'))(
                                   q.astype(jnp.float64), k.astype(jnp.float64),
                                   v.astype(jnp.float64))
  assert _err(got, want) <= 2e-5


# ------------------------------------------------------------------ hardware lowering


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('impl,platform', [('pallas_tpu', 'tpu'),
                                           ('pallas_gpu', 'cuda')])
def test_lowers_for_hardware(impl, platform, dtype):
  """Forward + backward lower to Mosaic (TPU) / Triton (GPU) IR without interpret.

  This runs the Pallas hardware lowering (block-shape, dtype and primitive checks)
  on CPU; the final Mosaic / PTX compilation only happens on a real device.
  """
  b, t, n, kh, h = 1, 256, 4, 2, 128
  q = jnp.ones((b, t, n, h), dtype)
  kv = jnp.ones((b, t, kh, h), dtype)
  seg = jnp.zeros((b, t), jnp.int32)
  mask = base.causal(t) & base.from_array(_per_head_masks(t))

  def loss(q, k, v, sinks, bias):
    out = MODULES[impl].attention(
        q, k, v, scale=0.1, mask_obj=mask, logits_soft_cap=5.0, sinks=sinks,
        bias=bias, q_segment_ids=seg, kv_segment_ids=seg, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  text = grad.trace(q, kv, kv, jnp.zeros((n,), jnp.float32),
                    jnp.zeros((1, n, t, t), jnp.bfloat16)).lower(
                        lowering_platforms=(platform,)).as_text()
  marker = 'tpu_custom_call' if platform == 'tpu' else 'xla.gpu.triton'
  assert text.count(marker) == 3  # forward, dq, dk/dv
