"""Record and replace (Prompt-to-Prompt) and head-output activation patching.

- "Prompt-to-Prompt Image Editing with Cross Attention Control" (Hertz et al., ICLR
  2023): record chosen heads' probability maps in a source run (`Record(probs=True)`)
  and, in a target run, replace those maps by them (`ReplaceProbs`); or re-weight
  key columns by factors c_j and renormalise, A'_ij = A_ij c_j / sum_k A_ik c_k
  (`ReweightColumns`; a row whose re-weighted mass is 0 gives zeros).
- Activation patching ("Circuit Component Reuse Across Tasks in Transformer Language
  Models", Merullo et al. 2024, and the circuits literature): run clean and corrupted
  inputs; in the corrupted run replace head (l, h)'s output by its clean-run output
  (`PatchHeadOutputs`, optionally only at chosen query positions); the effect is the
  recovered fraction of the clean-vs-corrupted logit difference (`patching_effect`).

Blocked forms: re-weighting is softmax(logits + log c_j) (an elementwise logit edit,
valid before any other probability edit); patching edits the O(T) output.
Replacing whole maps needs them dense (no blocked form).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attention.interventions import base

__all__ = ['PatchHeadOutputs', 'ReplaceProbs', 'ReweightColumns', 'patching_effect',
           'reweight_columns']


def reweight_columns(probs: jax.Array, c: jax.Array) -> jax.Array:
  """A_ij c_j / sum_k A_ik c_k for probs [B, N, T, S], c [S] or [B, S] (zero rows: 0)."""
  cb = c[None, None, None, :] if c.ndim == 1 else c[:, None, None, :]
  w = probs * cb.astype(probs.dtype)
  z = jnp.sum(w, axis=-1, keepdims=True)
  return w / jnp.where(z > 0, z, 1.0)


def patching_effect(clean_diff, corrupt_diff, patched_diff):
  """Recovered fraction (patched - corrupt) / (clean - corrupt), elementwise.

  The arguments are logit differences (e.g. correct minus wrong answer) of the clean,
  corrupted and patched runs; 1 = fully recovered, 0 = no effect. Where clean ==
  corrupt there is nothing to recover and the result is 0.
  """
  clean, corrupt, patched = (jnp.asarray(x, jnp.float32)
                             for x in (clean_diff, corrupt_diff, patched_diff))
  denom = clean - corrupt
  return jnp.where(denom != 0, (patched - corrupt) / jnp.where(denom != 0, denom, 1.0),
                   0.0)


def _check_float(name, x, shape):
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or not jnp.issubdtype(
      x.dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating array, got '
                    f'{getattr(x, "dtype", type(x).__name__)}.')
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(x.shape)}.')


@dataclasses.dataclass(frozen=True, eq=False)
class ReplaceProbs(base.Intervention):
  """Selected heads' maps <- `maps`: [B, N, T, S], or [len(layers), B, N, T, S] (one
  per selected layer, in the order of `layers`)."""
  maps: jax.Array | None = base.array_field()

  stage = 'probs'
  blocked = None

  def __post_init__(self):
    super().__post_init__()
    if self.maps is None or not hasattr(self.maps, 'ndim') or self.maps.ndim not in (
        4, 5):
      raise ValueError('maps must be an array [B, N, T, S] or [L, B, N, T, S], got '
                       f'{getattr(self.maps, "shape", self.maps)}.')
    if self.maps.ndim == 5 and (self.layers is None or
                                len(self.layers) != self.maps.shape[0]):
      raise ValueError(f'maps [L, B, N, T, S] needs layers with L = '
                       f'{self.maps.shape[0]} entries, got layers={self.layers}.')

  def _map(self, layer: int) -> jax.Array:
    return self.maps if self.maps.ndim == 4 else self.maps[self.layers.index(layer)]

  def check_shapes(self, site, shapes):
    _check_float('maps', self._map(site.layer),
                 (shapes['B'], shapes['N'], shapes['T'], shapes['S']))

  def edit_probs(self, probs, site):
    return self.select_heads(self._map(site.layer).astype(probs.dtype), probs, axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class ReweightColumns(base.Intervention):
  """A'_ij = A_ij c_j / sum_k A_ik c_k on the selected heads; c [S] or [B, S], >= 0."""
  c: jax.Array | None = base.array_field()

  stage = 'probs'
  blocked = 'logit_mod'

  def __post_init__(self):
    super().__post_init__()
    if self.c is None:
      raise ValueError('c (key weights [S] or [B, S]) is required.')
    try:
      arr = np.asarray(self.c)
    except jax.errors.TracerArrayConversionError:
      return  # traced (built under jit): checked by shape only
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(
        np.isfinite(arr)) or np.any(arr < 0):
      raise ValueError('c must be a floating array of finite values >= 0, got '
                       f'{arr.dtype}{list(arr.shape)}.')

  def check_shapes(self, site, shapes):
    if self.c.ndim == 1:
      _check_float('c', self.c, (shapes['S'],))
    else:
      _check_float('c', self.c, (shapes['B'], shapes['S']))

  def edit_probs(self, probs, site):
    return self.select_heads(reweight_columns(probs, self.c), probs, axis=1)

  def logit_mod(self, score, b, h, q_idx, kv_idx, num_heads):
    c = self.c[kv_idx] if self.c.ndim == 1 else self.c[b, kv_idx]
    logc = jnp.log(c.astype(score.dtype))  # c = 0 -> -inf
    return jnp.where(self.head_selected(h, num_heads), score + logc, score)


@dataclasses.dataclass(frozen=True, eq=False)
class PatchHeadOutputs(base.Intervention):
  """Selected heads' outputs <- `outputs` [B, T, N, Hv] (a clean run's head outputs),
  at the query positions where `positions` [B, T] bool is True (None: all)."""
  outputs: jax.Array | None = base.array_field()
  positions: jax.Array | None = base.array_field()

  stage = 'output'
  blocked = 'output'

  def __post_init__(self):
    super().__post_init__()
    if self.outputs is None:
      raise ValueError('outputs [B, T, N, Hv] (the clean run\'s head outputs) is '
                       'required.')

  def check_shapes(self, site, shapes):
    b, t = shapes['B'], shapes['T']
    _check_float('outputs', self.outputs, (b, t, shapes['N'], shapes['Hv']))
    if self.positions is not None:
      if self.positions.dtype != jnp.bool_ or tuple(self.positions.shape) != (b, t):
        raise ValueError(f'positions must be a bool array [B, T] = {(b, t)}, got '
                         f'{self.positions.dtype}{list(self.positions.shape)}.')

  def edit_output(self, out, site):
    new = self.outputs.astype(out.dtype)
    if self.positions is not None:
      new = jnp.where(self.positions[:, :, None, None], new, out)
    return self.select_heads(new, out, axis=2)
