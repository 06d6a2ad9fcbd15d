"""The `variants` benchmark topic: end to end on its tiny sizes, rows and helpers."""

import csv
import json
import os

from absl import flags
import numpy as np
import pytest

from attention import score_mods
from experiments import benchmark
from experiments.benchmarks import common
from experiments.benchmarks import variants as var_bench
from tests.experiments import report_checks

SECTIONS = ('moh', 'flash_bias_alibi', 'flash_bias_svd', 'hyper_error',
            'hyper_time', 'quality')


def _task(row):
  return 'mqar' if row['setting'].startswith('MQAR') else 'bars'


def test_variants_topic_end_to_end_on_tiny_sizes(tmp_path, monkeypatch):
  monkeypatch.setitem(var_bench.SUITES, 'quick', var_bench.TINY)
  monkeypatch.setattr(common, 'matmul_flops_per_s', lambda *a, **k: 1e9)
  assert 'variants' in benchmark.available_topics()
  argv = flags.FLAGS(['benchmark', '--suite=quick', f'--workdir={tmp_path}',
                      '--topics=variants'])
  try:
    benchmark.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  rows = json.load(open(os.path.join(tmp_path, 'variants.json')))
  # Rectangular: every row has exactly the columns, in order, in every file.
  assert all(tuple(r) == var_bench.COLUMNS for r in rows)
  for name in ['variants.csv'] + [f'variants_{s}.csv' for s in SECTIONS]:
    with open(os.path.join(tmp_path, name)) as f:
      table = list(csv.reader(f))
    assert tuple(table[0]) == var_bench.COLUMNS, name
    assert len(table) > 1 and all(len(r) == len(table[0]) for r in table), name
  assert len(table) - 1 == sum(r['section'] == 'quality' for r in rows)
  assert [r['section'] for r in rows] == sorted(
      (r['section'] for r in rows), key=SECTIONS.index)
  assert report_checks.check_report(str(tmp_path), ['variants']) == {
      'variants': []}  # TINY: one HyperAttention length, no error-vs-length plot
  text = open(os.path.join(tmp_path, 'results.md')).read()
  for section in SECTIONS:
    assert f'### variants: {section} (' in text

  for r in rows:
    assert r['matmul_flops_per_s'] == 1e9
    if r['ratio'] != '':  # Ratios come from the row's own measurements.
      assert r['time_s'] > 0 and r['baseline_s'] > 0
      assert r['ratio'] == pytest.approx(r['time_s'] / r['baseline_s'], rel=1e-12)
    if r['target'] != '':
      strict = r['section'] == 'flash_bias_svd'
      assert r['met'] is bool(r['ratio'] < r['target'] if strict else
                              r['ratio'] <= r['target'])
  by = {s: [r for r in rows if r['section'] == s] for s in SECTIONS}

  (moh,) = by['moh']  # TINY: N=4, 2 shared + 1 of 2 routed heads, causal.
  assert moh['status'] == 'ok' and moh['target'] == 0.7
  t, c = moh['q_len'], moh['budget']
  assert moh['skipped_fraction'] == pytest.approx(1 - (2 * t + 2 * c) / (4 * t))
  assert {r['name'] for r in by['flash_bias_alibi']} == {'flash_bias_alibi',
                                                         'alibi_score_mod'}
  exact = [r for r in by['flash_bias_alibi'] if r['name'] == 'flash_bias_alibi']
  assert exact[0]['rel_error'] < 1e-5  # Rank 2 is ALiBi exactly.
  svd = [r for r in by['flash_bias_svd'] if r['name'] == 'flash_bias_svd_r4']
  assert len(svd) == 2 and all(0 < r['bias_rel_error'] < 1 for r in svd)
  assert all(r['prep_s'] > 0 and r['rel_error'] > 0 for r in svd)
  t5_row = [r for r in by['flash_bias_svd'] if r['name'] == 't5_score_mod']
  assert t5_row[0]['rel_error'] < 1e-5  # The same bias, without the array.
  assert [(r['q_len'], r['block_size'], r['sample_size'])
          for r in by['hyper_error']] == [(64, 16, 16)]
  for r in by['hyper_error'] + by['hyper_time']:
    assert r['rel_error'] >= 0 and r['rel_error_values'] >= 0
  assert [r['setting'] for r in by['hyper_time']] == ['non-causal, clustered q/k']

  quality = {(_task(r), r['name']): r for r in by['quality']}
  assert set(quality) == {(t, n) for t in ('mqar', 'bars')
                          for n in ('softmax', 'retention', 'focal_modulation')}
  # The incompatible pairs are n/a rows with the library's reason, not crashes.
  assert quality[('mqar', 'focal_modulation')]['status'].startswith(
      "n/a: attention layer 'focal_modulation' is non-causal")
  assert quality[('bars', 'retention')]['status'].startswith(
      "n/a: attention variant 'retention' is causal only")
  ran = {k: r for k, r in quality.items() if not r['status'].startswith('n/a')}
  assert len(ran) == 4 and all(r['status'] == 'ok' for r in ran.values())
  for (task, _), r in ran.items():
    base = quality[(task, 'softmax')]['tokens_per_s']
    assert r['vs_softmax'] == pytest.approx(r['tokens_per_s'] / base, rel=1e-12)
    assert 0 <= r['eval_accuracy'] <= 1 and np.isfinite(r['eval_loss'])
    assert r['steps'] == 3 and r['num_params'] > 0 and r['compile_s'] > 0
    if task == 'bars':  # 8 x 8 images in 2 x 2 patches: 16 tokens per image.
      assert r['q_len'] == 16
      assert r['tokens_per_s'] == pytest.approx(16 * r['images_per_s'])
    else:
      assert r['q_len'] == 16 and r['images_per_s'] == ''


