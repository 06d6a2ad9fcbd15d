"""Causal decoder for imported checkpoints: Llama family and GPT-2, with a KV cache.

One Flax NNX model covers the decoder-only architectures that differ only in options:

* Llama ("LLaMA: Open and Efficient Foundation Language Models", Touvron et al. 2023)
  and its relatives Mistral (sliding-window attention, "Mistral 7B"), Qwen2 (q/k/v
  biases, sliding windows on some layers) and Qwen3 (per-head RMSNorm of q and k,
  "Qwen3 Technical Report", 2025): pre-norm RMSNorm, rotary position embedding (RoFormer, Su et al. 2021) in
  Hugging Face's rotate-half layout with `rope_scaling` ('default', 'linear',
  'llama3', 'yarn'), SwiGLU MLP, grouped-query attention, tied or untied embeddings.
* GPT-2 ("Language Models are Unsupervised Multitask Learners", Radford et al. 2019):
  pre-norm LayerNorm with bias, learned absolute positions, GELU (tanh) MLP with
  biases, attention output bias, tied embeddings.

Every attention layer is a hook point (see `attention.interventions`): when an
intervention applies to the layer, or the layer is recorded, it builds an
`AttentionSite` and calls `attention.interventions.hook_point.attend`; otherwise it
calls `attention.dot_product_attention` directly (the fast path).

Visibility (as `AttentionSite.visible`): key j is visible to query i iff key j is a
real token (attention_mask / kv_valid), query i is a real token, kv_pos_j <= q_pos_i
and, with a sliding window w, q_pos_i - kv_pos_j < w (causality by position, so
left-padded rows with positions cumsum(mask) - 1 match Hugging Face). Positions
default to arange(T) (Hugging Face's plain forward) or, with a cache, to
cache.length + arange(T). A query row that sees nothing (a padding token) gives a
zero attention output, never NaN.

The KV cache (`KVCache`) is a pytree: per layer k [B, S_max, K, H] and v, plus
kv_positions [B, S_max], kv_valid [B, S_max] and the number of slots written
(`length`, shared by the batch; left-padded prompts keep their pad slots invalid).
A call with a cache writes its tokens at slots [length, length + T) and attends to
the whole cache, so prefill and `decode_step` (T = 1 against S_max keys) go through
the same attention call. An eager call that would write past S_max raises
ValueError; under jit (where the length is traced) such writes are dropped, so size
the cache first (`generate` does).

Fast-path masks: with default positions, no attention_mask and no cache, the call
is `is_causal=True` (plus an `attention.masks.sliding_window` Mask), so a long
prefill stays O(T) in memory on the blocked implementation; otherwise the
visibility above is passed as a boolean mask [B, 1, T, S].

Einsum letters: b batch, t query position, s key position, d model dim, n query
heads, k kv heads, h head dim, f MLP hidden dim, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding

import attention as attention_lib
from attention import masks as masks_lib
from attention.interventions import base as iv_base
from attention.interventions import hook_point
from experiments import sharding as sharding_lib

_NORMS = ('rms', 'layer')
_MLPS = ('swiglu', 'gelu_tanh')
_POSITIONS = ('rope', 'learned', 'none')
_ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')
_ROPE_KEYS = {  # The required keys (positive numbers) of each rope type.
    'default': (),
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
               'original_max_position_embeddings'),
    'yarn': ('factor', 'original_max_position_embeddings'),
}


def _is_traced(x: Any) -> bool:
  return isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Architecture of a `CausalDecoder` (validated on construction).

  Attributes:
    vocab_size: V.
    dim: model width D.
    depth: number of blocks L.
    num_heads: query heads N.
    num_kv_heads: key/value heads K (N a multiple of K; query head n reads kv head
      n // (N // K)).
    head_dim: H (even with RoPE).
    mlp_dim: MLP hidden width F.
    norm: 'rms' (RMSNorm, scale only) or 'layer' (LayerNorm, scale and bias).
    norm_eps: epsilon of every norm.
    mlp: 'swiglu' (w_down(silu(x w_gate) * x w_up)) or 'gelu_tanh'
      (w_out(gelu_tanh(x w_in + b_in)) + b_out).
    positions: 'rope', 'learned' (absolute table pos_embed [P, D]) or 'none'.
    rope_theta: RoPE base.
    rope_scaling: None or Hugging Face's dict: {'rope_type': 'default'},
      {'rope_type': 'linear', 'factor': f}, {'rope_type': 'llama3', 'factor',
      'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'}
      or {'rope_type': 'yarn', 'factor', 'original_max_position_embeddings',
      optional 'beta_fast', 'beta_slow', 'attention_factor' (or 'mscale',
      'mscale_all_dim'), 'truncate'} ('type' is accepted for 'rope_type'; other
      keys are ignored).
    max_positions: P, the learned table's length (informational with RoPE).
    qkv_bias: biases bq [N, H], bk [K, H], bv [K, H] (Qwen2, GPT-2).
    out_bias: attention output bias bo [D] (GPT-2).
    mlp_bias: MLP biases (GPT-2: b_in [F], b_out [D]; SwiGLU: b_gate, b_up [F],
      b_down [D]).
    tie_embeddings: logits use embed.embedding^T (no lm_head).
    sliding_window: w: a key is visible iff q_pos - k_pos < w (Mistral), or None.
    window_layers: the layers that use `sliding_window` (sorted, distinct), the
      others attend to the full causal context (Qwen2 / Qwen3's max_window_layers,
      layer_types); None: every layer.
    qk_norm: RMSNorm of each head's q and k over H before RoPE, scales q_norm /
      k_norm [H] (Qwen3).
    final_norm: a norm after the last block.
    dtype: activation dtype (parameters are float32; logits are float32).
    implementation: `attention.dot_product_attention` implementation of the fast
      path (None = best available).
  """
  vocab_size: int
  dim: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm: str = 'rms'
  norm_eps: float = 1e-6
  mlp: str = 'swiglu'
  positions: str = 'rope'
  rope_theta: float = 10000.0
  rope_scaling: dict[str, Any] | None = None
  max_positions: int = 2048
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  tie_embeddings: bool = False
  sliding_window: int | None = None
  window_layers: tuple[int, ...] | None = None
  qk_norm: bool = False
  final_norm: bool = True
  dtype: Any = jnp.float32
  implementation: str | None = None

  def __post_init__(self):
    for name in ('vocab_size', 'dim', 'depth', 'num_heads', 'num_kv_heads',
                 'head_dim', 'mlp_dim', 'max_positions'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
          value <= 0):
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
      object.__setattr__(self, name, int(value))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'num_heads ({self.num_heads}) must be a multiple of num_kv_heads '
          f'({self.num_kv_heads}).')
    for name, allowed in (('norm', _NORMS), ('mlp', _MLPS),
                          ('positions', _POSITIONS)):
      if getattr(self, name) not in allowed:
        raise ValueError(
            f'{name} must be one of {allowed}, got {getattr(self, name)!r}.')
    if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
      raise ValueError(f'norm_eps must be a positive float, got {self.norm_eps!r}.')
    if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
      raise ValueError(
          f'rope_theta must be a positive float, got {self.rope_theta!r}.')
    if self.positions == 'rope' and self.head_dim % 2:
      raise ValueError(f'RoPE needs an even head_dim, got {self.head_dim}.')
    object.__setattr__(self, 'rope_scaling', _check_rope_scaling(
        self.rope_scaling))
    for name in ('qkv_bias', 'out_bias', 'mlp_bias', 'tie_embeddings',
                 'final_norm', 'qk_norm'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(
            f'{name} must be a bool, got {getattr(self, name)!r}.')
    if self.sliding_window is not None and (
        isinstance(self.sliding_window, bool) or
        not isinstance(self.sliding_window, (int, np.integer)) or
        self.sliding_window <= 0):
      raise ValueError(
          f'sliding_window must be a positive int or None, got '
          f'{self.sliding_window!r}.')
    if self.sliding_window is not None:
      object.__setattr__(self, 'sliding_window', int(self.sliding_window))
    if self.window_layers is not None:
      layers = self.window_layers
      if (isinstance(layers, (str, bytes)) or not hasattr(layers, '__iter__') or
          any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
              for i in layers)):
        raise ValueError(
            f'window_layers must be None or a sequence of layer indices, got '
            f'{layers!r}.')
      layers = tuple(int(i) for i in layers)
      if (not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or
          layers[-1] >= self.depth):
        raise ValueError(
            f'window_layers must be distinct increasing layer indices in '
            f'[0, depth={self.depth}), got {self.window_layers!r}.')
      if self.sliding_window is None:
        raise ValueError(
            f'window_layers={layers} needs a sliding_window (got None).')
      object.__setattr__(self, 'window_layers', layers)
    try:
      dtype = jnp.dtype(self.dtype)
    except TypeError:
      raise ValueError(f'dtype must be a float dtype, got {self.dtype!r}.') from None
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f'dtype must be a float dtype, got {self.dtype!r}.')
    object.__setattr__(self, 'dtype', dtype)
    if self.implementation is not None and not isinstance(
        self.implementation, str):
      raise ValueError(
          f'implementation must be a str or None, got {self.implementation!r}.')

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of `layer` (None: full causal attention)."""
    if self.window_layers is not None and layer not in self.window_layers:
      return None
    return self.sliding_window

  def __hash__(self):
    fields = tuple(
        tuple(sorted(v.items())) if isinstance(v, dict) else v
        for v in (getattr(self, f.name) for f in dataclasses.fields(self)))
    return hash(fields)


def _check_rope_scaling(scaling: Mapping[str, Any] | None
                       ) -> dict[str, Any] | None:
  """Hugging Face's rope_scaling dict, checked; keeps the keys this model uses."""
  if scaling is None:
    return None
  if not isinstance(scaling, Mapping):
    raise ValueError(f'rope_scaling must be a dict or None, got {scaling!r}.')
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind not in _ROPE_TYPES:
    raise ValueError(
        f'rope_scaling rope_type must be one of {_ROPE_TYPES}, got {kind!r}.')
  out: dict[str, Any] = {'rope_type': kind}
  for name in _ROPE_KEYS[kind]:
    value = scaling.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        value <= 0):
      raise ValueError(
          f'rope_scaling[{name!r}] must be a positive number for rope_type '
          f'{kind!r}, got {value!r}.')
    out[name] = float(value)
  if kind == 'llama3' and not out['high_freq_factor'] > out['low_freq_factor']:
    raise ValueError(
        'rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got '
        f'{out["high_freq_factor"]} <= {out["low_freq_factor"]}.')
  if kind == 'yarn':
    out.update(_yarn_options(scaling, out['factor']))
  return out


