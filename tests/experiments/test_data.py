"""Tests of experiments.data: synthetic tasks (brute-force checks), byte corpus,
checkpointable iterators, tfds pipelines on mock data."""

import hypothesis
from hypothesis import strategies as st
import ml_collections
import numpy as np
import pytest

from experiments import data as data_lib
from experiments.configs import lm
from experiments.configs import vit
from experiments.data import base
from experiments.data import synthetic
from experiments.data import text


@hypothesis.given(pairs=st.integers(1, 6), queries=st.integers(1, 6),
                  extra=st.integers(0, 5), seed=st.integers(0, 99))
def test_mqar_answers_are_the_bound_values(pairs, queries, extra, seed):
  queries = min(queries, pairs)
  t = 2 * pairs + queries + extra
  b = synthetic.mqar(np.random.default_rng(seed), 3, t, num_pairs=pairs,
                     num_queries=queries, num_keys=8, num_values=5)
  vocab = synthetic.mqar_vocab_size(8, 5)
  assert b['inputs'].shape == (3, t) and b['inputs'].dtype == np.int32
  assert b['inputs'].min() >= 0 and b['inputs'].max() < vocab
  for row in range(3):
    seq = b['inputs'][row]
    binding = {}
    for i in range(pairs):  # Brute force: read the pairs back.
      k, v = int(seq[2 * i]), int(seq[2 * i + 1])
      assert 1 <= k <= 8 and 9 <= v <= 13 and k not in binding
      binding[k] = v
    scored = np.flatnonzero(b['weights'][row])
    assert len(scored) == queries
    assert len({int(seq[p]) for p in scored}) == queries  # Distinct queries.
    for p in scored:
      assert p >= 2 * pairs
      assert b['targets'][row, p] == binding[int(seq[p])]
    rest = np.setdiff1d(np.arange(2 * pairs, t), scored)
    assert (seq[rest] == 0).all()


def test_mqar_validates():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=r'seq_len must be >= 2 \* num_pairs'):
    synthetic.mqar(rng, 1, 5, num_pairs=2, num_queries=2, num_keys=4,
                   num_values=4)
  with pytest.raises(ValueError, match='num_pairs .* must be <= num_keys'):
    synthetic.mqar(rng, 1, 50, num_pairs=5, num_queries=2, num_keys=4,
                   num_values=4)
  with pytest.raises(ValueError, match='num_queries .* must be <= num_pairs'):
    synthetic.mqar(rng, 1, 50, num_pairs=2, num_queries=3, num_keys=4,
                   num_values=4)
  with pytest.raises(ValueError, match='batch must be a positive int'):
    synthetic.mqar(rng, 0, 50, num_pairs=2, num_queries=2, num_keys=4,
                   num_values=4)


@hypothesis.given(copy=st.integers(1, 5), extra=st.integers(0, 6),
                  seed=st.integers(0, 99))
def test_selective_copy_targets_are_the_data_tokens_in_order(copy, extra,
                                                             seed):
  t = 2 * copy + extra
  b = synthetic.selective_copy(np.random.default_rng(seed), 2, t,
                               num_copy=copy, num_tokens=6)
  for row in range(2):
    context = b['inputs'][row, :t - copy]
    data_tokens = context[context != 0]
    assert len(data_tokens) == copy
    assert (b['inputs'][row, t - copy:] == 7).all()
    np.testing.assert_array_equal(b['targets'][row, t - copy:], data_tokens)
    np.testing.assert_array_equal(b['weights'][row],
                                  np.arange(t) >= t - copy)
  with pytest.raises(ValueError, match=r'seq_len must be >= 2 \* num_copy'):
    synthetic.selective_copy(np.random.default_rng(0), 1, 5, num_copy=3,
                             num_tokens=4)


