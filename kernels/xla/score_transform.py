"""The logit transform of the xla passes: soft-cap, then score_mod, and their VJPs.

Both xla implementations (`blocked`, static block lists; `dynamic`, traced lists)
compute a tile's raw logits z = (alpha q) k^T, alpha = scale / soft_cap with a cap
(else scale), and then the same chain

  s = score_mod(soft_cap * tanh(z) if soft_cap else z, b, h, q_idx, kv_idx)

before adding the bias and masking. This module holds that chain, its backward
(d s -> d z and the score_mod's float-param gradients) and the plumbing of those
param gradients through `jax.custom_vjp`, so that the two passes cannot drift apart
(a param-free, non-additive score_mod once had a wrong backward in both).
Soft-capping as in Gemma 2 (Gemma Team, 2024); score_mod as in FlexAttention (Dong
et al., 2024).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels import problem as problem_lib

Index = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
ModVjp = Callable[[jax.Array], tuple[jax.Array, list[jax.Array]]]


def apply_mod(mod: problem_lib.ScoreMod, params, s: jax.Array,
              index: Index) -> jax.Array:
  """mod(s, *index) with `params`, in s's dtype and shape."""
  out = mod.fn(params, s, *index)
  return jnp.broadcast_to(jnp.asarray(out).astype(s.dtype), s.shape)


def float_leaves(params) -> tuple[list[Any], Any, list[int]]:
  """(leaves, treedef, positions of the floating leaves) of score_mod params."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  diff = [i for i, x in enumerate(leaves)
          if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return leaves, treedef, diff


def mod_with_vjp(mod: problem_lib.ScoreMod, s: jax.Array, index: Index,
                 with_params: bool = True) -> tuple[jax.Array, ModVjp]:
  """(mod(s), vjp: ds -> (d s_pre, [d float params])) of one tile.

  Without `with_params` the vjp is taken w.r.t. the score only (its param list is
  empty): every backward needs d mod / d score, which is 1 only for additive mods.
  """
  leaves, treedef, diff = float_leaves(mod.params)
  if not with_params:
    diff = []

  def f(s, floats):
    full = list(leaves)
    for i, x in zip(diff, floats):
      full[i] = x
    return apply_mod(mod, jax.tree_util.tree_unflatten(treedef, full), s, index)

  out, vjp = jax.vjp(f, s, [leaves[i] for i in diff])
  return out, vjp


def transform(z: jax.Array, soft_cap: float | None,
              mod: problem_lib.ScoreMod | None, index: Callable[[], Index], *,
              mod_vjp: bool = False, mod_params: bool = False
             ) -> tuple[jax.Array, jax.Array | None, ModVjp | None]:
  """(s, tanh(z) or None, the score_mod's VJP or None) of raw tile logits z.

  Args:
    z: raw logits of a tile, any layout.
    soft_cap: s = soft_cap * tanh(z) before the score_mod (None: s = z).
    mod: the score_mod, or None.
    index: () -> (b, h, q_idx, kv_idx) broadcasting against z (called only with a
      score_mod).
    mod_vjp: also return the score_mod's VJP (backward passes).
    mod_params: the VJP also gives the mod's float-param gradients.
  """
  tanh = None
  s = z
  if soft_cap is not None:
    tanh = jnp.tanh(z)
    s = soft_cap * tanh
  vjp = None
  if mod is not None:
    if mod_vjp:
      s, vjp = mod_with_vjp(mod, s, index(), mod_params)
    else:
      s = apply_mod(mod, mod.params, s, index())
  return s, tanh, vjp


def transform_vjp(ds: jax.Array, soft_cap: float | None, tanh: jax.Array | None,
                  vjp: ModVjp | None, dmod: list[jax.Array] | None
                 ) -> tuple[jax.Array, list[jax.Array] | None]:
  """(d z, dmod + this tile's float-param gradients) from d s of `transform`.

  `dmod` (None when the params' gradients are not needed) accumulates across tiles.
  """
  if vjp is not None:  # d mod / d score is 1 only for additive mods
    ds, d_floats = vjp(ds)
    if dmod is not None:
      dmod = [a + g.astype(a.dtype) for a, g in zip(dmod, d_floats)]
  dz = ds if tanh is None else ds * (soft_cap * (1.0 - tanh * tanh))
  return dz, dmod


def zero_float_grads(mod: problem_lib.ScoreMod) -> list[jax.Array]:
  """Zero accumulators for the score_mod's float params (`transform_vjp`'s dmod)."""
  leaves, _, diff = float_leaves(mod.params)
  return [jnp.zeros(jnp.shape(leaves[i]), jnp.result_type(leaves[i])) for i in diff]


def mod_cotangent(mod: problem_lib.ScoreMod | None,
                  dfloats: list[jax.Array] | None
                 ) -> problem_lib.ScoreMod | None:
  """The custom_vjp cotangent of `mod`: float params get `dfloats`, ints float0.

  dfloats None (the params' gradients were not needed) gives zeros.
  """
  if mod is None:
    return None
  leaves, treedef, diff = float_leaves(mod.params)
  grads = [np.zeros(np.shape(x), jax.dtypes.float0) for x in leaves]
  for j, i in enumerate(diff):
    grads[i] = (jnp.zeros(jnp.shape(leaves[i]), jnp.result_type(leaves[i]))
                if dfloats is None else dfloats[j])
  return dataclasses.replace(mod, params=jax.tree_util.tree_unflatten(treedef,
                                                                      grads))


def softmax_backward_rows(out: jax.Array, d_out: jax.Array, lse: jax.Array,
                          d_lse: jax.Array | None, cdt, precision
                         ) -> tuple[jax.Array, jax.Array]:
  """(delta, safe lse) [B, N, T] of the flash backward, in `cdt`.

  delta = rowsum(dO * O) - d lse; lse -inf (rows that see no key) becomes +inf so
  that their recomputed probabilities exp(s - lse) are 0, not NaN.
  """
  delta = jnp.einsum('btnv,btnv->bnt', d_out.astype(cdt), out.astype(cdt),
                     precision=precision)  # [B, N, T]
  if d_lse is not None:
    delta = delta - d_lse.astype(cdt)
  lse = lse.astype(cdt)
  return delta, jnp.where(lse == -jnp.inf, jnp.inf, lse)