def _yarn_options(scaling: Mapping[str, Any], factor: float) -> dict[str, Any]:
  """YaRN's optional keys with transformers' defaults (beta_fast 32, beta_slow 1,
  truncate true; attention_factor from factor, mscale and mscale_all_dim)."""

  def number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(
          f'rope_scaling[{name!r}] must be a positive number for rope_type '
          f"'yarn', got {value!r}.")
    return float(value)

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  out: dict[str, Any] = {}
  for name, default in (('beta_fast', 32.0), ('beta_slow', 1.0)):
    out[name] = number(name, scaling.get(name) or default)  # 0 / None: default
  attention_factor = scaling.get('attention_factor')
  if attention_factor is None:
    m, m_all = scaling.get('mscale'), scaling.get('mscale_all_dim')
    if m and m_all:
      attention_factor = mscale(factor, number('mscale', m)) / mscale(
          factor, number('mscale_all_dim', m_all))
    else:
      attention_factor = mscale(factor)
  out['attention_factor'] = number('attention_factor', attention_factor)
  truncate = scaling.get('truncate', True)
  if not isinstance(truncate, bool):
    raise ValueError(f"rope_scaling['truncate'] must be a bool, got {truncate!r}.")
  out['truncate'] = truncate
  return out


# ----------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float,
                  scaling: Mapping[str, Any] | None = None) -> np.ndarray:
  """Inverse frequencies [H/2] float32: theta^(-2i/H), then HF's rope scaling.

  'linear' divides by factor; 'llama3' divides the low frequencies (wavelength >
  original_max / low_freq_factor) by factor, keeps the high ones (wavelength <
  original_max / high_freq_factor) and interpolates smoothly in between (as
  transformers' `_compute_llama3_parameters`); 'yarn' ("YaRN: Efficient Context
  Window Extension of Large Language Models", Peng et al. 2023) blends the
  interpolated inv / factor and the original inv with a linear ramp over the
  dimensions between the beta_fast and beta_slow rotation counts at
  original_max (as `_compute_yarn_parameters`; its attention factor is
  `rope_attention_factor`). Computed in float64, rounded once.
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  kind = 'default' if scaling is None else scaling['rope_type']
  if kind == 'yarn':
    inv = _yarn_inv_freq(inv, head_dim, theta, scaling)
  elif kind == 'linear':
    inv = inv / scaling['factor']
  elif kind == 'llama3':
    factor = scaling['factor']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    old = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv = np.where(medium, smoothed, scaled)
  return inv.astype(np.float32)


def _yarn_inv_freq(inv: np.ndarray, head_dim: int, theta: float,
                   scaling: Mapping[str, Any]) -> np.ndarray:
  """YaRN's blend of interpolated (inv / factor) and original frequencies."""
  factor, old = scaling['factor'], scaling['original_max_position_embeddings']

  def dim_of(rotations):  # The dimension that turns `rotations` times in `old`.
    return head_dim * math.log(old / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  low, high = dim_of(scaling['beta_fast']), dim_of(scaling['beta_slow'])
  if scaling['truncate']:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  if low == high:
    high += 0.001  # As transformers: no zero-width ramp.
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) /
                 (high - low), 0.0, 1.0)
  extrapolate = 1.0 - ramp  # 1: keep the original frequency (fast dimensions).
  return inv / factor * (1.0 - extrapolate) + inv * extrapolate