def test_icl_regression_tokens_encode_a_linear_function():
  rng = np.random.default_rng(1)
  b = synthetic.icl_regression(rng, 4, 40, num_bins=16, noise_std=0.0)
  x_tok, y_tok = b['inputs'][:, 0::2], b['inputs'][:, 1::2]
  assert (x_tok < 16).all() and (y_tok >= 16).all() and (y_tok < 32).all()
  np.testing.assert_array_equal(b['targets'][:, 0::2], y_tok)
  assert b['weights'][:, 0].sum() == 0 and (b['weights'][:, 2::2] == 1).all()
  assert (b['weights'][:, 1::2] == 0).all()
  # Oracle: regenerate with the same draws; y bin = bin(w * x).
  rng = np.random.default_rng(1)
  w = rng.uniform(-1, 1, (4, 1))
  x = rng.uniform(-1, 1, (4, 20))
  np.testing.assert_array_equal(x_tok, synthetic.quantize(x, 16))
  np.testing.assert_array_equal(y_tok - 16, synthetic.quantize(w * x, 16))
  np.testing.assert_array_equal(
      synthetic.quantize(np.array([-2.0, -1.0, -0.01, 0.0, 0.99, 1.0, 5.0]), 4),
      [0, 0, 1, 2, 3, 3, 3])
  with pytest.raises(ValueError, match='seq_len must be even'):
    synthetic.icl_regression(rng, 1, 7, num_bins=4, noise_std=0.0)
  with pytest.raises(ValueError, match='noise_std must be >= 0'):
    synthetic.icl_regression(rng, 1, 8, num_bins=4, noise_std=-1.0)


def test_bars_images_show_their_class():
  b = synthetic.bars(np.random.default_rng(0), 64, 12, noise_std=0.0)
  img = b['inputs'][..., 0]
  assert img.shape == (64, 12, 12) and set(np.unique(img)) <= {0.0, 1.0}
  for image, label in zip(img, b['targets']):
    rows, cols = np.nonzero(image)
    assert len(rows) >= 2
    kind = [len(set(rows)) == 1, len(set(cols)) == 1,
            len(set(rows - cols)) == 1, len(set(rows + cols)) == 1]
    assert kind[label], (label, rows, cols)


def test_byte_corpus_windows_and_stdlib_default():
  corpus = text.load_corpus(text.stdlib_glob())
  assert len(corpus) > 1_000_000 and corpus.dtype == np.uint8
  train, evaluation = text.split_corpus(corpus, 0.05, 16)
  assert len(train) + len(evaluation) == len(corpus)
  b = text.random_windows(train, np.random.default_rng(0), 3, 16)
  np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
  for row in range(3):  # Each window is a contiguous slice of the corpus.
    window = bytes(np.concatenate([b['inputs'][row], b['targets'][row, -1:]])
                   .astype(np.uint8))
    assert window in bytes(train)
  evals = text.eval_windows(evaluation, 2, 16, 3)
  assert len(evals) == 3 and evals[0]['inputs'].shape == (2, 16)
  with pytest.raises(ValueError, match='matches no files'):
    text.load_corpus('/nonexistent/*.nothing')
  with pytest.raises(ValueError, match='eval_fraction must be in'):
    text.split_corpus(corpus, 1.5, 16)
  with pytest.raises(ValueError, match='fewer than seq_len'):
    text.split_corpus(corpus[:100], 0.5, 64)


@pytest.mark.parametrize('name', ['mqar', 'selective_copy', 'icl_regression',
                                  'bytes', 'bars'])
def test_offline_sources_are_deterministic_and_resumable(name):
  config = (vit if name == 'bars' else lm).get_config('tiny').data
  config.name = name
  source = data_lib.make_source(config, seed=3)
  batches = [next(source.train) for _ in range(4)]
  state = source.train.get_state()
  assert state == {'position': 4}
  after = [next(source.train) for _ in range(2)]
  fresh = data_lib.make_source(config, seed=3)
  fresh.train.set_state(state)
  for want, got in zip(after, [next(fresh.train) for _ in range(2)]):
    for key in ('inputs', 'targets', 'weights'):
      np.testing.assert_array_equal(want[key], got[key])
  assert not np.array_equal(batches[0]['inputs'], batches[1]['inputs'])
  # Different hosts draw different batches of size batch / hosts.
  host1 = data_lib.make_source(config, seed=3, process_index=1,
                               process_count=2)
  other = next(host1.train)
  assert other['inputs'].shape[0] == config.batch_size // 2
  assert not np.array_equal(other['inputs'], batches[0]['inputs'][:len(
      other['inputs'])])
  evals = source.eval_batches()
  assert len(evals) == config.num_eval_batches
  np.testing.assert_array_equal(evals[0]['inputs'],
                                source.eval_batches()[0]['inputs'])
  info = source.info
  if name == 'bars':
    assert info.kind == 'image' and info.num_classes == 4
  else:
    assert info.kind == 'lm' and batches[0]['inputs'].max() < info.vocab_size


