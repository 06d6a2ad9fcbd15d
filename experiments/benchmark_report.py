"""The readable report of `python -m experiments.benchmark`: results.md and its plots.

Every topic's rows (flat dicts of measured numbers, kept as they are in
<workdir>/<topic>.json and .csv) become one table per kind of row: a topic whose
rows all carry the same fields (attention, sparse, quality, ...) gets one table; a
topic that mixes kinds (the `section` of linear / routing / variants rows, the row
families of xla_attention, icl_regression's per-variant and aggregate rows) gets a
table per kind, each with its own fields, so no table has holes or ragged rows.

Within a table: label columns first (name, variant, pattern, ...), then the key
ratios (a measure with a `target_<measure>` beside it, then other ratios: names with
ratio / speedup / _over_ / _vs_), targets and met flags, times, then the rest. Headers
carry units derived from the field names (`fwd_s` -> 'fwd (ms)', `*_bytes` -> MiB,
`*_per_s` -> 1/s, FLOP/s in GFLOP/s, ratios '(x)'). A field equal in every row of a
table moves to an 'every row:' line above it; a table of one row and many fields is
written transposed (field | value). Cells escape '|' and newlines, and the writer
refuses a row whose cell count differs from its header's.

Plots (PNG, written next to results.md and linked from it) where a curve says more
than a table: time vs length (attention, linear), speedup vs density (sparse),
accuracy vs density (routing quality), accuracy vs length (quality), HyperAttention
error vs length (variants).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Sequence

Row = dict[str, Any]
# (caption, file name relative to the report's directory)
Link = tuple[str, str]

# Fields that identify a row; never moved to the 'every row' line.
_IDENTITY = ('name', 'variant', 'mask', 'implementation', 'pattern', 'case',
             'structure', 'benchmark')
# Fields that describe the setting of a row (first columns, after the identity).
_LABELS = _IDENTITY + ('setting', 'pass_', 'path', 'status', 'dtype', 'q_len',
                       'kv_len', 'seq_len', 'T', 'length', 'lengths', 'batch',
                       'heads', 'head_dim', 'block_q', 'block_kv', 'kv_chunk')
_TRANSPOSE_MIN_FIELDS = 9

_WORDS = (('fwd_bwd', 'fwd+bwd'), ('jax_nn', 'jax.nn'), ('_over_', ' / '),
          ('_vs_', ' vs '), ('pass_', 'pass'), ('seq_len', 'T'), ('q_len', 'T'),
          ('kv_len', 'S'))


def escape(text: str) -> str:
  """A markdown table cell: '|' escaped, newlines and tabs as spaces."""
  return re.sub(r'\s*[\r\n\t]+\s*', ' ', str(text)).replace('|', r'\|').strip()


def format_value(value: Any, scale: float = 1.0) -> str:
  """A readable cell (unescaped): 4 significant digits, e-notation outside
  [1e-3, 1e5); booleans yes / no; sequences joined by ' x '."""
  if value is None or (isinstance(value, str) and not value):
    return ''
  if isinstance(value, bool):
    return 'yes' if value else 'no'
  if isinstance(value, int) and scale == 1.0:
    return str(value)
  if isinstance(value, (int, float)):
    x = float(value) * scale
    if math.isnan(x) or math.isinf(x):
      return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
      return f'{x:.3e}'
    return f'{x:.4g}'
  if isinstance(value, (list, tuple)):
    return ' x '.join(format_value(v) for v in value)
  return str(value)


def markdown_table(header: Sequence[str], cells: Sequence[Sequence[Any]]) -> str:
  """A markdown table; every row must have exactly len(header) cells.

  Header entries and cells are escaped (`escape`); non-strings are formatted by
  `format_value`.
  """
  if not header:
    raise ValueError('header must name at least one column.')
  width = len(header)
  for i, row in enumerate(cells):
    if len(row) != width:
      raise ValueError(f'row {i} has {len(row)} cells, the header {width}: '
                       f'{list(row)} vs {list(header)}.')
  fmt = lambda c: c if isinstance(c, str) else format_value(c)
  lines = ['| ' + ' | '.join(escape(h) for h in header) + ' |',
           '|' + '---|' * width]
  lines += ['| ' + ' | '.join(escape(fmt(c)) for c in row) + ' |' for row in cells]
  return '\n'.join(lines)


# --------------------------------------------------------------------------------
# Columns: units from field names.
# --------------------------------------------------------------------------------


def _is_rate(key: str) -> bool:
  return key.endswith('_per_s') or key.endswith('_per_sec')


def _is_time(key: str) -> bool:
  if _is_rate(key) or key.endswith('_s_per_unit'):
    return False
  return (key in ('seconds', 'wall_s') or key.endswith('_s') or
          key.endswith('_seconds') or key.endswith('_sec') or '_s_' in key or
          key.startswith('seconds_'))


def _is_ratio(key: str) -> bool:
  if 'err' in key or key.startswith('target'):
    return False
  return any(w in key for w in ('ratio', 'speedup', '_over_', 'vs_',
                                'relative_to'))


def _is_flag(key: str) -> bool:
  return key in ('met', 'meets_target', 'passed') or key.startswith('within_')


def _humanize(key: str) -> str:
  text = key
  for old, new in _WORDS:
    text = text.replace(old, new)
  return re.sub(r' +', ' ', text.replace('_', ' ')).strip()


def _strip(key: str, suffixes: Sequence[str]) -> str:
  for s in suffixes:
    if key.endswith(s):
      return key[:-len(s)]
  return key


def column_header(key: str, values: Sequence[Any]) -> tuple[str, float]:
  """(header with unit, scale applied to the values) of field `key`."""
  nums = [abs(v) for v in values
          if isinstance(v, (int, float)) and not isinstance(v, bool)]
  if key.endswith('_ms'):
    return f'{_humanize(key[:-3])} (ms)', 1.0
  if key.endswith('_s_per_unit'):
    return f'{_humanize(key[:-len("_s_per_unit")])} (ns/unit)', 1e9
  if _is_time(key):
    base = re.sub(r'(^|_)(seconds|s|sec)(_|$)', r'\1\3', key).strip('_')
    if key.startswith('seconds_'):
      base = 'time_' + base
    base = _humanize(base) or 'time'
    if nums and max(nums) >= 1:
      return f'{base} (s)', 1.0
    return f'{base} (ms)', 1e3
  if 'gflops' in key:
    return _humanize(key.replace('gflops', '')) + ' (GFLOP/s)', 1.0
  if 'tflops' in key:
    return _humanize(key.replace('tflops', '')) + ' (TFLOP/s)', 1.0
  if 'points' in key:
    return f'{_humanize(key)} (points)', 1.0
  if 'flops' in key:
    if key.startswith('useful_flops'):
      return f'{_humanize(key)} (GFLOP)', 1e-9
    base = _humanize(_strip(key, ('_per_s',)).replace('flops', '')).strip()
    return (f'{base} (GFLOP/s)' if base else 'GFLOP/s'), 1e-9
  if _is_rate(key):
    base = _strip(key, ('_per_s', '_per_sec'))
    return f'{_humanize(base)}/s', 1.0
  if key.endswith('_bytes'):
    return f'{_humanize(key[:-6])} (MiB)', 2.0**-20
  if key.endswith('_gib'):
    return f'{_humanize(key[:-4])} (GiB)', 1.0
  if key.endswith('_kib'):
    return f'{_humanize(key[:-4])} (MiB)', 2.0**-10
  if key.endswith('_min'):
    return f'{_humanize(key[:-4])} (min)', 1.0
  if key.endswith('_us_per_token'):
    return f'{_humanize(key[:-len("_us_per_token")])} (µs/token)', 1.0
  if key.endswith('_pct'):
    return f'{_humanize(key[:-4])} (%)', 1.0
  if _is_ratio(key) or key.startswith('target_') and _is_ratio(key[7:]):
    return f'{_humanize(key)} (x)', 1.0
  return _humanize(key), 1.0


def _rank(key: str, keys: Sequence[str], order: Sequence[str]) -> tuple[int, int]:
  if key in order:
    return (1, order.index(key))
  if key in _LABELS:
    return (0, _LABELS.index(key))
  if f'target_{key}' in keys:
    return (2, 0)
  if key.startswith('target_') and key[7:] in keys:
    return (2, 1)
  if key == 'target' or _is_flag(key):
    return (3, 0)
  if _is_ratio(key):
    return (4, 0)
  if key.startswith('target_'):
    return (5, 0)
  if _is_time(key) or key.endswith('_ms'):
    return (6, 0)
  return (7, 0)


def _ordered_keys(keys: Sequence[str], order: Sequence[str]) -> list[str]:
  """Labels, spec order, key ratios (each next to its target), flags, times, rest."""
  decorated = []
  for i, k in enumerate(keys):
    rank = _rank(k, keys, order)
    anchor = k[7:] if rank == (2, 1) else k
    first = keys.index(anchor) if rank[0] == 2 else i
    decorated.append((rank[0], rank[1] if rank[0] in (0, 1) else first,
                      rank[1] if rank[0] == 2 else 0, i, k))
  return [d[-1] for d in sorted(decorated)]


# --------------------------------------------------------------------------------
# Topics.
# --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TopicSpec:
  """How a topic's rows are reported.

  kind: row -> title of its table (None: the row's 'section', else one table).
  order: fields placed right after the labels, in this order.
  drop: fields not shown (still in the .json / .csv).
  headers: field -> (header, scale) overrides.
  note: a line under the topic's heading (what the ratios mean).
  plots: (rows, workdir, topic) -> links of the PNGs it wrote.
  files: files of the topic (relative to workdir) linked when they exist.
  """
  kind: Callable[[Row], str] | None = None
  order: tuple[str, ...] = ()
  drop: tuple[str, ...] = ()
  headers: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict)
  note: str = ''
  plots: Callable[[list[Row], str, str], list[Link]] | None = None
  files: tuple[tuple[str, str], ...] = ()


def _kind_of(spec: TopicSpec, row: Row) -> str:
  if spec.kind is not None:
    return spec.kind(row)
  return str(row.get('section', ''))


def group_rows(spec: TopicSpec, rows: Sequence[Row]) -> dict[str, list[Row]]:
  """Title -> rows, in order of first appearance."""
  groups: dict[str, list[Row]] = {}
  for r in rows:
    groups.setdefault(_kind_of(spec, r), []).append(r)
  return groups


def table_of(rows: Sequence[Row], spec: TopicSpec = TopicSpec()) -> str:
  """One rectangular markdown table of rows of one kind (see the module doc)."""
  if not rows:
    return '(no rows)'
  keys = [k for k in dict.fromkeys(k for r in rows for k in r)
          if k not in spec.drop and not (k == 'section' and spec.kind is None)]
  columns = []  # (key, header, cells)
  constant = []
  for k in _ordered_keys(keys, spec.order):
    values = [r.get(k) for r in rows]
    header, scale = spec.headers.get(k) or column_header(k, values)
    cells = [format_value(v, scale) for v in values]
    if not any(cells):
      continue
    if (len(rows) > 1 and k not in _IDENTITY and len(set(cells)) == 1):
      constant.append(f'{header} {cells[0]}')
      continue
    columns.append((k, header, cells))
  plain = [h for _, h, _ in columns]
  # Two fields with one header: name both.
  headers = [f'{h} [{k}]' if plain.count(h) > 1 else h for k, h, _ in columns]
  out = []
  if constant:
    out.append('Every row: ' + '; '.join(escape(c) for c in constant) + '.\n')
  if not columns:
    out.append('(every field is the same in every row; see above)')
  elif len(rows) == 1 and len(columns) >= _TRANSPOSE_MIN_FIELDS:
    out.append(markdown_table(['field', 'value'],
                              [[h, c[2][0]] for h, c in zip(headers, columns)]))
  else:
    out.append(markdown_table(headers, [[c[2][i] for c in columns]
                                        for i in range(len(rows))]))
  return '\n'.join(out)


def topic_markdown(topic: str, rows: Sequence[Row], workdir: str | None = None,
                   seconds: float | None = None, level: int = 2) -> str:
  """The topic's section of results.md: heading, note, tables, plot links.

  With `workdir`, the topic's plots are written there and linked (paths relative to
  workdir), and its listed files are linked when they exist. A topic `<t>_<part>`
  (a module entry's partial run, e.g. 'routing_timing') is reported as topic t.
  """
  spec = SPECS.get(topic) or SPECS.get(topic.rsplit('_', 1)[0], TopicSpec())
  took = '' if seconds is None else f' ({seconds:.1f} s)'
  out = [f'{"#" * level} {topic}{took}', '']
  if spec.note:
    out += [spec.note, '']
  groups = group_rows(spec, rows)
  if not rows:
    out.append('(no rows)')
  for title, members in groups.items():
    if title and (len(groups) > 1 or spec.kind is not None or
                  'section' in members[0]):
      count = f'{len(members)} row' + ('s' if len(members) > 1 else '')
      out += [f'{"#" * (level + 1)} {topic}: {title} ({count})', '']
    out += [table_of(members, spec), '']
  if workdir is not None:
    links: list[Link] = []
    if spec.plots is not None and rows:
      links += spec.plots(list(rows), workdir, topic)
    links += [(c, f) for c, f in spec.files
              if os.path.exists(os.path.join(workdir, f))]
    for caption, name in links:
      if name.endswith('.png'):
        out += [f'![{escape(caption)}]({name})', '']
      else:
        out += [f'[{escape(caption)}]({name})', '']
  return '\n'.join(out).rstrip() + '\n'


def report(title: str, results: dict[str, Sequence[Row]], workdir: str,
           seconds: dict[str, float] | None = None) -> str:
  """The whole results.md text (plots are written into workdir)."""
  seconds = seconds or {}
  parts = [f'# {title}', '']
  for topic, rows in results.items():
    parts.append(topic_markdown(topic, rows, workdir, seconds.get(topic)))
  return '\n'.join(parts).rstrip() + '\n'


# --------------------------------------------------------------------------------
# Plots.
# --------------------------------------------------------------------------------


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _num(x: Any) -> bool:
  return (isinstance(x, (int, float)) and not isinstance(x, bool) and
          math.isfinite(x))


def _series(rows: Sequence[Row], x: str, y: str, label: Callable[[Row], str],
            scale: float = 1.0) -> dict[str, list[tuple[float, float]]]:
  out: dict[str, list[tuple[float, float]]] = {}
  for r in rows:
    if _num(r.get(x)) and _num(r.get(y)):
      out.setdefault(label(r), []).append((r[x], r[y] * scale))
  return {k: sorted(v) for k, v in out.items()}


def _draw(ax, series, *, title: str, xlabel: str, ylabel: str, logx=False,
          logy=False, style='o-') -> None:
  for name, pts in sorted(series.items()):
    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
  if logx:
    ax.set_xscale('log', base=2)
  if logy:
    ax.set_yscale('log')
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if series:
    ax.legend(fontsize=7)


def _save(fig, workdir: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, name), dpi=90)
  _pyplot().close(fig)
  return name


def plot_time_vs_length(rows: Sequence[Row], workdir: str, topic: str,
                        keys: Sequence[str] = ('fwd_s', 'fwd_bwd_s')
                        ) -> list[Link]:
  """Log-log time vs length, a panel per (pass, pattern), a line per
  (variant, implementation). Nothing when fewer than two lengths were run."""
  rows = [r for r in rows if _num(r.get('q_len'))]
  if len({r['q_len'] for r in rows}) < 2:
    return []
  keys = [k for k in keys if any(_num(r.get(k)) for r in rows)]
  patterns = list(dict.fromkeys(r.get('pattern', '') for r in rows))
  if not keys:
    return []
  plt = _pyplot()
  fig, axes = plt.subplots(len(keys), len(patterns),
                           figsize=(4 * len(patterns), 3.4 * len(keys)),
                           squeeze=False)
  for i, key in enumerate(keys):
    for j, pattern in enumerate(patterns):
      sel = [r for r in rows if r.get('pattern', '') == pattern]
      _draw(axes[i][j], _series(sel, 'q_len', key, lambda r: (
          f"{r.get('variant', '')}/{r.get('implementation', '')}").strip('/'),
                                1e3), title=f'{pattern} {_humanize(key[:-2])}'.strip(),
            xlabel='sequence length T', ylabel='time (ms)', logx=True, logy=True)
  name = _save(fig, workdir, f'{topic}_time_vs_length.png')
  return [(f'{topic}: time vs length', name)]


def _plot_sparse(rows: list[Row], workdir: str, topic: str) -> list[Link]:
  rows = [r for r in rows if _num(r.get('density')) and
          _num(r.get('measured_speedup'))]
  if not rows:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4.2))
  d = [r['density'] for r in rows]
  ax.plot(d, [r['measured_speedup'] for r in rows], 'o', label='measured')
  ax.plot(d, [r['predicted_speedup'] for r in rows], 'x',
          label='predicted (1 / tile fraction)')
  xs = sorted(d)
  ax.plot(xs, [1 / x for x in xs], ':', color='gray', label='1 / density')
  for r in rows:
    ax.annotate(r.get('mask', ''), (r['density'], r['measured_speedup']),
                fontsize=6, alpha=0.7)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('density (visible fraction of q x k pairs)')
  ax.set_ylabel('speedup over full attention (x)')
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7)
  return [(f'{topic}: speedup vs density', _save(
      fig, workdir, f'{topic}_speedup_vs_density.png'))]


def _plot_linear(rows: list[Row], workdir: str, topic: str) -> list[Link]:
  flat = [r for r in rows if r.get('section') == 'flat' and _num(r.get('q_len'))]
  cross = [r for r in rows if r.get('section') == 'crossover' and
           _num(r.get('q_len'))]
  panels = []
  for kind in ('fwd', 'fwd_bwd'):
    if len({r.get('q_len') for r in flat}) > 1:
      panels.append((f'chunked: {_humanize(kind)} time per token',
                     _series(flat, 'q_len', f'{kind}_us_per_token',
                             lambda r: r['variant']), 'time per token (µs)'))
  for kind in ('fwd', 'fwd_bwd'):
    if len(cross) > 1:
      series = {}
      for who in ('lightning', 'softmax_xla'):
        series[who] = _series(cross, 'q_len', f'{who}_{kind}_s', lambda r: who,
                              1e3).get(who, [])
      panels.append((f'lightning vs softmax: {_humanize(kind)}', series,
                     'time (ms)'))
  if not panels:
    return []
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4),
                           squeeze=False)
  for ax, (title, series, ylabel) in zip(axes[0], panels):
    _draw(ax, series, title=title, xlabel='sequence length T', ylabel=ylabel,
          logx=True, logy=True)
  return [(f'{topic}: time vs length', _save(
      fig, workdir, f'{topic}_time_vs_length.png'))]


def _plot_routing(rows: list[Row], workdir: str, topic: str) -> list[Link]:
  links = []
  fam = lambda r: re.sub(r'_k\d+$', '', str(r.get('name', '')))
  curves = _series([r for r in rows if r.get('section') == 'quality'],
                   'block_density', 'accuracy', fam)
  if curves:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    _draw(ax, curves, title='MQAR accuracy vs routed block density',
          xlabel='block density (listed / all blocks)', ylabel='eval accuracy')
    links.append((f'{topic}: accuracy vs density', _save(
        fig, workdir, f'{topic}_accuracy_vs_density.png')))
  timed = [r for r in rows if _num(r.get('predicted_ms')) and
           _num(r.get('measured_ms'))]
  if timed:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    _draw(ax, _series(timed, 'measured_ms', 'predicted_ms',
                      lambda r: f"{r.get('section', '')} {r.get('pass_', '')}".strip()),
          title='simulator: predicted vs measured', xlabel='measured (ms)',
          ylabel='predicted (ms)', logx=False, logy=True, style='o')
    ax.set_xscale('log')
    lo = min(min(r['measured_ms'], r['predicted_ms']) for r in timed)
    hi = max(max(r['measured_ms'], r['predicted_ms']) for r in timed)
    ax.plot([lo, hi], [lo, hi], ':', color='gray')
    links.append((f'{topic}: predicted vs measured time', _save(
        fig, workdir, f'{topic}_predicted_vs_measured.png')))
  return links


def _plot_variants(rows: list[Row], workdir: str, topic: str) -> list[Link]:
  err = [r for r in rows if r.get('section') == 'hyper_error' and
         _num(r.get('q_len')) and _num(r.get('rel_error'))]
  if len({r['q_len'] for r in err}) < 2:
    return []
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.4), squeeze=False)
  label = lambda r: f"b={r['block_size']}, m={r['sample_size']}"
  for ax, key in zip(axes[0], ('rel_error', 'rel_error_values')):
    _draw(ax, _series(err, 'q_len', key, label),
          title=f'HyperAttention {_humanize(key)}', xlabel='sequence length T',
          ylabel=_humanize(key), logx=True, logy=True)
  return [(f'{topic}: HyperAttention error vs length', _save(
      fig, workdir, f'{topic}_hyper_error_vs_length.png'))]


def _plot_quality(rows: list[Row], workdir: str, topic: str) -> list[Link]:
  curves = _series(rows, 'seq_len', 'eval_accuracy', lambda r: r['variant'])
  if len({r.get('seq_len') for r in rows}) < 2 or not curves:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  _draw(ax, curves,
        title='MQAR eval accuracy vs length', xlabel='sequence length T',
        ylabel='eval accuracy', logx=True)
  return [(f'{topic}: accuracy vs length', _save(
      fig, workdir, f'{topic}_accuracy_vs_length.png'))]


_XLA_KINDS = (
    (r'_memory_', 'peak memory of causal fwd+bwd (fresh subprocess)'),
    (r'_bwd_tiling_sweep$', 'backward tiling sweep'),
    (r'^causal_fwd_T\d+_sweep$', 'forward tiling sweep'),
    (r'^causal_fwd_bwd_T', 'causal forward + backward vs forward'),
    (r'^causal_fwd_T', 'causal forward vs jax.nn'),
    (r'^window\d+_T\d+_tiling_sweep$', 'sliding-window tiling sweep'),
    (r'_vs_jax_nn_dense', 'sliding window vs jax.nn with the dense mask'),
    (r'^window\d+_vs_causal', 'sliding window vs causal (density-scaled)'),
    (r'^tradeoff_', 'trade-off: the 256 x 256 fused causal forward'),
    (r'^batched_tile_dot', "batched tile dots (XLA:CPU's threading threshold)"),
    (r'^alibi_', 'ALiBi score_mod vs plain causal'),
    (r'^matmul_', 'matmul ceiling at the end of the run'),
)


def _xla_kind(row: Row) -> str:
  name = str(row.get('name', ''))
  for pattern, title in _XLA_KINDS:
    if re.search(pattern, name):
      return title
  return 'other'


def _icl_kind(row: Row) -> str:
  if row.get('variant') == 'aggregate':
    return 'aggregate: joint training vs the alternatives'
  if row.get('variant') == 'paper_main_run_actual':
    return 'the paper main run, trained to the end'
  return 'throughput per variant'


SPECS: dict[str, TopicSpec] = {
    'attention': TopicSpec(
        order=('fwd_ratio_vs_jax_nn', 'fwd_bwd_ratio_vs_jax_nn', 'bwd_over_fwd',
               'fwd_s', 'fwd_bwd_s'),
        note='Ratios are time / the time of jax.nn.dot_product_attention on the '
             'same inputs in the same run (< 1: faster).',
        plots=plot_time_vs_length),
    'sparse': TopicSpec(
        order=('measured_speedup', 'predicted_speedup', 'measured_over_predicted',
               'speedup_vs_jax_nn', 'density', 'tile_fraction'),
        note='Speedups are the full-attention time / the masked time (blocked xla '
             'path); predicted = 1 / fraction of tiles computed.',
        plots=_plot_sparse),
    'masks': TopicSpec(
        order=('compile_s', 'target_s', 'meets_target', 'cached_compile_s'),
        files=(('masks: 2-D neighborhood block structure',
                'mask_neighborhood2d_32x32.png'),
               ('masks: radial block structure', 'mask_radial_8x64.png'))),
    'quality': TopicSpec(
        order=('eval_accuracy', 'speed_vs_first', 'tokens_per_s', 'eval_loss'),
        note='speed vs first = tokens/s / the first variant\'s (softmax) at the '
             'same length.',
        plots=_plot_quality),
    'train': TopicSpec(
        drop=('benchmark', 'suite'),
        order=('relative_to_softmax', 'tokens_per_sec'),
        note='relative to softmax = tokens/s / standard softmax\'s tokens/s.'),
    'xla_attention': TopicSpec(
        kind=_xla_kind,
        note='Times are minima over interleaved rounds; each row\'s target is '
             'beside the measure it applies to.'),
    'icl_regression': TopicSpec(
        kind=_icl_kind, drop=('topic', 'suite'),
        order=('steps_per_s', 'projected_500k_steps_min', 'speedup_joint_vs_sequential',
               'joint_projected_min', 'paper_preset_all_runs_projected_min',
               'target_min')),
    'linear': TopicSpec(
        note='Rows are B=1, N=8, H=64, float32, causal; ratios within a row.',
        plots=_plot_linear),
    'routing': TopicSpec(
        order=('accuracy', 'accuracy_points_vs_dense', 'within_5_points',
               'block_density'),
        note='Timing rows: predicted = the calibrated simulator '
             '(kernels.xla.cost_model); ratios traced / static are times of the '
             'routed call and of the static call with the same blocks.',
        plots=_plot_routing),
    'variants': TopicSpec(
        order=('ratio', 'target', 'met', 'time_s', 'baseline', 'baseline_s',
               'eval_accuracy', 'vs_softmax'),
        note='ratio = time / baseline time of the same row; vs softmax = tokens/s '
             '/ softmax\'s on the same task.',
        plots=_plot_variants),
    'hardware': TopicSpec(
        kind=lambda r: 'conformance' if 'case' in r else 'timing',
        files=(('hardware: the full hardware report', 'hardware/results.md'),)),
}
