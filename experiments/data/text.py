"""Byte-level language modelling on local text files (offline default).

By default the corpus is the Python standard library's own top-level source files
(`<stdlib>/*.py`), present on every Python install. Files are read in sorted order and
joined with newlines; the last `eval_fraction` of the bytes is held out for eval.
Training windows start at offsets drawn from the batch's own generator, so the batch
at a given index is reproducible and the iterator position is one integer.
"""

from __future__ import annotations

import functools
import glob
import os
import sysconfig

import numpy as np

from experiments.data import base

VOCAB_SIZE = 256


def stdlib_glob() -> str:
  return os.path.join(sysconfig.get_paths()['stdlib'], '*.py')


@functools.lru_cache(maxsize=4)
def load_corpus(pattern: str) -> np.ndarray:
  """All files matching `pattern` (sorted), joined by newlines, as uint8 bytes."""
  files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
  if not files:
    raise ValueError(f'text_glob {pattern!r} matches no files.')
  chunks = []
  for path in files:
    with open(path, 'rb') as f:
      chunks.append(f.read())
  data = np.frombuffer(b'\n'.join(chunks), dtype=np.uint8)
  data.setflags(write=False)
  return data


def split_corpus(data: np.ndarray, eval_fraction: float,
                 seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) byte arrays; each must hold at least one window."""
  if not 0.0 < eval_fraction < 1.0:
    raise ValueError(f'eval_fraction must be in (0, 1), got {eval_fraction}.')
  cut = int(len(data) * (1.0 - eval_fraction))
  train, evaluation = data[:cut], data[cut:]
  for name, part in (('train', train), ('eval', evaluation)):
    if len(part) < seq_len + 1:
      raise ValueError(
          f'the {name} part of the corpus has {len(part)} bytes, fewer than '
          f'seq_len + 1 = {seq_len + 1}.')
  return train, evaluation


def windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> base.Batch:
  """Next-byte batch from windows data[s : s + seq_len + 1]."""
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  w = data[idx].astype(np.int32)  # [b, T + 1]
  return {'inputs': w[:, :-1], 'targets': w[:, 1:],
          'weights': np.ones((len(starts), seq_len), np.float32)}


def random_windows(data: np.ndarray, rng: np.random.Generator, batch: int,
                   seq_len: int) -> base.Batch:
  starts = rng.integers(0, len(data) - seq_len, batch)
  return windows(data, starts, seq_len)


def eval_windows(data: np.ndarray, batch: int, seq_len: int,
                 num_batches: int) -> list[base.Batch]:
  """`num_batches` batches of windows evenly spread over the eval bytes."""
  total = batch * num_batches
  starts = np.linspace(0, len(data) - seq_len - 1, total).astype(np.int64)
  return [windows(data, starts[i * batch:(i + 1) * batch], seq_len)
          for i in range(num_batches)]
