"""The implementation contract: one validated attention problem, built once by the API.

`attention.dot_product_attention` validates its inputs once (`make_problem`) and hands
every implementation the same frozen `AttentionProblem`:

    implementation.attention(query, key, value, problem, **options)
    implementation.unsupported(query, key, value, problem) -> str | None   (optional)

Semantics (identical on every implementation):

    z      = scale * q k^T                                   [B, N, T, S]
    z      = cap * tanh(z / cap)            (logits_soft_cap)
    z      = score_mod(z, b, h, q_idx, kv_idx) + bias
    z      = -inf where not visible         (mask AND segments)
    p      = softmax(z) with exp(sink_h) added to each denominator
    p      = p * keep / (1 - dropout_rate)  (dropout on the normalised probabilities)
    out    = p v,  lse = log-sum-exp of z (with the sink; -inf for rows seeing nothing)

Rows that see nothing (whatever hid their keys: mask, segments, -inf bias or
score_mod) return zeros and zero gradients, never NaN.

`score_mod` follows PyTorch FlexAttention's convention ("FlexAttention: A Programming
Model for Generating Optimized Attention Kernels", Dong et al. 2024): an elementwise
function of the logit and broadcast int32 index arrays. Its code is static; the arrays
it uses are the leaves of a `ScoreMod` (explicit `params`, or the closed-over arrays of a
plain function, hoisted as in `jax.closure_convert`), so they are traced inputs of every
kernel and receive gradients.

Dropout draws its keep-mask from a counter-based hash of (seed, b, h, q_idx, kv_idx)
(the stateless scheme of "Parallel random numbers: as easy as 1, 2, 3", Salmon et al.
2011, here with the murmur3 finaliser as the mixing round): any tile recomputes its
bits from its indices, so the backward pass needs no stored mask and the result does not
depend on the tiling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention.masks import base as masks_base
from attention.masks import dynamic as masks_dynamic

ScoreModFn = Callable[..., jax.Array]


# ----------------------------------------------------------------------------------------
# score_mod.
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class ScoreMod:
  """A logit modification `fn(params, score, b, h, q_idx, kv_idx) -> score`.

  `fn` is static (hashed by identity, or by its traced program for converted plain
  functions); `params` is a pytree of arrays (tables, slopes), traced and
  differentiable. `fn` must be elementwise and broadcast its arguments as jnp does:
  kernels call it on tiles, e.g. score [..., bq, bk] with b [..., 1, 1],
  q_idx [bq, 1], kv_idx [1, bk] (int32).
  """
  fn: Callable[..., jax.Array]
  params: Any = ()
  name: str = 'score_mod'

  def __call__(self, score, b, h, q_idx, kv_idx):
    return self.fn(self.params, score, b, h, q_idx, kv_idx)

  def tree_flatten(self):
    return (self.params,), (self.fn, self.name)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(fn=aux[0], params=children[0], name=aux[1])

  @property
  def static_key(self) -> Any:
    """Hashable identity of the code (not of the parameter values)."""
    return (self.fn, self.name, jax.tree_util.tree_structure(self.params))


@dataclasses.dataclass(frozen=True, eq=False)
class _TracedFn:
  """A plain score_mod traced once on scalars: equal when the programs are equal."""
  jaxpr: Any  # jax.extend.core.Jaxpr of (score, b, h, q_idx, kv_idx) with constvars
  key: str

  def __eq__(self, other):
    return isinstance(other, _TracedFn) and self.key == other.key

  def __hash__(self):
    return hash(self.key)

  def __call__(self, consts, score, b, h, q_idx, kv_idx):
    """Applies the scalar program elementwise over the broadcast arguments."""
    args = [jnp.asarray(score)] + [jnp.asarray(x, jnp.int32)
                                   for x in (b, h, q_idx, kv_idx)]
    shape = jnp.broadcast_shapes(*(a.shape for a in args))
    flat = [jnp.broadcast_to(a, shape).reshape(-1) for a in args]

    def one(*scalars):
      return jax.core.eval_jaxpr(self.jaxpr, list(consts), *scalars)[0]

    return jax.vmap(one)(*flat).reshape(shape)


def as_score_mod(score_mod: ScoreMod | ScoreModFn | None,
                 dtype: Any = jnp.float32) -> ScoreMod | None:
  """A `ScoreMod` from a ScoreMod or a plain function `fn(score, b, h, q, kv)`.

  A plain function is traced once on scalars of `dtype` / int32; the arrays it closes
  over (concrete or traced) become the ScoreMod's params, so they are kernel inputs that
  receive gradients and a new value does not recompile. It is then applied
  elementwise (vmapped); a `ScoreMod` with an explicitly broadcasting `fn` (as those of
  `attention.score_mods`) avoids that and is what the Pallas kernels lower best.
  """
  if score_mod is None or isinstance(score_mod, ScoreMod):
    return score_mod
  if not callable(score_mod):
    raise TypeError('score_mod must be a callable fn(score, b, h, q_idx, kv_idx) or '
                    f'an attention.score_mods.ScoreMod, got {type(score_mod).__name__}.')
  score = jax.ShapeDtypeStruct((), dtype)
  index = jax.ShapeDtypeStruct((), jnp.int32)
  try:
    closed = jax.make_jaxpr(score_mod)(score, index, index, index, index)
  except TypeError as e:
    raise TypeError('score_mod must accept (score, b, h, q_idx, kv_idx) and use jnp '
                    f'operations only: {e}') from e
  outs = closed.out_avals
  if len(outs) != 1 or outs[0].shape != () or not jnp.issubdtype(
      outs[0].dtype, jnp.floating):
    raise ValueError('score_mod must return one floating score of the shape of its '
                     f'first argument, got {outs} for a scalar score.')
  jaxpr = closed.jaxpr
  key = str(jaxpr) + '|' + ','.join(str(jax.typeof(c)) for c in closed.consts)
  name = getattr(score_mod, '__name__', 'score_mod')
  return ScoreMod(fn=_TracedFn(jaxpr, key), params=tuple(closed.consts), name=name)


def check_score_mod(mod: ScoreMod, dtype: Any) -> None:
  """Calls `mod` abstractly on small broadcast tiles; raises if the result is off."""
  score = jax.ShapeDtypeStruct((2, 3, 4, 5), dtype)
  b = jax.ShapeDtypeStruct((2, 1, 1, 1), jnp.int32)
  h = jax.ShapeDtypeStruct((1, 3, 1, 1), jnp.int32)
  q = jax.ShapeDtypeStruct((1, 1, 4, 1), jnp.int32)
  kv = jax.ShapeDtypeStruct((1, 1, 1, 5), jnp.int32)
  try:
    out = jax.eval_shape(mod, score, b, h, q, kv)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'score_mod {mod.name!r} failed on broadcast tiles (score [2, 3, 4, 5], b '
        f'[2, 1, 1, 1], h [1, 3, 1, 1], q_idx [1, 1, 4, 1], kv_idx [1, 1, 1, 5]): '
        f'{type(e).__name__}: {e}') from e
  if tuple(out.shape) != (2, 3, 4, 5) or not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(
        f'score_mod {mod.name!r} must return a floating array of the score\'s shape '
        f'(elementwise), got {out.dtype}{list(out.shape)} for a [2, 3, 4, 5] score.')


def apply_score_mod(mod: ScoreMod | None, score, b, h, q_idx, kv_idx):
  """score_mod(score, ...) in score's dtype (identity when `mod` is None)."""
  if mod is None:
    return score
  return mod(score, b, h, q_idx, kv_idx).astype(score.dtype)


