"""Ready-made `score_mod`s: positional biases and logit transforms for attention.

Each function returns a `kernels.problem.ScoreMod` for
`attention.dot_product_attention(..., score_mod=...)`: an elementwise
`fn(params, score, b, h, q_idx, kv_idx)` whose learnable tables are its `params`
(traced kernel inputs that receive gradients). The functions broadcast their int32
index arguments as jnp does and use no gathers: a table lookup is a sum over the
table's entries of `where(index == e, table[e], 0)` (static slices only), and a
per-head value is selected the same way from `h`, so the Pallas kernels can lower
them. Hyperparameters live in small frozen dataclasses, so two mods built with equal
hyperparameters share one compiled kernel.

Index conventions (`kernels.problem`): b batch, h query head in [0, N), q_idx in
[0, T), kv_idx in [0, S); relative positions are measured as in each paper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# A module import (not its names): kernels.problem imports the `attention` package.
from kernels import problem as problem_lib

__all__ = [
    'alibi',
    'alibi_slopes',
    'compose',
    'distance_bias',
    'relative_bias_2d',
    'relative_logits',
    'soft_cap',
    't5_relative_bias',
    't5_relative_position_bucket',
]

_UNROLL_ENTRIES = 16  # larger tables: one-hot contraction (see `_lookup`).
_INIT_STD = 0.02  # truncated-normal init of learnable tables (Swin's trunc_normal_).


# ----------------------------------------------------------------------------------------
# Validation and gather-free lookups.
# ----------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be >= {minimum}, got {value}.')
  return int(value)


def _check_table(name: str, table: Any, shape: tuple[int, ...]) -> jax.Array:
  if not hasattr(table, 'shape') or not hasattr(table, 'dtype'):
    raise TypeError(f'{name} must be an array, got {type(table).__name__}.')
  if not jnp.issubdtype(table.dtype, jnp.floating):
    raise TypeError(f'{name} must have a floating dtype, got {table.dtype}.')
  if tuple(table.shape) != shape:
    raise ValueError(f'{name} must have shape {shape}, got {tuple(table.shape)}.')
  return jnp.asarray(table)


def _init_table(name: str, table: Any, key: Any, shape: tuple[int, ...]) -> jax.Array:
  """The given table, a truncated-normal one from `key`, or zeros."""
  if table is not None:
    if key is not None:
      raise ValueError(f'pass either {name} or key, not both.')
    return _check_table(name, table, shape)
  if key is None:
    return jnp.zeros(shape, jnp.float32)
  return _INIT_STD * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def _select_head(values: jax.Array, h: Any) -> jax.Array:
  """values[..., h] for values [E, N] (or [N]): h.shape + (E,) (or h.shape).

  A sum over heads of where(h == i, values[..., i], 0): static slices only.
  """
  h = jnp.asarray(h)
  if values.ndim == 1:
    out = jnp.zeros(h.shape, values.dtype)
    for i in range(values.shape[0]):
      out = out + jnp.where(h == i, values[i], jnp.zeros((), values.dtype))
    return out
  hh = h[..., None]
  out = jnp.zeros(h.shape + (values.shape[0],), values.dtype)
  for i in range(values.shape[1]):
    out = out + jnp.where(hh == i, values[:, i], jnp.zeros((), values.dtype))
  return out


def _lookup(rows: jax.Array, index: jax.Array) -> jax.Array:
  """rows[..., index] for rows [..., E] and an int index in [0, E), broadcast.

  No gather: for small tables (E <= `_UNROLL_ENTRIES`) a sum over the entries of
  where(index == e, rows[..., e], 0); for larger ones a one-hot contraction
  sum_e where(index[..., None] == iota, rows, 0) over a trailing axis of E (an
  unrolled sum over hundreds of entries compiles slowly, ~20 s for Swin's 165-entry
  table under a gradient). The gradient w.r.t. each entry is the sum of the
  cotangents of the positions that read it.
  """
  index = jnp.asarray(index)
  zero = jnp.zeros((), rows.dtype)
  size = rows.shape[-1]
  if size > _UNROLL_ENTRIES:
    shape = jnp.broadcast_shapes(index.shape, rows.shape[:-1])
    iota = jax.lax.broadcasted_iota(jnp.int32, shape + (size,), len(shape))
    return jnp.sum(jnp.where(index[..., None] == iota, rows, zero), axis=-1)
  out = None
  for e in range(size):
    term = jnp.where(index == e, rows[..., e], zero)
    out = term if out is None else out + term
  return out


# ----------------------------------------------------------------------------------------
# ALiBi.
# ----------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes (Press et al., "Train Short, Test Long", ICLR 2022).

  For n a power of two the geometric sequence m_i = 2^(-8 i / n), i = 1..n; otherwise
  the slopes of the closest smaller power of two 2^k followed by every other slope of
  2^(k+1) heads (the paper's reference code, `get_slopes`). float64 [n].
  """
  n = _check_int('num_heads', num_heads, 1)

  def power_of_two(m: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(m) - 3)))
    return [start * start ** i for i in range(m)]

  if math.log2(n).is_integer():
    return np.asarray(power_of_two(n), np.float64)
  closest = 2 ** math.floor(math.log2(n))
  extra = alibi_slopes(2 * closest)[0::2][:n - closest]
  return np.concatenate([power_of_two(closest), extra]).astype(np.float64)


