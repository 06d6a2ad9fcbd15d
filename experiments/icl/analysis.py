"""Measurements on trained in-context regression models (He et al., ICML 2025).

Structure readouts (findings 1-3 of arXiv 2503.12734, Section 3): the KQ x-block is
~ omega_h I_d, OV_h is ~ mu_h e_{d+1} (last entry only), sum_h mu_h ~ 0, and with
H = 2 the heads pair as (omega, mu), (-omega, -mu); test error against context length
for the trained models and the closed-form predictors (Section 4); the learned
preconditioner under non-isotropic covariates and the head/task allocation in
multi-task regression (Section 5).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.icl import data
from experiments.icl import model
from experiments.icl import predictors


def _offdiag_masks(dd: int, d: int) -> tuple[np.ndarray, np.ndarray]:
  """Boolean [D, D] masks: the x-block diagonal, and the identifiable entries.

  Rows >= d of KQ_h multiply the query's label slots, which are always 0 (z_q =
  (x_q, 0)), so they never affect the output (the matching columns of Q_h get zero
  gradient and keep their random init); the identifiable off-diagonal mass excludes
  them."""
  diag = np.zeros((dd, dd), bool)
  diag[np.arange(d), np.arange(d)] = True
  ident = np.zeros((dd, dd), bool)
  ident[:d, :] = True
  return diag, ident


def head_structure(params: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
  """Per-head readouts of stacked params (any leading axes, then heads N).

  Returns arrays [..., N]: omega (effective, includes 1/sqrt(D)), mu (single task),
  offdiag_ratio = ||identifiable KQ_h entries off the x-block diagonal||_F /
  ||x-block diagonal||_2 (see `_offdiag_masks`), offdiag_ratio_full (all entries),
  diag_cv = std / |mean| of the x-block diagonal (homogeneity), last_share =
  OV_h[-1]^2 / ||OV_h||^2.
  """
  kq = np.asarray(model.kq_matrices(params))  # [..., N, D, D]
  ov = np.asarray(model.ov_matrices(params))  # [..., N, T, D]
  diag_m, ident_m = _offdiag_masks(kq.shape[-1], d)
  diag = np.diagonal(kq[..., :d, :d], axis1=-2, axis2=-1)  # [..., N, d]
  diag_norm = np.maximum(np.sqrt(np.sum(diag ** 2, -1)), 1e-12)
  omega, mu = (np.asarray(a) for a in model.omega_mu(params, d))
  out = {
      'omega': omega,
      'offdiag_ratio': np.sqrt(np.sum(
          np.where(ident_m & ~diag_m, kq, 0.0) ** 2, (-2, -1))) / diag_norm,
      'offdiag_ratio_full': np.sqrt(np.sum(
          np.where(diag_m, 0.0, kq) ** 2, (-2, -1))) / diag_norm,
      'diag_cv': np.std(diag, -1) / np.maximum(np.abs(np.mean(diag, -1)), 1e-12),
  }
  if ov.shape[-2] == 1:
    out['mu'] = mu
    out['last_share'] = ov[..., 0, -1] ** 2 / np.maximum(
        np.sum(ov[..., 0, :] ** 2, -1), 1e-12)
  return out


def model_summary(params: dict[str, np.ndarray], heads: Sequence[int], d: int,
                  active_fraction: float = 0.1) -> list[dict[str, Any]]:
  """Per model (one per head count) and seed: structure numbers as plain lists.

  A head is 'active' when |omega_h mu_h| (its first-order debiased-GD step) is at
  least `active_fraction` of the model's largest; the others are 'dummy'.
  """
  s = head_structure(params, d)
  rows = []
  for h, sl in zip(heads, model.head_slices(heads)):
    omega, mu = s['omega'][..., sl], s['mu'][..., sl]  # [S, H]
    step = omega * mu
    active = np.abs(step) >= active_fraction * np.max(np.abs(step), -1,
                                                     keepdims=True)
    kq = np.asarray(model.kq_matrices(params))[..., sl, :, :]  # [S, H, D, D]
    diag_m, ident_m = _offdiag_masks(kq.shape[-1], d)
    diag_head = np.sum(np.where(diag_m, kq, 0.0) ** 2, (-2, -1))  # [S, H]
    off_head = np.sum(np.where(ident_m & ~diag_m, kq, 0.0) ** 2, (-2, -1))
    diag_mass, off_mass = diag_head.sum(-1), off_head.sum(-1)  # [S]
    # Pooled over the active heads only: a dummy head (omega ~ 0) has no diagonal to
    # speak of, and its ratio says nothing about the mechanism.
    diag_active = np.sum(np.where(active, diag_head, 0.0), -1)
    off_active = np.sum(np.where(active, off_head, 0.0), -1)
    rows.append({
        'heads': h,
        'omega': omega.tolist(),
        'mu': mu.tolist(),
        'omega_times_mu': step.tolist(),
        'eta_sum_omega_mu': np.sum(step, -1).tolist(),
        'sum_mu': np.sum(mu, -1).tolist(),
        'sum_mu_over_sum_abs_mu': (np.sum(mu, -1) / np.maximum(
            np.sum(np.abs(mu), -1), 1e-12)).tolist(),
        'offdiag_ratio_per_head': s['offdiag_ratio'][..., sl].tolist(),
        'offdiag_ratio': np.sqrt(off_mass / np.maximum(diag_mass, 1e-12)
                                 ).tolist(),
        'offdiag_ratio_active_heads': np.sqrt(
            off_active / np.maximum(diag_active, 1e-12)).tolist(),
        'offdiag_ratio_full_per_head': s['offdiag_ratio_full'][..., sl].tolist(),
        'diag_cv_per_head': s['diag_cv'][..., sl].tolist(),
        'last_share_per_head': s['last_share'][..., sl].tolist(),
        'active_heads': active.tolist(),
    })
  return rows


def pairing(omega: np.ndarray, mu: np.ndarray) -> dict[str, float]:
  """For one H = 2 model: relative mismatch of (omega_1, mu_1) vs -(omega_2, mu_2)."""
  omega, mu = np.asarray(omega, float), np.asarray(mu, float)
  if omega.shape != (2,) or mu.shape != (2,):
    raise ValueError(f'omega and mu must have shape (2,), got {omega.shape} and '
                     f'{mu.shape}.')
  return {
      'opposite_omega': bool(omega[0] * omega[1] < 0),
      'opposite_mu': bool(mu[0] * mu[1] < 0),
      'omega_mismatch': float(abs(omega[0] + omega[1]) / np.sum(np.abs(omega))),
      'mu_mismatch': float(abs(mu[0] + mu[1]) / np.sum(np.abs(mu))),
  }


_predict = jax.jit(model.softmax_forward,
                   static_argnames=('heads', 'projection', 'implementation'))
_ridge = jax.jit(predictors.ridge)


@functools.partial(jax.jit, static_argnames=('heads', 'linear_heads',
                                             'linear_normalize'))
def _model_errors(soft, lin, batch, length, heads, linear_heads,
                  linear_normalize):
  mask = jnp.arange(batch.x.shape[1])[None, :] < length  # [1, L]
  mask = jnp.broadcast_to(mask, batch.x.shape[:2])
  out = [model.softmax_forward(soft, batch.context, batch.query, heads,
                               mask=mask)]
  if linear_heads:
    out.append(model.linear_forward(lin, batch.context, batch.query,
                                    linear_heads, mask=mask,
                                    normalize=linear_normalize))
  pred = jnp.concatenate(out, axis=1)[..., 0]  # [B, M]
  return jnp.mean((pred - batch.yq) ** 2, axis=0)


@jax.jit
def _closed_form_errors(batch, fit, length, omegas, mus, eta, sigma2, d_scale,
                        single_omega):
  """Errors of the closed-form predictors [K] on `batch` at context `length`."""
  b, lmax, _ = batch.x.shape
  mask = jnp.broadcast_to(jnp.arange(lmax)[None, :] < length, (b, lmax))
  fmask = jnp.broadcast_to(jnp.arange(lmax)[None, :] < length, fit.x.shape[:2])
  x, y, xq, yq = batch.x, batch.y[..., 0], batch.xq, batch.yq[:, 0]
  err = lambda p: jnp.mean((p - yq) ** 2)
  reduced = jax.vmap(lambda o, m: err(predictors.reduced_multihead(
      x, y, xq, o, m, mask)))(omegas, mus)  # [M]
  f_fit = predictors.single_head_features(fit.x, fit.y[..., 0], fit.xq,
                                          single_omega, fmask)
  mu_single = predictors.optimal_scale(f_fit, fit.yq[:, 0])
  single = err(mu_single * predictors.single_head_features(
      x, y, xq, single_omega, mask))
  return jnp.concatenate([reduced, jnp.stack([
      err(predictors.gd(x, y, xq, eta, mask)),
      err(predictors.debiased_gd(x, y, xq, eta, mask)),
      single,
      err(predictors.ridge(x, y, xq, sigma2, d_scale, mask)),
      mu_single])])


def error_vs_length(state_params: dict[str, Any], spec, lengths: Sequence[int],
                    n_test: int, seed: int,
                    reference_heads: int | None = None) -> dict[str, Any]:
  """Test MSE on y_q (noisy) against context length, same draws for every curve.

  Curves: trained softmax model per H; trained linear attention per H; the reduced
  multi-head predictor with each model's fitted (omega, mu); GD and debiased GD with
  eta = sum_h omega_h mu_h of the reference model (H = 2 if trained); the best
  single head (omega = 1/sqrt(d), mu by least squares on separate draws at each L);
  ridge (Bayes-optimal). Models are averaged over seeds (per-seed values kept).
  """
  task = spec.task
  if task.num_tasks != 1:
    raise ValueError('error_vs_length needs a single-task run, got '
                     f'{task.num_tasks} tasks.')
  lengths = [int(l) for l in lengths]
  if not lengths or min(lengths) < 1:
    raise ValueError(f'lengths must be positive ints, got {lengths!r}.')
  lmax = max(lengths)
  batch = data.sample_numpy(task, seed, n_test, lmax)
  fit = data.sample_numpy(task, seed + 1, n_test, lmax)
  if reference_heads is None:
    reference_heads = 2 if 2 in spec.heads else max(spec.heads)
  ref = spec.heads.index(reference_heads)
  num_seeds = len(spec.seeds)
  model_err = np.zeros((num_seeds, len(lengths), spec.num_models))
  closed = np.zeros((num_seeds, len(lengths), len(spec.heads) + 5))
  for s in range(num_seeds):
    soft = jax.tree.map(lambda a: a[s], state_params['softmax'])
    lin = (jax.tree.map(lambda a: a[s], state_params['linear'])
           if spec.linear_heads else None)
    st = head_structure(soft, task.d)
    slices = model.head_slices(spec.heads)
    hmax = max(spec.heads)
    # Pad every model's (omega, mu) to hmax heads with mu = 0 (no contribution).
    omegas = np.zeros((len(spec.heads), hmax), np.float32)
    mus = np.zeros((len(spec.heads), hmax), np.float32)
    for m, sl in enumerate(slices):
      omegas[m, :sl.stop - sl.start] = st['omega'][sl]
      mus[m, :sl.stop - sl.start] = st['mu'][sl]
    eta = float(np.sum(omegas[ref] * mus[ref]))
    for i, length in enumerate(lengths):
      model_err[s, i] = np.asarray(_model_errors(
          soft, lin, batch, length, spec.heads, spec.linear_heads,
          spec.linear_normalize))
      closed[s, i] = np.asarray(_closed_form_errors(
          batch, fit, length, omegas, mus, eta, task.sigma2, float(task.d),
          1.0 / math.sqrt(task.d)))
  curves = {}
  for m, h in enumerate(spec.heads):
    curves[f'softmax_H{h}'] = model_err[:, :, m]
    curves[f'reduced_H{h}'] = closed[:, :, m]
  for j, h in enumerate(spec.linear_heads):
    curves[f'linear_H{h}'] = model_err[:, :, len(spec.heads) + j]
  nh = len(spec.heads)
  curves['gd'] = closed[:, :, nh]
  curves['debiased_gd'] = closed[:, :, nh + 1]
  curves['single_head_best'] = closed[:, :, nh + 2]
  curves['ridge'] = closed[:, :, nh + 3]
  return {
      'lengths': lengths,
      'train_length': spec.length,
      'reference_heads': reference_heads,
      'n_test': n_test,
      'noise_floor_sigma2': task.sigma2,
      'single_head_mu': closed[0, :, nh + 4].tolist(),
      'mean': {k: v.mean(0).tolist() for k, v in curves.items()},
      'per_seed': {k: v.tolist() for k, v in curves.items()},
  }


def effective_preconditioner(params: dict[str, np.ndarray], d: int) -> np.ndarray:
  """Gamma = sum_h mu_h A_h, A_h = the x-block of KQ_h / sqrt(D) (oriented so the
  logit is x_q^T A_h x_l), for one single-task model's heads [N, ...].

  To first order the model predicts (1/L) sum_l y_l x_q^T Gamma (x_l - xbar)
  (+ a term proportional to sum_h mu_h), i.e. pre-conditioned debiased GD."""
  dd = params['Q'].shape[-1]
  kq = np.asarray(model.kq_matrices(params))[..., :d, :d] / math.sqrt(dd)
  mu = np.asarray(model.omega_mu(params, d)[1])
  return np.einsum('n,nij->ij', mu, kq)  # [d, d]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  """Frobenius cosine similarity of two matrices."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  return float(np.sum(a * b) / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@jax.jit
