"""BlockMask against the materialised mask: states, bitmaps, lists, heads, stats."""

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from attention import masks
from attention.masks import base
from attention.masks import block

EMPTY, PARTIAL, FULL = 0, 1, 2


def _tiles(dense, bq, bk):
  """Dense [H, T, S] -> padded tiles [H, nq, nk, bq, bk] (padding False)."""
  h, t, s = dense.shape
  nq, nk = -(-t // bq), -(-s // bk)
  pad = np.zeros((h, nq * bq, nk * bk), dtype=bool)
  pad[:, :t, :s] = dense
  return pad.reshape(h, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)


def check_block_mask(mask, bq, bk, num_heads=None):
  bm = masks.compile_mask(mask, bq, bk, num_heads=num_heads)
  heads = mask.num_heads or num_heads or 1
  dense = mask.materialize(heads)
  tiles = _tiles(dense, bq, bk)
  anyv, allv = tiles.any(axis=(3, 4)), tiles.all(axis=(3, 4))
  want_state = np.where(allv, FULL, np.where(anyv, PARTIAL, EMPTY))
  assert bm.num_heads == heads and len(bm.head_map) == heads
  np.testing.assert_array_equal(bm.materialize(), dense)
  # Every block state and every partial bitmap, per query head.
  for h in range(heads):
    u = bm.head_map[h]
    np.testing.assert_array_equal(bm.block_state[u], want_state[h])
    sel = want_state[h] == PARTIAL
    np.testing.assert_array_equal(bm.partial_index[u] >= 0, sel)
    np.testing.assert_array_equal(
        bm.partial_masks[bm.partial_index[u][sel]], tiles[h][sel])
  # Bitmaps deduplicated and all referenced; heads deduplicated.
  packed = {np.packbits(b).tobytes() for b in bm.partial_masks}
  assert len(packed) == len(bm.partial_masks)
  used = np.unique(bm.partial_index[bm.partial_index >= 0])
  np.testing.assert_array_equal(used, np.arange(len(bm.partial_masks)))
  keys = {bm.block_state[u].tobytes() + bm.partial_index[u].tobytes()
          for u in range(bm.num_unique_heads)}
  assert len(keys) == bm.num_unique_heads
  distinct_heads = {dense[h].tobytes() for h in range(heads)}
  assert bm.num_unique_heads == len(distinct_heads)
  _check_lists(bm)
  return bm


def _check_lists(bm):
  u, nq, nk = bm.block_state.shape
  for name, state, pidx, idx, cnt, part in (
      ('kv', bm.block_state, bm.partial_index, bm.kv_indices, bm.kv_counts,
       bm.kv_partial),
      ('q', bm.block_state.transpose(0, 2, 1), bm.partial_index.transpose(
          0, 2, 1), bm.q_indices, bm.q_counts, bm.q_partial)):
    for a in range(u):
      for r in range(state.shape[1]):
        active = np.nonzero(state[a, r] != EMPTY)[0]
        c = cnt[a, r]
        assert c == len(active), name
        np.testing.assert_array_equal(idx[a, r, :c], active)
        np.testing.assert_array_equal(part[a, r, :c], pidx[a, r, active])
        pad = idx[a, r, c:]
        assert (pad == (active[-1] if c else 0)).all(), name
        assert (part[a, r, c:] == -1).all(), name
  # Transposed lists describe the same set of (q block, kv block) pairs.
  fwd = {(a, r, int(k)) for a in range(u) for r in range(nq)
         for k in bm.kv_indices[a, r, :bm.kv_counts[a, r]]}
  bwd = {(a, int(q), c) for a in range(u) for c in range(nk)
         for q in bm.q_indices[a, c, :bm.q_counts[a, c]]}
  assert fwd == bwd


SMALL_MASKS = {
    'causal': masks.causal(37, 41, offset=3),
    'sliding': masks.sliding_window(40, 5, 2),
    'chunked': masks.chunked_causal(40, 7),
    'sink': masks.sink_window(40, 3, 6),
    'prefix': masks.prefix_lm(40, 11),
    'segments': masks.segments(np.repeat([0, 1, 2, 4], [9, 3, 14, 14])),
    'documents': masks.documents([9, 3, 14, 14]),
    'modality': masks.modality_mutual(
        np.array([1] * 6 + [0] * 9 + [1] * 10 + [0] * 15),
        np.repeat([0, 1], [15, 25])),
    'pine': masks.bidirectional_segments(np.repeat([-1, 0, 1, 2, -1],
                                                   [4, 9, 9, 9, 9])),
    'nb2d': masks.neighborhood((8, 6), (3, 4), (2, 1), (1, 1), (False, True)),
    'nb3d': masks.neighborhood((3, 4, 4), (2, 3, 2), 1, (1, 1, 2)),
    'halo': masks.halo_blocks((8, 8), 4, 1),
    'crossformer': masks.crossformer((8, 8), 4, 'long'),
    'power': masks.power_attention(48, 4, 1, 1, token_causal=True),
    's2': masks.s2_attention(48, 4, 4, 1, 4, dense_heads=(3,)),
    'radial': masks.radial(6, 8),
    'moa': masks.moa(40, [[3, 0.1], [7, 0.0], [3, 0.1]], num_sinks=2),
    'per_head': masks.per_head([masks.causal(40), masks.prefix_lm(40, 9)]),
    'and_or_not': (masks.causal(40) & ~masks.sliding_window(40, 2, 0)) |
                  masks.prefix_lm(40, 3),
    'dense': masks.from_array(np.random.default_rng(0).random((2, 30, 33)) > .6),
    'full': masks.full(30, 20),
}


@pytest.mark.parametrize('name', sorted(SMALL_MASKS))
@pytest.mark.parametrize('bq,bk', [(8, 8), (16, 8), (5, 7), (48, 64)])
def test_block_mask_matches_dense(name, bq, bk):
  check_block_mask(SMALL_MASKS[name], bq, bk)


@pytest.mark.parametrize('name', sorted(SMALL_MASKS))
def test_analytic_claims_are_exact(name):
  # EMPTY / FULL claims of the analytic classification are never wrong.
  mask = SMALL_MASKS[name]
  for bq, bk in [(8, 8), (5, 7), (16, 4)]:
    t, s = mask.shape
    nq, nk = -(-t // bq), -(-s // bk)
    for h in range(mask.num_heads or 1):
      m = mask.head(h) if mask.head_dependent else mask
      classes = m._block_classes(bq, bk, nq, nk)  # pylint: disable=protected-access
      if classes is None:
        continue
      dense = _tiles(m.materialize()[None], bq, bk)[0]
      assert not dense[classes == EMPTY].any()
      assert dense[classes == FULL].all()


@hypothesis.given(data=st.data())
def test_neighborhood_blocks_property(data):
  rank = data.draw(st.integers(1, 3))
  grid, window, stride, dilation = [], [], [], []
  for _ in range(rank):
    n = data.draw(st.integers(2, {1: 40, 2: 10, 3: 5}[rank]))
    d = data.draw(st.integers(1, 2))
    w = data.draw(st.integers(1, max(1, n // d)))
    grid.append(n)
    window.append(w)
    stride.append(data.draw(st.integers(1, w)))
    dilation.append(d)
  causal = tuple(data.draw(st.booleans()) for _ in range(rank))
  mask = masks.neighborhood(tuple(grid), tuple(window), tuple(stride),
                            tuple(dilation), causal)
  bq = data.draw(st.sampled_from([1, 2, 4, 5, 8, 16]))
  bk = data.draw(st.sampled_from([2, 4, 6, 8, 16]))
  check_block_mask(mask, bq, bk)


def test_grid_fast_path_and_count_path_agree():
  m = masks.neighborhood((8, 12), (3, 5), 1, (2, 1), (True, False))
  fast = m._block_structure(8, 4, 12, 24)  # pylint: disable=protected-access
  assert fast is not None
  classes = m._block_classes(8, 4, 12, 24)  # pylint: disable=protected-access
  np.testing.assert_array_equal(fast[0], classes)  # both exact
  assert m._block_structure(7, 4, 14, 24) is None  # pylint: disable=protected-access


def test_head_independent_mask_shared_by_heads():
  bm = check_block_mask(masks.causal(64), 16, 16, num_heads=8)
  assert bm.num_unique_heads == 1 and (bm.head_map == 0).all()


def test_identical_heads_deduplicated():
  ms = [masks.causal(32), masks.sliding_window(32, 4, 0), masks.causal(32),
        masks.sliding_window(32, 4, 0)]
  bm = check_block_mask(masks.per_head(ms), 8, 8)
  assert bm.num_unique_heads == 2
  assert bm.head_map.tolist() == [0, 1, 0, 1]


def test_compile_is_cached():
  a = masks.compile_mask(masks.neighborhood((16, 16), 5), 32, 32)
  b = masks.compile_mask(masks.neighborhood((16, 16), (5, 5)), 32, 32)
  assert a is b


def test_padding_is_reported():
  bm = masks.compile_mask(masks.causal(100), 32, 48)
  assert bm.padded and bm.padded_q_len == 128 and bm.padded_kv_len == 144
  st_ = bm.stats()
  assert st_['padded'] and 'padded to (128, 144)' in st_['padding']
  assert not masks.compile_mask(masks.causal(64), 32, 32).stats()['padded']


@pytest.mark.parametrize('name', ['causal', 'nb2d', 's2', 'radial', 'moa'])
def test_stats_against_dense(name):
  mask = SMALL_MASKS[name]
  bq, bk = 8, 16
  bm = masks.compile_mask(mask, bq, bk)
  heads = mask.num_heads or 1
  dense = mask.materialize(heads)
  tiles = _tiles(dense, bq, bk)
  anyv, allv = tiles.any(axis=(3, 4)), tiles.all(axis=(3, 4))
  st_ = bm.stats()
  assert st_['full_blocks'] == allv.sum()
  assert st_['partial_blocks'] == (anyv & ~allv).sum()
  assert st_['empty_blocks'] == (~anyv).sum()
  np.testing.assert_allclose(st_['density'], dense.mean())
  computed = anyv.sum()
  np.testing.assert_allclose(st_['flop_fraction'],
                             computed * bq * bk / dense.size)
  np.testing.assert_allclose(st_['speedup_bound'], anyv.size / computed)
  np.testing.assert_allclose(bm.tile_density()[bm.head_map[0]],
                             tiles[0].sum(axis=(2, 3)) / _real_area(bm))


def _real_area(bm):
  rows = np.diff(np.minimum(np.arange(bm.num_q_blocks + 1) * bm.block_q,
                            bm.q_len))
  cols = np.diff(np.minimum(np.arange(bm.num_kv_blocks + 1) * bm.block_kv,
                            bm.kv_len))
  return rows[:, None] * cols[None, :]


def test_empty_mask_stats():
  bm = masks.compile_mask(~masks.full(16, 16), 8, 8)
  st_ = bm.stats()
  assert st_['density'] == 0 and st_['speedup_bound'] == float('inf')
  assert (bm.kv_counts == 0).all() and (bm.kv_indices == 0).all()


def test_plot_writes_png(tmp_path):
  bm = masks.compile_mask(SMALL_MASKS['nb2d'], 8, 8)
  path = bm.plot(str(tmp_path / 'mask.png'))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  big = masks.compile_mask(masks.causal(4096), 256, 256)
  big.plot(str(tmp_path / 'big.png'), max_pixels=1000)
  assert (tmp_path / 'big.png').stat().st_size > 0
  with pytest.raises(ValueError, match='head'):
    bm.plot(str(tmp_path / 'x.png'), head=3)


def test_compile_bad_inputs():
  with pytest.raises(ValueError, match='block_q'):
    masks.compile_mask(masks.causal(8), 0, 8)
  with pytest.raises(TypeError, match='block_kv'):
    masks.compile_mask(masks.causal(8), 8, 2.0)
  with pytest.raises(TypeError, match='mask'):
    masks.compile_mask(np.ones((8, 8), bool), 8, 8)
  with pytest.raises(ValueError, match='num_heads'):
    masks.compile_mask(masks.s2_attention(16, 2, 4, 1, 2), 8, 8, num_heads=3)
  with pytest.raises(ValueError, match='num_heads'):
    masks.compile_mask(masks.causal(8), 8, 8, num_heads=0)


def test_large_masks_compile_without_dense():
  # Guard: these never evaluate more than the partial tiles.
  calls = []

  class Spy(base.Causal):

    def _predicate(self, q, k, h):
      calls.append(np.broadcast_shapes(np.shape(q), np.shape(k)))
      return super()._predicate(q, k, h)

  bm = block.compile_mask(Spy((8192, 8192), 0), 128, 128)
  evaluated = sum(int(np.prod(c)) for c in calls)
  assert evaluated <= 64 * 128 * 128  # only the 64 diagonal tiles
  assert bm.stats()['partial_blocks'] == 64


@pytest.mark.parametrize('mask,bq,bk', [
    (masks.neighborhood((16, 16), 5), 24, 40),
    (masks.neighborhood((12, 20), (3, 7), (1, 2), 1, (True, False)), 48, 80),
    (masks.neighborhood((8, 8, 8), 3, 1, (2, 1, 1)), 96, 64),
    (masks.radial(5, 40), 16, 24),
    (masks.radial(4, 48), 32, 64),
])
def test_structure_composed_from_fine_tiles(mask, bq, bk):
  # Blocks that do not divide the grid / frame: the exact structure is assembled
  # from gcd-sized tiles; it must agree with the dense mask everywhere.
  t, s = mask.shape
  structure = mask._block_structure(bq, bk, -(-t // bq), -(-s // bk))  # pylint: disable=protected-access
  assert structure is not None
  check_block_mask(mask, bq, bk)


@hypothesis.given(name=st.sampled_from(sorted(SMALL_MASKS)),
                  bq=st.integers(1, 24), bk=st.integers(1, 24))
def test_any_block_sizes(name, bq, bk):
  check_block_mask(SMALL_MASKS[name], bq, bk)


def test_large_grid_uses_no_predicate(monkeypatch):
  # The 65,536-token 2-D neighborhood compiles from per-axis tables alone.
  def boom(*args):
    raise AssertionError('predicate evaluated')

  monkeypatch.setattr(masks.Neighborhood, '_predicate', boom)
  block.clear_cache()
  bm = masks.compile_mask(masks.neighborhood((256, 256), 9), 128, 128)
  st_ = bm.stats()
  assert st_['num_q_blocks'] == 512 and st_['full_blocks'] == 0
  np.testing.assert_allclose(st_['density'], 81 / 65536)
  block.clear_cache()
