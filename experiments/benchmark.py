r"""Benchmarks: speed, memory and quality of attention implementations and studies.

  python -m experiments.benchmark --suite=quick --workdir=/tmp/attnlab_bench
  python -m experiments.benchmark --suite=cpu_core --topics=attention,xla_attention
  python -m experiments.benchmark --suite=cpu_core --topics=variants --workdir=/tmp/var

Each topic is a module of `experiments.benchmarks` with `run(suite, workdir)`. Results go
to <workdir>/<topic>.json and .csv, plots to <workdir>/<topic>_*.png, and a markdown
table per topic is printed at the end (and written to <workdir>/results.md). Speed is
reported as ratios measured side by side in one run; the run's matmul FLOP/s is the
ceiling.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import pkgutil
import platform
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging

from experiments import benchmarks
from experiments import common_flags
from experiments.benchmarks import common

_SUITE = flags.DEFINE_enum('suite', 'quick', list(common.SUITES),
                           'Which sizes to run.')
_WORKDIR = common_flags.WORKDIR
_DEFAULT_WORKDIR = '/tmp/attnlab_bench'
_TOPICS = flags.DEFINE_list(
    'topics', None, 'Topics to run (default: all). Available: see --helpfull.')


def available_topics() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                if m.name != 'common' and not m.name.startswith('_'))


def _check_topics(topics: Sequence[str] | None) -> list[str]:
  known = available_topics()
  if not topics:
    return known
  unknown = [t for t in topics if t not in known]
  if unknown:
    raise ValueError(f'topics must be among {known}, got unknown {unknown}.')
  return list(topics)


def write_rows(workdir: str, topic: str, rows: list[dict[str, Any]]) -> None:
  with open(os.path.join(workdir, f'{topic}.json'), 'w') as f:
    json.dump(rows, f, indent=1, default=float)
  if not rows:
    return
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(workdir, f'{topic}.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
      return f'{value:.3e}'
    return f'{value:.4g}'
  return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
  if not rows:
    return '(no rows)'
  fields = list(dict.fromkeys(k for r in rows for k in r))
  lines = ['| ' + ' | '.join(fields) + ' |',
           '|' + '---|' * len(fields)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(k, '')) for k in fields) + ' |')
  return '\n'.join(lines)


def plot_time_vs_length(rows: list[dict[str, Any]], path: str,
                        key: str = 'fwd_s') -> bool:
  """Log-log time vs length, one line per (variant, implementation), per pattern."""
  rows = [r for r in rows if key in r and 'q_len' in r]
  if not rows:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  patterns = sorted({r.get('pattern', '') for r in rows})
  fig, axes = plt.subplots(1, len(patterns), figsize=(4.5 * len(patterns), 4),
                           squeeze=False)
  for ax, pattern in zip(axes[0], patterns):
    lines: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
      if r.get('pattern', '') == pattern:
        label = f"{r.get('variant', '')}/{r.get('implementation', '')}"
        lines.setdefault(label, []).append((r['q_len'], r[key]))
    for label, pts in sorted(lines.items()):
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], 'o-', label=label)
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_title(pattern or key)
    ax.set_xlabel('sequence length')
    ax.set_ylabel(f'{key} (s)')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def run(suite: str, workdir: str, topics: Sequence[str] | None = None
        ) -> dict[str, list[dict[str, Any]]]:
  """Runs the topics, writes results, returns {topic: rows}."""
  common.check_suite(suite)
  topics = _check_topics(topics)
  os.makedirs(workdir, exist_ok=True)
  results: dict[str, list[dict[str, Any]]] = {}
  report = [f'# attnlab benchmark: suite={suite}, {platform.node()}, '
            f'{time.strftime("%Y-%m-%d %H:%M:%S")}']
  for topic in topics:
    module = importlib.import_module(f'experiments.benchmarks.{topic}')
    start = time.perf_counter()
    logging.info('benchmark topic %s (suite %s)', topic, suite)
    rows = module.run(suite, workdir)
    results[topic] = rows
    write_rows(workdir, topic, rows)
    for key in ('fwd_s', 'fwd_bwd_s'):
      plot_time_vs_length(rows, os.path.join(workdir, f'{topic}_{key}.png'),
                          key)
    report.append(f'\n## {topic} ({time.perf_counter() - start:.1f} s)\n')
    report.append(markdown_table(rows))
  text = '\n'.join(report)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text + '\n')
  print(text)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run(_SUITE.value, _WORKDIR.value or _DEFAULT_WORKDIR, _TOPICS.value)


if __name__ == '__main__':
  app.run(main)
