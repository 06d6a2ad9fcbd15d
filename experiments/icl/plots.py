"""Figures for the in-context regression study (matplotlib PNGs, Agg backend).

One figure per analysis of He et al. (ICML 2025, arXiv 2503.12734): KQ heatmaps and
omega trajectories, OV vectors and mu trajectories, H = 2 pairing and dummy heads,
error vs context length, the non-isotropic preconditioner, multi-task allocation.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from experiments.icl import model


def _save(fig, path: str) -> str:
  if not fig.get_constrained_layout():
    fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _heatmap(ax, m, title, vmax=None):
  vmax = vmax or float(np.max(np.abs(m))) or 1.0
  im = ax.imshow(m, cmap='RdBu_r', vmin=-vmax, vmax=vmax)
  ax.set_title(title, fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  return im


def kq_heatmaps(params: dict[str, np.ndarray], heads: Sequence[int], d: int,
                path: str) -> str:
  """Finding 1: KQ_h / sqrt(D) (full D x D; x-block is the top-left d x d)."""
  hmax = max(heads)
  fig, axes = plt.subplots(len(heads), hmax, squeeze=False,
                           figsize=(1.7 * hmax + 1.6, 1.7 * len(heads) + 0.6),
                           layout='constrained')
  kq = np.asarray(model.kq_matrices(params)) / math.sqrt(params['Q'].shape[-1])
  for r, (h, sl) in enumerate(zip(heads, model.head_slices(heads))):
    vmax = float(np.max(np.abs(kq[sl])))
    im = None
    for c in range(hmax):
      ax = axes[r, c]
      if c >= h:
        ax.axis('off')
        continue
      m = kq[sl.start + c]
      im = _heatmap(
          ax, m, f'H={h} head {c + 1}\nomega={np.mean(np.diag(m)[:d]):+.3f}',
          vmax)
      ax.add_patch(plt.Rectangle((-0.5, -0.5), d, d, fill=False, lw=0.8,
                                 ec='k'))
    # One colour scale per head count (shared by its heads).
    fig.colorbar(im, ax=axes[r].tolist(), shrink=0.8, pad=0.01)
  fig.suptitle('KQ_h / sqrt(D) (box: x-block); red +, blue -', fontsize=9)
  return _save(fig, path)


def ov_bars(params: dict[str, np.ndarray], heads: Sequence[int], path: str) -> str:
  """Finding 2: OV_h rows; only the last entry (y -> output) should be large."""
  ov = np.asarray(model.ov_matrices(params))[:, 0, :]  # [N, D]
  fig, axes = plt.subplots(1, len(heads), squeeze=False,
                           figsize=(3.2 * len(heads), 2.6))
  dd = ov.shape[-1]
  for i, (h, sl) in enumerate(zip(heads, model.head_slices(heads))):
    ax = axes[0, i]
    width = 0.8 / h
    for c in range(h):
      ax.bar(np.arange(dd) + c * width - 0.4 + width / 2, ov[sl.start + c],
             width, label=f'head {c + 1}')
    ax.axhline(0, color='k', lw=0.5)
    ax.set_xticks(np.arange(dd))
    ax.set_xticklabels([f'x{j + 1}' for j in range(dd - 1)] + ['y'], fontsize=7)
    ax.set_title(f'H={h}: OV_h entries, sum mu={np.sum(ov[sl, -1]):+.3f}',
                 fontsize=8)
    ax.legend(fontsize=6, loc='upper left', bbox_to_anchor=(1.0, 1.0))
  return _save(fig, path)


def trajectories(history: dict[str, np.ndarray], heads: Sequence[int], d: int,
                 log_every: int, path: str) -> str:
  """omega_h and mu_h over training (seed 0), sum mu, and the off-diagonal ratio."""
  from experiments.icl import analysis  # pylint: disable=g-import-not-at-top
  s = analysis.head_structure(history, d)  # arrays [R+1, N]
  steps = np.arange(s['omega'].shape[0]) * log_every
  fig, axes = plt.subplots(len(heads), 3, squeeze=False,
                           figsize=(12, 2.3 * len(heads)), layout='constrained')
  for r, (h, sl) in enumerate(zip(heads, model.head_slices(heads))):
    for c in range(h):
      axes[r, 0].plot(steps, s['omega'][:, sl.start + c], label=f'head {c + 1}')
      axes[r, 1].plot(steps, s['mu'][:, sl.start + c], label=f'head {c + 1}')
      axes[r, 2].semilogy(steps, s['offdiag_ratio'][:, sl.start + c],
                          label=f'head {c + 1}')
    axes[r, 1].plot(steps, np.sum(s['mu'][:, sl], -1), 'k--', label='sum mu')
    for ax, t, ylab in zip(
        axes[r], ('omega_h (effective)', 'mu_h = OV_h[-1]', 'KQ off-diag / diag'),
        (f'H={h}: omega_h', 'mu_h', 'off-diag / diag')):
      ax.set_title(f'H={h}: {t}', fontsize=8)
      ax.set_ylabel(ylab, fontsize=8)
      ax.axhline(0, color='k', lw=0.4)
    # One legend per row (heads share colours across columns), outside the axes.
    handles, labels = axes[r, 1].get_legend_handles_labels()
    axes[r, 2].legend(handles, labels, fontsize=6, loc='upper left',
                      bbox_to_anchor=(1.02, 1.0))
  for ax in axes[-1]:
    ax.set_xlabel('step')
  return _save(fig, path)


def pairing_plot(history: dict[str, np.ndarray], final: dict[str, np.ndarray],
                 heads: Sequence[int], d: int, log_every: int, path: str,
                 suptitle: str | None = None) -> str:
  """Finding 4: H = 2 pairing over training; per-head |omega mu| shares for H > 2."""
  from experiments.icl import analysis  # pylint: disable=g-import-not-at-top
  s = analysis.head_structure(history, d)
  f = analysis.head_structure(final, d)
  steps = np.arange(s['omega'].shape[0]) * log_every
  big = [h for h in heads if h > 2]
  fig, axes = plt.subplots(1, 2 + len(big), squeeze=False,
                           figsize=(3.6 * (2 + len(big)), 3))
  axes = axes[0]
  if 2 in heads:
    sl = model.head_slices(heads)[heads.index(2)]
    o, m = s['omega'][:, sl], s['mu'][:, sl]
    axes[0].plot(steps, o[:, 0], label='omega_1')
    axes[0].plot(steps, -o[:, 1], '--', label='-omega_2')
    axes[1].plot(steps, m[:, 0], label='mu_1')
    axes[1].plot(steps, -m[:, 1], '--', label='-mu_2')
    for ax, t in zip(axes[:2], ('H=2: omega_1 vs -omega_2', 'H=2: mu_1 vs -mu_2')):
      ax.set_title(t, fontsize=8)
      ax.set_xlabel('step')
      ax.legend(fontsize=7)
  for ax, h in zip(axes[2:], big):
    sl = model.head_slices(heads)[heads.index(h)]
    share = np.abs(f['omega'][sl] * f['mu'][sl])
    share = share / max(float(np.sum(share)), 1e-12)
    ax.bar(np.arange(1, h + 1), share)
    ax.set_title(f'H={h}: |omega_h mu_h| share (dummy ~ 0)', fontsize=8)
    ax.set_xlabel('head')
  if suptitle:  # e.g. the seed shown and the counts over all seeds
    fig.suptitle(suptitle, fontsize=8)
  return _save(fig, path)


def error_vs_length_plot(result: dict[str, Any], path: str) -> str:
  """Finding 4: test MSE vs context length for models and predictors."""
  lengths = result['lengths']
  fig, ax = plt.subplots(figsize=(9.5, 4.5))
  styles = {'ridge': ('k', '-', 'ridge (Bayes)'),
            'debiased_gd': ('tab:green', '--', 'debiased GD'),
            'gd': ('tab:olive', ':', 'GD'),
            'single_head_best': ('tab:red', '-.', 'best single head')}
  for name, vals in result['mean'].items():
    if name in styles:
      c, ls, lab = styles[name]
      ax.plot(lengths, vals, color=c, ls=ls, label=lab)
    elif name.startswith('softmax'):
      ax.plot(lengths, vals, marker='o', ms=3, label=f'trained {name}')
    elif name.startswith('reduced'):
      ax.plot(lengths, vals, marker='x', ms=3, ls='', label=name)
    elif name.startswith('linear'):
      ax.plot(lengths, vals, marker='s', ms=3, color='tab:gray',
              label=f'trained {name}')
  ax.axvline(result['train_length'], color='k', lw=0.5, ls=':')
  ax.axhline(result['noise_floor_sigma2'], color='k', lw=0.5)
  ax.set_yscale('log')
  ax.set_xlabel('context length L (dotted: training L)')
  ax.set_ylabel('test MSE on y_q (incl. noise sigma^2)')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def noniso_plot(result: dict[str, Any], path: str) -> str:
  """Finding 5: learned preconditioner Gamma vs Sigma^{-1}, and errors."""
  row = result['models'][0]
  ps = row['per_seed'][0]
  gamma = np.asarray(ps['gamma'])
  sinv = np.asarray(result['sigma_inv'])
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout='constrained')
  im = _heatmap(axes[0], gamma / np.max(np.abs(gamma)),
           f'learned Gamma (H={row["heads"]}), normalized\n'
           f'cos(Gamma, Sigma^-1)={ps["cos_gamma_sigma_inv"]:.3f}\n'
           f'cos(Gamma, I)={ps["cos_gamma_identity"]:.3f}')
  _heatmap(axes[1], sinv / np.max(np.abs(sinv)),
           f'Sigma^-1 (rho={result["rho"]}), normalized', 1.0)
  fig.colorbar(im, ax=axes[:2].tolist(), shrink=0.8, pad=0.01,
               label='entry / max |entry|')
  names = list(ps['errors'])
  axes[2].barh(np.arange(len(names)), [ps['errors'][n] for n in names])
  axes[2].set_yticks(np.arange(len(names)))
  axes[2].set_yticklabels(names, fontsize=7)
  axes[2].set_xlabel(f'test MSE at L={result["length"]}')
  return _save(fig, path)


def multitask_plot(result: dict[str, Any], path: str) -> str:
  """Finding 6: per head, KQ x-diagonal per coordinate and the OV y-block."""
  models = result['models']
  hmax = max(r['heads'] for r in models)
  fig, axes = plt.subplots(2 * len(models), hmax, squeeze=False,
                           figsize=(2.0 * hmax + 1.0, 2.0 * 2 * len(models)),
                           layout='constrained')
  for r, row in enumerate(models):
    ps = row['per_seed'][0]
    mu = np.asarray(ps['mu'])
    kd = np.asarray(ps['kq_x_diag'])
    vk = float(np.max(np.abs(kd)))
    vm = float(np.max(np.abs(mu)))
    for c in range(hmax):
      a1, a2 = axes[2 * r, c], axes[2 * r + 1, c]
      if c >= row['heads']:
        a1.axis('off')
        a2.axis('off')
        continue
      a1.bar(np.arange(1, kd.shape[1] + 1), kd[c])
      a1.set_ylim(-vk * 1.1, vk * 1.1)
      a1.set_xticks(np.arange(1, kd.shape[1] + 1))
      a1.set_title(f'H={row["heads"]} head {c + 1}: KQ x-diag', fontsize=7)
      a1.set_ylabel('KQ_ii', fontsize=7)
      im = _heatmap(a2, mu[c], f'OV y-block, serves {ps["serves_tasks"][c]}', vm)
    fig.colorbar(im, ax=axes[2 * r + 1].tolist(), shrink=0.8, pad=0.01)
  fig.suptitle(f'multi-task windows {result["windows"]}', fontsize=9)
  return _save(fig, path)


def all_paths(workdir: str) -> dict[str, str]:
  names = ['fig1_kq_heatmaps', 'fig1_2_trajectories', 'fig2_ov_vectors',
           'fig3_pairing_dummy', 'fig4_error_vs_length', 'fig5_noniso',
           'fig6_multitask']
  return {n: os.path.join(workdir, n + '.png') for n in names}
