"""Presets for `python -m experiments.icl_regression` (ml_collections).

Study of He, Pan, Chen, Yang, "In-Context Linear Regression Demystified" (ICML 2025,
arXiv 2503.12734). Every field is also an absl flag of the binary (a flag, when
given, overrides the preset).

  paper: the paper's settings. d = 5, L = 40, sigma^2 = 0.1, H in {1, 2, 4, 8},
    500k Adam steps at lr 1e-3, batch 256, seeds 0-3 (trained together; summary.json
    'seeds' reports per head count how many seeds pair and grow dummy heads, and
    from which step; the 4 seeds cost about 4x the single-seed times below, not
    measured here); linear-attention baseline;
    non-isotropic (rho = 0.5, H = 2) and multi-task (d = 6, H in {3, 4}) runs.
      python -m experiments.icl_regression --workdir=/tmp/icl_paper --preset=paper
    Observed on the 2-core CPU (two host devices): the main run (H in {1, 2, 4, 8} +
    linear) trained 500k steps in 15.4 min (546 steps/s); H = 2 pairs with
    omega = (+0.128, -0.130), mu = (+3.38, -3.37); H = 8 ends with 3 active and 5
    dummy heads; dummy heads appear slowly (100k-450k steps). The two extension runs
    add about 12 + 19 min (benchmark projection).
  quick: findings 1-4 qualitatively in under 2 minutes on a 2-core CPU, for seed 1
    (one of several; seeds 0 and 3 stay on the same-sign plateau): H in
    {1, 2, 4, 8}, 12k steps at lr 3e-3 (3x the paper's, so the pairing emerges within
    the budget), plus shorter non-isotropic and multi-task runs. Expected (observed):
    H = 2 heads with opposite (omega, mu), sum mu ~ 0, off-diagonal KQ mass a few % of
    the diagonal (active heads), H = 8 with its first 2 dummy heads (H = 4 has none
    yet), multi-head error well below the best single head and near debiased GD.
      python -m experiments.icl_regression --workdir=/tmp/icl_quick --preset=quick
  tiny: a seconds-long smoke run used by the end-to-end test.
"""

from __future__ import annotations

import ml_collections

PRESETS = ('quick', 'paper', 'tiny')


def get_config(preset: str = 'quick') -> ml_collections.ConfigDict:
  """Returns the locked config of `preset`."""
  if preset not in PRESETS:
    raise ValueError(f'preset must be one of {PRESETS}, got {preset!r}.')
  c = ml_collections.ConfigDict()
  c.d = 5
  c.context_length = 40
  c.sigma2 = 0.1
  c.heads = (1, 2, 4, 8)
  c.steps = 500_000
  c.batch = 256
  c.lr = 1e-3
  # Seed 0's H = 2 model sits on the same-sign plateau (both heads alike, loss equal
  # to the single head's) for all 500k steps at lr 1e-3 (observed), while its H = 4
  # and H = 8 models pair and grow dummy heads; seeds 1 and 2 pair within 500 steps
  # at lr 3e-3 (observed over seeds 0-3). The finding is seed-dependent, so the
  # paper preset trains seeds 0-3 together (vmapped) and summary.json['seeds']
  # counts how many pair / grow dummy heads and from which step; the quick preset
  # shows seed 1, one of several (its summary and fig3 say so; --seeds=0,1,2,3).
  c.seeds = (0, 1, 2, 3)
  c.log_every = 2500
  c.checkpoint_every = 25_000
  c.linear_heads = (1,)
  c.linear_normalize = False
  c.eval_lengths = tuple(range(10, 101, 10))
  c.n_test = 8192
  c.noniso = True
  c.rho = 0.5
  c.noniso_heads = (2,)
  c.noniso_steps = 500_000
  c.multitask = True
  c.multitask_heads = (3, 4)
  c.multitask_steps = 500_000
  c.projection = 'folded'
  c.rng_impl = 'threefry2x32'
  if preset == 'quick':
    c.seeds = (1,)
    c.steps = 12000
    c.lr = 3e-3
    c.log_every = 250
    c.checkpoint_every = 2000
    c.n_test = 4096
    c.noniso_steps = 3000
    c.multitask_steps = 6000
  elif preset == 'tiny':
    c.seeds = (1,)
    c.heads = (1, 2)
    c.steps = 60
    c.batch = 32
    c.lr = 3e-3
    c.log_every = 20
    c.checkpoint_every = 20
    c.eval_lengths = (10, 40, 60)
    c.n_test = 256
    c.noniso_steps = 40
    c.multitask_steps = 40
  return c.lock()
