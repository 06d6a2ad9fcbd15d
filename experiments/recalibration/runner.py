"""The library behind `python -m experiments.recalibrate`: analysis, ACT head
filtering and held-out evaluation of a trained decoder, resumable.

`run(config, train_config)` does, in `config.workdir`:

  model        load `config.checkpoint` (trainer workdir or HF directory); with no
               checkpoint, first train `train_config` (default: the trainer's 'tiny'
               preset) into <workdir>/model with `train_lib.train_and_evaluate`.
  task         build the calibration / held-out splits (`tasks.make_task`).
  baseline     held-out and calibration accuracy without interventions.
  interventions  held-out accuracy with `config.interventions` (a
               `parse_interventions` spec), when given.
  analysis     on the held-out split: ACT sink scores, massive activations (dims
               found on the calibration split), attention entropy; retrieval scores
               on a copy task (the task itself when it records copy sources, else
               needle_copy).
  head_search  ACT one head at a time on the calibration split (`head_search`),
               results appended to head_search.jsonl.
  calibrated   held-out accuracy with ACT on the kept heads.
  masking      accuracy of the retrieval task with its retrieval heads masked vs
               as many random other heads (several draws).
  figures      heatmaps (layer x head) and the accuracy bars.

Every finished stage is saved to <workdir>/stages/<stage>.json and skipped on a
rerun; run.json pins the settings (a rerun with other settings is refused), so an
interrupted run continues where it stopped and ends with the same summary.json.
Timings go to timings.json (not summary.json, which is a pure function of the
settings and the model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax.numpy as jnp
import ml_collections
import numpy as np

from attention.interventions import act as act_lib
from attention.interventions import config as iv_config
from attention.interventions import head_interventions
from experiments.recalibration import analysis as analysis_lib
from experiments.recalibration import checkpoints
from experiments.recalibration import evaluation
from experiments.recalibration import figures
from experiments.recalibration import head_search
from experiments.recalibration import tasks as tasks_lib

ANALYSES = ('sinks', 'massive', 'entropy', 'retrieval')
SUMMARY_FILE = 'summary.json'
RUN_FILE = 'run.json'
HEAD_SEARCH_FILE = 'head_search.jsonl'
STAGES = ('baseline', 'interventions', 'analysis', 'head_search', 'calibrated',
          'masking', 'figures')


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Settings of one recalibration run (the binary's flags).

  Attributes:
    workdir: output directory.
    checkpoint: a trainer workdir or HF directory; None = train the default
      model into <workdir>/model first.
    task: a name of `tasks.TASKS`.
    task_params: overrides of the task's generator parameters.
    analysis: which of `ANALYSES` to run.
    interventions: a `parse_interventions` spec evaluated on the held-out split.
    num_calibration, num_eval: split sizes.
    layers: ACT's searched layers ('authors', 'all', 'a-b', 'i,j').
    seed: task seed (splits, random heads).
    batch_size: examples per forward pass.
    act_tau, act_beta: ACT's threshold and sink scale.
    retrieval_task: the copy task for retrieval scores ('' = the task if it
      records copy sources, else needle_copy).
    retrieval_threshold: retrieval heads score above it (Wu et al.: 0.1).
    num_random_masks: random head sets masked for comparison.
    massive_top_k: massive-activation dimensions reported / used for phi.
    max_heads_per_run: stop the head search after this many new heads (None: no
      limit); the run then ends without a summary and a rerun continues.
  """
  workdir: str
  checkpoint: str | None = None
  task: str = 'associative_recall'
  task_params: dict[str, Any] = dataclasses.field(default_factory=dict)
  analysis: tuple[str, ...] = ANALYSES
  interventions: str = ''
  num_calibration: int = 64
  num_eval: int = 128
  layers: str = head_search.AUTHORS
  seed: int = 0
  batch_size: int = 32
  act_tau: float = 0.1
  act_beta: float = 0.4
  retrieval_task: str = ''
  retrieval_threshold: float = analysis_lib.RETRIEVAL_THRESHOLD
  num_random_masks: int = 3
  massive_top_k: int = 2
  max_heads_per_run: int | None = None

  def __post_init__(self):
    if not isinstance(self.workdir, str) or not self.workdir:
      raise ValueError(f'workdir must be a non-empty path, got {self.workdir!r}.')
    bad = [a for a in self.analysis if a not in ANALYSES]
    if bad:
      raise ValueError(f'analysis must be a subset of {ANALYSES}, got {bad}.')
    for name in ('num_calibration', 'num_eval', 'batch_size', 'massive_top_k'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f'{name} must be an int >= 1, got {v!r}.')
    if isinstance(self.num_random_masks, bool) or not isinstance(
        self.num_random_masks, int) or self.num_random_masks < 0:
      raise ValueError(f'num_random_masks must be an int >= 0, got '
                       f'{self.num_random_masks!r}.')
    if not 0.0 <= self.retrieval_threshold <= 1.0:
      raise ValueError(f'retrieval_threshold must be in [0, 1], got '
                       f'{self.retrieval_threshold}.')

  def fingerprint(self) -> dict[str, Any]:
    """The settings a result depends on (not max_heads_per_run)."""
    out = dataclasses.asdict(self)
    out.pop('max_heads_per_run')
    out.pop('workdir')
    out['analysis'] = list(self.analysis)
    return out


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    v = float(x)
    return v if np.isfinite(v) else None
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def write_json(path: str, value: Any) -> None:
  """Atomic JSON write (a killed run never leaves a torn file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(_jsonable(value), f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  with open(path, encoding='utf-8') as f:
    return json.load(f)


class _Stages:
  """Runs each named stage once per workdir (results in stages/<name>.json)."""

  def __init__(self, workdir: str, names: Sequence[str]):
    self.directory = os.path.join(workdir, 'stages')
    os.makedirs(self.directory, exist_ok=True)
    self.names = list(names)
    self.timings: dict[str, float] = {}
    self._start = time.perf_counter()

  def done(self, name: str) -> bool:
    return os.path.exists(os.path.join(self.directory, f'{name}.json'))

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    path = os.path.join(self.directory, f'{name}.json')
    index = self.names.index(name) + 1 if name in self.names else 0
    if os.path.exists(path):
      logging.info('stage %d/%d %s: done before, skipped.', index,
                   len(self.names), name)
      return _read_json(path)
    t0 = time.perf_counter()
    result = _jsonable(fn())
    write_json(path, result)
    self.timings[name] = time.perf_counter() - t0
    logging.info('stage %d/%d %s finished in %.1fs (%.0fs since start).',
                 index, len(self.names), name, self.timings[name],
                 time.perf_counter() - self._start)
    return result


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def default_train_config() -> ml_collections.ConfigDict:
  """The offline default model: the trainer's 'tiny' preset."""
  from experiments.configs import lm  # pylint: disable=g-import-not-at-top
  return lm.get_config('tiny')


