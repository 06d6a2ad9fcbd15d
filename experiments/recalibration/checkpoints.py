"""Loads the model to recalibrate: a trainer workdir or a Hugging Face directory.

* Trainer workdir (`python -m experiments.train`): `config.json` (the trainer config,
  with 'model' and 'data' sections) and `checkpoints/<step>/`. The newest checkpoint
  that restores and verifies is read with `experiments.checkpointing` onto one
  device (nothing in the workdir is moved or written) and converted with
  `experiments.models.decoder.from_trainer_lm`.
* Hugging Face directory: `config.json` with 'architectures' and `*.safetensors`
  (or `model.safetensors.index.json`), read by
  `experiments.models.hf_checkpoint.load_hf_checkpoint`.

The two are told apart by their files; anything else is a ValueError saying what
is missing.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from experiments import checkpointing
from experiments.configs import common
from experiments.data import base as data_base
from experiments.data import synthetic
from experiments.data import text as text_data
from experiments.data import tfds_data
from experiments.models import decoder as decoder_lib

TRAINER = 'trainer'
HF = 'hf'
CONFIG_FILE = 'config.json'
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                    'tokenizer.model', 'vocab.json')


@dataclasses.dataclass
class LoadedModel:
  """A decoder ready for recalibration and where it came from.

  Attributes:
    model: the `CausalDecoder`.
    config: its `DecoderConfig`.
    kind: 'trainer' or 'hf'.
    directory: the checkpoint directory.
    step: the trainer checkpoint's step (None for HF).
    trainer_config: the trainer config (dict from config.json) or None.
    has_tokenizer: an HF directory with tokenizer files.
  """
  model: decoder_lib.CausalDecoder
  config: decoder_lib.DecoderConfig
  kind: str
  directory: str
  step: int | None = None
  trainer_config: dict[str, Any] | None = None
  has_tokenizer: bool = False

  def describe(self) -> dict[str, Any]:
    c = self.config
    return {'kind': self.kind, 'directory': self.directory, 'step': self.step,
            'vocab_size': c.vocab_size, 'depth': c.depth, 'dim': c.dim,
            'num_heads': c.num_heads, 'num_kv_heads': c.num_kv_heads,
            'head_dim': c.head_dim,
            'trained_on': (self.trainer_config or {}).get('data', {}).get(
                'name')}


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'cannot read {path}: {type(e).__name__}: {e}.') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} must hold a JSON object, got '
                     f'{type(value).__name__}.')
  return value


def _has_weights(directory: str) -> bool:
  return bool(glob.glob(os.path.join(directory, '*.safetensors'))) or (
      os.path.exists(os.path.join(directory, 'model.safetensors.index.json')))


def detect_format(directory: str) -> str:
  """'trainer' or 'hf' from the files of `directory`; ValueError otherwise."""
  if not isinstance(directory, str) or not directory:
    raise ValueError(f'checkpoint must be a directory path, got {directory!r}.')
  if not os.path.isdir(directory):
    raise ValueError(f'checkpoint directory {directory!r} does not exist.')
  expected = ('a trainer workdir (config.json with "model" and "data" sections '
              'and checkpoints/<step>/) or a Hugging Face directory (config.json '
              'with "architectures" and *.safetensors)')
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    hint = (' (it has checkpoints/ but no config.json: train it with this '
            'version of experiments.train, which writes config.json)'
            if os.path.isdir(os.path.join(directory, checkpointing.CHECKPOINT_DIR))
            else '')
    raise ValueError(f'checkpoint directory {directory!r} has no {CONFIG_FILE}'
                     f'{hint}; expected {expected}.')
  config = _read_json(path)
  if 'architectures' in config:
    if not _has_weights(directory):
      raise ValueError(
          f'Hugging Face directory {directory!r} has config.json but no '
          f'*.safetensors or model.safetensors.index.json weights.')
    return HF
  if 'model' in config and 'data' in config:
    ckpt = os.path.join(directory, checkpointing.CHECKPOINT_DIR)
    steps = [d for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(
        ckpt) else []
    if not steps:
      raise ValueError(
          f'trainer workdir {directory!r} has config.json but no checkpoints '
          f'(expected {ckpt}/<step>/).')
    return TRAINER
  raise ValueError(f'{path} is neither a trainer config nor a Hugging Face '
                   f'config (keys: {sorted(config)[:12]}); expected {expected}.')


def trainer_config(values: dict[str, Any]) -> ml_collections.ConfigDict:
  """A locked trainer ConfigDict from config.json values (missing fields keep
  their defaults, so older or partial files still load)."""
  kind = values.get('model', {}).get('kind', 'lm')
  if kind not in ('lm', 'vit'):
    raise ValueError(f'config.json model.kind must be "lm" or "vit", got '
                     f'{kind!r}.')
  config = common.base_config(kind)

  def merge(node: ml_collections.ConfigDict, update: dict[str, Any], path: str):
    for key, value in update.items():
      if isinstance(value, dict) and key in node and isinstance(
          node[key], ml_collections.ConfigDict):
        merge(node[key], value, f'{path}{key}.')
      else:
        try:
          node[key] = value
        except (TypeError, ValueError) as e:
          raise ValueError(f'config.json field {path}{key}={value!r}: '
                           f'{e}') from None
  merge(config, values, '')
  config.lock()
  return config


def trainer_vocab_size(data: Any) -> int:
  """The vocabulary of the trainer's `data` config (as `experiments.data`)."""
  name = data.name
  if name == 'mqar':
    return synthetic.mqar_vocab_size(data.mqar.num_keys, data.mqar.num_values)
  if name == 'selective_copy':
    return synthetic.selective_copy_vocab_size(data.selective_copy.num_tokens)
  if name == 'icl_regression':
    return synthetic.icl_regression_vocab_size(data.icl_regression.num_bins)
  if name == 'bytes':
    return text_data.VOCAB_SIZE
  if name in tfds_data.TEXT_DATASETS:
    return tfds_data.TEXT_VOCAB_SIZE
  raise ValueError(f'data.name={name!r} is not language-model data; '
                   f'recalibration needs a decoder LM.')


