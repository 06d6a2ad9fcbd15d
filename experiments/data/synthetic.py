"""Offline synthetic tasks: long-range recall, copying, in-context regression.

Each generator maps (NumPy generator, batch size, sequence length, task parameters) to
a batch {'inputs', 'targets', 'weights'} for next-token training: `targets[t]` is the
token the model must emit after reading `inputs[: t + 1]`, and `weights` marks the
positions that are scored (only the answers), so accuracy is task accuracy.
"""

from __future__ import annotations

import numpy as np

from experiments.data import base


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
        value <= 0):
      raise ValueError(f'{name} must be a positive int, got {value!r}.')


def mqar_vocab_size(num_keys: int, num_values: int) -> int:
  return 1 + num_keys + num_values


def mqar(rng: np.random.Generator, batch: int, seq_len: int, *,
         num_pairs: int, num_queries: int, num_keys: int,
         num_values: int) -> base.Batch:
  """Multi-query associative recall ("Zoology", Arora et al. 2023).

  Layout: k_1 v_1 ... k_n v_n, then `num_queries` keys (drawn from the n, without
  repetition) at random positions among noise tokens (0). At a query position the
  target is the value bound to that key. Token ids: 0 noise, keys 1..num_keys,
  values num_keys+1..num_keys+num_values.
  """
  _check_positive(batch=batch, seq_len=seq_len, num_pairs=num_pairs,
                  num_queries=num_queries, num_keys=num_keys,
                  num_values=num_values)
  if num_pairs > num_keys:
    raise ValueError(
        f'num_pairs ({num_pairs}) must be <= num_keys ({num_keys}).')
  if num_queries > num_pairs:
    raise ValueError(
        f'num_queries ({num_queries}) must be <= num_pairs ({num_pairs}).')
  if 2 * num_pairs + num_queries > seq_len:
    raise ValueError(
        f'seq_len must be >= 2 * num_pairs + num_queries = '
        f'{2 * num_pairs + num_queries}, got {seq_len}.')
  inputs = np.zeros((batch, seq_len), np.int32)
  targets = np.zeros((batch, seq_len), np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  rows = np.arange(batch)[:, None]
  keys = np.argsort(rng.random((batch, num_keys)), axis=1)[:, :num_pairs] + 1
  values = rng.integers(0, num_values, (batch, num_pairs)) + 1 + num_keys
  inputs[:, 0:2 * num_pairs:2] = keys
  inputs[:, 1:2 * num_pairs:2] = values
  which = np.argsort(rng.random((batch, num_pairs)), axis=1)[:, :num_queries]
  free = seq_len - 2 * num_pairs
  slots = np.sort(np.argsort(rng.random((batch, free)), axis=1)[:, :num_queries],
                  axis=1) + 2 * num_pairs
  inputs[rows, slots] = keys[rows, which]
  targets[rows, slots] = values[rows, which]
  weights[rows, slots] = 1.0
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


def selective_copy_vocab_size(num_tokens: int) -> int:
  return num_tokens + 2


def selective_copy(rng: np.random.Generator, batch: int, seq_len: int, *,
                   num_copy: int, num_tokens: int) -> base.Batch:
  """Selective copying ("Mamba", Gu & Dao 2023).

  The first seq_len - num_copy positions hold `num_copy` data tokens (1..num_tokens)
  at random positions among noise (0); then come `num_copy` marker tokens
  (num_tokens + 1), at which the model must emit the data tokens in order.
  """
  _check_positive(batch=batch, seq_len=seq_len, num_copy=num_copy,
                  num_tokens=num_tokens)
  context = seq_len - num_copy
  if context < num_copy:
    raise ValueError(
        f'seq_len must be >= 2 * num_copy = {2 * num_copy}, got {seq_len}.')
  inputs = np.zeros((batch, seq_len), np.int32)
  targets = np.zeros((batch, seq_len), np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  rows = np.arange(batch)[:, None]
  data = rng.integers(1, num_tokens + 1, (batch, num_copy))
  slots = np.sort(np.argsort(rng.random((batch, context)), axis=1)[:, :num_copy],
                  axis=1)
  inputs[rows, slots] = data
  inputs[:, context:] = num_tokens + 1
  targets[:, context:] = data
  weights[:, context:] = 1.0
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


def icl_regression_vocab_size(num_bins: int) -> int:
  return 2 * num_bins


def quantize(x: np.ndarray, num_bins: int) -> np.ndarray:
  """Bins of [-1, 1] (values outside are clipped): 0 .. num_bins - 1."""
  scaled = np.floor((np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * num_bins)
  return np.minimum(scaled, num_bins - 1).astype(np.int32)


def icl_regression(rng: np.random.Generator, batch: int, seq_len: int, *,
                   num_bins: int, noise_std: float) -> base.Batch:
  """In-context linear regression as tokens ("What Can Transformers Learn
  In-Context?", Garg et al. 2022), scalar case, quantized.

  Per sequence w ~ U(-1, 1); x_i ~ U(-1, 1); y_i = w x_i + N(0, noise_std^2).
  Tokens alternate x_1 y_1 x_2 y_2 ...: x bins are 0..num_bins-1, y bins
  num_bins..2*num_bins-1. At x_i (i >= 2) the target is y_i's token.
  """
  _check_positive(batch=batch, seq_len=seq_len, num_bins=num_bins)
  if seq_len % 2 or seq_len < 4:
    raise ValueError(f'seq_len must be even and >= 4, got {seq_len}.')
  if not noise_std >= 0:
    raise ValueError(f'noise_std must be >= 0, got {noise_std}.')
  n = seq_len // 2
  w = rng.uniform(-1.0, 1.0, (batch, 1))
  x = rng.uniform(-1.0, 1.0, (batch, n))
  y = w * x + noise_std * rng.standard_normal((batch, n))
  xt, yt = quantize(x, num_bins), quantize(y, num_bins) + num_bins
  inputs = np.zeros((batch, seq_len), np.int32)
  inputs[:, 0::2], inputs[:, 1::2] = xt, yt
  targets = np.zeros((batch, seq_len), np.int32)
  weights = np.zeros((batch, seq_len), np.float32)
  targets[:, 0::2] = yt
  weights[:, 2::2] = 1.0
  return {'inputs': inputs, 'targets': targets, 'weights': weights}


BARS_CLASSES = 4


def bars(rng: np.random.Generator, batch: int, image_size: int, *,
         noise_std: float) -> base.Batch:
  """Offline image classification: which way a bright bar runs (4 classes).

  Class 0 horizontal, 1 vertical, 2 diagonal, 3 anti-diagonal, at a random offset,
  plus Gaussian pixel noise; images [b, S, S, 1].
  """
  _check_positive(batch=batch, image_size=image_size)
  if not noise_std >= 0:
    raise ValueError(f'noise_std must be >= 0, got {noise_std}.')
  s = image_size
  labels = rng.integers(0, BARS_CLASSES, batch)
  offsets = rng.integers(-(s // 2) + 1, s // 2, batch)
  i = np.arange(s)[:, None]
  j = np.arange(s)[None, :]
  c = s // 2 + offsets[:, None, None]
  lines = np.stack([
      np.broadcast_to(i, (s, s))[None] == c,
      np.broadcast_to(j, (s, s))[None] == c,
      (i - j)[None] == offsets[:, None, None],
      (i + j)[None] == s - 1 + offsets[:, None, None],
  ], axis=1)  # [b, 4, S, S]
  image = lines[np.arange(batch), labels].astype(np.float32)
  image = image + noise_std * rng.standard_normal(image.shape)
  return {'inputs': image[..., None].astype(np.float32),
          'targets': labels.astype(np.int32),
          'weights': np.ones((batch,), np.float32)}
