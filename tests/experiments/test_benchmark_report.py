"""The results.md writer: rectangular tables, units, order, sections and plots."""

import os
import re

import pytest

from experiments import benchmark_report as report
from tests.experiments import report_checks


def _table_lines(text):
  (block,) = report_checks.tables(text)
  return [report_checks.cells(line) for line in block]


def test_markdown_table_rejects_rows_wider_or_narrower_than_the_header():
  with pytest.raises(ValueError, match='row 1 has 3 cells, the header 2'):
    report.markdown_table(['a', 'b'], [[1, 2], [1, 2, 3]])
  with pytest.raises(ValueError, match='row 0 has 1 cells'):
    report.markdown_table(['a', 'b'], [[1]])
  with pytest.raises(ValueError, match='header must name'):
    report.markdown_table([], [])
  text = report.markdown_table(['x|y', 'z'], [['a|b', 'line\nbreak'], [0.5, True]])
  assert report_checks.check_rectangular(text) == 1
  assert _table_lines(text) == [['x|y', 'z'], ['---', '---'],
                                ['a|b', 'line break'], ['0.5', 'yes']]


def test_rows_with_pipes_newlines_and_different_fields_stay_rectangular():
  # The old writer put '|' and newlines of values into the table as they were: a
  # row with a value 'a|b' had one cell more than its header.
  rows = [dict(name='a|b', fwd_s=0.0012, note='two\nlines'),
          dict(name='c', fwd_s=0.0034, extra=3)]
  text = report.table_of(rows)
  assert report_checks.check_rectangular(text) == 1
  header, _, first, second = _table_lines(text)
  assert header == ['name', 'fwd (ms)', 'note', 'extra']
  assert first == ['a|b', '1.2', 'two lines', '']
  assert second == ['c', '3.4', '', '3']


def test_units_in_headers_from_field_names():
  cases = {
      'fwd_s': ([0.5], 'fwd (ms)', 1e3),
      'train_s_incl_compile': ([0.5, 1.2], 'train incl compile (s)', 1.0),
      'matmul_gflops_ceiling': ([80.0], 'matmul ceiling (GFLOP/s)', 1.0),
      'seconds': ([0.1], 'time (ms)', 1e3),
      'measured_ms': ([3.0], 'measured (ms)', 1.0),
      'mem_fwd_bytes': ([2.0**20], 'mem fwd (MiB)', 2.0**-20),
      'peak_rss_gib': ([1.0], 'peak rss (GiB)', 1.0),
      'tokens_per_s': ([1e5], 'tokens/s', 1.0),
      'eff_flops_fwd': ([1e10], 'eff fwd (GFLOP/s)', 1e-9),
      'fwd_tflops': ([1.0], 'fwd (TFLOP/s)', 1.0),
      'useful_flops_fwd': ([1e9], 'useful flops fwd (GFLOP)', 1e-9),
      'fwd_ratio_vs_jax_nn': ([0.7], 'fwd ratio vs jax.nn (x)', 1.0),
      'fwd_bwd_over_fwd': ([2.0], 'fwd+bwd / fwd (x)', 1.0),
      'measured_speedup': ([3.0], 'measured speedup (x)', 1.0),
      'projected_500k_steps_min': ([9.0], 'projected 500k steps (min)', 1.0),
      'fwd_us_per_token': ([2.0], 'fwd (µs/token)', 1.0),
      'accuracy_points_vs_dense': ([-1.0], 'accuracy points vs dense (points)',
                                   1.0),
      'max_abs_err_vs_jax_nn': ([1e-7], 'max abs err vs jax.nn', 1.0),
      'seq_len': ([64], 'T', 1.0),
  }
  for key, (values, header, scale) in cases.items():
    assert report.column_header(key, values) == (header, scale), key


def test_format_value():
  assert report.format_value(0.00123456) == '0.001235'
  assert report.format_value(0.000123456) == '1.235e-04'
  assert report.format_value(123456.0) == '1.235e+05'
  assert report.format_value(12) == '12'
  assert report.format_value(0.0025, 1e3) == '2.5'
  assert report.format_value(True) == 'yes' and report.format_value(None) == ''
  assert report.format_value([256, 128]) == '256 x 128'
  assert report.format_value(float('inf')) == 'inf'


def test_labels_then_key_ratio_with_its_target_then_flags_then_times():
  rows = [dict(seconds=0.002, name='causal_T256', jax_nn_seconds=0.004,
               effective_flops=1e10, time_vs_jax_nn=0.5, meets_target=True,
               target_time_vs_jax_nn=0.5, other_vs_default=1.5, q_len=256),
          dict(seconds=0.003, name='causal_T512', jax_nn_seconds=0.005,
               effective_flops=2e10, time_vs_jax_nn=0.6, meets_target=False,
               target_time_vs_jax_nn=0.5, other_vs_default=1.2, q_len=512)]
  text = report.table_of(rows)
  header = _table_lines(text.split('\n\n')[-1])[0]
  assert header == ['name', 'T', 'time vs jax.nn (x)', 'meets target',
                    'other vs default (x)', 'time (ms)', 'jax.nn (ms)',
                    'effective (GFLOP/s)']
  # The shared target moved to the 'every row' line.
  assert text.startswith('Every row: target time vs jax.nn (x) 0.5.')


