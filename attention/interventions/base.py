"""Attention hook sites, interventions and records: the types `attend` works with.

An `AttentionSite` describes one attention call of a model (which layer, the token
positions of queries and keys, padding, sliding window, the layer's input hidden
state). An `Intervention` edits that call per (layer, head) at one of three stages,
without touching weights:

    logits [B, N, T, S]  --edit_logits-->  softmax  --edit_probs-->  probs @ v
    out [B, T, N, Hv]    --edit_output-->  (the output projection follows)

Interventions are frozen dataclasses registered as JAX pytrees: fields declared with
`array_field()` are leaves (traced under jit, differentiable where floating), every
other field is static (hashed into the jit cache). A `Record` says what `attend`
captures (probabilities, logits, head outputs, the hidden state) for chosen layers.

The blocked protocol (used by `attend(..., method='blocked')`, which never builds a
[T, S] array) is declared per class by `blocked`:

  - None: no exact blocked form (the dense map is needed).
  - 'logit_mod': the edit is an elementwise function of the logit and its indices,
    `logit_mod(score, b, h, q_idx, kv_idx, num_heads)`, applied inside the blocked
    kernel's tiles (FlexAttention's score_mod convention).
  - 'probs': `blocked_probs(ctx)` rebuilds the edited output from the blocked pass's
    output, log-sum-exp and further blocked passes (`attention.interventions.blocked`).
  - 'query_scale': a per-head factor on the logits, applied to the queries
    (`query_scale(num_heads) -> [N]`; valid because the other logit edits are masks,
    which commute with a positive scale). A multiplicative edit is kept out of the
    kernel's score_mod: the blocked kernel's backward differentiates a score_mod
    w.r.t. the score only when the mod has float params to differentiate.
  - 'output': `edit_output` is already O(T) and runs as is.

Einsum letters: b batch, t query position, s key position, n query head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'AttentionSite',
    'Intervention',
    'Record',
    'array_field',
    'check_fraction',
    'check_index_tuple',
]

_ARRAY = 'intervention_array'


# ----------------------------------------------------------------------------------------
# Small validators shared by the interventions.
# ----------------------------------------------------------------------------------------


def check_index_tuple(name: str, value: Any) -> tuple[int, ...] | None:
  """None, or a tuple of distinct non-negative ints (from an int or a sequence)."""
  if value is None:
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (value,)
  if not isinstance(value, (tuple, list, range)):
    raise TypeError(f'{name} must be None, an int or a sequence of ints, got '
                    f'{type(value).__name__}.')
  out = []
  for x in value:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
      raise TypeError(f'{name} must hold ints, got {x!r} ({type(x).__name__}).')
    if x < 0:
      raise ValueError(f'{name} must hold non-negative ints, got {x}.')
    out.append(int(x))
  if len(set(out)) != len(out):
    raise ValueError(f'{name} must not repeat an index, got {tuple(out)}.')
  if not out:
    raise ValueError(f'{name} must be None (all) or non-empty, got ().')
  return tuple(out)


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0,
                   low_open: bool = False, high_open: bool = False) -> float:
  """A Python float in [low, high] (open ends as asked); ValueError otherwise."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)):
    raise TypeError(f'{name} must be a Python float, got {type(value).__name__}.')
  v = float(value)
  ok = np.isfinite(v) and (v > low if low_open else v >= low) and (
      v < high if high_open else v <= high)
  if not ok:
    lb = '(' if low_open else '['
    rb = ')' if high_open else ']'
    raise ValueError(f'{name} must be in {lb}{low}, {high}{rb}, got {value}.')
  return v


def _check_int_array(name: str, x: Any, shape: tuple[int, ...]) -> None:
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'{name} must be an array, got {type(x).__name__}.')
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f'{name} must have an integer dtype, got {x.dtype}.')
  if tuple(x.shape) != shape:
    raise ValueError(f'{name} must have shape {shape}, got {tuple(x.shape)}.')


def _check_bool_array(name: str, x: Any, shape: tuple[int, ...]) -> None:
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype'):
    raise TypeError(f'{name} must be an array, got {type(x).__name__}.')
  if x.dtype != jnp.bool_:
    raise TypeError(f'{name} must have dtype bool, got {x.dtype}.')
  if tuple(x.shape) != shape:
    raise ValueError(f'{name} must have shape {shape}, got {tuple(x.shape)}.')


# ----------------------------------------------------------------------------------------
# AttentionSite.
# ----------------------------------------------------------------------------------------