def _precond_errors(batch, fit, gamma, sigma_inv, sigma2, d_scale, soft_pred):
  x, y, xq, yq = batch.x, batch.y[..., 0], batch.xq, batch.yq[:, 0]
  fx, fy, fxq, fyq = fit.x, fit.y[..., 0], fit.xq, fit.yq[:, 0]
  err = lambda p: jnp.mean((p - yq) ** 2)
  out = [err(soft_pred)]
  for p in (None, sigma_inv, gamma):
    eta = predictors.optimal_scale(
        predictors.debiased_gd(fx, fy, fxq, 1.0, precond=p), fyq)
    out.append(err(predictors.debiased_gd(x, y, xq, eta, precond=p)))
  out.append(err(predictors.debiased_gd(x, y, xq, 1.0, precond=gamma)))
  out.append(err(predictors.ridge(x, y, xq, sigma2, d_scale)))
  return jnp.stack(out)


def _models_and_seeds(state_params: dict[str, Any], spec):
  """Yields (model index, heads, seed index, all softmax params, this model's)."""
  for m, (h, sl) in enumerate(zip(spec.heads, model.head_slices(spec.heads))):
    for s in range(len(spec.seeds)):
      soft = jax.tree.map(lambda a, s=s: a[s], state_params['softmax'])
      yield m, h, s, soft, jax.tree.map(lambda a, sl=sl: a[sl], soft)