def test_one_wide_row_is_transposed_and_empty_fields_dropped():
  row = {f'field_{i}': float(i) for i in range(12)}
  row.update(name='x', unused='', nothing=None)
  lines = _table_lines(report.table_of([row]))
  assert lines[0] == ['field', 'value']
  assert lines[2] == ['name', 'x'] and len(lines) == 2 + 13
  assert ['field 3', '3'] in lines and not any('unused' in c[0] for c in lines)


def test_topics_get_a_table_per_kind_and_their_plots(tmp_path):
  workdir = str(tmp_path)
  sparse = [dict(mask=m, q_len=1024, density=d, tile_fraction=d * 1.2,
                 predicted_speedup=1 / (d * 1.2), measured_speedup=s,
                 xla_full_s=0.01, xla_mask_s=0.01 / s)
            for m, d, s in (('causal', 0.5, 1.8), ('window', 0.1, 6.0))]
  linear = ([dict(section='flat', variant=v, q_len=t, fwd_s=1e-3 * t / 64,
                  fwd_bwd_s=3e-3 * t / 64, fwd_us_per_token=1.0,
                  fwd_bwd_us_per_token=3.0)
             for v in ('lightning', 'linear') for t in (64, 128)] +
            [dict(section='crossover', q_len=t, lightning_fwd_s=1e-3,
                  softmax_xla_fwd_s=t * 1e-5, lightning_fwd_bwd_s=2e-3,
                  softmax_xla_fwd_bwd_s=t * 3e-5,
                  fwd_softmax_over_lightning=t * 1e-2,
                  fwd_bwd_softmax_over_lightning=t * 1.5e-2) for t in (32, 64)] +
            [dict(section='memory', variant='lightning', q_len=128,
                  fwd_bwd_peak_rss_gib=0.3, target=2.0, met=True)])
  xla = [dict(name='causal_fwd_T256_N2_H16', seconds=1e-3, time_vs_jax_nn=0.4,
              target_time_vs_jax_nn=0.5, meets_target=True),
         dict(name='batched_tile_dot', batch=2, m=32, k=16, n=32, flops=1e9),
         dict(name='batched_tile_dot', batch=2, m=64, k=16, n=32, flops=2e9)]
  quality = [dict(section='quality', name=n, accuracy=a, block_density=d,
                  accuracy_points_vs_dense=100 * (a - 0.9))
             for n, a, d in (('dense', 0.9, 0.5), ('moba_k1', 0.5, 0.1),
                             ('moba_k2', 0.8, 0.2), ('seer_attention_k1', 0.6, 0.1))]
  attention = [dict(variant='softmax', implementation=i, pattern=p, q_len=t,
                    fwd_s=t * 1e-6, fwd_bwd_s=t * 3e-6, fwd_ratio_vs_jax_nn=1.0)
               for i in ('jax.nn', 'xla') for p in ('causal_self', 'noncausal_self')
               for t in (32, 64)]
  text = report.report('test', dict(attention=attention, sparse=sparse,
                                    linear=linear, xla_attention=xla,
                                    routing=quality, unknown_topic=[dict(a=1)]),
                       workdir)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  links = report_checks.check_report(
      workdir, ['attention', 'sparse', 'linear', 'xla_attention', 'routing',
                'unknown_topic'])
  assert links == {
      'attention': ['attention_time_vs_length.png'],
      'sparse': ['sparse_speedup_vs_density.png'],
      'linear': ['linear_time_vs_length.png'],
      'xla_attention': [],
      'routing': ['routing_accuracy_vs_density.png'],
      'unknown_topic': []}
  assert '### linear: flat (4 rows)' in text and '### linear: memory (1 row)' in text
  assert '### xla_attention: causal forward vs jax.nn (1 row)' in text
  assert re.search(r'### xla_attention: batched tile dots.*\(2 rows\)', text)
  # Sparse: the key ratios right after the mask; the constant length above.
  sparse_text = text.split('## sparse')[1].split('## linear')[0]
  assert 'Every row: T 1024' in sparse_text
  assert '| mask | measured speedup (x) | predicted speedup (x) | density |' in (
      sparse_text)


def test_partial_topic_uses_its_topic_spec_and_empty_topics():
  rows = [dict(section='quality', name='dense', accuracy=0.5)]
  assert '### routing_quality: quality (1 row)' in report.topic_markdown(
      'routing_quality', rows)
  assert '(no rows)' in report.topic_markdown('attention', [])
