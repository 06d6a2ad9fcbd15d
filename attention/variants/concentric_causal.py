"""Concentric causal attention (CCA) for 2D image tokens in a causal decoder.

"Mitigating Object Hallucination via Concentric Causal Attention" (Xing et al.,
NeurIPS 2024). The H x W visual tokens of an LVLM (row-major, between a text prefix
and a text suffix) are re-indexed ring by ring from the border to the centre:

    ring(i, j) = min(i, j, H - 1 - i, W - 1 - j)           R = ceil(min(H, W) / 2)

* Position ids (for RoPE): prefix tokens 0 .. P - 1, visual token (i, j) at
  P + ring(i, j) (every token of a ring shares a position), suffix tokens from
  P + R on, so the visual block spans R positions instead of H W and the centre of
  the image sits closest to the instruction tokens.
* The 2D causal mask: a visual query in ring r sees the visual keys of rings <= r
  (its own ring included, whatever their raster order); every other pair follows the
  plain causal rule k <= q on the sequence (prefix before the image is visible to
  it, the suffix sees everything before it, nothing sees the future text).

This is the rule of the released code (cca-llava: `concentric_pos`, and the mask
that opens (q, k) for ring(k) <= ring(q) inside the image block). The tokens keep
their raster order in the sequence; `concentric_order` gives the ring-major order
(border first, raster order inside a ring) for a physical re-indexing, under which
the visual part of the mask is block-causal over rings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from attention import _checks
from attention import api as attention_api
from attention.masks import base
from attention.routing import seer_attention


def _int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  if value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value}.')
  return int(value)


def _check_grid(grid: Any) -> tuple[int, int]:
  if not isinstance(grid, (tuple, list)) or len(grid) != 2:
    raise ValueError(f'grid must be a 2D token grid (H, W), got {grid!r}.')
  return tuple(_int(f'grid[{i}]', g, 1) for i, g in enumerate(grid))


def num_rings(grid: Sequence[int]) -> int:
  """R = ceil(min(H, W) / 2), the number of concentric rings."""
  h, w = _check_grid(grid)
  return (min(h, w) + 1) // 2


def ring_index(grid: Sequence[int]) -> np.ndarray:
  """int64 [H W]: ring(i, j) = min(i, j, H-1-i, W-1-j) in row-major token order
  (0 = the border, R - 1 = the centre)."""
  h, w = _check_grid(grid)
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  ring = np.minimum(np.minimum(i, j), np.minimum(h - 1 - i, w - 1 - j))
  return ring.reshape(-1).astype(np.int64)


def concentric_order(grid: Sequence[int]) -> np.ndarray:
  """int64 [H W]: the ring-major order, border ring first, raster order within a
  ring; perm[p] is the row-major index of the token at position p (the
  `attention.masks.apply_permutation` convention)."""
  return np.argsort(ring_index(grid), kind='stable').astype(np.int64)


def position_ids(grid: Sequence[int], prefix_len: int = 0, suffix_len: int = 0
                 ) -> np.ndarray:
  """int64 [P + H W + S]: CCA position ids (prefix, P + ring, then P + R + j)."""
  p = _int('prefix_len', prefix_len, 0)
  s = _int('suffix_len', suffix_len, 0)
  return np.concatenate([np.arange(p), p + ring_index(grid),
                         p + num_rings(grid) + np.arange(s)]).astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class ConcentricCausal(base.Mask):
  """CCA's mask over [prefix (P), H x W visual tokens (row-major), suffix (S)].

  Visual q, visual k: ring(k) <= ring(q); any other pair: k <= q.
  """
  grid: tuple[int, int]
  prefix_len: int = 0
  suffix_len: int = 0

  def __post_init__(self):
    object.__setattr__(self, 'grid', _check_grid(self.grid))
    _int('prefix_len', self.prefix_len, 0)
    _int('suffix_len', self.suffix_len, 0)

  @property
  def shape(self):
    t = self.prefix_len + self.grid[0] * self.grid[1] + self.suffix_len
    return (t, t)

  def _predicate(self, q, k, h):
    p, n = self.prefix_len, self.grid[0] * self.grid[1]
    ring = ring_index(self.grid)
    q_img = (q >= p) & (q < p + n)
    k_img = (k >= p) & (k < p + n)
    rq = ring[np.clip(q - p, 0, n - 1)]
    rk = ring[np.clip(k - p, 0, n - 1)]
    return np.where(q_img & k_img, rk <= rq, k <= q)


def concentric_causal(grid: Sequence[int], prefix_len: int = 0,
                      suffix_len: int = 0) -> ConcentricCausal:
  """The CCA mask; see `ConcentricCausal`."""
  return ConcentricCausal(_check_grid(grid), _int('prefix_len', prefix_len, 0),
                          _int('suffix_len', suffix_len, 0))


def concentric_causal_attention(query: jax.Array, key: jax.Array,
                                value: jax.Array, *, grid: Sequence[int],
                                prefix_len: int = 0, suffix_len: int = 0,
                                rope_base: float | None = 10000.0,
                                implementation: str | None = None) -> jax.Array:
  """Decoder attention over [prefix, image, suffix] with CCA positions and mask.

  query [B, T, N, H], key / value [B, T, K, H(_v)], T = P + H_g W_g + S. RoPE
  (rotate-half, RoFormer) at `position_ids` when `rope_base` is not None, then
  softmax attention under `concentric_causal`. Returns [B, T, N, H_v].
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('key', key, ndim=4, floating=True)
  mask = concentric_causal(grid, prefix_len, suffix_len)
  t = mask.shape[0]
  if query.shape[1] != t or key.shape[1] != t:
    raise ValueError(f'query and key length must be prefix_len + H * W + '
                     f'suffix_len = {t}, got {query.shape[1]} and {key.shape[1]}.')
  if rope_base is not None:
    _checks.check_positive('rope_base', rope_base, allow_none=False)
    pos = jax.numpy.asarray(position_ids(grid, prefix_len, suffix_len))
    query = seer_attention.rope(query, pos, rope_base).astype(query.dtype)
    key = seer_attention.rope(key, pos, rope_base).astype(key.dtype)
  return attention_api.dot_product_attention(query, key, value, mask=mask,
                                             implementation=implementation)


__all__ = ['ConcentricCausal', 'concentric_causal', 'concentric_causal_attention',
           'concentric_order', 'num_rings', 'position_ids', 'ring_index']