def test_rows_are_rectangular_and_reject_unknown_columns():
  row = var_bench.make_row('s', 'n', time_s=1.0)
  assert tuple(row) == var_bench.COLUMNS and row['status'] == 'ok'
  assert row['ratio'] == '' and row['time_s'] == 1.0
  assert var_bench.make_row('s', 'n', status='n/a: x')['status'] == 'n/a: x'
  with pytest.raises(ValueError, match='unknown columns'):
    var_bench.make_row('s', 'n', speedup=2.0)


def test_interleaved_median_rotates_and_takes_medians():
  calls = []
  # Call i of the timed rounds takes i + 1 seconds on this clock.
  ticks = iter([0, 1, 0, 2, 0, 3, 0, 4, 0, 5, 0, 6])
  out = var_bench.interleaved_median(
      {'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, rounds=3,
      clock=lambda: next(ticks))
  # Warm-up a, b; then rounds a b | b a | a b.
  assert calls == ['a', 'b', 'a', 'b', 'b', 'a', 'a', 'b']
  assert out == {'a': 4.0, 'b': 3.0}  # a: 1, 4, 5; b: 2, 3, 6.
  with pytest.raises(ValueError, match='rounds must be >= 1'):
    var_bench.interleaved_median({'a': lambda: 0}, rounds=0)


def test_bias_builders_match_their_definitions():
  t, n = 12, 3
  table = np.random.default_rng(0).normal(size=(32, n)).astype(np.float32)
  got = np.asarray(var_bench.t5_bias(t, table))
  rel = np.arange(t)[None, :] - np.arange(t)[:, None]
  buckets = np.asarray(score_mods.t5_relative_position_bucket(rel))
  want = np.stack([table[buckets[i, j]] for i in range(t) for j in range(t)])
  np.testing.assert_array_equal(got, want.reshape(t, t, n).transpose(2, 0, 1)[None])
  grid = (3, 4)
  got = np.asarray(var_bench.distance_2d_bias(grid, n), np.float64)
  slopes = score_mods.alibi_slopes(n)
  pos = [(y, x) for y in range(3) for x in range(4)]
  for h in range(n):
    for i, (yi, xi) in enumerate(pos):
      for j, (yj, xj) in enumerate(pos):
        assert got[0, h, i, j] == pytest.approx(
            -slopes[h] * np.hypot(yi - yj, xi - xj), rel=1e-6, abs=1e-7)


def test_quality_names_and_bad_parts():
  q = dict(var_bench.TINY['quality'], names=('linear', 'agent', 'softmax'))
  assert var_bench.quality_names(q) == ['softmax', 'agent', 'linear']
  every = var_bench.quality_names(dict(q, names=None))
  assert every[0] == 'softmax' and len(every) == len(set(every))
  assert {'agent', 'moba', 'retention'} <= set(every)
  with pytest.raises(ValueError, match='must be registered'):
    var_bench.quality_names(dict(q, names=('softmax', 'nope')))
  with pytest.raises(ValueError, match='parts must be a non-empty subset'):
    var_bench.run('quick', '', parts=('timing', 'speed'))
  with pytest.raises(ValueError, match='suite must be one of'):
    var_bench.run('huge', '')
