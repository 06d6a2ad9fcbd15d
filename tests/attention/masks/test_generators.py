"""Every mask generator against a brute-force loop written from the spec."""

import math

import hypothesis
from hypothesis import strategies as st
import numpy as np
import pytest

from attention import masks
from tests.attention.masks import oracles


def _eq(mask, expected):
  got = mask.materialize()
  assert got.shape == expected.shape
  np.testing.assert_array_equal(got, expected)


# ----- static -----
@hypothesis.given(t=st.integers(1, 40), s=st.integers(1, 40),
                  left=st.one_of(st.none(), st.integers(0, 12)),
                  right=st.one_of(st.none(), st.integers(0, 12)),
                  offset=st.integers(-5, 5))
def test_sliding_window(t, s, left, right, offset):
  _eq(masks.sliding_window(t, left, right, kv_len=s, offset=offset),
      oracles.sliding_window(t, s, left, right, offset))


@hypothesis.given(t=st.integers(1, 40), s=st.integers(1, 40),
                  offset=st.integers(-5, 5))
def test_causal(t, s, offset):
  _eq(masks.causal(t, s, offset), oracles.causal(t, s, offset))


@hypothesis.given(t=st.integers(1, 40), chunk=st.integers(1, 12))
def test_chunked_causal(t, chunk):
  _eq(masks.chunked_causal(t, chunk), oracles.chunked_causal(t, t, chunk))


@hypothesis.given(t=st.integers(1, 40), sinks=st.integers(0, 6),
                  window=st.integers(0, 12))
def test_sink_window(t, sinks, window):
  _eq(masks.sink_window(t, sinks, window),
      oracles.sink_window(t, t, sinks, window))


@hypothesis.given(t=st.integers(1, 40), prefix=st.integers(0, 45))
def test_prefix_lm(t, prefix):
  _eq(masks.prefix_lm(t, prefix), oracles.prefix_lm(t, t, prefix))


@hypothesis.given(q_ids=st.lists(st.integers(0, 4), min_size=1, max_size=30),
                  kv_ids=st.lists(st.integers(0, 4), min_size=1, max_size=30))
def test_segments_cross(q_ids, kv_ids):
  _eq(masks.segments(np.array(q_ids), np.array(kv_ids)),
      oracles.segments(q_ids, kv_ids))


def test_documents_is_segments_and_causal():
  lengths = [3, 7, 1, 9]
  ids = np.repeat(np.arange(4), lengths)
  expected = oracles.segments(ids, ids) & oracles.causal(20, 20)
  _eq(masks.documents(lengths), expected)
  _eq(masks.documents(lengths, causal=False), oracles.segments(ids, ids))


@hypothesis.given(img=st.lists(st.booleans(), min_size=1, max_size=30),
                  data=st.data())
def test_modality_mutual(img, data):
  sample = sorted(data.draw(st.lists(st.integers(0, 2), min_size=len(img),
                                     max_size=len(img))))
  _eq(masks.modality_mutual(np.array(img), np.array(sample)),
      oracles.modality_mutual(img, sample))


def test_modality_mutual_example():
  # Sample: [img img txt txt] -> images see the following text; text is causal.
  m = masks.modality_mutual([1, 1, 0, 0]).materialize()
  assert m[0].tolist() == [True, False, True, True]
  assert m[1].tolist() == [True, True, True, True]
  assert m[2].tolist() == [True, True, True, False]


@hypothesis.given(seg=st.lists(st.integers(-1, 3), min_size=1, max_size=30))
def test_bidirectional_segments(seg):
  _eq(masks.bidirectional_segments(np.array(seg)), oracles.pine(seg))


def test_per_head_selects_each_mask():
  ms = [masks.causal(12), masks.sliding_window(12, 2, 1),
        masks.prefix_lm(12, 4)]
  m = masks.per_head(ms)
  dense = m.materialize()
  for h, mh in enumerate(ms):
    np.testing.assert_array_equal(dense[h], mh.materialize())
    assert m.head(h) == mh


