"""Shared defaults of the training configs (`lm.py`, `vit.py`).

Every field exists in every preset, so any field can be overridden from the command
line (`--config.train.learning_rate=1e-3`) and a misspelt one is rejected: configs are
returned locked (`lock_config=True`).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict


def base_config(kind: str) -> ml_collections.ConfigDict:
  """Defaults for model kind 'lm' or 'vit' (presets override fields)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.kind = kind
  c.model.dim = 64
  c.model.depth = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 16
  c.model.mlp_dim = 128
  c.model.dropout_rate = 0.0
  c.model.dtype = 'float32'  # or 'bfloat16' (activations; params stay float32)
  c.model.patch_size = 4  # ViT only.
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.variant = 'softmax'
  # A mask spec resolved in attention.masks: 'none', 'causal', 'name:args'.
  # Language models are always causal; the mask restricts them further.
  c.model.attention.mask = 'causal' if kind == 'lm' else 'none'
  c.model.attention.sinks = False
  c.model.attention.logits_soft_cap = config_dict.placeholder(float)
  c.model.attention.implementation = config_dict.placeholder(str)
  c.model.attention.rope_base = config_dict.placeholder(float)
  c.model.attention.rope_base = 10000.0 if kind == 'lm' else None

  c.data = ml_collections.ConfigDict()
  c.data.name = 'mqar' if kind == 'lm' else 'bars'
  c.data.seq_len = 64
  c.data.batch_size = 32  # Global batch (all hosts).
  c.data.num_eval_batches = 4
  c.data.tfds_data_dir = config_dict.placeholder(str)
  c.data.mqar = ml_collections.ConfigDict(
      dict(num_pairs=8, num_queries=8, num_keys=64, num_values=64))
  c.data.selective_copy = ml_collections.ConfigDict(
      dict(num_copy=8, num_tokens=16))
  c.data.icl_regression = ml_collections.ConfigDict(
      dict(num_bins=32, noise_std=0.0))
  c.data.bytes = ml_collections.ConfigDict(
      dict(text_glob='', eval_fraction=0.05))  # '' = stdlib *.py.
  c.data.bars = ml_collections.ConfigDict(dict(image_size=16, noise_std=0.3))

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 100
  c.train.end_lr_fraction = 0.1  # Cosine decays to this fraction of the peak.
  c.train.weight_decay = 0.01
  c.train.b1 = 0.9
  c.train.b2 = 0.98
  c.train.grad_clip_norm = 1.0
  c.train.grad_accum_steps = 1
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.tensorboard = True

  # Device mesh: sizes of the (data, fsdp, tensor) axes; one -1 takes the rest.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


def preset_config(kind: str, presets: dict[str, Any],
                  preset: str) -> ml_collections.ConfigDict:
  """`base_config(kind)` modified by `presets[preset]`, named and locked."""
  if preset not in presets:
    raise ValueError(f'preset must be one of {sorted(presets)}, got {preset!r}.')
  c = base_config(kind)
  presets[preset](c)
  c.preset = preset
  c.lock()
  return c


def unknown_field(config: ml_collections.ConfigDict, path: str) -> str | None:
  """None if `path` ('data.batch_size') names a field of `config`, else a message.

  The message names the first unknown component and the closest valid names at that
  level (difflib), or all of them when none is close.
  """
  node: Any = config
  parts = path.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f'config field {".".join(parts[:i])!r} is a value, not a group; '
              f'it has no field {part!r}.')
    keys = sorted(node.keys())
    if part not in keys:
      where = '.'.join(parts[:i]) or 'the config'
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.6)
      hint = (f'closest valid names: {", ".join(close)}' if close else
              f'valid names in {where}: {", ".join(keys)}')
      return f'unknown config field {".".join(parts[:i + 1])!r}; {hint}.'
    node = node[part]
  return None


def check_override_flags(argv: Sequence[str], flag: str = 'config') -> str | None:
  """Checks the `--<flag>.<path>=value` overrides of `argv` against the config.

  The config is loaded from the `--<flag>=file.py:preset` argument (a module with
  `get_config(preset)`). Returns the first unknown-field message (see
  `unknown_field`), or None when all fields exist or the config cannot be loaded
  here (then the normal flag parser reports the problem).
  """
  spec, overrides = None, []
  for arg in argv[1:]:
    if arg == '--':
      break
    if arg.startswith(f'--{flag}='):
      spec = arg.split('=', 1)[1]
    elif arg.startswith(f'--{flag}.'):
      overrides.append((arg, arg[len(flag) + 3:].split('=', 1)[0]))
  if spec is None or not overrides:
    return None
  path, _, preset = spec.partition(':')
  try:
    module_spec = importlib.util.spec_from_file_location(
        '_attnlab_config_check', os.path.abspath(path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None  # Reported by the config flag itself.
  for arg, field in overrides:
    message = unknown_field(config, field)
    if message:
      return f'{message} (from {arg})'
  return None
