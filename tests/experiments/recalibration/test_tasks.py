"""Tests of the recalibration tasks: shapes, answers correct by construction (checked
by direct loops over the tokens), disjoint splits, token layouts, tfds prompts on
tfds.testing.mock_data, and bad input."""

import numpy as np
import pytest

from experiments.recalibration import tasks


def _task(name, vocab=33, n_cal=6, n_eval=5, seed=0, **kw):
  return tasks.make_task(name, vocab_size=vocab, num_calibration=n_cal,
                         num_eval=n_eval, seed=seed, **kw)


def test_associative_recall_answers_by_construction():
  task = _task('associative_recall', params=dict(seq_len=24, num_pairs=5,
                                                 num_queries=3))
  p = task.params
  for split in (task.calibration, task.held_out):
    assert split.tokens.shape[1] == 24 and split.answer_tokens.shape[1] == 3
    np.testing.assert_array_equal(
        split.candidates, np.arange(p['num_keys'] + 1,
                                    p['num_keys'] + p['num_values'] + 1))
    for e in range(len(split)):
      row = split.tokens[e]
      pairs = {int(row[2 * i]): (int(row[2 * i + 1]), 2 * i + 1)
               for i in range(p['num_pairs'])}
      for a in range(3):
        pos = split.answer_positions[e, a]
        assert pos >= 2 * p['num_pairs']
        value, where = pairs[int(row[pos])]
        assert split.answer_tokens[e, a] == value
        assert split.sources[e, a] == where and row[where] == value


def test_in_context_classification_rule_is_consistent():
  task = _task('in_context_classification', vocab=40, params=dict(
      num_shots=6, num_items=5, num_labels=3, label_offset=20))
  split = task.calibration
  assert split.tokens.shape == (6, 13) and split.answer_positions.shape == (6, 1)
  np.testing.assert_array_equal(split.candidates, [21, 22, 23])
  assert task.chance == pytest.approx(1 / 3)
  for e in range(len(split)):
    row = split.tokens[e]
    query = row[-1]
    assert split.answer_positions[e, 0] == 12
    shots = [(row[2 * i], row[2 * i + 1]) for i in range(6)]
    assert all(1 <= x <= 5 and 21 <= y <= 23 for x, y in shots)
    labels = {y for x, y in shots if x == query}
    assert labels == {split.answer_tokens[e, 0]}  # Shown, and one rule.
    assert split.sources[e, 0] == -1


@pytest.mark.parametrize('repeat_cue,noise', [(False, -1), (True, 0)])
def test_needle_copy_sources(repeat_cue, noise):
  params = dict(seq_len=20, needle_len=4, token_low=1, token_high=12,
                cue_token=13, noise_token=noise, repeat_cue=repeat_cue)
  task = _task('needle_copy', vocab=14, params=params)
  split = task.held_out
  context = 16
  for e in range(len(split)):
    row, src = split.tokens[e], split.sources[e]
    needle = split.answer_tokens[e]
    assert len(set(needle.tolist())) == 4
    np.testing.assert_array_equal(row[src], needle)
    np.testing.assert_array_equal(src, src[0] + np.arange(4))
    np.testing.assert_array_equal(split.answer_positions[e],
                                  context + np.arange(4))
    hay = np.delete(row[:context], src)
    if noise < 0:  # Every copied token occurs once in the context.
      assert not set(hay.tolist()) & set(needle.tolist())
      assert np.all((hay >= 1) & (hay <= 12))
    else:
      assert np.all(hay == 0)
    expected = [13] * 4 if repeat_cue else [13] + needle[:-1].tolist()
    np.testing.assert_array_equal(row[context:], expected)


def test_splits_disjoint_and_deterministic():
  a = _task('associative_recall', vocab=9, n_cal=40, n_eval=40,
            params=dict(seq_len=6, num_pairs=2, num_queries=2, num_keys=3,
                        num_values=3))
  b = _task('associative_recall', vocab=9, n_cal=40, n_eval=40,
            params=dict(seq_len=6, num_pairs=2, num_queries=2, num_keys=3,
                        num_values=3))
  cal, held = set(a.calibration.keys()), set(a.held_out.keys())
  assert len(cal) == 40 and len(held) == 40 and not cal & held
  np.testing.assert_array_equal(a.held_out.tokens, b.held_out.tokens)
  c = _task('associative_recall', seed=1)
  d = _task('associative_recall', seed=2)
  assert not np.array_equal(c.calibration.tokens, d.calibration.tokens)
  with pytest.raises(ValueError, match='too small'):
    _task('in_context_classification', vocab=5, n_cal=50, n_eval=50,
          params=dict(num_shots=1, num_items=2, num_labels=2, label_offset=2))


