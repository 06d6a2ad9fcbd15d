"""Hugging Face checkpoint import: config.json + safetensors -> `CausalDecoder`.

Reads a directory in the Hugging Face layout (config.json and model.safetensors, or
shards listed by model.safetensors.index.json) with the `safetensors` package's NumPy
backend (torch is not needed to load) and maps the tensors into the parameter tree of
`experiments.models.decoder.CausalDecoder`.

Architectures:
- Llama family: LlamaForCausalLM ("LLaMA", Touvron et al. 2023), MistralForCausalLM
  (sliding-window attention, "Mistral 7B", Jiang et al. 2023), Qwen2ForCausalLM (q/k/v
  biases, optional sliding window on all or some layers; "Qwen2 Technical Report",
  2024), Qwen3ForCausalLM (per-head q / k RMSNorm, optional attention biases and
  sliding windows; "Qwen3 Technical Report", 2025). RMSNorm, rotary
  positions (rope_theta; rope_scaling / rope_parameters of type 'default', 'linear',
  'llama3' or 'yarn'), SwiGLU MLP, grouped-query attention, tied or untied embeddings.
- GPT-2 (GPT2LMHeadModel, "Language Models are Unsupervised Multitask Learners",
  Radford et al. 2019): LayerNorm with bias, tanh-approximated GELU, learned positions,
  fused q/k/v stored as a Conv1D (weights [in, out], transposed relative to
  `torch.nn.Linear`'s [out, in]), tied embeddings.

Every tensor of the checkpoint is either mapped to a parameter or is a known derived
buffer that the model recomputes (GPT-2's causal-mask `attn.bias` / `attn.masked_bias`,
Llama's `rotary_emb.inv_freq` in old saves); anything else is an error, as is a
missing tensor or a shape that does not match the config.

Shapes: D model dim, N query heads, K kv heads, H head dim, F MLP dim, V vocabulary,
P learned positions.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from experiments.models import decoder as decoder_lib
from experiments.models.decoder import CausalDecoder
from experiments.models.decoder import DecoderConfig

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'

LLAMA_FAMILY = ('LlamaForCausalLM', 'MistralForCausalLM', 'Qwen2ForCausalLM',
                'Qwen3ForCausalLM')
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + ('GPT2LMHeadModel',)

# model_type -> architecture, for a config.json without `architectures`.
_MODEL_TYPES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
                'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM',
                'gpt2': 'GPT2LMHeadModel'}

# transformers' activation names that are the tanh approximation of GELU
# (ACT2FN: 'gelu_new' = NewGELUActivation, 'gelu_pytorch_tanh', 'gelu_fast': the
# same formula 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))).
_TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')
_ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')
# YaRN's optional keys (transformers' defaults apply when absent).
_YARN_OPTIONS = ('beta_fast', 'beta_slow', 'attention_factor', 'mscale',
                 'mscale_all_dim', 'truncate')
_DEFAULT_WINDOW = 4096  # transformers' Mistral / Qwen2 / Qwen3 sliding_window.

# safetensors dtypes NumPy reads directly; BF16 is widened to float32 here.
_NUMPY_DTYPES = ('F64', 'F32', 'F16', 'I64', 'I32', 'I16', 'I8', 'U8', 'BOOL')


# ----------------------------------------------------------------------------
# config.json -> DecoderConfig


def _architecture(config_json: dict[str, Any]) -> str:
  archs = config_json.get('architectures')
  if archs:
    if not isinstance(archs, (list, tuple)) or not all(
        isinstance(a, str) for a in archs):
      raise ValueError(
          f'config.json "architectures" must be a list of names, got {archs!r}.')
    for arch in archs:
      if arch in SUPPORTED_ARCHITECTURES:
        return arch
    raise ValueError(
        f'unsupported architecture {archs[0]!r} (config.json architectures='
        f'{list(archs)}); supported: {", ".join(SUPPORTED_ARCHITECTURES)}.')
  model_type = config_json.get('model_type')
  if model_type in _MODEL_TYPES:
    return _MODEL_TYPES[model_type]
  raise ValueError(
      f'unsupported architecture: config.json has no "architectures" and '
      f'model_type={model_type!r}; supported: '
      f'{", ".join(SUPPORTED_ARCHITECTURES)} (model_type one of '
      f'{sorted(_MODEL_TYPES)}).')


def _get(config_json: dict[str, Any], key: str, default: Any = None, *,
         kind: type | tuple[type, ...] | None = None) -> Any:
  """config_json[key] (None or absent -> default), type-checked."""
  value = config_json.get(key)
  if value is None:
    value = default
  if value is None:
    raise ValueError(f'config.json needs "{key}".')
  if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
    raise ValueError(f'config.json "{key}" must be an int, got {value!r}.')
  if kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f'config.json "{key}" must be a number, got {value!r}.')
    value = float(value)
  if kind is bool and not isinstance(value, bool):
    raise ValueError(f'config.json "{key}" must be true/false, got {value!r}.')
  return value


def _rope(config_json: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling in HF's form or None) from either config style.

  transformers >= 5 writes `rope_parameters` ({'rope_type', 'rope_theta', ...});
  older configs have a top-level `rope_theta` and `rope_scaling` ({'type' or
  'rope_type', 'factor', ...}). The scaling dict is returned with 'rope_type'
  (without 'type' / 'rope_theta'), e.g. {'rope_type': 'llama3', 'factor': 8.0,
  'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
  'original_max_position_embeddings': 8192} or {'rope_type': 'linear', 'factor': 2.0}.
  """
  params = config_json.get('rope_parameters')
  if params is None:
    params = config_json.get('rope_scaling')
  if params is not None and not isinstance(params, dict):
    raise ValueError(
        f'config.json rope_parameters / rope_scaling must be a dict, got '
        f'{params!r}.')
  params = dict(params or {})
  theta = params.pop('rope_theta', None)
  if theta is None:
    theta = config_json.get('rope_theta', 10000.0)
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
    raise ValueError(f'config.json rope_theta must be positive, got {theta!r}.')
  legacy_type = params.pop('type', None)
  rope_type = params.pop('rope_type', None) or legacy_type or 'default'
  if rope_type not in _ROPE_TYPES:
    raise ValueError(
        f'config.json rope type {rope_type!r} is not supported; supported: '
        f'{_ROPE_TYPES}.')
  required = {'default': (), 'linear': ('factor',),
              'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                         'original_max_position_embeddings'),
              'yarn': ('factor', 'original_max_position_embeddings')}[rope_type]
  optional = _YARN_OPTIONS if rope_type == 'yarn' else ('attention_factor',)
  unknown = sorted(set(params) - set(required) - set(optional))
  if unknown:  # E.g. per-layer-type parameters {'full_attention': {...}}.
    raise ValueError(
        f'config.json rope parameters {unknown} are not supported for rope type '
        f'{rope_type!r} (known: {list(required) + list(optional)}).')
  attention_factor = params.get('attention_factor')
  if rope_type != 'yarn' and attention_factor not in (None, 1, 1.0):
    raise ValueError(
        f'config.json rope attention_factor={attention_factor!r} is not supported '
        f'for rope type {rope_type!r} (only 1.0).')
  if rope_type == 'default':
    return float(theta), None
  scaling: dict[str, Any] = {'rope_type': rope_type}
  if rope_type in ('llama3', 'yarn'):
    # As transformers' standardize_rope_params: a top-level
    # original_max_position_embeddings wins, else max_position_embeddings.
    top = config_json.get('original_max_position_embeddings')
    if top is not None:
      params['original_max_position_embeddings'] = top
    elif rope_type == 'yarn':
      params.setdefault('original_max_position_embeddings',
                        config_json.get('max_position_embeddings'))
  if rope_type == 'yarn':
    if params.get('factor') is None:  # DeepSeek: max / original positions.
      original = params.get('original_max_position_embeddings')
      maximum = config_json.get('max_position_embeddings')
      if (isinstance(original, (int, float)) and original > 0 and
          isinstance(maximum, (int, float))):
        params['factor'] = maximum / original
    scaling.update({k: params[k] for k in _YARN_OPTIONS if k in params})
  for key in required:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(
          f'config.json rope scaling {rope_type!r} needs a positive "{key}", got '
          f'{value!r}.')
    scaling[key] = (int(value) if key == 'original_max_position_embeddings'
                    else float(value))
  return float(theta), scaling


