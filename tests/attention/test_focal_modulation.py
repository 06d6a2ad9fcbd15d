"""Focal modulation against a direct float64 implementation of the paper's equations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention import focal_modulation as fm


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape))


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def numpy_dwconv(x, kern, grid):
  b, t, c = x.shape
  hh, ww = grid
  k = kern.shape[0]
  xp = np.pad(x.reshape(b, hh, ww, c), ((0, 0), (k // 2,) * 2, (k // 2,) * 2,
                                        (0, 0)))
  out = sum(kern[dy, dx] * xp[:, dy:dy + hh, dx:dx + ww]
            for dy in range(k) for dx in range(k))
  return out.reshape(b, t, c)


def numpy_focal(q, ctx, gates, kernels, w_h, b_h, grid, normalize=False):
  q, z, gates, w_h, b_h = (np.asarray(a) for a in (q, ctx, gates, w_h, b_h))
  total = 0
  for l, kern in enumerate(kernels):
    z = _gelu(numpy_dwconv(z, np.asarray(kern), grid))
    total = total + z * gates[..., l:l + 1]
  total = total + _gelu(z.mean(1, keepdims=True)) * gates[..., len(kernels):]
  if normalize:
    total = total / (len(kernels) + 1)
  return q * (total @ w_h + b_h)


@pytest.mark.parametrize('normalize', [False, True])
def test_matches_direct_equations_and_gradients(normalize):
  rng = np.random.default_rng(0)
  grid, c = (3, 4), 5
  q, ctx, gates = _rand(rng, 2, 12, c), _rand(rng, 2, 12, c), _rand(rng, 2, 12, 3)
  kernels = [_rand(rng, 3, 3, c), _rand(rng, 5, 5, c)]
  w_h, b_h = _rand(rng, c, c), _rand(rng, c)
  got = fm.focal_modulation(q, ctx, gates, kernels, w_h, grid, modulator_bias=b_h,
                            normalize=normalize)
  np.testing.assert_allclose(
      got, numpy_focal(q, ctx, gates, kernels, w_h, b_h, grid, normalize),
      atol=1e-12)
  w = _rand(rng, *got.shape)
  f = lambda q, ctx, gates, k0, k1, w_h: jnp.sum(fm.focal_modulation(
      q, ctx, gates, [k0, k1], w_h, grid, normalize=normalize) * w)
  args = (q, ctx, gates, *kernels, w_h)
  grads = jax.jit(jax.grad(f, range(6)))(*args)
  eps = 1e-6
  d = [_rand(rng, *a.shape) for a in args]
  fd = (f(*(a + eps * da for a, da in zip(args, d))) -
        f(*(a - eps * da for a, da in zip(args, d)))) / (2 * eps)
  np.testing.assert_allclose(sum(jnp.sum(g * da) for g, da in zip(grads, d)), fd,
                             rtol=1e-6)


def test_kernel_schedule_and_1d_grid():
  assert fm.focal_kernel_sizes(3) == (3, 5, 7)
  assert fm.focal_kernel_sizes(2, 5, 4) == (5, 9)
  rng = np.random.default_rng(1)
  q, ctx, gates = _rand(rng, 1, 7, 2), _rand(rng, 1, 7, 2), _rand(rng, 1, 7, 2)
  kern = _rand(rng, 3, 2)
  got = fm.focal_modulation(q, ctx, gates, [kern], jnp.eye(2), (7,))
  zp = np.pad(np.asarray(ctx), ((0, 0), (1, 1), (0, 0)))
  z = _gelu(sum(np.asarray(kern)[o] * zp[:, o:o + 7] for o in range(3)))
  total = z * gates[..., :1] + _gelu(z.mean(1, keepdims=True)) * gates[..., 1:]
  np.testing.assert_allclose(got, q * total, atol=1e-12)


def test_layer_composes_and_trains():
  grid = (3, 3)
  layer = fm.FocalModulation(6, grid=grid, rngs=nnx.Rngs(0))
  x = _rand(np.random.default_rng(2), 2, 9, 6)
  f = np.asarray(x) @ np.asarray(layer.w_f[...]) + np.asarray(layer.b_f[...])
  q, ctx, gates = f[..., :6], f[..., 6:12], f[..., 12:]
  y = numpy_focal(q, ctx, gates, [k[...] for k in layer.kernels], layer.w_h[...],
                  layer.b_h[...], grid)
  np.testing.assert_allclose(layer(x), y @ np.asarray(layer.w_o[...]) +
                             np.asarray(layer.b_o[...]), atol=1e-10)
  graphdef, params = nnx.split(layer, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)))(
      params)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0)
             for g in jax.tree.leaves(grads))


def test_bad_inputs():
  rng = np.random.default_rng(3)
  q = _rand(rng, 1, 4, 2)
  g = _rand(rng, 1, 4, 2)
  k = [_rand(rng, 3, 3, 2)]
  with pytest.raises(ValueError, match='gates'):
    fm.focal_modulation(q, q, q[..., :1], k, jnp.eye(2), (2, 2))
  with pytest.raises(ValueError, match='context'):
    fm.focal_modulation(q, q[:, :3], g, k, jnp.eye(2), (2, 2))
  with pytest.raises(ValueError, match=r'kernels\[0\]'):
    fm.focal_modulation(q, q, g, [_rand(rng, 3, 2)], jnp.eye(2), (2, 2))
  with pytest.raises(ValueError, match='kernels\\[0\\] size'):
    fm.focal_modulation(q, q, g, [_rand(rng, 2, 2, 2)], jnp.eye(2), (2, 2))
  with pytest.raises(ValueError, match='modulator_weight'):
    fm.focal_modulation(q, q, g, k, jnp.eye(3), (2, 2))
  with pytest.raises(ValueError, match='grid'):
    fm.focal_modulation(q, q, g, k, jnp.eye(2), (3, 2))
  with pytest.raises(ValueError, match='focal_factor'):
    fm.focal_kernel_sizes(2, 3, 1)
  with pytest.raises(ValueError, match='focal_window'):
    fm.focal_kernel_sizes(2, 4)
  with pytest.raises(ValueError, match='x must'):
    fm.FocalModulation(6, grid=(3, 3), rngs=nnx.Rngs(0))(_rand(rng, 1, 9, 5))