# ----------------------------------------------------------------------------------------
# Dropout: a counter-based keep mask.
# ----------------------------------------------------------------------------------------


def _fmix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finaliser (a bijection with full avalanche) on uint32."""
  x = x ^ jax.lax.shift_right_logical(x, jnp.uint32(16))
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ jax.lax.shift_right_logical(x, jnp.uint32(13))
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ jax.lax.shift_right_logical(x, jnp.uint32(16))


def dropout_bits(seed: jax.Array, b, h, q_idx, kv_idx) -> jax.Array:
  """uint32 random bits for each (b, h, q_idx, kv_idx), broadcast; seed uint32[2]."""
  x = _fmix32(seed[0] ^ jnp.uint32(0x9E3779B9))
  for i, v in enumerate((seed[1], b, h, q_idx, kv_idx)):
    x = _fmix32(x ^ (jnp.asarray(v).astype(jnp.uint32) +
                     jnp.uint32((0x7F4A7C15 * (i + 1)) & 0xFFFFFFFF)))
  return x


def dropout_threshold(rate: float) -> int:
  """Bits below this are dropped: P(drop) = rate (to 2^-32)."""
  return min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)


def dropout_keep(seed: jax.Array, rate: float, b, h, q_idx, kv_idx) -> jax.Array:
  """Boolean keep mask (P = 1 - rate) for the broadcast index arrays."""
  bits = dropout_bits(seed, b, h, q_idx, kv_idx)
  return bits >= jnp.uint32(dropout_threshold(rate))


def dropout_multiplier(seed: jax.Array, rate: float, b, h, q_idx, kv_idx,
                       dtype) -> jax.Array:
  """keep / (1 - rate) as `dtype` (the factor applied to the probabilities)."""
  keep = dropout_keep(seed, rate, b, h, q_idx, kv_idx)
  return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype),
                   jnp.zeros((), dtype))


def seed_from_key(key: Any) -> jax.Array:
  """uint32[2] seed from a PRNG key (typed or raw uint32[2])."""
  if hasattr(key, 'dtype') and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f'dropout_key must be a single key, got shape {key.shape}.')
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
  else:
    _checks.check_array('dropout_key', key)
    if key.dtype != jnp.uint32 or key.ndim != 1:
      raise TypeError('dropout_key must be a jax.random.key or a raw uint32[2] key, '
                      f'got {key.dtype}{list(key.shape)}.')
    data = jnp.asarray(key)
  if data.shape[0] < 2:
    data = jnp.concatenate([data, jnp.zeros((2 - data.shape[0],), jnp.uint32)])
  elif data.shape[0] > 2:  # e.g. a 4-word key: fold the rest in.
    data = _fmix32(data[:2] ^ _fmix32(data[2:4] if data.shape[0] >= 4 else data[2:3]))
  return data


# ----------------------------------------------------------------------------------------
# The problem.
# ----------------------------------------------------------------------------------------

_ARRAY_FIELDS = ('bias', 'mask', 'sinks', 'q_segment_ids', 'kv_segment_ids',
                 'dropout_seed', 'block_mask', 'score_mod')
_PLAIN_ARRAYS = _ARRAY_FIELDS[:-2]
_STATIC_FIELDS = ('scale', 'logits_soft_cap', 'mask_obj', 'dropout_rate',
                  'return_residuals', 'shapes')


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionProblem:
  """Everything an implementation needs beyond (query, key, value), validated.

  Attributes:
    scale: logits scale (float).
    logits_soft_cap: c > 0 for c * tanh(z / c), or None.
    mask_obj: static `attention.masks.Mask` of shape (T, S) (causal included), or None.
      None whenever `block_mask` is given (it is folded into the block mask's inner).
    block_mask: traced `attention.masks.DynamicBlockMask` (block lists chosen under
      jit, with a static inner Mask applied inside the listed blocks), or None.
    score_mod: `ScoreMod` or None (params are traced pytree leaves).
    bias: additive logits broadcastable to [B, N, T, S] (rank 4), or None.
    mask: dense boolean array broadcastable to [B, N, T, S], or None.
    sinks: [N] sink logits, or None.
    q_segment_ids, kv_segment_ids: [B, T] / [B, S] int, both or neither.
    dropout_rate: in [0, 1); 0 means no dropout.
    dropout_seed: uint32[2] when dropout_rate > 0, else None.
    return_residuals: also return the lse [B, N, T].
    shapes: ((B, T, N, H), (B, S, K, H), (B, S, K, Hv)), the validated shapes.

  A pytree: the arrays (and the score_mod's params) are leaves, the rest static, so a
  problem passes through jit and custom_vjp; `static_key` is hashable.
  """
  scale: float
  logits_soft_cap: float | None = None
  mask_obj: masks_base.Mask | None = None
  score_mod: ScoreMod | None = None
  bias: jax.Array | None = None
  mask: jax.Array | None = None
  sinks: jax.Array | None = None
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None
  dropout_rate: float = 0.0
  dropout_seed: jax.Array | None = None
  return_residuals: bool = False
  shapes: tuple[tuple[int, ...], ...] | None = None
  block_mask: Any = None  # masks.dynamic.DynamicBlockMask | None

  @property
  def static_key(self) -> tuple[Any, ...]:
    mod = None if self.score_mod is None else self.score_mod.static_key
    arrays = tuple(None if getattr(self, f) is None else
                   (tuple(getattr(self, f).shape), str(getattr(self, f).dtype))
                   for f in _PLAIN_ARRAYS)
    blocks = None if self.block_mask is None else self.block_mask.static_key
    return (self.scale, self.logits_soft_cap, self.mask_obj, mod, self.dropout_rate,
            self.return_residuals, self.shapes, arrays, blocks)

  def __hash__(self):
    return hash(self.static_key)

  def __eq__(self, other):
    return self is other

  @property
  def has_dropout(self) -> bool:
    return self.dropout_rate > 0

  def replace(self, **changes) -> 'AttentionProblem':
    return dataclasses.replace(self, **changes)

  def tree_flatten(self):
    children = tuple(getattr(self, f) for f in _ARRAY_FIELDS)
    aux = tuple(getattr(self, f) for f in _STATIC_FIELDS)
    return children, aux

  @classmethod
  def tree_unflatten(cls, aux, children):
    kw = dict(zip(_ARRAY_FIELDS, children))
    kw.update(zip(_STATIC_FIELDS, aux))
    return cls(**kw)


jax.tree_util.register_pytree_node(AttentionProblem, AttentionProblem.tree_flatten,
                                   AttentionProblem.tree_unflatten)


def _normalize_segment_ids(segment_ids, b, t, s):
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(
          'segment_ids must be an array [B, T] or a pair (q_segment_ids [B, T], '
          f'kv_segment_ids [B, S]), got a sequence of length {len(segment_ids)}.')
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
    if t != s:
      raise ValueError(
          'segment_ids must be a pair (q_segment_ids, kv_segment_ids) for '
          f'cross-attention (T={t} != S={s}).')
  for name, seg, length in (('q_segment_ids', q_seg, t),
                            ('kv_segment_ids', kv_seg, s)):
    _checks.check_array(name, seg, ndim=2)
    if not jnp.issubdtype(seg.dtype, jnp.integer):
      raise TypeError(f'{name} must have an integer dtype, got {seg.dtype}.')
    if tuple(seg.shape) != (b, length):
      raise ValueError(
          f'{name} must have shape {(b, length)}, got {tuple(seg.shape)}.')
  return q_seg, kv_seg


def _split_masks(mask, b, t, s, n, target):
  """(mask_obj, dense mask array, block mask) from masks or a sequence of them."""
  items = list(mask) if isinstance(mask, (tuple, list)) else [mask]
  mask_obj, mask_array, block_mask = None, None, None
  for i, m in enumerate(items):
    name = 'mask' if len(items) == 1 else f'mask[{i}]'
    if m is None:
      continue
    if isinstance(m, masks_dynamic.DynamicBlockMask):
      if block_mask is not None:
        raise ValueError(f'{name}: at most one DynamicBlockMask may be given (combine '
                         'their block matrices with attention.masks.dynamic.union).')
      m.check(b, n, t, s)
      block_mask = m
      continue
    if isinstance(m, masks_base.Mask):
      if tuple(m.shape) != (t, s):
        raise ValueError(
            f'{name} must have shape (T, S) = {(t, s)}, got {tuple(m.shape)}.')
      if m.head_dependent and m.num_heads != n:
        raise ValueError(
            f'{name} num_heads must equal query heads ({n}), got {m.num_heads}.')
      mask_obj = m if mask_obj is None else mask_obj & m
      continue
    _checks.check_array(name, m)
    if m.dtype != jnp.bool_:
      raise TypeError(f'{name} must have dtype bool, got {m.dtype}.')
    _checks.check_broadcastable(name, m.shape, target, '[B, N, T, S]')
    mask_array = m if mask_array is None else mask_array & m
  return mask_obj, mask_array, block_mask


def _check_dims(b, t, n, h, s, kh, hv) -> None:
  for name, what, value in (('query', 'batch (dim 0)', b),
                            ('query', 'length (dim 1)', t),
                            ('query', 'heads (dim 2)', n),
                            ('query', 'head_dim (dim 3)', h),
                            ('key', 'length (dim 1)', s),
                            ('key', 'heads (dim 2)', kh),
                            ('value', 'head_dim (dim 3)', hv)):
    if value == 0:
      raise ValueError(f'{name} {what} must be at least 1, got 0 (an empty '
                       'attention problem has no defined output).')


def make_problem(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    score_mod: ScoreMod | ScoreModFn | None = None,
    sinks: jax.Array | None = None,
    segment_ids: Any = None,
    dropout_rate: float = 0.0,
    dropout_key: Any = None,
    return_residuals: bool = False,
) -> AttentionProblem:
  """Validates the arguments of `attention.dot_product_attention` into a problem.

  Raises ValueError / TypeError naming the argument and the expected value.
  """
  for name, x in (('query', query), ('key', key), ('value', value)):
    _checks.check_array(name, x, ndim=4, floating=True)
  b, t, n, h = query.shape
  _checks.check_equal('key', 'batch (dim 0)', key.shape[0], b, 'query batch')
  _checks.check_equal('value', 'batch (dim 0)', value.shape[0], b, 'query batch')
  _checks.check_equal('key', 'head_dim (dim 3)', key.shape[3], h, 'query head_dim')
  s, kh = key.shape[1], key.shape[2]
  _checks.check_equal('value', 'length (dim 1)', value.shape[1], s, 'key length')
  _checks.check_equal('value', 'heads (dim 2)', value.shape[2], kh, 'key heads')
  _check_dims(b, t, n, h, s, kh, value.shape[3])
  if n % kh:
    raise ValueError(
        f'query heads ({n}) must be a multiple of key/value heads ({kh}).')
  if scale is None:
    scale = 1.0 / math.sqrt(h)
  _checks.check_positive('scale', scale)
  _checks.check_positive('logits_soft_cap', logits_soft_cap)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise TypeError(f'is_causal must be a bool, got {type(is_causal).__name__}.')
  target = (b, n, t, s)
  if bias is not None:
    _checks.check_array('bias', bias, floating=True)
    _checks.check_broadcastable('bias', bias.shape, target, '[B, N, T, S]')
  mask_obj, mask_array, block_mask = _split_masks(mask, b, t, s, n, target)
  if is_causal:
    causal = masks_base.causal(t, s)
    mask_obj = causal if mask_obj is None else mask_obj & causal
  if block_mask is not None and mask_obj is not None:
    # One static token mask per problem: inside the listed blocks.
    inner = mask_obj if block_mask.inner is None else block_mask.inner & mask_obj
    block_mask, mask_obj = block_mask.replace(inner=inner), None
  if sinks is not None:
    _checks.check_array('sinks', sinks, ndim=1, floating=True)
    _checks.check_equal('sinks', 'length', sinks.shape[0], n, 'query heads')
  q_seg, kv_seg = _normalize_segment_ids(segment_ids, b, t, s)
  if not isinstance(return_residuals, (bool, np.bool_)):
    raise TypeError('return_residuals must be a bool, got '
                    f'{type(return_residuals).__name__}.')
  if isinstance(dropout_rate, bool) or not isinstance(
      dropout_rate, (int, float, np.integer, np.floating)):
    raise TypeError('dropout_rate must be a Python float in [0, 1), got '
                    f'{type(dropout_rate).__name__}.')
  if not 0.0 <= float(dropout_rate) < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}.')
  seed = None
  if dropout_rate > 0:
    if dropout_key is None:
      raise ValueError('dropout_key must be given when dropout_rate > 0 (a '
                       'jax.random.key; fold in the step for a new mask per step).')
    seed = seed_from_key(dropout_key)
  cdt = jnp.promote_types(jnp.result_type(query, key, value), jnp.float32)
  mod = as_score_mod(score_mod, cdt)
  if mod is not None:
    check_score_mod(mod, cdt)
  return AttentionProblem(
      scale=float(scale),
      logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
      mask_obj=mask_obj, score_mod=mod, bias=bias, mask=mask_array, sinks=sinks,
      q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      dropout_rate=float(dropout_rate), dropout_seed=seed,
      return_residuals=bool(return_residuals), block_mask=block_mask,
      shapes=(tuple(query.shape), tuple(key.shape), tuple(value.shape)))


def index_grids(b: int, n: int, t: int, s: int):
  """Broadcast int32 index arrays [B,1,1,1], [1,N,1,1], [1,1,T,1], [1,1,1,S]."""
  return (jnp.arange(b, dtype=jnp.int32)[:, None, None, None],
          jnp.arange(n, dtype=jnp.int32)[None, :, None, None],
          jnp.arange(t, dtype=jnp.int32)[None, None, :, None],
          jnp.arange(s, dtype=jnp.int32)[None, None, None, :])


def kernel_inputs(problem: AttentionProblem) -> Sequence[Any]:
  """The traced leaves of a problem (for a kernel's explicit-input list)."""
  return jax.tree_util.tree_leaves(problem)