@dataclasses.dataclass(frozen=True)
class _AlibiFn:
  symmetric: bool

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    del b
    slope = _select_head(params, h)  # h.shape
    rel = (jnp.asarray(kv_idx) - jnp.asarray(q_idx)).astype(params.dtype)
    if self.symmetric:
      rel = -jnp.abs(rel)
    return score + slope * rel


def alibi(num_heads: int, *, slopes: Any = None, symmetric: bool = False) -> problem_lib.ScoreMod:
  """ALiBi: score + m_h * (kv_idx - q_idx) (Press et al., "Train Short, Test Long").

  The paper adds -m_h * (i - j) to the logit of query i and key j <= i (causal use);
  `symmetric=True` gives -m_h * |i - j| for bidirectional attention. `slopes` [N]
  defaults to `alibi_slopes(num_heads)` and is the mod's (differentiable) param.
  """
  n = _check_int('num_heads', num_heads, 1)
  if not isinstance(symmetric, (bool, np.bool_)):
    raise TypeError(f'symmetric must be a bool, got {type(symmetric).__name__}.')
  if slopes is None:
    slopes = jnp.asarray(alibi_slopes(n), jnp.float32)
  else:
    slopes = _check_table('slopes', slopes, (n,))
  return problem_lib.ScoreMod(fn=_AlibiFn(bool(symmetric)), params=slopes, name='alibi')


# ----------------------------------------------------------------------------------------
# T5 bucketed relative position bias.
# ----------------------------------------------------------------------------------------


