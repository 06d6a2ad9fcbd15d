"""ACT's offline head filtering ("Unveiling and Harnessing Hidden Attention Sinks",
Yu et al., ICML 2024, step 5 of the method).

Baseline accuracy on the calibration split; then ACT is enabled on one (layer, head)
at a time and the heads whose calibrated accuracy beats the baseline (strictly) are
kept. The authors calibrate layers 2..L-2 only (0-based, both ends included: the
first two layers and the last layer are never calibrated); `layer_range` resolves
the layer selection, and for a model too shallow for that range (L <= 3) it falls
back to all layers and says so.

The search is resumable: every finished head is appended to a JSON-lines file
(`{"layer", "head", "accuracy"}`) and skipped when the search is started again.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

from absl import logging
import numpy as np

from experiments import metrics as metrics_lib

AUTHORS = 'authors'
ALL = 'all'


@dataclasses.dataclass(frozen=True)
class LayerRange:
  """The layers to search, the request they came from and, if any, why not it."""
  layers: tuple[int, ...]
  requested: str
  note: str | None = None

  def to_json(self) -> dict[str, object]:
    return {'requested': self.requested, 'layers': list(self.layers),
            'note': self.note}


def layer_range(spec: str, num_layers: int) -> LayerRange:
  """Resolves a layer selection for a model of `num_layers` layers.

  Args:
    spec: 'authors' (layers 2..L-2, 0-based inclusive, as Yu et al.; all layers
      when that range is empty), 'all', 'a-b' (inclusive) or 'i,j,k'.
    num_layers: L.

  Raises:
    ValueError: a malformed spec or a layer outside [0, L).
  """
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or (
      num_layers < 1):
    raise ValueError(f'num_layers must be an int >= 1, got {num_layers!r}.')
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"layers must be 'authors', 'all', 'a-b' or 'i,j,...', got "
                     f'{spec!r}.')
  spec = spec.strip()
  if spec == AUTHORS:
    layers = tuple(range(2, num_layers - 1))
    if layers:
      return LayerRange(layers, spec)
    return LayerRange(
        tuple(range(num_layers)), spec,
        note=(f"the authors' range 2..L-2 is empty for L={num_layers} layers; "
              f'all {num_layers} layers were searched instead.'))
  if spec == ALL:
    return LayerRange(tuple(range(num_layers)), spec)
  try:
    if '-' in spec:
      lo, hi = (int(x) for x in spec.split('-'))
      if lo > hi:
        raise ValueError
      layers = tuple(range(lo, hi + 1))
    else:
      layers = tuple(int(x) for x in spec.split(','))
  except ValueError:
    raise ValueError(f"layers must be 'authors', 'all', 'a-b' (a <= b) or "
                     f"'i,j,...', got {spec!r}.") from None
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad:
    raise ValueError(f'layers {bad} out of range: the model has {num_layers} '
                     f'layers (0..{num_layers - 1}); got layers={spec!r}.')
  if len(set(layers)) != len(layers):
    raise ValueError(f'layers must not repeat a layer, got {spec!r}.')
  return LayerRange(layers, spec)


def selection(pairs: Sequence[tuple[int, int]], num_layers: int,
              num_heads: int) -> np.ndarray:
  """bool [L, N], True at the (layer, head) `pairs`."""
  out = np.zeros((num_layers, num_heads), bool)
  for layer, head in pairs:
    if not (0 <= layer < num_layers and 0 <= head < num_heads):
      raise ValueError(f'(layer, head) = ({layer}, {head}) out of range for '
                       f'{num_layers} layers x {num_heads} heads.')
    out[layer, head] = True
  return out


def read_results(path: str) -> dict[tuple[int, int], float]:
  """{(layer, head): accuracy} of a results file (torn last lines are skipped)."""
  return {(int(row['layer']), int(row['head'])): float(row['accuracy'])
          for row in metrics_lib.read_json_lines(path)}


@dataclasses.dataclass(frozen=True)
class SearchResult:
  """Per-head calibrated accuracies and the kept heads.

  Attributes:
    baseline: calibration accuracy without ACT.
    accuracies: {(layer, head): calibration accuracy with ACT on that head}.
    kept: heads whose accuracy > baseline, best first.
    complete: every head of the range was evaluated (False when stopped by
      `max_heads`).
  """
  baseline: float
  accuracies: dict[tuple[int, int], float]
  kept: tuple[tuple[int, int], ...]
  complete: bool


def search(evaluate: Callable[[np.ndarray], float], *, baseline: float,
           layers: Sequence[int], num_layers: int, num_heads: int,
           results_path: str, max_heads: int | None = None,
           tokens_per_head: int = 0,
           on_head: Callable[[int, int, float], None] | None = None
          ) -> SearchResult:
  """ACT head filtering: one head at a time, keep those that beat `baseline`.

  Args:
    evaluate: select bool [L, N] -> calibration accuracy with ACT on the selected
      heads only.
    baseline: calibration accuracy without ACT.
    layers: the layers to search (see `layer_range`); all heads of each.
    num_layers, num_heads: the model's L and N.
    results_path: JSON-lines file of finished heads (appended; read on start).
    max_heads: evaluate at most this many new heads in this call (then return
      with complete=False); None = all.
    tokens_per_head: tokens one evaluation reads (for the progress line).
    on_head: called after each newly evaluated head with (layer, head, accuracy).
  """
  if max_heads is not None and (isinstance(max_heads, bool) or not isinstance(
      max_heads, int) or max_heads < 0):
    raise ValueError(f'max_heads must be None or an int >= 0, got {max_heads!r}.')
  todo = [(l, h) for l in layers for h in range(num_heads)]
  done = read_results(results_path)
  stale = [lh for lh in done if lh not in set(todo)]
  if stale:
    raise ValueError(
        f'{results_path} holds heads {stale[:4]} outside the searched layers '
        f'{list(layers)}: it belongs to another search; use another workdir.')
  pending = [lh for lh in todo if lh not in done]
  metrics_lib.end_torn_line(results_path)
  if done:
    logging.info('ACT head search: %d of %d heads already done (%s).',
                 len(done), len(todo), results_path)
  progress = metrics_lib.Progress(len(todo) - len(pending), len(todo))
  count = 0
  for layer, head in pending:
    if max_heads is not None and count >= max_heads:
      break
    accuracy = float(evaluate(selection([(layer, head)], num_layers,
                                        num_heads)))
    with open(results_path, 'a', encoding='utf-8') as f:
      f.write(json.dumps({'layer': layer, 'head': head,
                          'accuracy': accuracy}) + '\n')
    done[(layer, head)] = accuracy
    count += 1
    step = len(done)
    steps_per_sec, tokens_per_sec = progress.rates(step, tokens_per_head)
    logging.info('ACT head search: %s', progress.line(
        step, {'accuracy': accuracy, 'steps_per_sec': steps_per_sec,
               'tokens_per_sec': tokens_per_sec}).replace(
                   'step ', 'head ', 1).replace('steps/s', 'heads/s') +
                 f' | (layer {layer}, head {head}) vs baseline {baseline:.4g}')
    if on_head is not None:
      on_head(layer, head, accuracy)
  complete = all(lh in done for lh in todo)
  accuracies = {lh: done[lh] for lh in todo if lh in done}
  kept = tuple(sorted((lh for lh, a in accuracies.items() if a > baseline),
                      key=lambda lh: (-accuracies[lh], lh)))
  return SearchResult(baseline, accuracies, kept, complete)