_SITE_ARRAYS = ('q_positions', 'kv_positions', 'kv_valid', 'hidden', 'q_valid')
_SITE_STATIC = ('layer', 'num_layers', 'window', 'scale')


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionSite:
  """One attention call of a model: where it is and who sees whom.

  Key j is visible to query i iff kv_pos[j] <= q_pos[i] and kv_valid[j] (and, with
  a sliding window, q_pos[i] - kv_pos[j] < window; and q_valid[i] when given).

  Attributes:
    layer: this layer's index in [0, num_layers).
    num_layers: the model's number of attention layers.
    q_positions: [B, T] int32 token positions of the queries.
    kv_positions: [B, S] int32 token positions of the keys.
    kv_valid: [B, S] bool, False for padding keys (or unwritten cache slots).
    window: sliding window length (>= 1), or None.
    hidden: [B, T, D] the layer's input hidden state, or None (VAR needs it).
    scale: the logits scale (1 / sqrt(H) in most models).
    q_valid: optional [B, T] bool, False for padding queries (they see nothing and
      give zeros; ACT's sink scores then ignore them). None: all queries are real.

  A pytree: the arrays are leaves, the rest static.
  """
  layer: int
  num_layers: int
  q_positions: jax.Array
  kv_positions: jax.Array
  kv_valid: jax.Array
  window: int | None = None
  hidden: jax.Array | None = None
  scale: float = 1.0
  q_valid: jax.Array | None = None

  def __post_init__(self):
    for name in ('layer', 'num_layers'):
      v = getattr(self, name)
      if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f'{name} must be an int, got {type(v).__name__}.')
    if self.num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {self.num_layers}.')
    if not 0 <= self.layer < self.num_layers:
      raise ValueError(
          f'layer must be in [0, num_layers={self.num_layers}), got {self.layer}.')
    if self.window is not None and (
        isinstance(self.window, (bool, np.bool_)) or
        not isinstance(self.window, (int, np.integer)) or self.window < 1):
      raise ValueError(f'window must be None or an int >= 1, got {self.window!r}.')
    if isinstance(self.scale, (bool, np.bool_)) or not isinstance(
        self.scale, (int, float, np.integer, np.floating)) or not (
            np.isfinite(self.scale) and self.scale > 0):
      raise ValueError(f'scale must be a positive finite float, got {self.scale!r}.')

  @classmethod
  def default(cls, batch: int, q_len: int, kv_len: int | None = None, *,
              layer: int = 0, num_layers: int = 1, scale: float = 1.0,
              window: int | None = None, kv_valid: jax.Array | None = None,
              hidden: jax.Array | None = None,
              q_valid: jax.Array | None = None) -> 'AttentionSite':
    """Keys at positions 0..S-1, queries at the last T of them (prefill or decode)."""
    kv_len = q_len if kv_len is None else kv_len
    if q_len > kv_len:
      raise ValueError(f'q_len ({q_len}) must be <= kv_len ({kv_len}).')
    kv_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    q_pos = kv_pos[:, kv_len - q_len:]
    if kv_valid is None:
      kv_valid = jnp.ones((batch, kv_len), bool)
    return cls(layer=layer, num_layers=num_layers, q_positions=q_pos,
               kv_positions=kv_pos, kv_valid=kv_valid, window=window, hidden=hidden,
               scale=float(scale), q_valid=q_valid)

  def check(self, batch: int, q_len: int, kv_len: int) -> None:
    """Raises ValueError/TypeError unless the arrays fit [B, T] / [B, S]."""
    _check_int_array('site.q_positions', self.q_positions, (batch, q_len))
    _check_int_array('site.kv_positions', self.kv_positions, (batch, kv_len))
    _check_bool_array('site.kv_valid', self.kv_valid, (batch, kv_len))
    if self.q_valid is not None:
      _check_bool_array('site.q_valid', self.q_valid, (batch, q_len))
    if self.hidden is not None:
      h = self.hidden
      if not hasattr(h, 'shape') or len(h.shape) != 3 or tuple(h.shape[:2]) != (
          batch, q_len) or not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(
            f'site.hidden must be a floating array [B, T, D] = [{batch}, {q_len}, D], '
            f'got {getattr(h, "dtype", type(h).__name__)}'
            f'{list(getattr(h, "shape", ()))}.')

  @property
  def is_last_layer(self) -> bool:
    return self.layer == self.num_layers - 1

  def visible_elementwise(self, b, q_idx, kv_idx) -> jax.Array:
    """Visibility at broadcast int32 indices (batch, query index, key index)."""
    qp = self.q_positions[b, q_idx]
    kp = self.kv_positions[b, kv_idx]
    vis = (kp <= qp) & self.kv_valid[b, kv_idx]
    if self.window is not None:
      vis = vis & (qp - kp < self.window)
    if self.q_valid is not None:
      vis = vis & self.q_valid[b, q_idx]
    return vis

  def visible(self) -> jax.Array:
    """bool [B, 1, T, S]: key s visible to query t."""
    qp = self.q_positions[:, None, :, None]  # [B, 1, T, 1]
    kp = self.kv_positions[:, None, None, :]  # [B, 1, 1, S]
    vis = (kp <= qp) & self.kv_valid[:, None, None, :]
    if self.window is not None:
      vis = vis & (qp - kp < self.window)
    if self.q_valid is not None:
      vis = vis & self.q_valid[:, None, :, None]
    return vis

  def replace(self, **changes) -> 'AttentionSite':
    return dataclasses.replace(self, **changes)

  def tree_flatten(self):
    return (tuple(getattr(self, f) for f in _SITE_ARRAYS),
            tuple(getattr(self, f) for f in _SITE_STATIC))

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)  # no validation: leaves may be tracers or sentinels.
    for f, v in zip(_SITE_ARRAYS, children):
      object.__setattr__(obj, f, v)
    for f, v in zip(_SITE_STATIC, aux):
      object.__setattr__(obj, f, v)
    return obj