def _llama_window(arch: str, config_json: dict[str, Any], depth: int
                 ) -> tuple[int | None, tuple[int, ...] | None]:
  """(sliding window or None, the layers using it or None for all) of a config."""
  if arch == 'LlamaForCausalLM':
    return None, None
  if arch == 'MistralForCausalLM':
    # Every layer uses the window (transformers' Mistral ignores layer_types).
    window = config_json.get('sliding_window', _DEFAULT_WINDOW)  # null: none.
    sliding = None
  else:  # Qwen2 / Qwen3: the window applies from layer max_window_layers on.
    use = _get(config_json, 'use_sliding_window', False, kind=bool)
    window = config_json.get('sliding_window', _DEFAULT_WINDOW) if use else None
    layer_types = config_json.get('layer_types')
    if layer_types is None:
      first = _get(config_json, 'max_window_layers', 28, kind=int)
      layer_types = ['sliding_attention' if window is not None and i >= first
                     else 'full_attention' for i in range(depth)]
    if not isinstance(layer_types, list) or len(layer_types) != depth or not set(
        layer_types) <= {'sliding_attention', 'full_attention'}:
      raise ValueError(
          f'config.json layer_types must list {depth} of "full_attention" / '
          f'"sliding_attention", got {layer_types}.')
    sliding = tuple(i for i, kind in enumerate(layer_types)
                    if kind == 'sliding_attention')
    if window is None or not sliding:
      return None, None
    if len(sliding) == depth:
      sliding = None
  if window is None:
    return None, None
  if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
    raise ValueError(
        f'config.json sliding_window must be a positive int or null, got '
        f'{window!r}.')
  return window, sliding