def rope_attention_factor(scaling: Mapping[str, Any] | None) -> float:
  """The factor applied to cos and sin (so to q and k): YaRN's, else 1."""
  if scaling is not None and scaling['rope_type'] == 'yarn':
    return float(scaling['attention_factor'])
  return 1.0


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: jax.Array, attention_factor: float = 1.0) -> jax.Array:
  """Rotary embedding in the rotate-half layout (HF Llama / the trainer's `rope`).

  out = x * cos + rotate_half(x) * sin with angles positions * inv_freq, in float32,
  cos and sin scaled by `attention_factor` (`rope_attention_factor`).

  Args:
    x: [B, T, N, H].
    positions: [B, T] integer positions.
    inv_freq: [H/2] float32.
    attention_factor: YaRN's scale of cos / sin (1: none).
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  if attention_factor != 1.0:
    cos, sin = cos * attention_factor, sin * attention_factor
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x * rsqrt(mean(x^2) + eps) * scale, in float32 (RMSNorm, Zhang & Sennrich)."""
  x32 = x.astype(jnp.float32)
  inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias, in float32 (Ba et al. 2016)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def visibility(q_positions: jax.Array, kv_positions: jax.Array,
               kv_valid: jax.Array, window: int | None,
               q_valid: jax.Array | None = None) -> jax.Array:
  """bool [B, 1, T, S] as `AttentionSite.visible`.

  kv_valid and kv_pos <= q_pos (and q_pos - kv_pos < window, and q_valid: a padding
  query sees nothing).
  """
  q = q_positions[:, None, :, None]  # [B, 1, T, 1]
  k = kv_positions[:, None, None, :]  # [B, 1, 1, S]
  visible = kv_valid[:, None, None, :] & (k <= q)
  if window is not None:
    visible = visible & (q - k < window)
  if q_valid is not None:
    visible = visible & q_valid[:, None, :, None]
  return visible


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every layer for up to S_max tokens per sequence.

  Attributes:
    k: per layer [B, S_max, K, H] (after RoPE).
    v: per layer [B, S_max, K, H].
    kv_positions: [B, S_max] int32 position of each slot.
    kv_valid: [B, S_max] bool, True for a written real token.
    length: int32 scalar, slots written so far (the next write starts there).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  kv_positions: jax.Array
  kv_valid: jax.Array
  length: jax.Array

  @property
  def batch_size(self) -> int:
    return self.kv_positions.shape[0]

  @property
  def max_len(self) -> int:
    return self.kv_positions.shape[1]

  def next_positions(self) -> jax.Array:
    """[B] int32: one past each sequence's last real position (0 when empty)."""
    last = jnp.max(jnp.where(self.kv_valid, self.kv_positions, -1), axis=1)
    return (last + 1).astype(jnp.int32)


