"""Figures of a recalibration run (matplotlib, Agg backend, PNG files).

`heatmap` draws a layer x head map (sink score, entropy, retrieval score);
`accuracy_bars` the held-out accuracy before / after ACT (and with masked heads).
"""

from __future__ import annotations

import os
import textwrap
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def heatmap(path: str, values: np.ndarray, *, title: str, label: str,
            marks: Sequence[tuple[int, int]] = (), vmin: float | None = None,
            vmax: float | None = None) -> str:
  """Writes a layer (rows) x head (columns) heatmap of `values` [L, N] to `path`.

  Every cell is annotated with its value; `marks` (layer, head) get a box
  (e.g. the heads ACT keeps, or retrieval heads).
  """
  values = np.asarray(values, np.float64)
  if values.ndim != 2 or not values.size:
    raise ValueError(f'values must be a non-empty [L, N] array, got '
                     f'{values.shape}.')
  plt = _pyplot()
  layers, heads = values.shape
  fig, ax = plt.subplots(figsize=(max(4.8, 1.6 + 0.55 * heads),
                                  max(2.6, 1.2 + 0.45 * layers)))
  shown = np.where(np.isfinite(values), values, np.nan)
  image = ax.imshow(shown, cmap='viridis', aspect='auto', vmin=vmin, vmax=vmax,
                    origin='upper')
  fig.colorbar(image, ax=ax, label=label)
  if layers * heads <= 400:
    lo, hi = image.get_clim()
    middle = (lo + hi) / 2
    for l in range(layers):
      for h in range(heads):
        if np.isfinite(shown[l, h]):
          ax.text(h, l, f'{shown[l, h]:.2f}', ha='center', va='center',
                  fontsize=7, color='white' if shown[l, h] < middle else 'black')
  for l, h in marks:
    ax.add_patch(plt.Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False,
                               edgecolor='red', linewidth=2))
  ax.set_xlabel('head')
  ax.set_ylabel('layer')
  ax.set_xticks(range(heads))
  ax.set_yticks(range(layers))
  ax.set_title(textwrap.fill(title, 48), fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def accuracy_bars(path: str, accuracies: Mapping[str, float], *, title: str,
                  chance: float | None = None) -> str:
  """Writes a bar chart of named accuracies (in order) to `path`."""
  if not accuracies:
    raise ValueError('accuracies must not be empty.')
  plt = _pyplot()
  names = list(accuracies)
  values = [float(accuracies[n]) for n in names]
  fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 3.2))
  bars = ax.bar(range(len(names)), values, color='tab:blue')
  for bar, value in zip(bars, values):
    ax.text(bar.get_x() + bar.get_width() / 2, value + 0.01, f'{value:.3f}',
            ha='center', va='bottom', fontsize=8)
  if chance is not None:
    ax.axhline(chance, color='gray', linestyle='--', linewidth=1,
               label=f'chance {chance:.3f}')
    ax.legend(fontsize=8, loc='upper right')
  ax.set_xticks(range(len(names)))
  ax.set_xticklabels(names, rotation=20, ha='right', fontsize=8)
  ax.set_ylim(0, 1.08)
  ax.set_ylabel('held-out accuracy')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