def _llama_config(arch: str, c: dict[str, Any], dtype: Any) -> DecoderConfig:
  dim = _get(c, 'hidden_size', kind=int)
  num_heads = _get(c, 'num_attention_heads', kind=int)
  num_kv_heads = _get(c, 'num_key_value_heads', num_heads, kind=int)
  if dim % num_heads and c.get('head_dim') is None:
    raise ValueError(
        f'config.json hidden_size ({dim}) is not a multiple of num_attention_heads '
        f'({num_heads}) and head_dim is not given.')
  head_dim = _get(c, 'head_dim', dim // num_heads, kind=int)
  depth = _get(c, 'num_hidden_layers', kind=int)
  act = c.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(
        f'{arch} hidden_act={act!r} is not supported (SwiGLU needs "silu").')
  if arch == 'Qwen2ForCausalLM':
    qkv_bias, out_bias = True, False  # Hard-coded in Qwen2Attention.
  else:  # Llama, Mistral, Qwen3: q, k, v and o together.
    qkv_bias = out_bias = _get(c, 'attention_bias', False, kind=bool)
  # pretraining_tp only changes how transformers splits its matmuls.
  theta, scaling = _rope(c)
  window, window_layers = _llama_window(arch, c, depth)
  return DecoderConfig(
      vocab_size=_get(c, 'vocab_size', kind=int), dim=dim, depth=depth,
      num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
      mlp_dim=_get(c, 'intermediate_size', kind=int), norm='rms',
      norm_eps=_get(c, 'rms_norm_eps', 1e-6, kind=float), mlp='swiglu',
      positions='rope', rope_theta=theta, rope_scaling=scaling,
      max_positions=_get(c, 'max_position_embeddings', 2048, kind=int),
      qkv_bias=qkv_bias, out_bias=out_bias,
      mlp_bias=(arch == 'LlamaForCausalLM' and
                _get(c, 'mlp_bias', False, kind=bool)),
      tie_embeddings=_get(c, 'tie_word_embeddings', False, kind=bool),
      sliding_window=window, window_layers=window_layers,
      qk_norm=arch == 'Qwen3ForCausalLM', final_norm=True, dtype=dtype)


def _gpt2_config(c: dict[str, Any], dtype: Any) -> DecoderConfig:
  dim = _get(c, 'n_embd', 768, kind=int)
  num_heads = _get(c, 'n_head', 12, kind=int)
  if dim % num_heads:
    raise ValueError(
        f'config.json n_embd ({dim}) must be a multiple of n_head ({num_heads}).')
  act = c.get('activation_function', 'gelu_new')
  if act not in _TANH_GELUS:
    raise ValueError(
        f'GPT2LMHeadModel activation_function={act!r} is not supported; '
        f'supported (tanh GELU): {_TANH_GELUS}.')
  for key, unsupported in (('scale_attn_weights', False),
                           ('scale_attn_by_inverse_layer_idx', True),
                           ('add_cross_attention', True)):
    if _get(c, key, not unsupported, kind=bool) == unsupported:
      raise ValueError(
          f'GPT2LMHeadModel with {key}={str(unsupported).lower()} is not '
          'supported.')
  # reorder_and_upcast_attn only changes the float16 numerics, not the math.
  return DecoderConfig(
      vocab_size=_get(c, 'vocab_size', 50257, kind=int), dim=dim,
      depth=_get(c, 'n_layer', 12, kind=int), num_heads=num_heads,
      num_kv_heads=num_heads, head_dim=dim // num_heads,
      mlp_dim=_get(c, 'n_inner', 4 * dim, kind=int), norm='layer',
      norm_eps=_get(c, 'layer_norm_epsilon', 1e-5, kind=float), mlp='gelu_tanh',
      positions='learned', rope_theta=10000.0, rope_scaling=None,
      max_positions=_get(c, 'n_positions', 1024, kind=int), qkv_bias=True,
      out_bias=True, mlp_bias=True,
      tie_embeddings=_get(c, 'tie_word_embeddings', True, kind=bool),
      sliding_window=None, final_norm=True, dtype=dtype)


def config_from_hf(config_json: dict[str, Any], *,
                   dtype: Any = jnp.float32) -> DecoderConfig:
  """The `DecoderConfig` of a Hugging Face config.json (as a dict).

  Keys absent from the dict take transformers' defaults for that architecture
  (e.g. Llama rms_norm_eps 1e-6, rope_theta 1e4; GPT-2 n_inner 4 n_embd,
  layer_norm_epsilon 1e-5, tied embeddings).

  Args:
    config_json: the parsed config.json.
    dtype: the model's dtype (`DecoderConfig.dtype`).

  Raises:
    ValueError: an architecture other than `SUPPORTED_ARCHITECTURES` (named with
      the supported list), or an option this codebase's decoder does not implement.
  """
  if not isinstance(config_json, dict):
    raise TypeError(
        f'config_json must be a dict (parsed config.json), got '
        f'{type(config_json).__name__}.')
  arch = _architecture(config_json)
  if arch == 'GPT2LMHeadModel':
    return _gpt2_config(config_json, dtype)
  return _llama_config(arch, config_json, dtype)


# ----------------------------------------------------------------------------
# safetensors files


def _read_bf16(path: pathlib.Path, offsets: tuple[int, int], data_start: int,
               shape: tuple[int, ...]) -> np.ndarray:
  """A BF16 tensor of a safetensors file as float32 (exact widening).

  NumPy has no bfloat16, so safetensors' NumPy backend cannot return it. The file
  format: an 8-byte little-endian header size, a JSON header with each tensor's
  dtype, shape and data_offsets (from the end of the header), then the data.
  """
  begin, end = offsets
  with open(path, 'rb') as f:
    f.seek(data_start + begin)
    raw = np.frombuffer(f.read(end - begin), dtype='<u2')
  return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


class _Entry(NamedTuple):
  path: pathlib.Path
  dtype: str  # safetensors' name: 'F32', 'BF16', ...
  shape: tuple[int, ...]
  offsets: tuple[int, int]  # Byte range in the data section.
  data_start: int  # Byte offset of the data section in the file.


def _read_header(path: pathlib.Path) -> dict[str, _Entry]:
  """The tensors listed in a safetensors file's header."""
  try:
    with open(path, 'rb') as f:
      size = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(size))
    header.pop('__metadata__', None)
    return {name: _Entry(path, info['dtype'], tuple(info['shape']),
                         tuple(info['data_offsets']), 8 + size)
            for name, info in header.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(f'{path} is not a readable safetensors file: {e}.') from e


class _TensorStore:
  """The tensors of a checkpoint directory, loaded on demand, consumption tracked."""

  def __init__(self, directory: pathlib.Path):
    self._entries: dict[str, _Entry] = {}
    self._handles: dict[pathlib.Path, Any] = {}  # safetensors safe_open objects.
    self._consumed: set[str] = set()
    index = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if index.is_file():
      self.source = str(index)
      try:
        with open(index) as f:
          weight_map = json.load(f).get('weight_map')
      except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f'{index} is not a JSON object: {e}.') from e
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f'{index} needs a non-empty "weight_map" {{tensor name: shard file}}.')
      shards: dict[str, list[str]] = {}
      for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
      for shard, names in shards.items():
        path = directory / shard
        if not path.is_file():
          raise ValueError(
              f'shard file {path} listed in {index} (for {len(names)} tensors, '
              f'e.g. {names[0]!r}) does not exist.')
        entries = _read_header(path)
        for name in names:
          if name not in entries:
            raise ValueError(
                f'{index} maps tensor {name!r} to {path}, which does not hold it.')
          self._entries[name] = entries[name]
        for name in sorted(set(entries) - set(weight_map)):
          raise ValueError(
              f'{path} holds tensor {name!r} that {index} does not list.')
    elif single.is_file():
      self.source = str(single)
      self._entries = _read_header(single)
    else:
      others = sorted(p.name for p in directory.iterdir()
                      if p.suffix in ('.safetensors', '.bin', '.pt', '.pth'))
      raise ValueError(
          f'{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (found: '
          f'{others or "no weight files"}); only safetensors checkpoints load.')

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name].shape

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor `name` as a float32 array of the expected `shape`; marks it consumed."""
    if name not in self._entries:
      raise ValueError(
          f'tensor {name!r} (expected shape {list(shape)}) is missing from '
          f'{self.source}.')
    entry = self._entries[name]
    if entry.shape != tuple(shape):
      raise ValueError(
          f'tensor {name!r} in {entry.path} has shape {list(entry.shape)}, '
          f'expected {list(shape)} (from config.json).')
    if entry.dtype == 'BF16':
      array = _read_bf16(entry.path, entry.offsets, entry.data_start, entry.shape)
    elif entry.dtype in _NUMPY_DTYPES:
      try:
        if entry.path not in self._handles:
          self._handles[entry.path] = safe_open(str(entry.path),
                                                framework='numpy')
        array = self._handles[entry.path].get_tensor(name)
      except Exception as e:  # safetensors raises its own error types.
        raise ValueError(
            f'tensor {name!r} in {entry.path} cannot be read: {e}.') from e
    else:
      raise ValueError(
          f'tensor {name!r} in {entry.path} has dtype {entry.dtype}; supported: '
          f'BF16, {", ".join(_NUMPY_DTYPES)}.')
    self._consumed.add(name)
    return np.asarray(array, np.float32)

  def unused(self) -> list[str]:
    return sorted(set(self._entries) - self._consumed)


# ----------------------------------------------------------------------------
# tensor names -> CausalDecoder parameters

Path = tuple[str | int, ...]


def _prefix(store: _TensorStore, base: str, probe: str) -> str:
  """'<base>.' (the usual save) unless the names lack the base-model prefix."""
  return '' if probe in store and f'{base}.{probe}' not in store else f'{base}.'


def _lm_head(store: _TensorStore, cfg: DecoderConfig, embedding: np.ndarray,
             params: dict[Path, np.ndarray]) -> None:
  shape = (cfg.vocab_size, cfg.dim)
  if cfg.tie_embeddings:
    if 'lm_head.weight' in store:  # Some saves write the tied copy out.
      head = store.take('lm_head.weight', shape)
      if not np.array_equal(head, embedding):
        raise ValueError(
            'tensor \'lm_head.weight\' differs from the token embedding, but '
            'config.json has tie_word_embeddings=true.')
  else:
    params[('lm_head',)] = store.take('lm_head.weight', shape).T  # [D, V]


def _norm(store: _TensorStore, name: str, path: Path, dim: int, bias: bool,
          params: dict[Path, np.ndarray]) -> None:
  params[path + ('scale',)] = store.take(f'{name}.weight', (dim,))
  if bias:
    params[path + ('bias',)] = store.take(f'{name}.bias', (dim,))


def _llama_params(store: _TensorStore, cfg: DecoderConfig
                 ) -> dict[Path, np.ndarray]:
  d, n, k, h, f = (cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                   cfg.mlp_dim)
  p = _prefix(store, 'model', 'embed_tokens.weight')
  params: dict[Path, np.ndarray] = {}
  embedding = store.take(f'{p}embed_tokens.weight', (cfg.vocab_size, d))
  params[('embed', 'embedding')] = embedding
  for i in range(cfg.depth):
    layer, block = f'{p}layers.{i}', ('blocks', i)
    _norm(store, f'{layer}.input_layernorm', block + ('attn_norm',), d, False,
          params)
    _norm(store, f'{layer}.post_attention_layernorm', block + ('mlp_norm',), d,
          False, params)
    attn = f'{layer}.self_attn'
    for proj, heads, ours in (('q', n, 'q'), ('k', k, 'k'), ('v', k, 'v')):
      w = store.take(f'{attn}.{proj}_proj.weight', (heads * h, d))  # [out, in]
      params[block + ('attn', f'w{ours}')] = w.T.reshape(d, heads, h)
      if cfg.qkv_bias:
        b = store.take(f'{attn}.{proj}_proj.bias', (heads * h,))
        params[block + ('attn', f'b{ours}')] = b.reshape(heads, h)
    if cfg.qk_norm:
      for proj in ('q', 'k'):
        _norm(store, f'{attn}.{proj}_norm', block + ('attn', f'{proj}_norm'), h,
              False, params)
    wo = store.take(f'{attn}.o_proj.weight', (d, n * h))
    params[block + ('attn', 'wo')] = wo.T.reshape(n, h, d)  # [N, H, D]
    if cfg.out_bias:
      params[block + ('attn', 'bo')] = store.take(f'{attn}.o_proj.bias', (d,))
    mlp = f'{layer}.mlp'
    params[block + ('mlp', 'w_gate')] = store.take(
        f'{mlp}.gate_proj.weight', (f, d)).T  # [D, F]
    params[block + ('mlp', 'w_up')] = store.take(f'{mlp}.up_proj.weight',
                                                 (f, d)).T  # [D, F]
    params[block + ('mlp', 'w_down')] = store.take(f'{mlp}.down_proj.weight',
                                                   (d, f)).T  # [F, D]
    if cfg.mlp_bias:
      for proj, ours, size in (('gate', 'b_gate', f), ('up', 'b_up', f),
                               ('down', 'b_down', d)):
        params[block + ('mlp', ours)] = store.take(f'{mlp}.{proj}_proj.bias',
                                                   (size,))
    inv_freq = f'{attn}.rotary_emb.inv_freq'  # A buffer in old saves.
    if inv_freq in store:
      stored = store.take(inv_freq, (h // 2,))
      ours = decoder_lib.rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling)
      if not np.allclose(stored, ours, rtol=1e-5, atol=0):
        raise ValueError(
            f'tensor {inv_freq!r} {stored.tolist()} differs from the inverse '
            f'frequencies config.json implies {ours.tolist()} (rope_theta '
            f'{cfg.rope_theta}, rope_scaling {cfg.rope_scaling}).')
  _norm(store, f'{p}norm', ('final_norm',), d, False, params)
  _lm_head(store, cfg, embedding, params)
  return params


def _gpt2_params(store: _TensorStore, cfg: DecoderConfig
                ) -> dict[Path, np.ndarray]:
  d, n, h, f = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
  p = _prefix(store, 'transformer', 'wte.weight')
  params: dict[Path, np.ndarray] = {}
  embedding = store.take(f'{p}wte.weight', (cfg.vocab_size, d))
  params[('embed', 'embedding')] = embedding
  params[('pos_embed', 'embedding')] = store.take(f'{p}wpe.weight',
                                                  (cfg.max_positions, d))
  for i in range(cfg.depth):
    layer, block = f'{p}h.{i}', ('blocks', i)
    _norm(store, f'{layer}.ln_1', block + ('attn_norm',), d, True, params)
    _norm(store, f'{layer}.ln_2', block + ('mlp_norm',), d, True, params)
    # Conv1D: y = x @ W + b with W [in, out]; c_attn's out axis is [q | k | v].
    w = store.take(f'{layer}.attn.c_attn.weight', (d, 3 * d))
    b = store.take(f'{layer}.attn.c_attn.bias', (3 * d,))
    for j, ours in enumerate('qkv'):
      params[block + ('attn', f'w{ours}')] = w[:, j * d:(j + 1) * d].reshape(
          d, n, h)  # [D, N, H]
      params[block + ('attn', f'b{ours}')] = b[j * d:(j + 1) * d].reshape(n, h)
    params[block + ('attn', 'wo')] = store.take(
        f'{layer}.attn.c_proj.weight', (d, d)).reshape(n, h, d)  # [N, H, D]
    params[block + ('attn', 'bo')] = store.take(f'{layer}.attn.c_proj.bias', (d,))
    params[block + ('mlp', 'w_in')] = store.take(f'{layer}.mlp.c_fc.weight',
                                                 (d, f))  # [D, F]
    params[block + ('mlp', 'b_in')] = store.take(f'{layer}.mlp.c_fc.bias', (f,))
    params[block + ('mlp', 'w_out')] = store.take(f'{layer}.mlp.c_proj.weight',
                                                  (f, d))  # [F, D]
    params[block + ('mlp', 'b_out')] = store.take(f'{layer}.mlp.c_proj.bias',
                                                  (d,))
    _gpt2_buffers(store, layer, cfg.max_positions)
  _norm(store, f'{p}ln_f', ('final_norm',), d, True, params)
  _lm_head(store, cfg, embedding, params)
  return params


def _gpt2_buffers(store: _TensorStore, layer: str, positions: int) -> None:
  """Checks and consumes the causal-mask buffers that old GPT-2 saves include."""
  name = f'{layer}.attn.bias'
  if name in store:
    mask = store.take(name, (1, 1, positions, positions))
    if not np.array_equal(mask[0, 0], np.tril(np.ones_like(mask[0, 0]))):
      raise ValueError(
          f'tensor {name!r} is not the causal (lower-triangular) mask; only '
          'causal GPT-2 attention is supported.')
  name = f'{layer}.attn.masked_bias'  # The scalar fill value of the old mask.
  if name in store:
    store.take(name, ())


_PARAM_BUILDERS: dict[str, Callable[[_TensorStore, DecoderConfig],
                                    dict[Path, np.ndarray]]] = {
    'LlamaForCausalLM': _llama_params, 'MistralForCausalLM': _llama_params,
    'Qwen2ForCausalLM': _llama_params, 'Qwen3ForCausalLM': _llama_params,
    'GPT2LMHeadModel': _gpt2_params}


def _fill(config: DecoderConfig, params: dict[Path, np.ndarray],
          dtype: Any) -> CausalDecoder:
  """A CausalDecoder whose parameters are `params` (no random initialisation)."""
  abstract = nnx.eval_shape(lambda: CausalDecoder(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  wanted = {tuple(path) for path, var in flat if isinstance(var, nnx.Param)}
  given = set(params)
  if wanted != given:
    raise ValueError(
        f'the HF mapping does not match CausalDecoder\'s parameter tree: '
        f'missing {sorted(map(str, wanted - given))}, extra '
        f'{sorted(map(str, given - wanted))}.')
  leaves = []
  for path, var in flat:
    path = tuple(path)
    if isinstance(var, nnx.Param):
      expected = tuple(var.get_value().shape)
      if params[path].shape != expected:
        raise ValueError(
            f'parameter {path} has shape {params[path].shape} after mapping, '
            f'CausalDecoder expects {expected}.')
      leaves.append((path, var.replace(jnp.asarray(params[path], dtype))))
    else:
      value = var.get_value()
      if isinstance(value, jax.ShapeDtypeStruct):
        raise ValueError(
            f'CausalDecoder state {path} ({type(var).__name__}) is not a '
            'parameter and has no value without initialisation.')
      leaves.append((path, var))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """The parsed config.json of a checkpoint directory (ValueError if absent)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if not pathlib.Path(directory).is_dir():
    raise ValueError(f'checkpoint directory {directory} does not exist.')
  if not path.is_file():
    raise ValueError(f'{path} does not exist (a Hugging Face checkpoint '
                     'directory needs config.json).')
  try:
    with open(path) as f:
      config_json = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}.') from e
  if not isinstance(config_json, dict):
    raise ValueError(f'{path} must hold a JSON object.')
  return config_json