def cache_shardings(cache: KVCache, mesh: Mesh) -> KVCache:
  """NamedShardings of a cache: batch over data x fsdp, kv heads by 'kv_heads'."""
  def spec(x, axes):
    return NamedSharding(mesh, sharding_lib.logical_to_spec(axes, x.shape, mesh))
  kv_axes = ('batch', 'seq', 'kv_heads', 'head_dim')
  return KVCache(
      k=tuple(spec(x, kv_axes) for x in cache.k),
      v=tuple(spec(x, kv_axes) for x in cache.v),
      kv_positions=spec(cache.kv_positions, ('batch', 'seq')),
      kv_valid=spec(cache.kv_valid, ('batch', 'seq')),
      length=sharding_lib.replicated(mesh))


# ----------------------------------------------------------------------------
# Modules (thin: parameters only; the math is above)
# ----------------------------------------------------------------------------


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], std: float,
            axes: tuple[str | None, ...]) -> nnx.Param:
  value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=axes)


def _zeros(shape: tuple[int, ...], axes: tuple[str | None, ...]) -> nnx.Param:
  return nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=axes)


class Embedding(nnx.Module):
  """A table `embedding` [rows, D]."""

  def __init__(self, rows: int, dim: int, axes: tuple[str | None, str], *,
               rngs: nnx.Rngs, std: float = 0.02):
    self.embedding = _normal(rngs, (rows, dim), std, axes)


class Norm(nnx.Module):
  """RMSNorm (`scale`) or LayerNorm (`scale`, `bias`)."""

  def __init__(self, dim: int, kind: str, eps: float):
    self.kind = kind
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=('norm',))
    if kind == 'layer':
      self.bias = _zeros((dim,), ('norm',))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == 'rms':
      return rms_norm(x, self.scale[...], self.eps)
    return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
  """Projections wq [D, N, H], wk / wv [D, K, H], wo [N, H, D] (+ biases)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    d, n, k, h = c.dim, c.num_heads, c.num_kv_heads, c.head_dim
    self.wq = _normal(rngs, (d, n, h), d ** -0.5, ('embed', 'heads', 'head_dim'))
    self.wk = _normal(rngs, (d, k, h), d ** -0.5,
                      ('embed', 'kv_heads', 'head_dim'))
    self.wv = _normal(rngs, (d, k, h), d ** -0.5,
                      ('embed', 'kv_heads', 'head_dim'))
    self.wo = _normal(rngs, (n, h, d), (n * h) ** -0.5,
                      ('heads', 'head_dim', 'embed'))
    if c.qkv_bias:
      self.bq = _zeros((n, h), ('heads', 'head_dim'))
      self.bk = _zeros((k, h), ('kv_heads', 'head_dim'))
      self.bv = _zeros((k, h), ('kv_heads', 'head_dim'))
    if c.out_bias:
      self.bo = _zeros((d,), ('embed',))
    if c.qk_norm:
      self.q_norm = Norm(h, 'rms', c.norm_eps)
      self.k_norm = Norm(h, 'rms', c.norm_eps)


class MLP(nnx.Module):
  """SwiGLU (w_gate, w_up, w_down) or GELU-tanh (w_in, b_in, w_out, b_out)."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    d, f = c.dim, c.mlp_dim
    if c.mlp == 'swiglu':
      self.w_gate = _normal(rngs, (d, f), d ** -0.5, ('embed', 'mlp'))
      self.w_up = _normal(rngs, (d, f), d ** -0.5, ('embed', 'mlp'))
      self.w_down = _normal(rngs, (f, d), f ** -0.5, ('mlp', 'embed'))
      if c.mlp_bias:
        self.b_gate = _zeros((f,), ('mlp',))
        self.b_up = _zeros((f,), ('mlp',))
        self.b_down = _zeros((d,), ('embed',))
    else:
      self.w_in = _normal(rngs, (d, f), d ** -0.5, ('embed', 'mlp'))
      self.w_out = _normal(rngs, (f, d), f ** -0.5, ('mlp', 'embed'))
      if c.mlp_bias:
        self.b_in = _zeros((f,), ('mlp',))
        self.b_out = _zeros((d,), ('embed',))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype

    def p(name):
      return getattr(self, name)[...].astype(dtype)

    def bias(name):
      return p(name) if hasattr(self, name) else 0.0

    if hasattr(self, 'w_gate'):
      gate = jnp.einsum('btd,df->btf', x, p('w_gate')) + bias('b_gate')  # [B,T,F]
      up = jnp.einsum('btd,df->btf', x, p('w_up')) + bias('b_up')  # [B, T, F]
      return jnp.einsum('btf,fd->btd', jax.nn.silu(gate) * up,
                        p('w_down')) + bias('b_down')  # [B, T, D]
    hidden = jnp.einsum('btd,df->btf', x, p('w_in')) + bias('b_in')  # [B, T, F]
    hidden = jax.nn.gelu(hidden, approximate=True)
    return jnp.einsum('btf,fd->btd', hidden, p('w_out')) + bias('b_out')  # [B,T,D]