def _train_default(workdir: str,
                   train_config: ml_collections.ConfigDict | None) -> str:
  """Trains `train_config` into <workdir>/model (resumes; no-op when finished)."""
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model_dir = os.path.join(workdir, 'model')
  done = os.path.join(model_dir, 'recalibrate_trained.json')
  config = train_config if train_config is not None else default_train_config()
  if os.path.exists(done) and _read_json(done) == json.loads(config.to_json()):
    logging.info('default model already trained in %s.', model_dir)
    return model_dir
  logging.info('no --checkpoint: training %s preset for %d steps into %s.',
               config.get('preset', '?'), config.train.num_steps, model_dir)
  train_lib.train_and_evaluate(config, model_dir, devices=jax.devices()[:1])
  write_json(done, json.loads(config.to_json()))
  return model_dir


# ----------------------------------------------------------------------------
# Analysis reductions (host side, float64)
# ----------------------------------------------------------------------------


def _sink_summary(sink_scores: np.ndarray, examples: tasks_lib.Examples,
                  tau: float) -> dict[str, Any]:
  """Per (layer, head) statistics of ACT sink scores [L, E, N, S]."""
  stats = [analysis_lib.sink_statistics(s, examples.attention_mask, threshold=tau)
           for s in sink_scores]
  is_sink = np.stack([np.asarray(s['is_sink']) for s in stats])  # [L, E, N, S]
  positions = np.sum(is_sink, (0, 1, 2))  # [S]
  tokens: dict[int, int] = {}
  for l, e, n, j in zip(*np.nonzero(is_sink)):
    tok = int(examples.tokens[e, j])
    tokens[tok] = tokens.get(tok, 0) + 1
  mean_scores = np.mean(sink_scores, 1)  # [L, N, S]
  return {
      'threshold': tau,
      'first_token_score': np.stack([np.asarray(s['first']) for s in stats]),
      'max_other_score': np.stack([np.asarray(s['max_other']) for s in stats]),
      'num_sinks': np.stack([np.asarray(s['num_sinks']) for s in stats]),
      'heads_with_sinks': int(np.sum(np.any(is_sink, (1, 3)))),
      'sink_positions': {int(j): int(c) for j, c in enumerate(positions) if c},
      'sink_tokens': dict(sorted(tokens.items(), key=lambda kv: -kv[1])[:16]),
      'top_position_per_head': np.argmax(mean_scores, -1),
      'top_position_score_per_head': np.max(mean_scores, -1),
  }