def is_hf_checkpoint(directory: str | os.PathLike[str]) -> bool:
  """Whether `directory` has config.json and safetensors weights (HF layout)."""
  d = pathlib.Path(directory)
  return (d / CONFIG_FILE).is_file() and (
      (d / WEIGHTS_FILE).is_file() or (d / INDEX_FILE).is_file())


def load_hf_checkpoint(directory: str | os.PathLike[str], *,
                       dtype: Any = jnp.float32
                      ) -> tuple[DecoderConfig, CausalDecoder]:
  """Loads a Hugging Face checkpoint directory into a `CausalDecoder`.

  Args:
    directory: holds config.json and model.safetensors, or a sharded
      model.safetensors.index.json (its weight_map names each tensor's shard).
    dtype: the activation dtype (`DecoderConfig.dtype`) and the dtype the
      parameters are stored in (bfloat16 halves a large model's memory; float32
      for parity checks). Tensors are read as float32 and cast once.

  Returns:
    (config, model) with every checkpoint tensor placed in the model.

  Raises:
    ValueError: a missing config.json / weight file / shard, an unsupported
      architecture or option, a missing or unexpected tensor, or a tensor whose
      shape differs from what config.json implies (each named).
  """
  directory = pathlib.Path(directory)
  config_json = read_config(directory)
  config = config_from_hf(config_json, dtype=dtype)
  arch = _architecture(config_json)
  store = _TensorStore(directory)
  params = _PARAM_BUILDERS[arch](store, config)
  unused = store.unused()
  if unused:
    shown = ', '.join(repr(u) for u in unused[:8])
    more = f' and {len(unused) - 8} more' if len(unused) > 8 else ''
    raise ValueError(
        f'{store.source} has {len(unused)} tensors that a {arch} with this '
        f'config.json does not use: {shown}{more}.')
  return config, _fill(config, params, dtype)


__all__ = ['SUPPORTED_ARCHITECTURES', 'config_from_hf', 'is_hf_checkpoint',
           'load_hf_checkpoint', 'read_config']