def t5_relative_position_bucket(relative_position: Any, *, bidirectional: bool = True,
                                num_buckets: int = 32,
                                max_distance: int = 128) -> jax.Array:
  """T5's bucket of relative_position = kv_idx - q_idx (Raffel et al., 2020).

  Exactly the T5 / Hugging Face `_relative_position_bucket`: half the buckets (per
  direction when bidirectional) hold exact distances, the rest are logarithmically
  spaced up to `max_distance` (farther positions share the last bucket). The
  logarithm is taken in float32 as there. int32, the shape of `relative_position`.
  """
  rel = jnp.asarray(relative_position).astype(jnp.int32)
  buckets = jnp.zeros(rel.shape, jnp.int32)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  is_small = rel < max_exact
  # max(rel, 1) keeps log finite where is_small picks the exact bucket anyway.
  ratio = jnp.maximum(rel, 1).astype(jnp.float32) / jnp.float32(max_exact)
  large = max_exact + (jnp.log(ratio) / jnp.float32(math.log(max_distance / max_exact))
                       * jnp.float32(num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, rel, large)


@dataclasses.dataclass(frozen=True)
class _T5Fn:
  num_buckets: int
  max_distance: int
  bidirectional: bool

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    del b
    bucket = t5_relative_position_bucket(
        jnp.asarray(kv_idx) - jnp.asarray(q_idx), bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    return score + _lookup(_select_head(params, h), bucket)


def t5_relative_bias(num_heads: int, *, num_buckets: int = 32, max_distance: int = 128,
                     bidirectional: bool = True, table: Any = None,
                     key: Any = None) -> problem_lib.ScoreMod:
  """T5 relative position bias: score + table[bucket(kv_idx - q_idx), h].

  "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
  (Raffel et al., JMLR 2020); bucket function `t5_relative_position_bucket`. `table`
  [num_buckets, N] is learnable (default: zeros, or N(0, 0.02^2) truncated at 2 std
  from `key`); `bidirectional=False` for decoder self-attention.
  """
  n = _check_int('num_heads', num_heads, 1)
  if not isinstance(bidirectional, (bool, np.bool_)):
    raise TypeError(
        f'bidirectional must be a bool, got {type(bidirectional).__name__}.')
  nb = _check_int('num_buckets', num_buckets, 4 if bidirectional else 2)
  max_exact = (nb // 2 if bidirectional else nb) // 2
  md = _check_int('max_distance', max_distance, 1)
  if md <= max_exact:
    raise ValueError(
        f'max_distance must exceed the exact buckets ({max_exact} for num_buckets='
        f'{nb}, bidirectional={bool(bidirectional)}), got {md}.')
  table = _init_table('table', table, key, (nb, n))
  return problem_lib.ScoreMod(fn=_T5Fn(nb, md, bool(bidirectional)), params=table,
                  name='t5_relative_bias')


# ----------------------------------------------------------------------------------------
# Clipped-distance tables: relative logits and generic distance biases.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DistanceFn:
  """score + table[clip(sign * (q_idx - kv_idx) - lo, 0, E - 1) (, h)]."""
  sign: int
  lo: int

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    del b
    dist = self.sign * (jnp.asarray(q_idx) - jnp.asarray(kv_idx))
    index = jnp.clip(dist - self.lo, 0, params.shape[0] - 1)
    if params.ndim == 1:
      return score + _lookup(params, index)
    return score + _lookup(_select_head(params, h), index)


def relative_logits(num_heads: int, max_distance: int, *, table: Any = None,
                    key: Any = None) -> problem_lib.ScoreMod:
  """Learned relative-position logits per clipped distance and head.

  Music Transformer (Huang et al., "Music Transformer", ICLR 2019) adds relative
  logits indexed by the distance kv_idx - q_idx, clipped to [-max_distance,
  max_distance] as in Shaw et al. ("Self-Attention with Relative Position
  Representations", 2018). A score_mod sees only the score, so this is the
  query-independent form: one learned scalar per (distance, head),
  score + table[clip(kv_idx - q_idx) + max_distance, h], table [2 max_distance + 1, N]
  (default zeros, or a truncated N(0, 0.02^2) from `key`).
  """
  n = _check_int('num_heads', num_heads, 1)
  md = _check_int('max_distance', max_distance, 1)
  table = _init_table('table', table, key, (2 * md + 1, n))
  return problem_lib.ScoreMod(fn=_DistanceFn(sign=-1, lo=-md), params=table,
                  name='relative_logits')


def distance_bias(table: Any, *, per_head: bool | None = None,
                  min_distance: int = 0) -> problem_lib.ScoreMod:
  """score + table[clip(q_idx - kv_idx - min_distance, 0, D - 1)] (per head: [., h]).

  A generic learned bias per query-key distance d = q_idx - kv_idx, as in the
  relative position schemes surveyed by Dufter et al. ("Position Information in
  Transformers: An Overview", 2022): row r holds distance min_distance + r and
  distances outside the table use its first / last row (clipped). The default
  min_distance=0 covers causal attention (d >= 0). `table` is [D] (shared by all heads)
  or [D, N] (per head); `per_head` defaults to table.ndim == 2 and must agree with it.
  """
  if not hasattr(table, 'shape') or not hasattr(table, 'dtype'):
    raise TypeError(f'table must be an array, got {type(table).__name__}.')
  if per_head is None:
    per_head = len(table.shape) == 2
  if not isinstance(per_head, (bool, np.bool_)):
    raise TypeError(f'per_head must be a bool or None, got {type(per_head).__name__}.')
  want = 2 if per_head else 1
  if len(table.shape) != want:
    raise ValueError(
        f'table must have rank {want} ({"[D, N]" if per_head else "[D]"} for '
        f'per_head={bool(per_head)}), got shape {tuple(table.shape)}.')
  if table.shape[0] < 1 or (per_head and table.shape[1] < 1):
    raise ValueError(f'table must be non-empty, got shape {tuple(table.shape)}.')
  table = _check_table('table', table, tuple(table.shape))
  if isinstance(min_distance, (bool, np.bool_)) or not isinstance(
      min_distance, (int, np.integer)):
    raise TypeError(f'min_distance must be an int, got {type(min_distance).__name__}.')
  return problem_lib.ScoreMod(fn=_DistanceFn(sign=1, lo=int(min_distance)), params=table,
                  name='distance_bias')


# ----------------------------------------------------------------------------------------
# Swin 2D relative position bias.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Relative2DFn:
  height: int
  width: int

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    del b
    q_idx, kv_idx = jnp.asarray(q_idx), jnp.asarray(kv_idx)
    hh, ww = self.height, self.width
    dy = q_idx // ww - kv_idx // ww + (hh - 1)  # in [0, 2H - 1) on the grid
    dx = q_idx % ww - kv_idx % ww + (ww - 1)  # in [0, 2W - 1)
    index = jnp.clip(dy, 0, 2 * hh - 2) * (2 * ww - 1) + jnp.clip(dx, 0, 2 * ww - 2)
    return score + _lookup(_select_head(params, h), index)


def relative_bias_2d(grid_hw: Sequence[int], num_heads: int, *, table: Any = None,
                     key: Any = None) -> problem_lib.ScoreMod:
  """Swin 2D relative position bias: score + table[(dy, dx), h].

  "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et
  al., ICCV 2021): tokens are raster positions p = y * W + x of an (H, W) grid (q_idx
  and kv_idx < H * W), dy = y_q - y_k + H - 1, dx = x_q - x_k + W - 1, and the row is
  dy * (2W - 1) + dx of `table` [(2H - 1)(2W - 1), N] (default zeros, or a truncated
  N(0, 0.02^2) from `key`, Swin's init). Positions beyond the grid are clipped to it.
  """
  if not isinstance(grid_hw, (tuple, list)) or len(grid_hw) != 2:
    raise ValueError(f'grid_hw must be a pair (H, W), got {grid_hw!r}.')
  height = _check_int('grid_hw[0]', grid_hw[0], 1)
  width = _check_int('grid_hw[1]', grid_hw[1], 1)
  n = _check_int('num_heads', num_heads, 1)
  table = _init_table('table', table, key, ((2 * height - 1) * (2 * width - 1), n))
  return problem_lib.ScoreMod(fn=_Relative2DFn(height, width), params=table,
                  name='relative_bias_2d')


# ----------------------------------------------------------------------------------------
# Logit transforms and composition.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SoftCapFn:
  cap: float

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    del params, b, h, q_idx, kv_idx
    cap = jnp.asarray(self.cap, score.dtype)
    return cap * jnp.tanh(score / cap)


def soft_cap(cap: float) -> problem_lib.ScoreMod:
  """Logit soft-capping cap * tanh(score / cap) (Gemma 2, Gemma Team 2024).

  The same transform as `logits_soft_cap=`, usable at any point of a `compose` chain
  (e.g. after a bias, where `logits_soft_cap` applies before it).
  """
  if isinstance(cap, (bool, np.bool_)) or not isinstance(
      cap, (int, float, np.integer, np.floating)):
    raise TypeError(f'cap must be a positive number, got {type(cap).__name__}.')
  if not np.isfinite(cap) or cap <= 0:
    raise ValueError(f'cap must be positive and finite, got {cap}.')
  return problem_lib.ScoreMod(fn=_SoftCapFn(float(cap)), params=(), name='soft_cap')


@dataclasses.dataclass(frozen=True)
class _ComposeFn:
  fns: tuple[Any, ...]

  def __call__(self, params, score, b, h, q_idx, kv_idx):
    for fn, p in zip(self.fns, params):
      score = fn(p, score, b, h, q_idx, kv_idx)
    return score


def compose(*mods: Any) -> problem_lib.ScoreMod:
  """The score_mod applying `mods` left to right: compose(f, g)(s) = g(f(s), ...).

  Each mod is a `ScoreMod` or a plain fn(score, b, h, q_idx, kv_idx) (converted with
  `kernels.problem.as_score_mod`, closed-over arrays becoming params); the result's
  params are the tuple of theirs.
  """
  if not mods:
    raise ValueError('mods must hold at least one score_mod, got none.')
  converted = []
  for i, mod in enumerate(mods):
    if not isinstance(mod, problem_lib.ScoreMod) and not callable(mod):
      raise TypeError(f'mods[{i}] must be a ScoreMod or a callable, got '
                      f'{type(mod).__name__}.')
    converted.append(problem_lib.as_score_mod(mod))
  return problem_lib.ScoreMod(fn=_ComposeFn(tuple(m.fn for m in converted)),
                  params=tuple(m.params for m in converted),
                  name='+'.join(m.name for m in converted))
