"""Data-source protocol: checkpointable batch iterators and dataset info.

Every batch is a dict of NumPy arrays with a leading local-batch dimension:
`inputs` (int32 tokens [b, T] or float32 images [b, H, W, C]), `targets` (int32
[b, T] or [b]) and `weights` (float32, same shape as `targets`; 0 = not scored).
An iterator's position (`get_state` / `set_state`) is a small JSON-able dict saved
with every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import numpy as np

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model needs to know about the data.

  Attributes:
    kind: 'lm' (token sequences) or 'image' (classification).
    vocab_size: number of token ids (kind 'lm').
    num_classes: number of labels (kind 'image').
    image_shape: (H, W, C) (kind 'image').
    tokens_per_example: sequence length, or patches per image, for throughput.
  """
  kind: str
  vocab_size: int | None = None
  num_classes: int | None = None
  image_shape: tuple[int, int, int] | None = None
  tokens_per_example: int = 1


class BatchIterator(Protocol):
  """An endless iterator of batches whose position can be saved and restored."""

  def __iter__(self) -> 'BatchIterator':
    ...

  def __next__(self) -> Batch:
    ...

  def get_state(self) -> dict[str, Any]:
    ...

  def set_state(self, state: dict[str, Any]) -> None:
    ...


def check_position_state(state: Any) -> int:
  """The `position` of an iterator state dict, validated."""
  if not isinstance(state, dict) or set(state) != {'position'}:
    raise ValueError(
        f'iterator state must be a dict {{"position": int}}, got {state!r}.')
  position = state['position']
  if isinstance(position, bool) or not isinstance(
      position, (int, np.integer)) or position < 0:
    raise ValueError(
        f'iterator state position must be an int >= 0, got {position!r}.')
  return int(position)


class IndexedIterator:
  """Batches that are a pure function of their index: `make_batch(index)`.

  The state is the index of the next batch; restoring it is O(1).
  """

  def __init__(self, make_batch: Callable[[int], Batch]):
    self._make_batch = make_batch
    self._position = 0

  def __iter__(self) -> 'IndexedIterator':
    return self

  def __next__(self) -> Batch:
    batch = self._make_batch(self._position)
    self._position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'position': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    self._position = check_position_state(state)


@dataclasses.dataclass
class DataSource:
  """A training iterator, a fixed list of eval batches and the `DataInfo`."""
  info: DataInfo
  train: BatchIterator
  eval_batches: Callable[[], list[Batch]]


def batch_rng(seed: int, process_index: int, split: int,
              index: int) -> np.random.Generator:
  """The NumPy generator of one batch: independent per (seed, host, split, index)."""
  return np.random.default_rng([seed, process_index, split, index])