def _entropy_summary(a: dict[str, np.ndarray]) -> dict[str, Any]:
  rows = np.sum(a['rows'], 1)[:, None]  # [L, 1]
  nrows = np.sum(a['normalized_rows'], 1)[:, None]
  per_head = np.sum(a['entropy_sum'], 1) / np.maximum(rows, 1)  # [L, N]
  normalized = np.sum(a['normalized_sum'], 1) / np.maximum(nrows, 1)
  return {'per_head': per_head, 'per_layer': per_head.mean(1),
          'normalized_per_head': normalized,
          'normalized_per_layer': normalized.mean(1), 'unit': 'nats'}


def _massive_summary(max_abs_cal: np.ndarray, a: dict[str, np.ndarray],
                     dims: np.ndarray, examples: tasks_lib.Examples,
                     top_k: int) -> dict[str, Any]:
  per_layer_max = np.max(max_abs_cal, 1)  # [L, D]
  layers = []
  phi = a['phi']  # [L, E, T]
  valid = examples.attention_mask
  for l, m in enumerate(per_layer_max):
    d = analysis_lib.massive_dims(m, top_k=top_k)
    p = phi[l][valid]
    sink = phi[l] > analysis_lib.MASSIVE_THRESHOLD
    layers.append({
        'layer': l, 'dims': d, 'max_abs': m[d],
        'median_max_abs': float(np.median(m)),
        'max_phi': float(p.max()) if p.size else 0.0,
        'mean_phi': float(p.mean()) if p.size else 0.0,
        'fraction_phi_above': float(np.mean(p > analysis_lib.MASSIVE_THRESHOLD)) if (
            p.size) else 0.0,
        'positions_phi_above': {int(j): int(c) for j, c in enumerate(
            np.sum(sink & valid, 0)) if c},
    })
  dim = max_abs_cal.shape[-1]
  note = None
  if math.sqrt(dim) <= analysis_lib.MASSIVE_THRESHOLD:
    note = (f'phi <= sqrt(D) = {math.sqrt(dim):.2f} for D = {dim}, so the VAR '
            f'threshold {analysis_lib.MASSIVE_THRESHOLD} cannot be reached by '
            f'this model (it needs D > {analysis_lib.MASSIVE_THRESHOLD ** 2:.0f}).')
  return {'model_dims': dims, 'phi_threshold': analysis_lib.MASSIVE_THRESHOLD,
          'phi_bound': math.sqrt(dim), 'note': note,
          'found_on': 'calibration split (max |activation| per dim over real '
                      'tokens, all layer inputs); phi on the held-out split',
          'layers': layers}


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------


def _random_heads(rng: np.random.Generator, count: int, exclude: set,
                  num_layers: int, num_heads: int) -> list[tuple[int, int]]:
  pool = [(l, h) for l in range(num_layers) for h in range(num_heads)
          if (l, h) not in exclude]
  pick = rng.choice(len(pool), min(count, len(pool)), replace=False)
  return sorted(pool[i] for i in pick)