# ----- neighborhood family -----
@st.composite
def _nb_params(draw):
  rank = draw(st.integers(1, 3))
  max_n = {1: 16, 2: 8, 3: 5}[rank]
  grid, window, stride, dilation, causal = [], [], [], [], []
  for _ in range(rank):
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(1, max(1, min(3, n))))
    w = draw(st.integers(1, max(1, n // d)))
    s = draw(st.integers(1, w))
    grid.append(n)
    window.append(w)
    stride.append(s)
    dilation.append(d)
    causal.append(draw(st.booleans()))
  return tuple(grid), tuple(window), tuple(stride), tuple(dilation), tuple(causal)


@hypothesis.given(params=_nb_params())
def test_neighborhood(params):
  grid, window, stride, dilation, causal = params
  _eq(masks.neighborhood(grid, window, stride, dilation, causal),
      oracles.neighborhood(grid, window, stride, dilation, causal))


@pytest.mark.parametrize('n,w', [(9, 3), (10, 4), (7, 7), (12, 5)])
def test_neighborhood_has_exactly_window_keys(n, w):
  # Non-causal neighborhood attention (s = 1, no dilation): every query sees
  # exactly w keys, the window clamped at the borders (NAT / NATTEN semantics).
  m = masks.neighborhood((n,), w).materialize()
  assert (m.sum(1) == w).all()
  m2 = masks.neighborhood((n, n), (w, w)).materialize()
  assert (m2.sum(1) == w * w).all()


@pytest.mark.parametrize('n,w', [(8, 4), (9, 3), (6, 2)])
def test_stride_equal_window_is_blocked(n, w):
  q = np.arange(n)
  expected = (q[:, None] // w) == (q[None, :] // w)
  _eq(masks.neighborhood((n,), w, stride=w), expected)
  grid = (n, n)
  i = np.arange(n * n)
  r, c = i // n, i % n
  blocked = (((r[:, None] // w) == (r[None, :] // w)) &
             ((c[:, None] // w) == (c[None, :] // w)))
  _eq(masks.neighborhood(grid, w, stride=w), blocked)


def test_causal_neighborhood_window_one_is_diagonal():
  _eq(masks.neighborhood((6,), 1, causal=True), np.eye(6, dtype=bool))


@hypothesis.given(grid=st.tuples(st.integers(1, 3), st.integers(1, 3)).map(
    lambda g: (g[0] * 2, g[1] * 3)), halo=st.integers(0, 2))
def test_halo(grid, halo):
  _eq(masks.halo_blocks(grid, (2, 3), halo),
      oracles.halo(grid, (2, 3), (halo, halo)))


@pytest.mark.parametrize('kind', ['short', 'long'])
def test_crossformer(kind):
  grid, size = (6, 8), (3, 2)
  _eq(masks.crossformer(grid, size, kind),
      oracles.crossformer(grid, size, kind == 'long'))


def test_crossformer_3d():
  _eq(masks.crossformer((2, 4, 4), (1, 2, 2), 'long'),
      oracles.crossformer((2, 4, 4), (1, 2, 2), True))


# ----- long context -----
@hypothesis.given(t=st.integers(1, 60), block=st.integers(1, 6),
                  sinks=st.integers(0, 3), local=st.integers(0, 3),
                  token_causal=st.booleans())
def test_power_attention(t, block, sinks, local, token_causal):
  _eq(masks.power_attention(t, block, sinks, local, token_causal),
      oracles.power(t, block, sinks, local, token_causal))


@hypothesis.given(t=st.integers(1, 48), heads=st.integers(1, 5),
                  block=st.integers(1, 5), local=st.integers(0, 3),
                  vert=st.integers(1, 6), offset=st.integers(0, 4),
                  token_causal=st.booleans(), data=st.data())
def test_s2_attention(t, heads, block, local, vert, offset, token_causal, data):
  dense = tuple(data.draw(st.sets(st.integers(0, heads - 1), max_size=2)))
  m = masks.s2_attention(t, heads, block, local, vert, offset, dense,
                         token_causal)
  _eq(m, oracles.s2(t, heads, block, local, vert, offset, dense, token_causal))


def test_s2_union_covers_every_block():
  # With as many heads as the stride, the heads' strided columns tile every block.
  t, block, heads = 64, 4, 8
  m = masks.s2_attention(t, heads, block, local_blocks=1, vert_stride=8)
  union = m.materialize().any(0)
  _eq(masks.power_attention(t, block, 0, 100), union)  # all blocks kb <= qb


@hypothesis.given(frames=st.integers(1, 9), s=st.integers(1, 9))
def test_radial(frames, s):
  _eq(masks.radial(frames, s), oracles.radial(frames, s))


def test_radial_density_decays_with_distance():
  m = masks.radial(16, 16).materialize().reshape(16, 16, 16, 16)
  per_frame = m.sum(axis=(1, 3))[8]  # keys seen from frame 8, per key frame
  assert per_frame[8] == 256 and per_frame[0] == 256  # self frame, sink frame
  assert per_frame[7] > per_frame[6] > per_frame[4]


@hypothesis.given(t=st.integers(1, 40), sinks=st.integers(0, 3),
                  plan=st.lists(st.tuples(st.integers(1, 6),
                                          st.sampled_from([0.0, 0.1, 0.25, 0.5])),
                                min_size=1, max_size=4))
def test_moa(t, sinks, plan):
  _eq(masks.moa(t, plan, num_sinks=sinks), oracles.moa(t, t, plan, sinks))


def test_moa_layer_plan():
  plan = np.array([[[2, 0.0], [4, 0.0]], [[1, 0.5], [3, 0.0]]])
  m = masks.moa(10, plan, layer=1)
  assert m.spans == (6, 3)
  _eq(m, oracles.moa(10, 10, plan[1], 0))


# ----- combinators -----
def test_combinators_and_bool():
  a, b = masks.causal(16), masks.sliding_window(16, 3, 3)
  _eq(a & b, oracles.causal(16, 16) & oracles.sliding_window(16, 16, 3, 3))
  _eq(a | b, oracles.causal(16, 16) | oracles.sliding_window(16, 16, 3, 3))
  _eq(~a, ~oracles.causal(16, 16))
  with pytest.raises(TypeError, match='truth value'):
    bool(a)
  with pytest.raises(TypeError, match='truth value'):
    _ = a and b


def test_head_dependent_and_independent_compose():
  m = masks.s2_attention(32, 3, 4, 1, 3) & masks.causal(32)
  dense = m.materialize()
  assert dense.shape == (3, 32, 32)
  np.testing.assert_array_equal(
      dense, oracles.s2(32, 3, 4, 1, 3, 0, (), True))
  np.testing.assert_array_equal(m.head(2).materialize(), dense[2])


def test_masks_hash_by_content():
  assert masks.neighborhood((4, 4), 3) == masks.neighborhood((4, 4), (3, 3))
  assert hash(masks.segments([0, 0, 1])) == hash(masks.segments(
      np.array([0, 0, 1])))
  assert masks.segments([0, 0, 1]) != masks.segments([0, 1, 1])


# ----- bad inputs -----
@pytest.mark.parametrize('fn,match', [
    (lambda: masks.sliding_window(8, -1, 0), 'left'),
    (lambda: masks.sliding_window(8, 1, -2), 'right'),
    (lambda: masks.sliding_window(0, 1, 1), 'q_len'),
    (lambda: masks.chunked_causal(8, 0), 'chunk'),
    (lambda: masks.sink_window(8, -1, 2), 'num_sinks'),
    (lambda: masks.sink_window(8, 1, -2), 'window'),
    (lambda: masks.prefix_lm(8, -1), 'prefix_len'),
    (lambda: masks.segments(np.zeros((2, 2), int)), 'q_segment_ids'),
    (lambda: masks.documents([3, 0]), r'lengths\[1\]'),
    (lambda: masks.modality_mutual([0, 2]), 'is_image'),
    (lambda: masks.modality_mutual([0, 1], [0]), 'sample_ids'),
    (lambda: masks.bidirectional_segments([0, -2]), 'segment_ids'),
    (lambda: masks.neighborhood((8,), -1), r'window\[0\]'),
    (lambda: masks.neighborhood((8, 8), 3, stride=(1, 4)), r'stride\[1\]'),
    (lambda: masks.neighborhood((8, 8), 3, dilation=(3, 1)), r'dilation\[0\]'),
    (lambda: masks.neighborhood((8, 8), (3, 9)), r'window\[1\]'),
    (lambda: masks.neighborhood((8, 8), 3, seq_len=65), 'seq_len'),
    (lambda: masks.neighborhood((8, 8), (3, 3, 3)), 'window'),
    (lambda: masks.neighborhood((2, 2, 2, 2), 1), 'grid'),
    (lambda: masks.neighborhood((8,), 3, causal=(True, False)), 'causal'),
    (lambda: masks.halo_blocks((8, 9), 4, 1), r'block\[1\]'),
    (lambda: masks.halo_blocks((8, 8), 4, -1), r'halo\[0\]'),
    (lambda: masks.crossformer((8, 8), 3), r'size\[0\]'),
    (lambda: masks.crossformer((8, 8), 2, 'medium'), 'kind'),
    (lambda: masks.power_attention(16, 0), 'block_size'),
    (lambda: masks.s2_attention(16, 2, 4, 1, 0), 'vert_stride'),
    (lambda: masks.s2_attention(16, 2, 4, 1, 2, dense_heads=(2,)),
     r'dense_heads\[0\]'),
    (lambda: masks.radial(4, 4, seq_len=15), 'seq_len'),
    (lambda: masks.moa(8, [[0, 0.0]]), 'span'),
    (lambda: masks.moa(8, [[1, 0.0], [2, 0.0]], num_heads=3), 'num_heads'),
    (lambda: masks.moa(8, np.zeros((2, 2, 2))), 'layer'),
    (lambda: masks.moa(8, np.zeros((3,))), 'plan'),
    (lambda: masks.per_head([masks.causal(4), masks.causal(5)]), r'masks\[1\]'),
    (lambda: masks.per_head([masks.causal(4)], num_heads=2), 'num_heads'),
    (lambda: masks.per_head([masks.s2_attention(8, 2, 2, 1, 2)]), 'masks'),
    (lambda: masks.causal(4) & masks.causal(5), 'same shape'),
    (lambda: masks.s2_attention(8, 2, 2, 1, 2) & masks.s2_attention(
        8, 3, 2, 1, 2), 'num_heads'),
])
def test_bad_inputs(fn, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fn()


def test_bad_input_types():
  with pytest.raises(TypeError, match='left'):
    masks.sliding_window(8, 1.5, 0)
  with pytest.raises(TypeError, match='segment_ids'):
    masks.segments(np.array([0.5, 1.0]))
  with pytest.raises(ValueError, match='h must be'):
    masks.s2_attention(8, 2, 2, 1, 2).head(2)
  with pytest.raises(ValueError, match='depends on the head'):
    masks.s2_attention(8, 2, 2, 1, 2)(0, 0)


def test_stride_window_grid_math():
  # Grid must multiply to the length the caller expects.
  m = masks.neighborhood((3, 4, 5), 1, seq_len=60)
  assert m.shape == (60, 60) and math.prod(m.grid) == 60