class Block(nnx.Module):
  """Pre-norm block: x + Attn(attn_norm(x)), then x + MLP(mlp_norm(x))."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = Norm(config.dim, config.norm, config.norm_eps)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = Norm(config.dim, config.norm, config.norm_eps)
    self.mlp = MLP(config, rngs=rngs)


class DecoderOutput(NamedTuple):
  """logits [B, T, V] float32; the updated cache (or None); records per layer."""
  logits: jax.Array
  cache: KVCache | None
  records: dict[int, dict[str, jax.Array]]


class CausalDecoder(nnx.Module):
  """tokens [B, T] -> DecoderOutput; see the module docstring."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, DecoderConfig):
      raise TypeError(
          f'config must be a DecoderConfig, got {type(config).__name__}.')
    c = config
    self.config = c
    self.embed = Embedding(c.vocab_size, c.dim, ('vocab', 'embed'), rngs=rngs)
    if c.positions == 'learned':
      self.pos_embed = Embedding(c.max_positions, c.dim, (None, 'embed'),
                                 rngs=rngs, std=0.01)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.depth)])
    if c.final_norm:
      self.final_norm = Norm(c.dim, c.norm, c.norm_eps)
    if not c.tie_embeddings:
      self.lm_head = _normal(rngs, (c.dim, c.vocab_size), c.dim ** -0.5,
                             ('embed', 'vocab'))

  # ----- cache -----
  def init_cache(self, batch: int, max_len: int, *,
                 mesh: Mesh | None = None) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens.

    With `mesh` (default: the mesh of the parameters when they are placed with
    NamedShardings, else none) the arrays are placed as `cache_shardings`.
    """
    for name, value in (('batch', batch), ('max_len', max_len)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
          value <= 0):
        raise ValueError(f'{name} must be a positive int, got {value!r}.')
    c = self.config
    shape = (int(batch), int(max_len), c.num_kv_heads, c.head_dim)
    cache = KVCache(
        k=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.depth)),
        v=tuple(jnp.zeros(shape, c.dtype) for _ in range(c.depth)),
        kv_positions=jnp.zeros(shape[:2], jnp.int32),
        kv_valid=jnp.zeros(shape[:2], bool),
        length=jnp.zeros((), jnp.int32))
    mesh = param_mesh(self) if mesh is None else mesh
    if mesh is not None:
      cache = jax.device_put(cache, cache_shardings(cache, mesh))
    return cache

  # ----- forward -----
  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None,
               cache: KVCache | None = None,
               interventions: Sequence[Any] = (),
               record: Any = None) -> DecoderOutput:
    """Logits of every position (and the cache with these tokens written).

    Args:
      tokens: [B, T] int token ids in [0, vocab_size).
      positions: [B, T] int positions (default arange(T), or cache.length +
        arange(T) with a cache).
      attention_mask: [B, T] bool / int, 1 = real token, 0 = padding (never
        visible as a key).
      cache: a `KVCache` from `init_cache`; tokens are written at slots
        [cache.length, cache.length + T).
      interventions: `attention.interventions.Intervention`s (their `layers` and
        `heads` select where they act).
      record: an `attention.interventions.Record` (what to capture), or None.

    Returns:
      DecoderOutput(logits [B, T, V] float32, cache or None, records {layer:
      {name: array}} for the recorded layers).
    """
    c = self.config
    tokens, positions, valid = _check_inputs(c, tokens, positions,
                                             attention_mask, cache)
    interventions = tuple(interventions)
    _check_hooks(c, interventions, record)
    b, t = tokens.shape
    # The fast causal path (no boolean T x S mask) needs index order == position
    # order and nothing hidden: no padding, no cache, default positions.
    plain = positions is None and attention_mask is None and cache is None
    if positions is None:
      start = 0 if cache is None else cache.length
      positions = jnp.broadcast_to(
          (start + jnp.arange(t, dtype=jnp.int32))[None], (b, t))
    positions = positions.astype(jnp.int32)

    x = jnp.take(self.embed.embedding[...], tokens, axis=0,
                 mode='clip').astype(c.dtype)  # [B, T, D]
    if c.positions == 'learned':
      x = x + jnp.take(self.pos_embed.embedding[...], positions, axis=0,
                       mode='clip').astype(c.dtype)  # [B, T, D]
    rope_factor = rope_attention_factor(c.rope_scaling)
    inv_freq = (jnp.asarray(rope_inv_freq(c.head_dim, c.rope_theta,
                                          c.rope_scaling))
                if c.positions == 'rope' else None)

    # Padding queries see nothing (zero attention output, ignored by ACT's sums).
    q_valid = None if attention_mask is None else valid
    if cache is None:
      kv_positions, kv_valid = positions, valid
      slots = None
    else:
      slots = cache.length + jnp.arange(t, dtype=jnp.int32)  # [T]
      kv_positions = cache.kv_positions.at[:, slots].set(positions, mode='drop')
      kv_valid = cache.kv_valid.at[:, slots].set(valid, mode='drop')

    records: dict[int, dict[str, jax.Array]] = {}
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      h = block.attn_norm(x)
      q, k, v = _project_qkv(block.attn, h)  # [B, T, N, H], [B, T, K, H] x 2
      if inv_freq is not None:
        q = apply_rope(q, positions, inv_freq, rope_factor)
        k = apply_rope(k, positions, inv_freq, rope_factor)
      if cache is not None:
        k = cache.k[i].at[:, slots].set(k.astype(cache.k[i].dtype), mode='drop')
        v = cache.v[i].at[:, slots].set(v.astype(cache.v[i].dtype), mode='drop')
        new_k.append(k)
        new_v.append(v)
        k, v = k.astype(c.dtype), v.astype(c.dtype)
      hooked = [iv for iv in interventions if iv.applies_to(i)]
      recorded = record is not None and (record.layers is None or
                                         i in record.layers)
      if hooked or recorded:
        out, layer_records = _hooked_attention(
            c, i, q, k, v, positions, kv_positions, kv_valid, q_valid, x,
            hooked, record if recorded else None)
        if recorded:
          records[i] = dict(layer_records)
      else:
        out = _fast_attention(c, i, q, k, v, positions, kv_positions, kv_valid,
                              q_valid, plain)
      attn = block.attn
      y = jnp.einsum('btnh,nhd->btd', out.astype(c.dtype),
                     attn.wo[...].astype(c.dtype))  # [B, T, D]
      if hasattr(attn, 'bo'):
        y = y + attn.bo[...].astype(c.dtype)
      x = x + y
      x = x + block.mlp(block.mlp_norm(x))
    if c.final_norm:
      x = self.final_norm(x)
    if c.tie_embeddings:
      logits = jnp.einsum('btd,vd->btv', x,
                          self.embed.embedding[...].astype(c.dtype))  # [B,T,V]
    else:
      logits = jnp.einsum('btd,dv->btv', x,
                          self.lm_head[...].astype(c.dtype))  # [B, T, V]
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=tuple(new_k), v=tuple(new_v),
                          kv_positions=kv_positions, kv_valid=kv_valid,
                          length=(cache.length + t).astype(jnp.int32))
    return DecoderOutput(logits.astype(jnp.float32), new_cache, records)


def _project_qkv(attn: Attention, x: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  dtype = x.dtype
  q = jnp.einsum('btd,dnh->btnh', x, attn.wq[...].astype(dtype))  # [B, T, N, H]
  k = jnp.einsum('btd,dkh->btkh', x, attn.wk[...].astype(dtype))  # [B, T, K, H]
  v = jnp.einsum('btd,dkh->btkh', x, attn.wv[...].astype(dtype))  # [B, T, K, H]
  if hasattr(attn, 'bq'):
    q = q + attn.bq[...].astype(dtype)
    k = k + attn.bk[...].astype(dtype)
    v = v + attn.bv[...].astype(dtype)
  if hasattr(attn, 'q_norm'):  # Per head, over H (Qwen3).
    q, k = attn.q_norm(q), attn.k_norm(k)
  return q, k, v


def _fast_attention(c: DecoderConfig, layer: int, q, k, v, q_positions,
                    kv_positions, kv_valid, q_valid, plain: bool) -> jax.Array:
  """`attention.dot_product_attention` with the decoder's visibility."""
  scale = c.head_dim ** -0.5
  window = c.layer_window(layer)
  if plain:
    t = q.shape[1]
    mask = None
    if window is not None and window < t:
      mask = masks_lib.sliding_window(t, window - 1, 0)
    return attention_lib.dot_product_attention(
        q, k, v, mask=mask, is_causal=True, scale=scale,
        implementation=c.implementation)
  mask = visibility(q_positions, kv_positions, kv_valid, window, q_valid)
  return attention_lib.dot_product_attention(
      q, k, v, mask=mask, scale=scale, implementation=c.implementation)