jax.tree_util.register_pytree_node(AttentionSite, AttentionSite.tree_flatten,
                                   AttentionSite.tree_unflatten)


# ----------------------------------------------------------------------------------------
# Intervention.
# ----------------------------------------------------------------------------------------


def array_field(default: Any = None, **kwargs) -> Any:
  """A dataclass field that is a pytree leaf of its Intervention (an array or None)."""
  return dataclasses.field(default=default, metadata={_ARRAY: True}, **kwargs)


def _split_fields(cls) -> tuple[tuple[str, ...], tuple[str, ...]]:
  arrays, static = [], []
  for f in dataclasses.fields(cls):
    (arrays if f.metadata.get(_ARRAY, False) else static).append(f.name)
  return tuple(arrays), tuple(static)


def _flatten(obj):
  arrays, static = _split_fields(type(obj))
  return (tuple(getattr(obj, f) for f in arrays),
          tuple(getattr(obj, f) for f in static))


def _unflatten(cls, aux, children):
  arrays, static = _split_fields(cls)
  obj = object.__new__(cls)  # no __post_init__: leaves may be tracers or sentinels.
  for f, v in zip(arrays, children):
    object.__setattr__(obj, f, v)
  for f, v in zip(static, aux):
    object.__setattr__(obj, f, v)
  return obj


