"""Metric writers: JSON lines + TensorBoard event files, and a console progress line.

`MetricsWriter` appends one JSON object per call to `<workdir>/metrics.jsonl`
({"step": s, "split": "train"|"eval", <name>: value, ...}) and, when tensorboardX is
installed, writes the same scalars as TensorBoard events under `<workdir>/tensorboard/`
(one run directory per split). Only the primary host writes.

Resuming: a run restarted from the checkpoint of step s re-runs steps s+1, ...; the
writer's `resume(s)` (or `resume_step=s`) first drops every row with step > s from
metrics.jsonl, so the file keeps one row per (step, split), and opens the TensorBoard
writers with `purge_step=s + 1`, which tells TensorBoard to discard the old events of
those steps (TensorBoard applies it when it loads the event files; the old files are
not rewritten).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging

METRICS_FILE = 'metrics.jsonl'


def _to_float(name: str, value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    raise TypeError(
        f'metric {name!r} must be a scalar, got {type(value).__name__}.'
    ) from None


class MetricsWriter:
  """Writes scalar metrics to JSON lines and (optionally) TensorBoard."""

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               enabled: bool = True, resume_step: int | None = None):
    self._enabled = enabled
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tb: dict[str, Any] = {}
    self._tb_dir = os.path.join(workdir, 'tensorboard') if tensorboard else None
    self._purge_step: int | None = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      end_torn_line(self._path)
    if resume_step is not None:
      self.resume(resume_step)

  def resume(self, step: int) -> None:
    """Drops rows after `step` (about to be re-run); call before writing."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
      raise ValueError(f'step must be an int >= 0, got {step!r}.')
    if self._tb:
      raise RuntimeError('resume() must be called before the first write().')
    self._purge_step = step + 1
    if self._enabled:
      truncate_after(self._path, step)

  def _writer(self, split: str):
    if split not in self._tb:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb[split] = SummaryWriter(os.path.join(self._tb_dir, split),
                                      purge_step=self._purge_step)
    return self._tb[split]

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    """Records `scalars` at `step` for `split` ('train' or 'eval')."""
    if not self._enabled:
      return
    values = {k: _to_float(k, v) for k, v in scalars.items()}
    row = {'step': int(step), 'split': split, **values}
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb_dir is not None:
      writer = self._writer(split)
      for name, value in values.items():
        writer.add_scalar(name, value, int(step))
      writer.flush()

  def close(self) -> None:
    for writer in self._tb.values():
      writer.close()
    self._tb.clear()


def end_torn_line(path: str) -> None:
  """Terminates a last line left unfinished by a killed writer (JSON lines files)."""
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, 'rb+') as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')


def _complete_lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(line, parsed row) of each valid JSON line of `path`; torn lines are skipped."""
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # Torn by a process killed while writing it.
        continue
      yield line, row


def read_json_lines(path: str) -> list[Any]:
  """The complete rows of the JSON-lines file `path` in file order ([] if absent)."""
  return [row for _, row in _complete_lines(path)]


def truncate_after(path: str, step: int,
                   keep: Callable[[dict[str, Any]], bool] | None = None) -> int:
  """Rewrites the JSON-lines file `path` without rows whose step is > `step`.

  Rows for which `keep(row)` is true stay regardless (e.g. other runs' rows); torn
  lines are dropped. The file is replaced atomically. Returns the rows dropped.
  """
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  for line, row in _complete_lines(path):
    if (keep is not None and keep(row)) or int(row.get('step', 0)) <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
    else:
      dropped += 1
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(kept)
  os.replace(tmp, path)
  return dropped


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete rows of `<workdir>/metrics.jsonl` in file order.

  A line that is not valid JSON (torn by a process killed while writing it) is
  skipped. A resumed run drops the rows after its checkpoint before re-running
  those steps, so there is one row per (step, split).
  """
  return read_json_lines(os.path.join(workdir, METRICS_FILE))


class Progress:
  """Console progress: step, loss, steps/s, tokens/s and ETA."""

  def __init__(self, start_step: int, num_steps: int):
    self._num_steps = num_steps
    self._last_step = start_step
    self._last_time = time.perf_counter()

  def rates(self, step: int, tokens_per_step: int) -> tuple[float, float]:
    """(steps/s, tokens/s) since the previous call; resets the window."""
    now = time.perf_counter()
    steps = step - self._last_step
    elapsed = max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return steps / elapsed, steps * tokens_per_step / elapsed

  def line(self, step: int, scalars: dict[str, float]) -> str:
    steps_per_sec = scalars.get('steps_per_sec', 0.0)
    remaining = self._num_steps - step
    eta = (datetime.timedelta(seconds=round(remaining / steps_per_sec))
           if steps_per_sec > 0 else '?')
    parts = [f'step {step}/{self._num_steps}']
    for name in ('loss', 'accuracy', 'learning_rate', 'grad_norm'):
      if name in scalars and math.isfinite(scalars[name]):
        parts.append(f'{name} {scalars[name]:.4g}')
    parts.append(f'{steps_per_sec:.2f} steps/s')
    parts.append(f'{scalars.get("tokens_per_sec", 0.0):,.0f} tokens/s')
    parts.append(f'ETA {eta}')
    return ' | '.join(parts)

  def log(self, step: int, scalars: dict[str, float]) -> None:
    logging.info('%s', self.line(step, scalars))
