"""tensorflow-datasets pipelines: byte-level text LM and image classification.

TensorFlow is imported only when one of these datasets is requested, so the offline
defaults need no TensorFlow. Per-host sharding: host i of n reads
`tfds.even_splits(split, n)[i]`. Order is deterministic (no file shuffling, seeded
window shuffle, `deterministic=True`), so the iterator state is the number of batches
already produced; restoring rebuilds the pipeline and skips that many batches.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from experiments.data import base

# name -> (train split, eval split)
TEXT_DATASETS = {'tiny_shakespeare': ('train', 'test'),
                 'lm1b': ('train', 'test')}
# name -> (image shape, classes, train split, eval split)
IMAGE_DATASETS = {'mnist': ((28, 28, 1), 10, 'train', 'test'),
                  'cifar10': ((32, 32, 3), 10, 'train', 'test')}
TEXT_VOCAB_SIZE = 256
_NEWLINE = 10
_SHUFFLE_BUFFER = 1024


def _import_tf():
  """TensorFlow and tfds, with TF kept off any accelerator (JAX owns them)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')
  return tf, tfds


def _load(name: str, split: str, *, process_index: int, process_count: int,
          data_dir: str | None):
  tf, tfds = _import_tf()
  host_split = tfds.even_splits(split, n=process_count,
                                drop_remainder=True)[process_index]
  ds = tfds.load(name, split=host_split, shuffle_files=False,
                 data_dir=data_dir)
  options = tf.data.Options()
  options.deterministic = True
  return tf, ds.with_options(options)


def _text_examples(name: str, split: str, seq_len: int, **load_kwargs):
  """Bytes of every example (newline-joined) cut into windows of seq_len + 1."""
  tf, ds = _load(name, split, **load_kwargs)
  ds = ds.map(lambda ex: tf.concat(
      [tf.io.decode_raw(ex['text'], tf.uint8), tf.constant([_NEWLINE],
                                                           tf.uint8)], 0))
  ds = ds.unbatch().batch(seq_len + 1, drop_remainder=True)

  def to_batch(w):
    w = tf.cast(w, tf.int32)
    return {'inputs': w[..., :-1], 'targets': w[..., 1:],
            'weights': tf.ones_like(w[..., 1:], tf.float32)}
  return tf, ds, to_batch


def _image_examples(name: str, split: str, **load_kwargs):
  tf, ds = _load(name, split, **load_kwargs)

  def to_batch(ex):
    image = (tf.cast(ex['image'], tf.float32) / 255.0 - 0.5) / 0.5
    label = tf.cast(ex['label'], tf.int32)
    return {'inputs': image, 'targets': label,
            'weights': tf.ones_like(label, tf.float32)}
  return tf, ds, to_batch


class TfdsIterator:
  """Endless, deterministic batches of a tf.data pipeline; state = batches read."""

  def __init__(self, build: Callable[[int], Any]):
    self._build = build
    self._position = 0
    self._iterator = None

  def __iter__(self) -> 'TfdsIterator':
    return self

  def __next__(self) -> base.Batch:
    if self._iterator is None:
      self._iterator = iter(self._build(self._position))
    batch = next(self._iterator)
    self._position += 1
    return {k: np.asarray(v) for k, v in batch.items()}

  def get_state(self) -> dict[str, Any]:
    return {'position': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    self._position = base.check_position_state(state)
    self._iterator = None


def make_source(name: str, *, seq_len: int, local_batch: int, seed: int,
                num_eval_batches: int, process_index: int, process_count: int,
                data_dir: str | None) -> base.DataSource:
  """The `DataSource` of a tfds text or image dataset."""
  load_kwargs = dict(process_index=process_index, process_count=process_count,
                     data_dir=data_dir)
  if name in TEXT_DATASETS:
    train_split, eval_split = TEXT_DATASETS[name]
    info = base.DataInfo(kind='lm', vocab_size=TEXT_VOCAB_SIZE,
                         tokens_per_example=seq_len)

    def examples(split):
      return _text_examples(name, split, seq_len, **load_kwargs)
  elif name in IMAGE_DATASETS:
    shape, classes, train_split, eval_split = IMAGE_DATASETS[name]
    info = base.DataInfo(kind='image', num_classes=classes, image_shape=shape,
                         tokens_per_example=1)

    def examples(split):
      return _image_examples(name, split, **load_kwargs)
  else:
    raise ValueError(
        f'tfds dataset must be one of {sorted(TEXT_DATASETS)} + '
        f'{sorted(IMAGE_DATASETS)}, got {name!r}.')

  def build_train(skip: int):
    tf, ds, to_batch = examples(train_split)
    ds = ds.shuffle(_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    ds = ds.repeat().batch(local_batch, drop_remainder=True).map(to_batch)
    return ds.skip(skip).prefetch(tf.data.AUTOTUNE)

  def eval_batches() -> list[base.Batch]:
    _, ds, to_batch = examples(eval_split)
    ds = ds.batch(local_batch, drop_remainder=True).map(to_batch)
    out = [{k: np.asarray(v) for k, v in b.items()}
           for b in ds.take(num_eval_batches)]
    if not out:
      raise ValueError(
          f'{name}:{eval_split} has too little data for one eval batch of '
          f'{local_batch}.')
    return out

  return base.DataSource(info=info, train=TfdsIterator(build_train),
                         eval_batches=eval_batches)