def noniso_analysis(state_params: dict[str, Any], spec, n_test: int,
                    seed: int) -> dict[str, Any]:
  """Non-isotropic covariates: the learned preconditioner vs Sigma^{-1}.

  Compares Gamma (see `effective_preconditioner`, per trained model) with Sigma^{-1}
  and with I by Frobenius cosine, and the test MSE at the training length of: the
  trained model, debiased GD with I, with Sigma^{-1} and with Gamma (each with the
  least-squares-optimal step on separate draws), Gamma with its own scale (step 1,
  the first-order reading of the trained weights), and ridge.
  """
  task = spec.task
  sigma = task.covariance()
  sigma_inv = np.linalg.inv(sigma)
  batch = data.sample_numpy(task, seed, n_test, spec.length)
  fit = data.sample_numpy(task, seed + 1, n_test, spec.length)
  names = ['trained', 'debiased_gd_identity', 'debiased_gd_sigma_inv',
           'debiased_gd_learned_gamma', 'learned_gamma_first_order', 'ridge']
  rows = [{'heads': h, 'per_seed': []} for h in spec.heads]
  for m, _, _, soft, sub in _models_and_seeds(state_params, spec):
    gamma = effective_preconditioner(sub, task.d)
    pred = _predict(soft, batch.context, batch.query, spec.heads)[:, m, 0]
    # debiased_gd uses (x_l - xbar)^T P x_q, so P = Gamma^T.
    errs = np.asarray(_precond_errors(batch, fit, jnp.asarray(gamma.T),
                                      jnp.asarray(sigma_inv, jnp.float32),
                                      task.sigma2, float(task.d), pred))
    rows[m]['per_seed'].append({
        'gamma': gamma.tolist(),
        'cos_gamma_sigma_inv': cosine(gamma, sigma_inv),
        'cos_gamma_identity': cosine(gamma, np.eye(task.d)),
        'cos_gamma_sigma': cosine(gamma, sigma),
        'errors': dict(zip(names, errs.tolist())),
    })
  return {'rho': task.rho, 'sigma_inv': sigma_inv.tolist(),
          'length': spec.length, 'n_test': n_test, 'models': rows}