def _hooked_attention(c: DecoderConfig, layer: int, q, k, v, q_positions,
                      kv_positions, kv_valid, q_valid, hidden, interventions,
                      record):
  """The hook point: `attention.interventions.hook_point.attend` on a site."""
  site = iv_base.AttentionSite(
      layer=layer, num_layers=c.depth, q_positions=q_positions,
      kv_positions=kv_positions, kv_valid=kv_valid, window=c.layer_window(layer),
      hidden=hidden, scale=c.head_dim ** -0.5, q_valid=q_valid)
  return hook_point.attend(q, k, v, site, interventions, record)


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _check_inputs(c: DecoderConfig, tokens, positions, attention_mask,
                  cache: KVCache | None):
  """Shapes / dtypes (always) and values (when concrete); returns valid [B, T]."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(
        f'tokens must be an int array [B, T], got {tokens.dtype} '
        f'{tuple(tokens.shape)}.')
  b, t = tokens.shape
  if t == 0:
    raise ValueError('tokens must have at least one position, got T=0.')
  if cache is not None and not isinstance(cache, KVCache):
    raise TypeError(f'cache must be a KVCache, got {type(cache).__name__}.')
  if not _is_traced(tokens):
    host = np.asarray(tokens)
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= c.vocab_size:
      raise ValueError(
          f'tokens must be in [0, vocab_size={c.vocab_size}), got values in '
          f'[{lo}, {hi}].')
  if positions is not None:
    positions = jnp.asarray(positions)
    if positions.shape != (b, t) or not jnp.issubdtype(positions.dtype,
                                                       jnp.integer):
      raise ValueError(
          f'positions must be an int array of shape {(b, t)} (as tokens), got '
          f'{positions.dtype} {tuple(positions.shape)}.')
    if not _is_traced(positions):
      host = np.asarray(positions)
      lo, hi = int(host.min()), int(host.max())
      limit = c.max_positions if c.positions == 'learned' else None
      if lo < 0 or (limit is not None and hi >= limit):
        raise ValueError(
            f'positions must be in [0, {limit if limit else "inf"}), got values '
            f'in [{lo}, {hi}].')
  elif c.positions == 'learned':
    start = 0 if cache is None or _is_traced(cache.length) else int(cache.length)
    if start + t > c.max_positions:
      raise ValueError(
          f'the default positions reach {start + t - 1}, past max_positions='
          f'{c.max_positions} (learned position table); tokens has T={t}.')
  if attention_mask is None:
    valid = jnp.ones((b, t), bool)
  else:
    attention_mask = jnp.asarray(attention_mask)
    if attention_mask.shape != (b, t) or not (
        attention_mask.dtype == bool or
        jnp.issubdtype(attention_mask.dtype, jnp.integer)):
      raise ValueError(
          f'attention_mask must be a bool / int array of shape {(b, t)}, got '
          f'{attention_mask.dtype} {tuple(attention_mask.shape)}.')
    if not _is_traced(attention_mask) and attention_mask.dtype != bool:
      values = np.unique(np.asarray(attention_mask))
      if not set(values.tolist()) <= {0, 1}:
        raise ValueError(
            f'attention_mask must hold 0 / 1, got values {values.tolist()}.')
    valid = attention_mask.astype(bool)
  if cache is not None:
    if len(cache.k) != c.depth or cache.batch_size != b or (
        cache.k[0].shape[2:] != (c.num_kv_heads, c.head_dim)):
      raise ValueError(
          f'cache must hold {c.depth} layers of [B={b}, S, {c.num_kv_heads}, '
          f'{c.head_dim}], got {len(cache.k)} layers of '
          f'{tuple(cache.k[0].shape)}.')
    if not _is_traced(cache.length):
      length = int(cache.length)
      if length + t > cache.max_len:
        raise ValueError(
            f'cache overflow: cache.length={length} + T={t} tokens exceeds '
            f'cache max_len={cache.max_len}; use init_cache with a larger '
            'max_len.')
  return tokens, positions, valid


def _check_hooks(c: DecoderConfig, interventions: tuple[Any, ...],
                 record: Any) -> None:
  for iv in interventions:
    for name, limit in (('layers', c.depth), ('heads', c.num_heads)):
      values = getattr(iv, name, None)
      if values is not None and any(not 0 <= int(x) < limit for x in values):
        raise ValueError(
            f'{type(iv).__name__}.{name} must be in [0, {limit}), got '
            f'{tuple(values)}.')
  if record is not None and record.layers is not None and any(
      not 0 <= int(x) < c.depth for x in record.layers):
    raise ValueError(
        f'record.layers must be in [0, {c.depth}), got {tuple(record.layers)}.')


# ----------------------------------------------------------------------------
# Decoding and placement
# ----------------------------------------------------------------------------


def decode_step(model: CausalDecoder, tokens: jax.Array, cache: KVCache, *,
                positions: jax.Array | None = None,
                interventions: Sequence[Any] = (),
                record: Any = None) -> DecoderOutput:
  """Appends one token per sequence to `cache`; logits [B, 1, V].

  Args:
    model: the decoder.
    tokens: [B] or [B, 1] int, the next token of each sequence.
    cache: the cache after prefill / earlier steps.
    positions: [B] or [B, 1] (default: one past each sequence's last real
      position, `cache.next_positions()`).
    interventions, record: as `CausalDecoder.__call__`.
  """
  if not isinstance(cache, KVCache):
    raise TypeError(f'cache must be a KVCache, got {type(cache).__name__}.')
  tokens = jnp.asarray(tokens)
  if tokens.ndim == 1:
    tokens = tokens[:, None]
  if tokens.ndim != 2 or tokens.shape[1] != 1:
    raise ValueError(
        f'tokens must be [B] or [B, 1] for decode_step, got '
        f'{tuple(tokens.shape)}.')
  if positions is None:
    positions = cache.next_positions()[:, None]
  else:
    positions = jnp.asarray(positions)
    if positions.ndim == 1:
      positions = positions[:, None]
  return model(tokens, positions=positions, cache=cache,
               interventions=interventions, record=record)


def param_mesh(model: nnx.Module) -> Mesh | None:
  """The mesh the model's parameters are placed on (NamedSharding), or None."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  sh = getattr(leaves[0], 'sharding', None) if leaves else None
  return sh.mesh if isinstance(sh, NamedSharding) else None


