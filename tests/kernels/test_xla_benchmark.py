"""Tests of the helpers of experiments/benchmarks/xla_attention.py (no timing)."""

import numpy as np
import pytest

from experiments.benchmarks import xla_attention


@pytest.mark.parametrize('t, window', [(1, None), (7, None), (9, 1), (9, 4),
                                       (10, 20)])
def test_visible_pairs_and_window_match_brute_force(t, window):
  q = np.arange(t)[:, None]
  k = np.arange(t)[None, :]
  dense = k <= q if window is None else (k <= q) & (k > q - window)
  assert xla_attention.visible_pairs(t, window) == int(dense.sum())
  if window is not None:
    np.testing.assert_array_equal(
        xla_attention.sliding_window(t, window).materialize(), dense)


def test_bad_suite_raises():
  with pytest.raises(ValueError, match='suite'):
    xla_attention.run('huge', '/tmp/unused')
