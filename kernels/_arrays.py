"""Small array helpers shared by the xla and Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_axis(x: jax.Array, axis: int, length: int, value=0) -> jax.Array:
  """Pads `axis` of `x` at the end up to `length` with `value` (no-op if equal)."""
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)
