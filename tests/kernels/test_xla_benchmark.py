"""Tests of the helpers of experiments/benchmarks/xla_attention.py (no timing)."""

import numpy as np
import pytest

from experiments.benchmarks import common
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


def test_interleaved_best_rotates_and_takes_minimum(monkeypatch):
  clock = [0.0]
  monkeypatch.setattr(common.time, 'perf_counter', lambda: clock[0])
  calls = []
  # Call i of 'a' lasts 5 - i seconds of the fake clock; 'b' always 2.
  def make(name, durations):
    def fn():
      calls.append(name)
      clock[0] += durations[len([c for c in calls if c == name]) - 1]
    return fn
  best = common.interleaved_best(
      dict(a=make('a', [9.0, 5.0, 4.0, 3.0]), b=make('b', [9.0, 2.0, 2.0, 2.0])),
      rounds=3)
  assert best == dict(a=3.0, b=2.0)  # the warm-up call (9 s) is not timed
  assert calls == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']
  with pytest.raises(ValueError, match='rounds'):
    common.interleaved_best(dict(a=lambda: None), rounds=0)


def test_memory_row_reports_the_child_not_the_parent():
  """The child's peak must not include this (parent) process's 1 GiB array.

  Linux carries ru_maxrss over fork and exec; the row reads the child's VmHWM.
  """
  parent_ballast = np.ones((256, 1024, 1024), np.float32)  # 1 GiB, touched
  row = xla_attention.memory_row(256, 2, 16)
  assert parent_ballast[-1, -1, -1] == 1.0
  assert row['grads_finite'] and row['meets_target']
  assert 0.0 < row['peak_rss_before_attention_gib'] <= row['peak_rss_gib'] < 0.9


def test_alibi_row_runs_at_a_tiny_size():
  (row,) = xla_attention.alibi_rows(256, 2, 16, rounds=1)
  assert row['name'] == 'alibi_score_mod_vs_causal_fwd_T256_N2_H16'
  assert row['seconds'] > 0 and row['causal_seconds'] > 0
  assert row['time_vs_causal'] == row['seconds'] / row['causal_seconds']
  assert row['grads_finite']
  assert 0.0 < row['causal_fwd_bwd_peak_rss_gib'] < 0.9
  assert 0.0 < row['alibi_fwd_bwd_peak_rss_gib'] < 0.9
