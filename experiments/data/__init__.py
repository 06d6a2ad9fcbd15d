"""Training data: offline synthetic tasks and byte corpora, and tfds pipelines.

`make_source(config.data, ...)` returns a `DataSource` (checkpointable train iterator,
fixed eval batches, `DataInfo`). Offline datasets (no download, no TensorFlow):
'mqar', 'selective_copy', 'icl_regression', 'bytes' (the Python standard library's
source by default) and 'bars' (images). tfds datasets: 'tiny_shakespeare', 'lm1b'
(byte-level), 'mnist', 'cifar10'.
"""

from __future__ import annotations

from typing import Any

from experiments.data import base
from experiments.data import synthetic
from experiments.data import text
from experiments.data import tfds_data

OFFLINE = ('mqar', 'selective_copy', 'icl_regression', 'bytes', 'bars')
TFDS = tuple(sorted(tfds_data.TEXT_DATASETS)) + tuple(
    sorted(tfds_data.IMAGE_DATASETS))
DATASETS = OFFLINE + TFDS

_TRAIN, _EVAL = 0, 1

# name -> (generator(rng, batch, seq_len, **params), DataInfo from (params, seq_len)).
# The params are the ConfigDict `config.data.<name>`, passed as keyword arguments.
_TASKS = {
    'mqar': (synthetic.mqar, lambda p, t: base.DataInfo(
        kind='lm', vocab_size=synthetic.mqar_vocab_size(p.num_keys,
                                                        p.num_values),
        tokens_per_example=t)),
    'selective_copy': (synthetic.selective_copy, lambda p, t: base.DataInfo(
        kind='lm', vocab_size=synthetic.selective_copy_vocab_size(p.num_tokens),
        tokens_per_example=t)),
    'icl_regression': (synthetic.icl_regression, lambda p, t: base.DataInfo(
        kind='lm', vocab_size=synthetic.icl_regression_vocab_size(p.num_bins),
        tokens_per_example=t)),
    'bars': (lambda rng, b, t, **p: synthetic.bars(rng, b, **p),
             lambda p, t: base.DataInfo(
                 kind='image', num_classes=synthetic.BARS_CLASSES,
                 image_shape=(p.image_size, p.image_size, 1))),
}


def _indexed_source(info: base.DataInfo, make, *, seed: int,
                    process_index: int, num_eval_batches: int
                   ) -> base.DataSource:
  """Source whose batch i is make(rng(seed, host, split, i))."""
  train = base.IndexedIterator(
      lambda i: make(base.batch_rng(seed, process_index, _TRAIN, i)))

  def eval_batches():
    return [make(base.batch_rng(seed, process_index, _EVAL, i))
            for i in range(num_eval_batches)]
  return base.DataSource(info=info, train=train, eval_batches=eval_batches)


def make_source(config: Any, *, seed: int, process_index: int = 0,
                process_count: int = 1) -> base.DataSource:
  """The data source named by `config.name` (a `config.data` ConfigDict).

  Args:
    config: `data` ConfigDict (name, seq_len, batch_size = global batch, ...).
    seed: data seed.
    process_index: this host's index (jax.process_index()).
    process_count: number of hosts; each reads batch_size / process_count examples.
  """
  if config.name not in DATASETS:
    raise ValueError(
        f'data.name must be one of {DATASETS}, got {config.name!r}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index must be in [0, {process_count}), got {process_index}.')
  if config.batch_size % process_count:
    raise ValueError(
        f'data.batch_size ({config.batch_size}) must be a multiple of the '
        f'process count ({process_count}).')
  if config.num_eval_batches < 1:
    raise ValueError(
        f'data.num_eval_batches must be >= 1, got {config.num_eval_batches}.')
  b = config.batch_size // process_count
  t = config.seq_len
  common = dict(seed=seed, process_index=process_index,
                num_eval_batches=config.num_eval_batches)
  if config.name in _TASKS:
    generate, make_info = _TASKS[config.name]
    params = config[config.name]
    return _indexed_source(
        make_info(params, t),
        lambda rng: generate(rng, b, t, **params.to_dict()), **common)
  if config.name == 'bytes':
    p = config.bytes
    corpus = text.load_corpus(p.text_glob or text.stdlib_glob())
    train_bytes, eval_bytes = text.split_corpus(corpus, p.eval_fraction, t)
    info = base.DataInfo(kind='lm', vocab_size=text.VOCAB_SIZE,
                         tokens_per_example=t)
    train = base.IndexedIterator(lambda i: text.random_windows(
        train_bytes, base.batch_rng(seed, process_index, _TRAIN, i), b, t))
    return base.DataSource(
        info=info, train=train, eval_batches=lambda: text.eval_windows(
            eval_bytes, b, t, config.num_eval_batches))
  return tfds_data.make_source(
      config.name, seq_len=t, local_batch=b, seed=seed,
      num_eval_batches=config.num_eval_batches, process_index=process_index,
      process_count=process_count, data_dir=config.tfds_data_dir)


__all__ = ['DATASETS', 'OFFLINE', 'TFDS', 'base', 'make_source', 'synthetic',
           'text', 'tfds_data']