def multitask_analysis(state_params: dict[str, Any], spec, n_test: int,
                       seed: int, serve_fraction: float = 0.25
                       ) -> dict[str, Any]:
  """Multi-task regression: which head serves which task, and per-task errors.

  Per head: mu_h = OV_h y-block [T, T] (row = output, column = label), the x-block
  diagonal of KQ_h / sqrt(D) per coordinate, and the tasks it serves (|mu_h[t, t]| >=
  `serve_fraction` of the model's largest |mu|). A head serving two tasks is the
  superposition regime of Section 5. Errors: per task, trained model vs per-task ridge
  on the task's window (prior N(0, I)).
  """
  task = spec.task
  d, t = task.d, task.num_tasks
  batch = data.sample_numpy(task, seed, n_test, spec.length)
  ridge_err = []
  for k, (a, b) in enumerate(task.windows):
    p = _ridge(batch.x[..., a:b], batch.y[..., k], batch.xq[:, a:b],
               task.sigma2, 1.0)
    ridge_err.append(float(jnp.mean((p - batch.yq[:, k]) ** 2)))
  rows = [{'heads': h, 'per_seed': []} for h in spec.heads]
  for m, _, _, soft, sub in _models_and_seeds(state_params, spec):
    ov = np.asarray(model.ov_matrices(sub))  # [H, T, D]
    kq = np.asarray(model.kq_matrices(sub)) / math.sqrt(task.token_dim)
    mu = ov[:, :, d:]  # [H, T, T]
    diag = np.diagonal(mu, axis1=-2, axis2=-1)  # [H, T]
    serves = np.abs(diag) >= serve_fraction * np.max(np.abs(mu))
    pred = _predict(soft, batch.context, batch.query, spec.heads)[:, m]  # [B, T]
    errs = jnp.mean((pred - batch.yq) ** 2, axis=0)
    rows[m]['per_seed'].append({
        'mu': mu.tolist(),
        'kq_x_diag': np.diagonal(kq[:, :d, :d], axis1=-2, axis2=-1).tolist(),
        'serves_tasks': [np.nonzero(r)[0].tolist() for r in serves],
        'num_heads_serving_both': int(np.sum(np.all(serves, -1))),
        'errors_per_task': np.asarray(errs).tolist(),
    })
  return {'windows': [list(w) for w in task.windows], 'ridge_per_task': ridge_err,
          'n_test': n_test, 'models': rows, 'num_tasks': t}