def test_layouts_follow_the_trainer_data():
  data = {'name': 'mqar', 'seq_len': 32,
          'mqar': dict(num_pairs=4, num_queries=3, num_keys=16, num_values=16)}
  ar = _task('associative_recall', trainer_data=data)
  assert ar.params == dict(seq_len=32, num_pairs=4, num_queries=3,
                           num_keys=16, num_values=16)
  icc = _task('in_context_classification', trainer_data=data)
  assert icc.params['num_items'] == 16 and icc.params['label_offset'] == 16
  assert icc.calibration.candidates.min() == 17  # Labels are values.
  sc = {'name': 'selective_copy', 'seq_len': 24,
        'selective_copy': dict(num_copy=4, num_tokens=8)}
  nc = _task('needle_copy', vocab=10, trainer_data=sc)
  assert nc.params == dict(seq_len=24, needle_len=4, token_low=1, token_high=8,
                           cue_token=9, noise_token=0, repeat_cue=True)
  for name in tasks.OFFLINE_TASKS:  # Generic layouts fit any vocabulary.
    for vocab in (8, 33, 1000):
      t = _task(name, vocab=vocab, n_cal=2, n_eval=2)
      assert t.calibration.tokens.max() < vocab


def test_correct_restricts_argmax_to_candidates():
  task = _task('needle_copy', vocab=20, n_cal=3, params=dict(
      seq_len=12, needle_len=2, token_low=2, token_high=9, cue_token=0,
      noise_token=-1, repeat_cue=False))
  ex = task.calibration
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 2, 20))
  logits[..., 15] = 100.0  # Not a candidate: ignored.
  got = tasks.correct(logits, ex)
  want = np.zeros((3, 2), bool)
  for e in range(3):
    for a in range(2):
      best = max(range(2, 10), key=lambda v: logits[e, a, v])
      want[e, a] = best == ex.answer_tokens[e, a]
  np.testing.assert_array_equal(got, want)
  logits[0, 0, ex.answer_tokens[0, 0]] = 50.0
  assert tasks.correct(logits, ex)[0, 0]
  with pytest.raises(ValueError, match='logits_at_answers'):
    tasks.correct(logits[:, :1], ex)


def test_bad_input():
  with pytest.raises(ValueError, match='associative_recall, in_context_'):
    _task('no_such_task')
  with pytest.raises(ValueError, match='vocab_size=9'):
    _task('associative_recall', vocab=9, params=dict(num_keys=8,
                                                     num_values=8))
  with pytest.raises(ValueError, match='no parameter'):
    _task('needle_copy', params=dict(needle=3))
  with pytest.raises(ValueError, match='seq_len'):
    _task('associative_recall', params=dict(seq_len=5))
  with pytest.raises(ValueError, match='num_calibration'):
    _task('needle_copy', n_cal=0)
  with pytest.raises(ValueError, match='outside'):
    _task('needle_copy', params=dict(cue_token=3))
  with pytest.raises(ValueError, match='tokenizer'):
    _task('tfds:imdb_reviews', vocab=100)


def test_tfds_text_classification_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=24):
    task = tasks.make_task('tfds:imdb_reviews', vocab_size=256,
                           num_calibration=4, num_eval=3, params=dict(
                               num_shots=1, max_text_tokens=10,
                               eval_split='train'))
  assert task.params['label_names'] == ['neg', 'pos']
  # Verbalizers: ' neg' / ' pos' both start with the space byte, so the names'
  # first bytes are used.
  labels = [ord('n'), ord('p')]
  assert task.params['label_tokens'] == labels
  sep = list(b'\nLabel:')
  for split in (task.calibration, task.held_out):
    for e in range(len(split)):
      n = split.attention_mask[e].sum()
      assert split.attention_mask[e, :n].all() and not split.attention_mask[
          e, n:].any()
      assert split.answer_positions[e, 0] == n - 1
      assert split.tokens[e, n - len(sep):n].tolist() == sep
      assert split.tokens[e].tolist().count(ord('\n')) >= 2  # One shot.
      assert split.answer_tokens[e, 0] in labels
  def queries(split):  # The text after the shot's last newline.
    out = set()
    for e in range(len(split)):
      row = split.tokens[e, :split.attention_mask[e].sum() - len(sep)].tolist()
      out.add(bytes(row[len(row) - row[::-1].index(ord('\n')):]))
    return out
  assert len(queries(task.calibration)) == 4
  assert not queries(task.calibration) & queries(task.held_out)
  with pytest.raises(ValueError, match='not available locally'):
    tasks.make_task('tfds:imdb_reviews', vocab_size=256, num_calibration=2,
                    num_eval=2, params=dict(data_dir=str(tmp_path)))
