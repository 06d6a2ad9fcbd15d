"""Closed-form in-context predictors compared with the trained attention model.

All from He, Pan, Chen, Yang, "In-Context Linear Regression Demystified" (ICML 2025,
arXiv 2503.12734), Sections 3-5. Every predictor takes the covariates x [B, L, d],
labels y [B, L] (one task), the query x_q [B, d] and an optional validity mask
[B, L] (True = this context example exists), so prompts of several lengths can be
evaluated from one padded batch; masked examples contribute nothing and L counts the
valid examples only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prepare(x, y, xq, mask):
  if x.ndim != 3:
    raise ValueError(f'x must have shape [B, L, d], got {tuple(x.shape)}.')
  b, l, d = x.shape
  if y.shape != (b, l):
    raise ValueError(f'y must have shape {(b, l)} [B, L], got {tuple(y.shape)}.')
  if xq.shape != (b, d):
    raise ValueError(f'xq must have shape {(b, d)} [B, d], got '
                     f'{tuple(xq.shape)}.')
  if mask is None:
    mask = jnp.ones((b, l), bool)
  elif mask.shape != (b, l) or mask.dtype != jnp.bool_:
    raise ValueError(f'mask must be a bool array of shape {(b, l)}, got '
                     f'{mask.dtype} {tuple(mask.shape)}.')
  m = mask.astype(x.dtype)
  count = jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B]
  return x * m[..., None], y * m, m, count


def reduced_multihead(x, y, xq, omega, mu, mask=None):
  """y_hat = sum_h mu_h sum_i y_i softmax_i(omega_h x_i^T x_q): the multi-head model
  with KQ_h = omega_h I (effective, scale included) and OV_h = mu_h e_{d+1}^T."""
  x, y, m, _ = _prepare(x, y, xq, mask)
  if omega.ndim != 1 or omega.shape != mu.shape:
    raise ValueError(f'omega and mu must be vectors [H] of equal length, got '
                     f'{tuple(omega.shape)} and {tuple(mu.shape)}.')
  s = jnp.einsum('bli,bi->bl', x, xq)  # [B, L]
  logits = omega[None, :, None] * s[:, None, :]  # [B, H, L]
  logits = jnp.where(m[:, None, :] > 0, logits, -jnp.inf)
  p = jax.nn.softmax(logits, axis=-1)  # [B, H, L]
  return jnp.einsum('bhl,bl,h->b', p, y, mu)


def gd(x, y, xq, eta, mask=None):
  """One step of GD from zero on the in-context least squares: (eta / L) sum_i y_i
  x_i^T x_q (the paper's GD with eta = 2 omega mu)."""
  x, y, _, count = _prepare(x, y, xq, mask)
  return eta * jnp.einsum('bl,bli,bi->b', y, x, xq) / count


def debiased_gd(x, y, xq, eta, mask=None, precond=None):
  """(eta / L) sum_i y_i (x_i - xbar)^T P x_q, P = I or `precond` [d, d]: what a
  (+omega, +mu), (-omega, -mu) head pair implements to first order in omega."""
  x, y, m, count = _prepare(x, y, xq, mask)
  xbar = jnp.sum(x, axis=1) / count[:, None]  # [B, d]
  xc = (x - xbar[:, None, :]) * m[..., None]  # [B, L, d]
  q = xq if precond is None else jnp.einsum('ij,bj->bi', precond, xq)
  return eta * jnp.einsum('bl,bli,bi->b', y, xc, q) / count


def ridge(x, y, xq, sigma2, d_scale, mask=None):
  """x_q^T (X X^T + lambda I)^{-1} X y with lambda = sigma2 * d_scale: the posterior
  mean (Bayes-optimal) for beta ~ N(0, I / d_scale), noise variance sigma2."""
  x, y, _, _ = _prepare(x, y, xq, mask)
  d = x.shape[-1]
  gram = jnp.einsum('bli,blj->bij', x, x)  # [B, d, d]
  gram = gram + (sigma2 * d_scale) * jnp.eye(d, dtype=x.dtype)
  rhs = jnp.einsum('bli,bl->bi', x, y)  # [B, d]
  beta = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
  return jnp.einsum('bi,bi->b', beta, xq)


def single_head_features(x, y, xq, omega, mask=None):
  """sum_i y_i softmax_i(omega x_i^T x_q): a single head's output before mu."""
  return reduced_multihead(x, y, xq, jnp.asarray([omega], x.dtype),
                           jnp.ones((1,), x.dtype), mask)


def optimal_scale(features, target):
  """argmin_c mean((c f - y)^2) = <f, y> / <f, f> (least squares, one coefficient)."""
  if features.shape != target.shape or features.ndim != 1:
    raise ValueError(f'features and target must be equal-length vectors, got '
                     f'{tuple(features.shape)} and {tuple(target.shape)}.')
  return jnp.sum(features * target) / jnp.maximum(
      jnp.sum(features * features), jnp.finfo(features.dtype).tiny)
