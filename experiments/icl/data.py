"""In-context linear regression prompts.

Data model of "In-Context Linear Regression Demystified: Training Dynamics and
Mechanistic Interpretability of Multi-Head Softmax Attention" (He, Pan, Chen, Yang;
ICML 2025, arXiv 2503.12734), Section 2:

  x_l, x_q ~ N(0, Sigma),  Sigma_ij = rho^|i - j|  (rho = 0: isotropic),
  beta ~ N(0, I_d / d)  (single task),  y = beta^T x + eps,  eps ~ N(0, sigma^2).

Tokens are z_l = (x_l, y_l) in R^{d+1} and the query token is z_q = (x_q, 0). In the
multi-task extension each task k reads a coordinate window of x with its own
beta_k ~ N(0, I) and the token carries every label: z_l = (x_l, y_l^1, ..., y_l^T).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
  """A prompt distribution (hashable, usable as a static jit argument).

  Attributes:
    d: covariate dimension.
    sigma2: label noise variance.
    rho: covariance decay, Sigma_ij = rho^|i-j|, in [0, 1).
    windows: per task, the [start, stop) coordinate window of x its beta reads.
      `None` means the single task of the paper's main setting (window [0, d) and
      beta ~ N(0, I_d / d)); otherwise multi-task with beta_k ~ N(0, I).
  """
  d: int
  sigma2: float
  rho: float = 0.0
  windows: tuple[tuple[int, int], ...] | None = None

  def __post_init__(self):
    if isinstance(self.d, bool) or not isinstance(self.d, (int, np.integer)):
      raise TypeError(f'd must be an int, got {type(self.d).__name__}.')
    if self.d < 1:
      raise ValueError(f'd must be >= 1, got {self.d}.')
    if not np.isfinite(self.sigma2) or self.sigma2 < 0:
      raise ValueError(f'sigma2 must be finite and >= 0, got {self.sigma2}.')
    if not np.isfinite(self.rho) or not 0.0 <= self.rho < 1.0:
      raise ValueError(f'rho must be in [0, 1), got {self.rho}.')
    if self.windows is not None:
      if not self.windows:
        raise ValueError('windows must be None or a non-empty tuple of '
                         f'(start, stop), got {self.windows!r}.')
      for w in self.windows:
        if (len(w) != 2 or not 0 <= w[0] < w[1] <= self.d):
          raise ValueError(
              f'each window must be (start, stop) with 0 <= start < stop <= d '
              f'= {self.d}, got {w!r} in windows={self.windows!r}.')

  @property
  def num_tasks(self) -> int:
    return 1 if self.windows is None else len(self.windows)

  @property
  def token_dim(self) -> int:
    """D = d + number of labels."""
    return self.d + self.num_tasks

  def covariance(self) -> np.ndarray:
    """Sigma [d, d] (float64)."""
    idx = np.arange(self.d)
    return self.rho ** np.abs(idx[:, None] - idx[None, :]).astype(np.float64)

  def beta_mask(self) -> np.ndarray:
    """[T, d] float: 1 where task t's beta reads coordinate i."""
    if self.windows is None:
      return np.ones((1, self.d), np.float32)
    m = np.zeros((self.num_tasks, self.d), np.float32)
    for t, (a, b) in enumerate(self.windows):
      m[t, a:b] = 1.0
    return m

  def beta_scale(self) -> float:
    return 1.0 / np.sqrt(self.d) if self.windows is None else 1.0


class Batch(NamedTuple):
  """A batch of prompts. Shapes: B batch, L context, d features, T tasks."""
  x: jax.Array  # [B, L, d]
  y: jax.Array  # [B, L, T]
  xq: jax.Array  # [B, d]
  yq: jax.Array  # [B, T] (noisy)
  beta: jax.Array  # [B, T, d]

  @property
  def context(self) -> jax.Array:
    """Context tokens z_l = (x_l, y_l): [B, L, D]."""
    return jnp.concatenate([self.x, self.y], axis=-1)

  @property
  def query(self) -> jax.Array:
    """Query token z_q = (x_q, 0): [B, D]."""
    return jnp.concatenate([self.xq, jnp.zeros_like(self.yq)], axis=-1)


def _check_sizes(batch, length):
  for name, v in (('batch', batch), ('length', length)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f'{name} must be a positive int, got {v!r}.')


def _assemble(task: Task, x, beta, eps, xp) -> Batch:
  if task.rho:
    chol = np.linalg.cholesky(task.covariance()).astype(np.float32)
    x = xp.einsum('bli,ji->blj', x, chol.astype(x.dtype))  # [B, L+1, d]
  beta = beta * (task.beta_mask() * task.beta_scale()).astype(x.dtype)
  y = xp.einsum('bli,bti->blt', x, beta)  # [B, L+1, T]
  y = y + np.sqrt(task.sigma2).astype(x.dtype) * eps
  return Batch(x=x[:, :-1], y=y[:, :-1], xq=x[:, -1], yq=y[:, -1], beta=beta)


def sample(task: Task, key: jax.Array, batch: int, length: int,
           dtype=jnp.float32) -> Batch:
  """Draws `batch` independent prompts with `length` context examples (jittable)."""
  _check_sizes(batch, length)
  d, t = task.d, task.num_tasks
  shapes = ((batch, length + 1, d), (batch, t, d), (batch, length + 1, t))
  sizes = [int(np.prod(s)) for s in shapes]
  # One draw split three ways: on CPU one large normal draw is ~1.3x faster than
  # three small ones (or than Box-Muller), and compiles faster.
  z = jax.random.normal(key, (sum(sizes),), dtype)
  x, beta, eps = (part.reshape(s) for part, s in zip(
      jnp.split(z, np.cumsum(sizes)[:-1]), shapes))  # [B, L+1, d], [B, T, d], ...
  return _assemble(task, x, beta, eps, jnp)


def sample_numpy(task: Task, seed: int, batch: int, length: int) -> Batch:
  """The same distribution drawn with NumPy (evaluation sets: no compilation)."""
  _check_sizes(batch, length)
  rng = np.random.default_rng(seed)
  d, t = task.d, task.num_tasks
  x = rng.standard_normal((batch, length + 1, d), np.float32)
  beta = rng.standard_normal((batch, t, d), np.float32)
  eps = rng.standard_normal((batch, length + 1, t), np.float32)
  return _assemble(task, x, beta, eps, np)
