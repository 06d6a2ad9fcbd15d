r"""Attention recalibration and head analysis of a trained decoder (ACT, sinks,
massive activations, entropy, retrieval heads).

  python -m experiments.recalibrate --checkpoint=DIR --workdir=OUT \
      [--task=associative_recall] [--analysis=sinks,massive,entropy,retrieval] \
      [--interventions='temperature:t=2,layers=1'] [--num_calibration=64] \
      [--num_eval=128] [--layers=authors]

DIR is a trainer workdir of `python -m experiments.train` (config.json +
checkpoints/) or a Hugging Face directory (config.json with "architectures" +
*.safetensors). Without --checkpoint the trainer's 'tiny' preset (or
--train_config, e.g. `--train_config=experiments/configs/lm.py:mqar
--train_config.train.num_steps=500`) is trained into OUT/model first, offline.

Writes OUT/summary.json (held-out accuracy before / after ACT's head filtering,
the kept heads, sink statistics, massive-activation dimensions, entropy, retrieval
heads and the accuracy with them masked vs as many random heads), PNG figures and
a progress line with ETA. Rerunning the same command continues an interrupted run
(finished stages and heads are skipped). The logic lives in
`experiments.recalibration.runner`.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import common_flags
from experiments.recalibration import runner
from experiments.recalibration import tasks

_DEFAULT_TRAIN_CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'configs', 'lm.py') + ':tiny'

_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', None, 'Trainer workdir or Hugging Face directory; unset: '
    'train --train_config into <workdir>/model first.')
_WORKDIR = common_flags.WORKDIR
_TASK = flags.DEFINE_string(
    'task', 'associative_recall',
    f'One of {", ".join(tasks.OFFLINE_TASKS)} or tfds:<name> (local data).')
_TASK_PARAMS = flags.DEFINE_string(
    'task_params', '', 'Task sizes as key=value,... (e.g. seq_len=64,'
    'num_pairs=8,num_queries=4 for associative_recall; num_shots,num_items,'
    'num_labels for in_context_classification; seq_len,needle_len for '
    'needle_copy; num_shots,max_text_tokens,calibration_split,eval_split,'
    'data_dir for tfds). Unset keys follow the model (the trainer data layout).')
_ANALYSIS = flags.DEFINE_list(
    'analysis', list(runner.ANALYSES), f'Subset of {runner.ANALYSES}.')
_INTERVENTIONS = flags.DEFINE_string(
    'interventions', '', 'Extra interventions evaluated on the held-out split '
    "(attention.interventions.parse_interventions), e.g. 'act:layers=1,heads=0'.")
_NUM_CALIBRATION = flags.DEFINE_integer('num_calibration', 64,
                                        'Calibration examples (head search).')
_NUM_EVAL = flags.DEFINE_integer('num_eval', 128, 'Held-out examples.')
_LAYERS = flags.DEFINE_string(
    'layers', 'authors', "ACT's searched layers: 'authors' (2..L-2 as Yu et al.; "
    "all layers when empty), 'all', 'a-b' or 'i,j'.")
_SEED = flags.DEFINE_integer('seed', 0, 'Task seed (splits, random heads).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Examples per forward.')
_ACT_TAU = flags.DEFINE_float('act_tau', 0.1, "ACT's sink threshold tau.")
_ACT_BETA = flags.DEFINE_float('act_beta', 0.4, "ACT's sink scale beta.")
_RETRIEVAL_TASK = flags.DEFINE_string(
    'retrieval_task', '', 'Copy task for retrieval scores (default: --task if it '
    'records copy sources, else needle_copy).')
_RETRIEVAL_THRESHOLD = flags.DEFINE_float(
    'retrieval_threshold', 0.1, 'Retrieval heads score above this.')
_NUM_RANDOM_MASKS = flags.DEFINE_integer(
    'num_random_masks', 3, 'Random head sets masked for comparison.')
_MASSIVE_TOP_K = flags.DEFINE_integer('massive_top_k', 2,
                                      'Massive-activation dims to report.')
_MAX_HEADS = flags.DEFINE_integer(
    'max_heads_per_run', None, 'Stop the head search after this many new heads '
    '(a rerun continues).')
_TRAIN_CONFIG = config_flags.DEFINE_config_file(
    'train_config', _DEFAULT_TRAIN_CONFIG,
    'Trainer config of the default model (used without --checkpoint).',
    lock_config=True)


def parse_task_params(text: str) -> dict:
  """'a=1,b=x,c=true' -> {'a': 1, 'b': 'x', 'c': True} (ints, floats, bools)."""
  out = {}
  for item in filter(None, (p.strip() for p in text.split(','))):
    key, eq, value = item.partition('=')
    if not eq or not key.strip():
      raise ValueError(f'task_params must be key=value,..., got {item!r}.')
    value = value.strip()
    if value.lower() in ('true', 'false'):
      parsed = value.lower() == 'true'
    elif value.lower() == 'none':
      parsed = None
    else:
      try:
        parsed = int(value)
      except ValueError:
        try:
          parsed = float(value)
        except ValueError:
          parsed = value
    out[key.strip()] = parsed
  return out


def config_from_flags() -> runner.RunConfig:
  return runner.RunConfig(
      workdir=_WORKDIR.value, checkpoint=_CHECKPOINT.value, task=_TASK.value,
      task_params=parse_task_params(_TASK_PARAMS.value),
      analysis=tuple(_ANALYSIS.value), interventions=_INTERVENTIONS.value,
      num_calibration=_NUM_CALIBRATION.value, num_eval=_NUM_EVAL.value,
      layers=_LAYERS.value, seed=_SEED.value, batch_size=_BATCH_SIZE.value,
      act_tau=_ACT_TAU.value, act_beta=_ACT_BETA.value,
      retrieval_task=_RETRIEVAL_TASK.value,
      retrieval_threshold=_RETRIEVAL_THRESHOLD.value,
      num_random_masks=_NUM_RANDOM_MASKS.value,
      massive_top_k=_MASSIVE_TOP_K.value, max_heads_per_run=_MAX_HEADS.value)


def main(argv):
  common_flags.start_checkpointing_binary(argv)
  try:
    config = config_from_flags()
    summary = runner.run(config, _TRAIN_CONFIG.value)
  except ValueError as e:  # One line, no traceback: the input is wrong.
    sys.stderr.write(f'FATAL recalibrate: {e}\n')
    sys.exit(2)
  if summary.get('complete'):
    logging.info('Done: %s', os.path.join(config.workdir, runner.SUMMARY_FILE))
  else:
    logging.info('Stopped early (%s of %s heads); rerun to continue.',
                 summary.get('heads_done'), summary.get('heads_total'))


if __name__ == '__main__':
  app.run(main)