def test_make_source_validates():
  config = lm.get_config('tiny').data
  with pytest.raises(ValueError, match='process_index must be in'):
    data_lib.make_source(config, seed=0, process_index=2, process_count=2)
  config.batch_size = 15
  with pytest.raises(ValueError, match=r'batch_size \(15\) must be a multiple'):
    data_lib.make_source(config, seed=0, process_count=2)
  config.name = 'nope'
  with pytest.raises(ValueError, match="data.name must be one of"):
    data_lib.make_source(config, seed=0)
  it = base.IndexedIterator(lambda i: {'i': np.array(i)})
  for bad in ({'position': -1}, {'pos': 1}, {'position': 1.5}, [1]):
    with pytest.raises(ValueError, match='iterator state'):
      it.set_state(bad)


def _tfds_config(name, batch):
  config = ml_collections.ConfigDict(lm.get_config('tiny').data.to_dict())
  config.update(dict(name=name, batch_size=batch, seq_len=16,
                     num_eval_batches=2))
  return config


@pytest.mark.parametrize('name', ['tiny_shakespeare', 'mnist'])
def test_tfds_pipelines_on_mock_data(name):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _tfds_config(name, 4)
  with tfds.testing.mock_data(num_examples=48):
    source = data_lib.make_source(config, seed=0)
    first = [next(source.train) for _ in range(5)]
    state = source.train.get_state()
    after = [next(source.train) for _ in range(3)]
    again = data_lib.make_source(config, seed=0)
    again_first = [next(again.train) for _ in range(5)]
    resumed = data_lib.make_source(config, seed=0)
    resumed.train.set_state(state)
    resumed_after = [next(resumed.train) for _ in range(3)]
    hosts = [next(data_lib.make_source(config, seed=0, process_index=i,
                                       process_count=2).train)
             for i in range(2)]
    evals = source.eval_batches()
  for a, b in zip(first + after, again_first + resumed_after):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])  # Deterministic.
  assert state == {'position': 5}
  assert len(evals) == 2
  if name == 'tiny_shakespeare':
    b = first[0]
    assert b['inputs'].shape == (4, 16) and b['inputs'].dtype == np.int32
    np.testing.assert_array_equal(b['inputs'][:, 1:], b['targets'][:, :-1])
    assert source.info.vocab_size == 256
  else:
    b = first[0]
    assert b['inputs'].shape == (4, 28, 28, 1) and b['targets'].shape == (4,)
    assert -1.0 <= b['inputs'].min() and b['inputs'].max() <= 1.0
    assert source.info.image_shape == (28, 28, 1)
  # (mock_data ignores split slicing; host splits are checked separately.)
  assert hosts[0]['inputs'].shape[0] == hosts[1]['inputs'].shape[0] == 2


def test_tfds_hosts_read_their_even_split(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  from experiments.data import tfds_data  # pylint: disable=g-import-not-at-top
  calls = []
  original = tfds.load

  def spy(name, *, split, **kwargs):
    calls.append((name, split, kwargs['shuffle_files']))
    return original(name, split=split, **kwargs)
  monkeypatch.setattr(tfds, 'load', spy)
  with tfds.testing.mock_data(num_examples=12):
    for i in range(3):
      tfds_data._load('mnist', 'train', process_index=i,  # pylint: disable=protected-access
                      process_count=3, data_dir=None)
  assert calls == [('mnist', s, False) for s in
                   tfds.even_splits('train', n=3, drop_remainder=True)]
  with pytest.raises(ValueError, match='tfds dataset must be one of'):
    tfds_data.make_source('imagenet', seq_len=4, local_batch=2, seed=0,
                          num_eval_batches=1, process_index=0,
                          process_count=1, data_dir=None)