def place_on_mesh(model: CausalDecoder, mesh: Mesh) -> CausalDecoder:
  """Places the parameters by their logical axes (`experiments.sharding.RULES`)."""
  state = nnx.state(model, nnx.Param)
  shardings = sharding_lib.param_shardings(state, mesh)
  placed = jax.device_put(nnx.to_pure_dict(state), shardings)
  nnx.replace_by_pure_dict(state, placed)
  nnx.update(model, state)
  return model


# ----------------------------------------------------------------------------
# From the trainer's DecoderLM
# ----------------------------------------------------------------------------


def _get(config: Any, name: str, default: Any = None) -> Any:
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def config_from_trainer(model_config: Any, vocab_size: int) -> DecoderConfig:
  """The DecoderConfig of the trainer's `config.model` (kind 'lm', softmax)."""
  kind = _get(model_config, 'kind', 'lm')
  if kind != 'lm':
    raise ValueError(f'model config kind must be "lm", got {kind!r}.')
  att = _get(model_config, 'attention', {})
  variant = _get(att, 'variant', 'softmax')
  if variant != 'softmax':
    raise ValueError(
        f'from_trainer_lm supports only the softmax attention variant, got '
        f'variant {variant!r}.')
  if _get(att, 'sinks', False):
    raise ValueError(
        'from_trainer_lm: attention sinks (attention.sinks=True) are not '
        'supported by CausalDecoder.')
  if _get(att, 'logits_soft_cap', None) is not None:
    raise ValueError(
        'from_trainer_lm: attention.logits_soft_cap is not supported by '
        f'CausalDecoder, got {_get(att, "logits_soft_cap")}.')
  window = _trainer_window(_get(att, 'mask', 'causal'), _get(model_config,
                                                             'num_heads'))
  rope_base = _get(att, 'rope_base', 10000.0)
  dtype = _get(model_config, 'dtype', 'float32')
  return DecoderConfig(
      vocab_size=vocab_size, dim=_get(model_config, 'dim'),
      depth=_get(model_config, 'depth'),
      num_heads=_get(model_config, 'num_heads'),
      num_kv_heads=_get(model_config, 'num_kv_heads'),
      head_dim=_get(model_config, 'head_dim'),
      mlp_dim=_get(model_config, 'mlp_dim'), norm='rms', norm_eps=1e-6,
      mlp='swiglu', positions='none' if rope_base is None else 'rope',
      rope_theta=10000.0 if rope_base is None else float(rope_base),
      tie_embeddings=False, sliding_window=window, final_norm=True,
      dtype=jnp.dtype(dtype),
      implementation=_get(att, 'implementation', None))