@dataclasses.dataclass(frozen=True, eq=False)
class Intervention:
  """Base class: an edit of one attention call, per (layer, head); identity here.

  Subclasses are frozen dataclasses (decorate them with
  `@dataclasses.dataclass(frozen=True, eq=False)`); they are registered as pytrees
  automatically. Static fields must be hashable.

  Attributes:
    layers: the layers it applies to (None: all).
    heads: the query heads it applies to (None: all); the others are bitwise
      unchanged.

  Class attributes:
    stage: which dense hook the subclass overrides: 'logits', 'probs' or 'output'.
    blocked: its blocked form: None, 'logit_mod', 'query_scale', 'probs' or
      'output' (module doc).
    logit_mask: True when its logit edit only hides entries (-inf), so it commutes
      with a 'query_scale' edit.
  """
  layers: tuple[int, ...] | None = None
  heads: tuple[int, ...] | None = None

  stage: ClassVar[str] = 'output'
  blocked: ClassVar[str | None] = 'output'
  logit_mask: ClassVar[bool] = False

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    jax.tree_util.register_pytree_node(
        cls, _flatten, lambda aux, children, cls=cls: _unflatten(cls, aux, children))

  def __post_init__(self):
    object.__setattr__(self, 'layers', check_index_tuple('layers', self.layers))
    object.__setattr__(self, 'heads', check_index_tuple('heads', self.heads))

  @property
  def name(self) -> str:
    return type(self).__name__

  # -- selection ---------------------------------------------------------------------

  def applies_to(self, layer: int) -> bool:
    return self.layers is None or layer in self.layers

  def check_layers(self, num_layers: int) -> None:
    """ValueError if a selected layer is not in [0, num_layers)."""
    if self.layers is not None and max(self.layers) >= num_layers:
      raise ValueError(f'{self.name}: layers must be in [0, {num_layers}), got '
                       f'{self.layers}.')

  def head_mask(self, num_heads: int) -> np.ndarray:
    """bool [N]: which query heads this edits; ValueError if a head is >= N."""
    if self.heads is None:
      return np.ones((num_heads,), bool)
    if max(self.heads) >= num_heads:
      raise ValueError(f'{self.name}: heads must be in [0, {num_heads}), got '
                       f'{self.heads}.')
    mask = np.zeros((num_heads,), bool)
    mask[list(self.heads)] = True
    return mask

  def select_heads(self, new: jax.Array, old: jax.Array, axis: int) -> jax.Array:
    """`new` on the selected heads (along `axis`), `old` (bitwise) elsewhere."""
    mask = self.head_mask(old.shape[axis])
    if mask.all():
      return new
    shape = [1] * old.ndim
    shape[axis] = old.shape[axis]
    return jnp.where(jnp.asarray(mask).reshape(shape), new, old)

  def head_selected(self, h: jax.Array, num_heads: int) -> jax.Array | bool:
    """Elementwise: is query head index `h` (int32 array) selected."""
    mask = self.head_mask(num_heads)
    if mask.all():
      return True
    return jnp.asarray(mask)[h]

  # -- dense hooks (identity) --------------------------------------------------------

  def edit_logits(self, logits: jax.Array, site: AttentionSite) -> jax.Array:
    """logits [B, N, T, S] float32, -inf where not visible -> edited logits."""
    del site
    return logits

  def edit_probs(self, probs: jax.Array, site: AttentionSite) -> jax.Array:
    """probs [B, N, T, S] float32 (rows sum to 1 or are 0) -> edited probs."""
    del site
    return probs

  def edit_output(self, out: jax.Array, site: AttentionSite) -> jax.Array:
    """Per-head output [B, T, N, Hv] (before the output projection) -> edited."""
    del site
    return out

  # -- blocked hooks -----------------------------------------------------------------

  def logit_mod(self, score: jax.Array, b: jax.Array, h: jax.Array,
                q_idx: jax.Array, kv_idx: jax.Array, num_heads: int) -> jax.Array:
    """Elementwise logit edit on broadcast int32 indices (blocked == 'logit_mod')."""
    del b, h, q_idx, kv_idx, num_heads
    return score

  def query_scale(self, num_heads: int) -> np.ndarray:
    """[N] factors on the queries (blocked == 'query_scale')."""
    return np.ones((num_heads,), np.float32)

  def blocked_probs(self, ctx: Any) -> jax.Array:
    """The edited output [B, T, N, Hv] from a `blocked.BlockedContext`."""
    return ctx.out

  def check_shapes(self, site: AttentionSite, shapes: dict[str, int]) -> None:
    """ValueError if its arrays do not fit this call (B, T, S, N, Hv in `shapes`)."""
    del site, shapes


jax.tree_util.register_pytree_node(
    Intervention, _flatten,
    lambda aux, children: _unflatten(Intervention, aux, children))


# ----------------------------------------------------------------------------------------
# Record.
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Record:
  """What `attend` captures, for which layers (None: all); a static pytree.

  Attributes:
    layers: layers to record (None: all).
    probs: the probabilities [B, N, T, S] actually used (after the edits).
    logits: the logits [B, N, T, S] after the logit edits (-inf where not visible).
    head_outputs: per-head outputs [B, T, N, Hv] after the output edits.
    hidden: the layer's input hidden state [B, T, D] (`site.hidden`).
  """
  layers: tuple[int, ...] | None = None
  probs: bool = False
  logits: bool = False
  head_outputs: bool = False
  hidden: bool = False

  def __post_init__(self):
    object.__setattr__(self, 'layers', check_index_tuple('record.layers',
                                                         self.layers))
    for name in ('probs', 'logits', 'head_outputs', 'hidden'):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise TypeError(f'record.{name} must be a bool, got '
                        f'{type(getattr(self, name)).__name__}.')

  def applies_to(self, layer: int) -> bool:
    return self.layers is None or layer in self.layers

  @property
  def needs_dense(self) -> bool:
    return bool(self.probs or self.logits)

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(k for k in ('probs', 'logits', 'head_outputs', 'hidden')
                 if getattr(self, k))


def as_interventions(interventions: Any) -> tuple[Intervention, ...]:
  """A tuple of Interventions from None, one, or a sequence; TypeError otherwise."""
  if interventions is None:
    return ()
  if isinstance(interventions, Intervention):
    return (interventions,)
  if not isinstance(interventions, Sequence):
    raise TypeError('interventions must be a sequence of Intervention, got '
                    f'{type(interventions).__name__}.')
  for i, iv in enumerate(interventions):
    if not isinstance(iv, Intervention):
      raise TypeError(f'interventions[{i}] must be an Intervention, got '
                      f'{type(iv).__name__}.')
  return tuple(interventions)
