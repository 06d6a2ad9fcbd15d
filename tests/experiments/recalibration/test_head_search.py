"""ACT head filtering: layer ranges, the search vs a brute-force loop with static
per-head ACT on a tiny model, SelectedHeads vs static head selection, resumption."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention.interventions import act as act_lib
from attention.interventions import head_interventions
from experiments.models import decoder as decoder_lib
from experiments.recalibration import evaluation
from experiments.recalibration import head_search
from experiments.recalibration import tasks

L, N = 2, 2


@pytest.fixture(scope='module')
def tiny():
  config = decoder_lib.DecoderConfig(vocab_size=33, dim=16, depth=L,
                                     num_heads=N, num_kv_heads=1, head_dim=8,
                                     mlp_dim=32)
  model = decoder_lib.CausalDecoder(config, rngs=nnx.Rngs(3))
  task = tasks.make_task('associative_recall', vocab_size=33,
                         num_calibration=8, num_eval=4, seed=0,
                         params=dict(seq_len=16, num_pairs=4, num_queries=4))
  return evaluation.ModelRunner(model, batch_size=8), task


def test_layer_range():
  assert head_search.layer_range('authors', 6).layers == (2, 3, 4)
  assert head_search.layer_range('authors', 6).note is None
  assert head_search.layer_range('authors', 4).layers == (2,)
  for depth in (1, 2, 3):  # 2..L-2 is empty: all layers, said so.
    r = head_search.layer_range('authors', depth)
    assert r.layers == tuple(range(depth)) and 'empty' in r.note
    assert r.to_json()['requested'] == 'authors'
  assert head_search.layer_range('all', 3).layers == (0, 1, 2)
  assert head_search.layer_range('1-2', 4).layers == (1, 2)
  assert head_search.layer_range('0,3', 4).layers == (0, 3)
  with pytest.raises(ValueError, match='out of range'):
    head_search.layer_range('5', 2)
  for bad in ('x', '3-1', '', '1,1'):
    with pytest.raises(ValueError, match='layers'):
      head_search.layer_range(bad, 4)


def _brute_force(evaluate, layers):
  """Direct loop: baseline, then every head alone; kept = beats the baseline."""
  baseline = evaluate(None)
  accuracies = {(l, h): evaluate((l, h)) for l in layers for h in range(N)}
  return baseline, accuracies, {lh for lh, a in accuracies.items()
                                if a > baseline}


def test_search_matches_brute_force_with_static_act(tiny, tmp_path):
  runner, task = tiny
  act = act_lib.ACT(tau=0.05, beta=0.1)  # Strong, so heads differ.

  def selected(sel):
    return runner.accuracy(task.calibration, [evaluation.SelectedHeads(
        inner=act, select=jnp.asarray(sel))])

  def static(head):  # ACT with static layers / heads: one program per head.
    if head is None:
      return runner.accuracy(task.calibration)
    return runner.accuracy(task.calibration, [act_lib.ACT(
        tau=0.05, beta=0.1, layers=(head[0],), heads=(head[1],))])

  baseline = selected(np.zeros((L, N), bool))
  want_base, want_acc, want_kept = _brute_force(static, range(L))
  assert baseline == want_base
  seen = []
  got = head_search.search(selected, baseline=baseline, layers=range(L),
                           num_layers=L, num_heads=N,
                           results_path=str(tmp_path / 'h.jsonl'),
                           on_head=lambda l, h, a: seen.append((l, h)))
  assert got.complete and got.accuracies == want_acc
  assert set(got.kept) == want_kept
  assert len(set(want_acc.values())) > 1  # The search had something to find.
  assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
  kept_acc = [got.accuracies[lh] for lh in got.kept]
  assert kept_acc == sorted(kept_acc, reverse=True)


def test_selected_heads_equals_static_selection(tiny):
  runner, task = tiny
  ex = task.held_out
  tokens = jnp.asarray(ex.tokens)
  model = nnx.merge(runner.graphdef, runner.state)
  sel = np.zeros((L, N), bool)
  sel[1, 1] = True
  for inner, static in ((head_interventions.HeadMask(),
                         head_interventions.HeadMask(layers=(1,), heads=(1,))),
                        (act_lib.ACT(), act_lib.ACT(layers=(1,), heads=(1,)))):
    a = model(tokens, interventions=[evaluation.SelectedHeads(
        inner=inner, select=jnp.asarray(sel), layers=(1,))]).logits
    b = model(tokens, interventions=[static]).logits
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  base = model(tokens).logits
  assert not np.allclose(a, base, atol=1e-4)  # The edit does something.
  with pytest.raises(ValueError, match='heads=None'):
    evaluation.SelectedHeads(inner=act_lib.ACT(heads=(0,)),
                             select=jnp.asarray(sel))
  with pytest.raises(ValueError, match='select'):
    evaluation.SelectedHeads(inner=act_lib.ACT(), select=jnp.ones((L, N)))
  with pytest.raises(ValueError, match='out of range'):
    runner.accuracy(ex, [head_interventions.HeadMask(heads=(5,))])


def test_search_resumes(tmp_path):
  rng = np.random.default_rng(0)
  table = rng.integers(0, 4, (3, N)) / 4.0
  calls = []

  def evaluate(sel):
    (l, h), = zip(*np.nonzero(sel))
    calls.append((int(l), int(h)))
    return float(table[l, h])

  kw = dict(baseline=0.5, layers=(0, 1, 2), num_layers=3, num_heads=N)
  path = str(tmp_path / 'heads.jsonl')
  part = head_search.search(evaluate, results_path=path, max_heads=2, **kw)
  assert not part.complete and len(part.accuracies) == 2

  def kill(l, h, a):  # A run that dies after its first head.
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    head_search.search(evaluate, results_path=path, on_head=kill, **kw)
  with open(path, 'a', encoding='utf-8') as f:
    f.write('{"layer": 2, "he')  # Torn by a kill mid-write.
  calls.clear()
  full = head_search.search(evaluate, results_path=path, **kw)
  assert calls == [(1, 1), (2, 0), (2, 1)]  # Only the missing heads.
  ref = head_search.search(evaluate, results_path=str(tmp_path / 'ref.jsonl'),
                           **kw)
  assert full == ref and full.complete
  assert set(full.kept) == {(l, h) for l in range(3) for h in range(N)
                            if table[l, h] > 0.5}
  rows = [json.loads(x) for x in open(path, encoding='utf-8') if x.endswith(
      '}\n')]
  assert len(rows) == 6
  with pytest.raises(ValueError, match='another search'):
    head_search.search(evaluate, results_path=path, baseline=0.5, layers=(0,),
                       num_layers=3, num_heads=N)
  assert os.path.exists(path)