def run(config: RunConfig,
        train_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Runs (or continues) a recalibration study; returns the summary.

  Returns the summary dict (also written to <workdir>/summary.json), or, when
  the head search stopped at `max_heads_per_run`, {'complete': False, ...}
  without writing a summary.

  Raises:
    ValueError: bad settings (unknown task, layer / head out of range, bad
      checkpoint directory, a workdir holding a run with other settings).
  """
  workdir = config.workdir
  os.makedirs(workdir, exist_ok=True)
  interventions = iv_config.parse_interventions(config.interventions)
  checkpoint = config.checkpoint
  if checkpoint is None:
    checkpoint = _train_default(workdir, train_config)
  loaded = checkpoints.load(checkpoint)
  c = loaded.config
  evaluation.check_interventions(interventions, c)
  layer_range = head_search.layer_range(config.layers, c.depth)

  fingerprint = dict(config.fingerprint(), checkpoint=os.path.abspath(
      checkpoint), model=loaded.describe())
  run_path = os.path.join(workdir, RUN_FILE)
  if os.path.exists(run_path):
    previous = _read_json(run_path)
    if previous != _jsonable(fingerprint):
      diff = sorted(k for k in set(previous) | set(fingerprint)
                    if previous.get(k) != _jsonable(fingerprint.get(k)))
      raise ValueError(
          f'workdir {workdir!r} holds a run with other settings (differing: '
          f'{diff}); use another --workdir or delete it.')
  else:
    write_json(run_path, fingerprint)

  trainer_data = (loaded.trainer_config or {}).get('data')
  tokenizer = None
  if config.task.startswith(tasks_lib.TFDS_PREFIX) and loaded.has_tokenizer:
    tokenizer = tasks_lib.HFTokenizer(checkpoint)
  task = tasks_lib.make_task(
      config.task, vocab_size=c.vocab_size,
      num_calibration=config.num_calibration, num_eval=config.num_eval,
      seed=config.seed, params=config.task_params, trainer_data=trainer_data,
      tokenizer=tokenizer)
  retrieval_name = config.retrieval_task or (
      config.task if config.task in tasks_lib.COPY_TASKS else 'needle_copy')
  if retrieval_name not in tasks_lib.COPY_TASKS:
    raise ValueError(f'retrieval_task must be one of {tasks_lib.COPY_TASKS} '
                     f'(tasks that record copy sources), got {retrieval_name!r}.')
  retrieval_task = task if retrieval_name == config.task else (
      tasks_lib.make_task(retrieval_name, vocab_size=c.vocab_size,
                          num_calibration=1, num_eval=config.num_eval,
                          seed=config.seed, trainer_data=trainer_data))
  runner = evaluation.ModelRunner(loaded.model, batch_size=config.batch_size)
  stages = _Stages(workdir, STAGES)
  act = act_lib.ACT(tau=config.act_tau, beta=config.act_beta)
  searched = tuple(layer_range.layers)
  num_layers, num_heads = c.depth, c.num_heads

  def with_act(select: np.ndarray) -> list[evaluation.SelectedHeads]:
    return [evaluation.SelectedHeads(inner=act, select=jnp.asarray(select),
                                     layers=searched)]

  none = np.zeros((num_layers, num_heads), bool)

  # Baselines go through the same (hooked, dense) program as ACT with nothing
  # selected, so the comparison is not blurred by a different summation order.
  baseline = stages.run('baseline', lambda: {
      'held_out': runner.accuracy(task.held_out, with_act(none)),
      'calibration': runner.accuracy(task.calibration, with_act(none)),
      'held_out_fast_path': runner.accuracy(task.held_out),
  })
  intervened = None
  if interventions:
    intervened = stages.run('interventions', lambda: {
        'spec': config.interventions,
        'held_out': runner.accuracy(task.held_out, interventions)})

  def analyse():
    out: dict[str, Any] = {}
    want = set(config.analysis)
    top_k = min(config.massive_top_k, c.dim)
    hidden = 'massive' in want
    # Always top_k dims, so every pass of a split shape shares one program.
    dims = np.zeros((top_k,), np.int32)
    held = None
    if want & {'sinks', 'massive', 'entropy'} or (
        'retrieval' in want and retrieval_task is task):
      max_abs_cal = None
      if hidden:
        max_abs_cal = runner.analyse(task.calibration, dims)['max_abs']
        dims = analysis_lib.massive_dims(np.max(max_abs_cal, (0, 1)),
                                         top_k=top_k)
      held = runner.analyse(task.held_out, dims, hidden=hidden)
      if 'sinks' in want:
        out['sinks'] = _sink_summary(held['sink_scores'], task.held_out,
                                     config.act_tau)
      if 'entropy' in want:
        out['entropy'] = _entropy_summary(held)
      if hidden:
        out['massive'] = _massive_summary(max_abs_cal, held, dims,
                                          task.held_out, top_k)
    if 'retrieval' in want:
      r = held if retrieval_task is task else runner.analyse(
          retrieval_task.held_out, dims, hidden=hidden)
      copies = float(np.sum(r['copies'][0]))
      scores = analysis_lib.retrieval_scores(np.sum(r['hits'], 1),
                                             copies)  # [L, N]
      heads = analysis_lib.retrieval_heads(
          scores, threshold=config.retrieval_threshold)
      out['retrieval'] = {
          'task': retrieval_name, 'params': retrieval_task.params,
          'scores': scores, 'copies': copies,
          'threshold': config.retrieval_threshold, 'heads': heads,
          'fraction_of_heads': len(heads) / scores.size,
      }
    return out

  result = stages.run('analysis', analyse)

  # ----- ACT head search -----
  def search() -> head_search.SearchResult:
    return head_search.search(
        lambda sel: runner.accuracy(task.calibration, with_act(sel)),
        baseline=baseline['calibration'], layers=searched,
        num_layers=num_layers, num_heads=num_heads,
        results_path=os.path.join(workdir, HEAD_SEARCH_FILE),
        max_heads=config.max_heads_per_run,
        tokens_per_head=int(task.calibration.attention_mask.sum()))

  if not stages.done('head_search'):
    logging.info('stage %d/%d head_search ... (%d layers x %d heads)',
                 STAGES.index('head_search') + 1, len(STAGES), len(searched),
                 num_heads)
    found = search()
    if not found.complete:
      logging.info('head search stopped after max_heads_per_run=%s new heads '
                   '(%d of %d done); rerun the same command to continue.',
                   config.max_heads_per_run, len(found.accuracies),
                   len(searched) * num_heads)
      _write_timings(workdir, stages)
      return {'complete': False, 'heads_done': len(found.accuracies),
              'heads_total': len(searched) * num_heads}
    searched_result = stages.run('head_search', lambda: {
        'baseline': found.baseline,
        'accuracies': [[l, h, a] for (l, h), a in sorted(
            found.accuracies.items())],
        'kept': [list(lh) for lh in found.kept]})
  else:
    searched_result = stages.run('head_search', lambda: None)
  kept = [tuple(lh) for lh in searched_result['kept']]

  calibrated = stages.run('calibrated', lambda: {
      'held_out': runner.accuracy(
          task.held_out, with_act(head_search.selection(kept, num_layers,
                                                        num_heads))),
      'calibration': runner.accuracy(
          task.calibration, with_act(head_search.selection(kept, num_layers,
                                                           num_heads)))})

  # ----- masking retrieval heads vs random heads -----
  masking = None
  if 'retrieval' in result:
    heads = [tuple(lh) for lh in result['retrieval']['heads']]

    def mask():
      mask_iv = head_interventions.HeadMask()

      def masked(pairs):
        return runner.accuracy(retrieval_task.held_out, [
            evaluation.SelectedHeads(inner=mask_iv, select=jnp.asarray(
                head_search.selection(pairs, num_layers, num_heads)))])

      out = {'task': retrieval_name, 'retrieval_heads': heads,
             'none': masked([])}
      if not heads:
        out['note'] = (f'no head scores above {config.retrieval_threshold}; '
                       'nothing masked.')
        return out
      rng = np.random.default_rng([config.seed, 7])
      out['retrieval'] = masked(heads)
      draws = []
      for _ in range(config.num_random_masks):
        pairs = _random_heads(rng, len(heads), set(heads), num_layers,
                              num_heads)
        draws.append({'heads': pairs, 'accuracy': masked(pairs)})
      out['random'] = draws
      if draws:
        out['random_mean'] = float(np.mean([d['accuracy'] for d in draws]))
        if len(draws[0]['heads']) < len(heads):
          out['note'] = (f'only {len(draws[0]["heads"])} non-retrieval heads '
                         f'exist; random draws mask that many.')
      return out

    masking = stages.run('masking', mask)

  summary = {
      'complete': True,
      'model': loaded.describe(),
      'task': {'name': task.name, 'params': task.params,
               'num_calibration': config.num_calibration,
               'num_eval': config.num_eval, 'seed': config.seed,
               'chance': task.chance},
      'accuracy': {
          'baseline': baseline['held_out'],
          'calibrated': calibrated['held_out'],
          'calibration_baseline': baseline['calibration'],
          'calibration_calibrated': calibrated['calibration'],
          'baseline_fast_path': baseline['held_out_fast_path'],
      },
      'act': {'tau': config.act_tau, 'beta': config.act_beta,
              'layer_range': layer_range.to_json(),
              'kept_heads': [list(lh) for lh in kept],
              'head_accuracies': searched_result['accuracies'],
              'calibration_baseline': searched_result['baseline']},
      **{k: v for k, v in result.items()},
  }
  if intervened is not None:
    summary['accuracy']['interventions'] = intervened['held_out']
    summary['interventions'] = config.interventions
  if masking is not None:
    summary['retrieval']['masking'] = masking

  summary['figures'] = stages.run('figures', lambda: _figures(
      workdir, summary, num_layers, num_heads))
  summary = _jsonable(summary)
  write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  _write_timings(workdir, stages)
  logging.info('held-out accuracy: baseline %.4f, ACT on %d kept heads %.4f '
               '(chance %.4f). Summary: %s', summary['accuracy']['baseline'],
               len(kept), summary['accuracy']['calibrated'], task.chance,
               os.path.join(workdir, SUMMARY_FILE))
  return summary


def _write_timings(workdir: str, stages: _Stages) -> None:
  path = os.path.join(workdir, 'timings.json')
  old = _read_json(path) if os.path.exists(path) else {}
  old.update(stages.timings)
  write_json(path, old)


def _figures(workdir: str, summary: dict[str, Any], num_layers: int,
             num_heads: int) -> list[str]:
  """Writes the PNGs; returns their paths relative to the workdir."""
  out = []
  kept = [tuple(lh) for lh in summary['act']['kept_heads']]

  def save(name, values, **kw):
    figures.heatmap(os.path.join(workdir, name), np.asarray(values, float), **kw)
    out.append(name)

  if 'sinks' in summary:
    s = summary['sinks']
    save('sink_first_token.png', s['first_token_score'],
         title='ACT sink score of the first token (boxes: heads ACT keeps)',
         label='s_0', marks=kept, vmin=0.0, vmax=1.0)
    save('sink_max_other.png', s['max_other_score'],
         title=f'largest ACT sink score of a later token (tau={s["threshold"]})',
         label='max_{j>0} s_j', marks=kept, vmin=0.0, vmax=1.0)
  if 'entropy' in summary:
    save('entropy.png', summary['entropy']['per_head'],
         title='attention entropy per head (nats, held-out split)',
         label='entropy', vmin=0.0)
  if 'retrieval' in summary:
    r = summary['retrieval']
    save('retrieval.png', r['scores'],
         title=f'retrieval score on {r["task"]} (boxes: > {r["threshold"]})',
         label='retrieval score', marks=[tuple(x) for x in r['heads']],
         vmin=0.0, vmax=1.0)
  acc = summary['accuracy']
  bars = {'baseline': acc['baseline'], 'ACT (kept heads)': acc['calibrated']}
  if 'interventions' in acc:
    bars['--interventions'] = acc['interventions']
  masking = summary.get('retrieval', {}).get('masking')
  if masking and 'retrieval' in masking:
    bars[f'{masking["task"]}: none masked'] = masking['none']
    bars['retrieval heads masked'] = masking['retrieval']
    if 'random_mean' in masking:
      bars['random heads masked'] = masking['random_mean']
  figures.accuracy_bars(os.path.join(workdir, 'accuracy.png'), bars,
                        title=f'held-out accuracy, {summary["task"]["name"]}',
                        chance=summary['task']['chance'])
  out.append('accuracy.png')
  del num_layers, num_heads
  return out
