"""The `linear` benchmark topic end to end on its tiny preset."""

import json
import os

from absl import flags

from experiments import benchmark
from experiments.benchmarks import common
from experiments.benchmarks import linear as linear_bench
from tests.experiments import report_checks


def test_linear_topic_rows_on_tiny_preset(tmp_path, monkeypatch):
  monkeypatch.setitem(linear_bench.SUITES, 'quick', linear_bench.TINY)
  monkeypatch.setattr(common, 'matmul_flops_per_s', lambda *a, **k: 1e9)
  assert 'linear' in benchmark.available_topics()
  argv = flags.FLAGS(['benchmark', '--suite=quick', f'--workdir={tmp_path}',
                      '--topics=linear'])
  try:
    benchmark.main(argv)
  finally:
    flags.FLAGS.unparse_flags()
  rows = json.load(open(os.path.join(tmp_path, 'linear.json')))
  by = {}
  for r in rows:
    by.setdefault(r['section'], []).append(r)
  assert {(r['variant'], r['q_len']) for r in by['flat']} == {
      (v, t) for v in ('lightning', 'linear') for t in (64, 128)}
  for r in by['flat']:
    assert r['fwd_s'] > 0 and r['fwd_bwd_s'] > 0
    assert abs(r['fwd_us_per_token'] - 1e6 * r['fwd_s'] / r['q_len']) < 1e-6
  for r in by['flat_summary']:
    assert r['lengths'] == '64->128' and r['fwd_per_token_ratio'] > 0
    assert isinstance(r['met'], bool)
  (rec,) = by['chunked_vs_recurrent']
  assert abs(rec['speedup'] - rec['recurrent_fwd_s'] / rec['chunked_fwd_s']) < 1e-9
  assert [r['q_len'] for r in by['crossover']] == [32, 64]
  (cross,) = by['crossover_summary']
  assert cross['fwd_crossover_len'] in (32, 64, 'none in range')
  (mem,) = by['memory']
  # XLA's estimate: q, k, v, their gradients and O(T) temporaries, above the inputs.
  assert mem['inputs_gib'] * 2 <= mem['xla_estimate_gib'] < 1.0
  # The subprocess's real peak holds at least what it had before the attention.
  assert 0 < mem['peak_rss_before_attention_gib'] <= mem['fwd_bwd_peak_rss_gib'] < 4
  assert mem['grads_finite'] is True
  assert report_checks.check_report(str(tmp_path), ['linear']) == {
      'linear': ['linear_time_vs_length.png']}
  text = open(os.path.join(tmp_path, 'results.md')).read()
  for section in by:
    assert f'### linear: {section} (' in text