def _load_trainer(directory: str) -> LoadedModel:
  from experiments import train_lib  # pylint: disable=g-import-not-at-top
  values = _read_json(os.path.join(directory, CONFIG_FILE))
  config = trainer_config(values)
  if config.model.kind != 'lm':
    raise ValueError(f'trainer workdir {directory!r} holds a '
                     f'{config.model.kind!r} model; recalibration needs a '
                     f'decoder LM (model.kind="lm").')
  vocab = trainer_vocab_size(config.data)
  with config.unlocked():  # One device, whatever mesh it was trained on.
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
    config.data.batch_size = 1
    config.train.grad_accum_steps = 1
  # The softmax / mask checks come first, with from_trainer_lm's messages.
  decoder_lib.config_from_trainer(config.model, vocab)
  info = data_base.DataInfo(kind='lm', vocab_size=vocab,
                            tokens_per_example=config.data.seq_len)
  trainer = train_lib.Trainer(config, info, devices=jax.devices()[:1])
  abstract = trainer.abstract_state()
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=1 << 30,
                                    async_save=False)
  failures = []
  try:
    for step in sorted(ckpt.all_steps(), reverse=True):
      try:
        with checkpointing._quiet_async_errors():  # pylint: disable=protected-access
          state, _ = ckpt.restore(step, abstract)
        checkpointing.verify_restored(step, state)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f'step {step}: {type(e).__name__}: '
                        f'{str(e).splitlines()[0][:200] if str(e) else ""}')
        continue
      break
    else:
      raise ValueError(f'no usable checkpoint in {ckpt.directory}: ' +
                       ('; '.join(failures) or 'none found') + '.')
  finally:
    ckpt.close()
  for failure in failures:
    logging.warning('skipped unusable checkpoint %s in %s', failure,
                    ckpt.directory)
  params = jax.device_get(state['params'])
  model = decoder_lib.from_trainer_lm(params, config.model, vocab_size=vocab)
  return LoadedModel(model=model, config=model.config, kind=TRAINER,
                     directory=directory, step=int(step),
                     trainer_config=config.to_dict())


def _load_hf(directory: str) -> LoadedModel:
  from experiments.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  config, model = hf_checkpoint.load_hf_checkpoint(directory)
  tokenizer = any(os.path.exists(os.path.join(directory, f))
                  for f in _TOKENIZER_FILES)
  return LoadedModel(model=model, config=config, kind=HF, directory=directory,
                     has_tokenizer=tokenizer)


def load(directory: str) -> LoadedModel:
  """The decoder of a trainer workdir or an HF directory (see module doc)."""
  kind = detect_format(directory)
  return _load_trainer(directory) if kind == TRAINER else _load_hf(directory)