def _trainer_window(spec: str, num_heads: int) -> int | None:
  """Trainer mask spec -> sliding window (None: plain causal); others rejected."""
  from experiments.models import registry  # pylint: disable=g-import-not-at-top
  name, _, _ = registry.parse_mask_spec(spec)
  if name in ('causal', registry.NO_MASK):
    mask = None
  elif name == 'sliding_window':
    mask = registry.make_mask(spec, q_len=8, kv_len=8, num_heads=num_heads)
  else:
    mask = False
  if mask is None:
    return None
  if isinstance(mask, masks_lib.SlidingWindow) and mask.offset == 0:
    # ANDed with causality: q - left <= k <= q; the right bound is moot.
    return None if mask.left is None else mask.left + 1
  raise ValueError(
      f'from_trainer_lm supports the causal mask (or a causal sliding window), '
      f'got attention.mask {spec!r}.')


def _shape(x: Any) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def _child(tree: Mapping[Any, Any], index: int) -> Any:
  if index in tree:
    return tree[index]
  return tree[str(index)]


def from_trainer_lm(params: Mapping[str, Any], model_config: Any, *,
                    vocab_size: int | None = None) -> CausalDecoder:
  """A CausalDecoder with the weights of the trainer's `DecoderLM`.

  The trainer's model (experiments/models/lm.py) is a Llama-style decoder with the
  same RoPE (rotate-half, theta^(-2i/H)), RMSNorm (eps 1e-6, float32), SwiGLU and an
  untied head, so the logits agree.

  Args:
    params: `nnx.to_pure_dict(nnx.state(lm))` of a DecoderLM (a trainer
      checkpoint's 'params'); list indices may be ints or strs.
    model_config: the trainer's `config.model` (ConfigDict or dict).
    vocab_size: V (default: the embedding's rows).

  Raises:
    ValueError: for attention variants other than softmax (linear, MoH, ...), masks
      other than causal / causal sliding window, sinks or a logits soft-cap.
  """
  vocab = _shape(params['embed'])[0] if vocab_size is None else vocab_size
  config = config_from_trainer(model_config, vocab)
  model = nnx.eval_shape(lambda: CausalDecoder(config, rngs=nnx.Rngs(0)))
  blocks = params['encoder']['blocks']
  tree: dict[str, Any] = {
      'embed': {'embedding': params['embed']},
      'final_norm': {'scale': params['encoder']['norm']['scale']},
      'lm_head': params['head'],
      'blocks': {},
  }
  for i in range(config.depth):
    src = _child(blocks, i)
    tree['blocks'][i] = {
        'attn_norm': {'scale': src['attn_norm']['scale']},
        'attn': {n: src['attn'][n] for n in ('wq', 'wk', 'wv', 'wo')},
        'mlp_norm': {'scale': src['mlp_norm']['scale']},
        'mlp': {n: src['mlp'][n] for n in ('w_gate', 'w_up', 'w_down')},
    }
  state = nnx.state(model)
  expected = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state))
  got = jax.tree.map(_shape, tree)
  if expected != got:
    raise ValueError(
        f'params do not match the model config: expected shapes {expected}, got '
        f'{got}.')
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, tree))
  nnx.update(model, state)
  return model


# Generation lives in its own module; re-exported (it needs nothing from here).
# pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.models.generation import generate
from experiments.models.generation import sample_logits
# pylint: enable=g-import-not-at-top,wrong-import-position

__all__ = [
    'CausalDecoder', 'DecoderConfig', 'DecoderOutput', 'KVCache', 'apply_rope',
    'cache_shardings', 'config_from_trainer', 'decode_step', 'from_trainer_lm',
    'generate', 'layer_norm', 'param_mesh', 'place_on_mesh', 'rms_norm',
    'rope_attention_factor', 'rope_inv_freq', 'sample_logits', 'visibility',
]
