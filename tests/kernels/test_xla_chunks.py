"""Tests of the forward "kv chunks" of kernels/xla.py (several kv blocks per step).

Segments, dense masks and lanes with chunks: test_xla.test_segments_dense_mask_*;
no re-tracing: test_xla.test_no_recompilation_same_shapes_and_mask.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention.masks import base
from kernels import xla
from tests.kernels import test_xla as helpers

_rand = helpers._rand  # pylint: disable=protected-access
_window = helpers._window  # pylint: disable=protected-access
_check = helpers._check_against_oracles  # pylint: disable=protected-access


def _two_bands(t, s):
  """A window of 4 keys or a band 21..24 keys back: chunks hold EMPTY blocks."""
  far = base.causal(t, s, offset=-21) & ~base.causal(t, s, offset=-25)
  return _window(t, s, 3) | far


def _head_dependent(t, s):
  rng = np.random.default_rng(11)
  dense = np.stack([_window(t, s, 6).materialize(),
                    rng.random((t, s)) < 0.3,
                    _two_bands(t, s).materialize(),
                    _window(t, s, 6).materialize()])
  dense[1, 4:7] = False  # rows that see nothing
  return base.from_array(dense)


# name -> (mask builder, T, S, block_q, block_kv, kv_chunk)
_CASES = {
    'window5_chunk3': (lambda t, s: _window(t, s, 5), 45, 45, 8, 8, 3),
    'window13_chunk5': (lambda t, s: _window(t, s, 13), 45, 45, 16, 8, 5),
    'window30_chunk2_cross': (lambda t, s: _window(t, s, 30), 45, 37, 8, 16, 2),
    'two_bands_chunk4': (_two_bands, 45, 45, 8, 8, 4),
    'head_dependent_chunk3': (_head_dependent, 40, 40, 8, 8, 3),
    'chunk_past_last_block': (lambda t, s: _window(t, s, 9), 37, 37, 8, 8, 50),
    'no_mask_chunk3_cross': (lambda t, s: None, 29, 37, 8, 8, 3),
}


@pytest.mark.parametrize('name', list(_CASES))
def test_chunked_forward_matches_oracles(name):
  build, t, s, bq, bk, chunk = _CASES[name]
  rng = np.random.default_rng(sum(map(ord, name)))
  b, n, kh = 2, 4, 2
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 5)
    bias_shape = [(1, n, 1, s), (b, 1, t, s), (b, n, t, 1)][len(name) % 3]
    _check(q, k, v, mask_obj=build(t, s), bias=_rand(rng, *bias_shape),
           logits_soft_cap=2.0 if 'window' in name else None,
           sinks=_rand(rng, n) if len(name) % 2 else None,
           impl_kwargs=dict(block_q=bq, block_kv=bk, kv_chunk=chunk))


@pytest.mark.parametrize('mask_name, chunk, bwd', [
    ('two_bands', 4, (None, None)), ('window', 50, (None, None)),
    ('window', 1, (16, 8)), ('two_bands', 2, (8, 24))])
def test_chunked_gradients_match_reference(mask_name, chunk, bwd):
  rng = np.random.default_rng(13)
  b, t, n, kh = 2, 33, 4, 2
  mask_obj = _two_bands(t, t) if mask_name == 'two_bands' else _window(t, t, 9)
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, t, kh, 8), _rand(rng, b, t, kh, 6)
    bias, sinks = _rand(rng, 1, n, t, t), _rand(rng, n)
    kwargs = dict(scale=0.4, logits_soft_cap=3.0, mask_obj=mask_obj)
    impl = functools.partial(helpers._xla, block_q=8, block_kv=8, kv_chunk=chunk,
                             bwd_block_q=bwd[0], bwd_block_kv=bwd[1])
    got = helpers._grads(impl, q, k, v, bias, sinks, **kwargs)  # pylint: disable=protected-access
    want = helpers._grads(helpers._ref, q, k, v, bias, sinks,  # pylint: disable=protected-access
                          **kwargs)
    for name, g, w in zip(('dq', 'dk', 'dv', 'dbias', 'dsinks'), got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-9,
                                 rtol=1e-9, err_msg=name)


@pytest.mark.parametrize('build, chunk', [(_two_bands, 4),
                                          (lambda t, s: _window(t, s, 20), 3),
                                          (lambda t, s: base.causal(t, s), 2),
                                          (lambda t, s: _window(t, s, 9), 20)])
def test_chunk_plan_covers_each_visible_pair_once(build, chunk):
  t, bq, bk = 60, 8, 8
  mask_obj = build(t, t)
  plan = xla._make_plan(mask_obj, 1, 1, bq, bk, 1, 1, chunk)  # pylint: disable=protected-access
  nq, nk = plan.num_q_blocks, plan.num_kv_blocks
  width = max(nk, chunk) * bk
  dense = np.zeros((nq * bq, width), bool)
  dense[:t, :t] = mask_obj.materialize()
  (grp,) = plan.groups
  lists = grp.fwd
  saw_inner_empty = False
  for g, r in enumerate(lists.order[:, 0]):
    count = np.zeros((bq, width), np.int64)
    for kind, cols, trips in (('full', lists.full_cols, lists.full_trips),
                              ('part', lists.part_cols, lists.part_trips)):
      for a in range(trips[g]):
        col = int(cols[g, a, 0])
        assert 0 <= col and (col + chunk) * bk <= width, 'chunks need no clamping'
        if kind == 'full':
          got = np.ones((bq, chunk * bk), bool)
        else:
          got = plan.chunk_bitmaps[lists.part_bitmap[g, a, 0]]
          members = got.reshape(bq, chunk, bk).any(axis=(0, 2))
          on = np.nonzero(members)[0]
          saw_inner_empty |= bool(len(on) and not members[on[0]:on[-1]].all())
        count[:, col * bk:(col + chunk) * bk] += got
    # The chunks' bitmaps (brute force) see every visible pair exactly once.
    np.testing.assert_array_equal(count, dense[r * bq:(r + 1) * bq].astype(np.int64))
  if build is _two_bands:
    assert saw_inner_empty
  # Interior chunks of a window share one deduplicated bitmap.
  assert plan.chunk_bitmaps.shape[0] <= 2 * nq


def test_auto_tiling_chunks_windows_and_keeps_causal():
  t = 16384
  win = base.causal(t) & ~base.causal(t, offset=-512)
  bq, bk, chunk = xla.tiling_for(t, t, win)
  assert chunk > 1 and bq >= 128
  assert xla._tiling_cost(win, bq, bk, chunk) < xla._tiling_cost(win, 256, 256, 1)  # pylint: disable=protected-access
  assert xla.tiling_for(t, t, base.causal(t)) == (512, 256, 1)
  assert xla.tiling_for(t, t, None) == (512, 256, 1)
  # Overrides are kept; the rest is still chosen.
  assert xla.tiling_for(t, t, win, kv_chunk=1)[2] == 1
  assert xla.tiling_for(t, t, win, block_q=64, block_kv=64, kv_chunk=9) == (64, 64, 9)
  assert xla.tiling_for(t, t, win, block_q=64)[0] == 64
  # A chunk covers its EMPTY members too, so chunked plans visit more area.
  assert (xla.visited_fraction(t, t, win, block_q=64, block_kv=64, kv_chunk=9) ==
          pytest.approx(256 * 9 / 256**2))


@pytest.mark.parametrize('call, error', [
    (lambda q: helpers._xla(q, q, q, scale=1.0, kv_chunk=0), ValueError),
    (lambda q: helpers._xla(q, q, q, scale=1.0, kv_chunk=2.0), TypeError),
    (lambda q: helpers._xla(q, q, q, scale=1.0, kv_chunk=True), TypeError),
    (lambda q: xla.tiling_for(8, 8, None, kv_chunk=-1), ValueError),
    (lambda q: xla.visited_fraction(8, 8, None, kv_chunk='2'), TypeError),
])
def test_bad_kv_chunk_raises(call, error):
  with pytest.raises(error, match='kv_chunk'):
    call(jnp.zeros((1, 8, 2, 4)))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(bwd_block_q=0), ValueError, 'bwd_block_q'),
    (dict(bwd_block_kv=2.5), TypeError, 'bwd_block_kv'),
])
def test_bad_bwd_blocks_raise(kwargs, error, match):
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(error, match=match):
    helpers._xla(q, q, q, scale=1.0, **kwargs)


def test_auto_bwd_tiling_widens_kv_for_dense_structures():
  t = 4096
  win = base.causal(t) & ~base.causal(t, offset=-512)
  assert xla.bwd_tiling_for(t, t, base.causal(t)) == (256, 512)
  assert xla.bwd_tiling_for(t, t, None) == (256, 512)
  assert xla.bwd_tiling_for(t, 300, None) == (256, 304)  # capped at the 8-aligned S
  # Banded (chunked) forward tilings get square power-of-two tiles up to block_q;
  # short sequences keep the forward's tiles.
  bq = xla.tiling_for(t, t, win)[0]
  side = xla.bwd_tiling_for(t, t, win)[0]
  assert xla.bwd_tiling_for(t, t, win) == (side, side)
  assert side <= bq < 2 * side and side & (side - 1) == 0
  assert xla.bwd_tiling_for(t, t, win, block_q=192, kv_chunk=11) == (128, 128)
  assert xla.bwd_tiling_for(100, 100, None) == (104, 104)
  # Given values are kept, explicit forward tiles change the automatic choice.
  assert xla.bwd_tiling_for(t, t, None, bwd_block_q=64) == (64, 512)
  assert xla.bwd_tiling_for(t, t, None, block_q=128) == (128, 256)
  with pytest.raises(ValueError, match='bwd_block_kv'):
    xla.bwd_tiling_for(t, t, None, bwd_block_kv=-8)


def test_default_dense_backward_tiles_match_reference():
  """T = 512, S = 600: one-block forward steps, 256 x 512 backward tiles (padded)."""
  rng = np.random.default_rng(17)
  b, t, s, n, kh = 1, 512, 600, 4, 2
  mask_obj = base.causal(t, s)
  assert xla.tiling_for(t, s, mask_obj)[2] == 1
  assert xla.bwd_tiling_for(t, s, mask_obj) == (256, 512)
  with jax.enable_x64(True):
    q, k, v = _rand(rng, b, t, n, 8), _rand(rng, b, s, kh, 8), _rand(rng, b, s, kh, 6)
    bias, sinks = _rand(rng, 1, n, t, s), _rand(rng, n)
    q_seg = jnp.asarray(np.repeat(np.arange(3), [200, 200, 112])[None])
    kv_seg = jnp.asarray(np.repeat(np.arange(3), [200, 200, 200])[None])
    kwargs = dict(scale=0.4, logits_soft_cap=3.0, mask_obj=mask_obj,
                  q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    got = helpers._grads(helpers._xla, q, k, v, bias, sinks, **kwargs)  # pylint: disable=protected-access
    want = helpers._grads(helpers._ref, q, k, v, bias, sinks,  # pylint: disable=protected-access
                          **kwargs)
    for name, g, w in zip(('dq', 'dk', 'dv', 'dbias', 'dsinks'), got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-9,
                                 rtol=1e-9, err_msg=name)


def test_automatic_banded_backward_tiles_match_reference():
  """A chunked forward (192-row blocks) with its automatic 128 x 128 backward tiles."""
  rng = np.random.default_rng(23)
  t, n, kh = 400, 4, 2
  mask_obj = base.causal(t) & ~base.causal(t, offset=-150)
  fwd = xla.tiling_for(t, t, mask_obj, block_q=192, kv_chunk=6)
  assert fwd[2] == 6 and xla.bwd_tiling_for(t, t, mask_obj, block_q=192,
                                            kv_chunk=6) == (128, 128)
  with jax.enable_x64(True):
    q, k, v = _rand(rng, 1, t, n, 8), _rand(rng, 1, t, kh, 8), _rand(rng, 1, t, kh, 6)

    def loss(fn):
      return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    ours = loss(lambda q, k, v: helpers._xla(q, k, v, scale=0.35, mask_obj=mask_obj,
                                              block_q=192, kv_chunk=6))
    ref = loss(lambda q, k, v: helpers._ref(q, k, v, scale=0.35,
                                                   mask_obj=mask_obj))
    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize('head_dim, error', [(0, ValueError), (2.5, TypeError)])
def test_tiling_for_bad_head_dim_raises(head_dim, error):
  with pytest.raises(error, match='head_dim'):
    xla.tiling_for(64, 64, None, head_dim=head_dim)
  with pytest.raises(error, match='head_dim'):
    xla.bwd_tiling_for(64, 64, None, head_dim=head_dim)
