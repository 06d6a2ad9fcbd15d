"""kernels._arrays.pad_axis against np.pad."""

import jax.numpy as jnp
import numpy as np

from kernels import _arrays


def test_pad_axis_matches_numpy():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  got = _arrays.pad_axis(jnp.asarray(x), 1, 7, value=-1)
  np.testing.assert_array_equal(got, np.pad(x, ((0, 0), (0, 3)), constant_values=-1))
  assert _arrays.pad_axis(jnp.asarray(x), 0, 3).shape == (3, 4)
