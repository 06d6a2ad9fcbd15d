r"""Benchmarks: speed, memory and quality of attention implementations and studies.

  python -m experiments.benchmark --suite=quick --workdir=/tmp/attnlab_bench
  python -m experiments.benchmark --suite=cpu_core --topics=attention,xla_attention
  python -m experiments.benchmark --suite=cpu_core --topics=variants --workdir=/tmp/var

Each topic is a module of `experiments.benchmarks` with `run(suite, workdir)`. Results go
to <workdir>/<topic>.json and .csv (every field of every row); <workdir>/results.md
(printed at the end) has a section per topic with one table per kind of row, units
in the headers and the key ratios first, and links the plots written next to it
(<workdir>/<topic>_*.png: time vs length, speedup vs density, accuracy vs density);
see `experiments.benchmark_report`. Speed is reported as ratios measured side by
side in one run; the run's matmul FLOP/s is the ceiling.
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

from experiments import benchmark_report
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


def run(suite: str, workdir: str, topics: Sequence[str] | None = None
        ) -> dict[str, list[dict[str, Any]]]:
  """Runs the topics, writes results, returns {topic: rows}."""
  common.check_suite(suite)
  topics = _check_topics(topics)
  os.makedirs(workdir, exist_ok=True)
  results: dict[str, list[dict[str, Any]]] = {}
  seconds: dict[str, float] = {}
  title = (f'attnlab benchmark: suite={suite}, {platform.node()}, '
           f'{time.strftime("%Y-%m-%d %H:%M:%S")}')
  for topic in topics:
    module = importlib.import_module(f'experiments.benchmarks.{topic}')
    start = time.perf_counter()
    logging.info('benchmark topic %s (suite %s)', topic, suite)
    rows = module.run(suite, workdir)
    results[topic] = rows
    seconds[topic] = time.perf_counter() - start
    write_rows(workdir, topic, rows)
  text = benchmark_report.report(title, results, workdir, seconds)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run(_SUITE.value, _WORKDIR.value or _DEFAULT_WORKDIR, _TOPICS.value)


if __name__ == '__main__':
  app.run(main)
