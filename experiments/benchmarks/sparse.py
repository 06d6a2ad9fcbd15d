"""Predicted vs measured speedup of every sparse-mask generator on the 'xla' path.

For each mask, the BlockMask simulator predicts an upper bound on the speedup over
full attention (1 / fraction of tiles computed, `BlockMask.stats()`); the measured
speedup is the time of full attention divided by the time with the mask, both with the
blocked XLA implementation at the block sizes it picks, side by side in one run. The
same row shows `jax.nn.dot_product_attention` with the dense mask as the baseline.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np

import attention
from attention import masks
from experiments.benchmarks import attention as attn_bench
from experiments.benchmarks import common
from kernels import xla

_LENGTH = {'quick': 1024, 'cpu_core': 4096, 'full': 16384}


def mask_zoo(t: int, heads: int) -> dict[str, masks.Mask]:
  """One instance of every generator family at length t (t a power of 4 times 64)."""
  side = int(math.isqrt(t))
  frames = 16
  zoo = {
      'causal': masks.causal(t),
      'sliding_window_256': masks.sliding_window(t, 256, 0),
      'chunked_causal_512': masks.chunked_causal(t, 512),
      'sink_window_4_256': masks.sink_window(t, 4, 256),
      'prefix_lm_quarter': masks.prefix_lm(t, t // 4),
      'documents_4': masks.documents([t // 4] * 4),
      'power_attention_64': masks.power_attention(t, 64, token_causal=True),
      's2_attention_64': masks.s2_attention(t, heads, 64, 2, 4,
                                            token_causal=True),
      'radial_16_frames': masks.radial(frames, t // frames),
  }
  if side * side == t:
    zoo['neighborhood_2d_w13'] = masks.neighborhood((side, side), 13)
    zoo['blocked_2d_w16'] = masks.neighborhood((side, side), 16, stride=16)
  return zoo


def run(suite: str, workdir: str, *, heads: int = 8, head_dim: int = 64,
        names: list[str] | None = None) -> list[dict[str, Any]]:
  """One row per mask: predicted and measured speedups, effective FLOP/s."""
  del workdir
  common.check_suite(suite)
  t = _LENGTH[suite]
  rng = np.random.default_rng(0)
  q, k, v = (jax.numpy.asarray(rng.normal(size=(1, t, heads, head_dim)),
                               jax.numpy.float32) for _ in range(3))
  matmul = common.matmul_flops_per_s()
  full_fn = jax.jit(functools.partial(attention.dot_product_attention,
                                      implementation='xla'))
  t_full = common.time_fn(full_fn, q, k, v, repeats=3)
  rows = []
  for name, mask in mask_zoo(t, heads).items():
    if names is not None and name not in names:
      continue
    bq, bk = xla.block_sizes_for(t, t, mask)
    stats = masks.compile_mask(
        mask, bq, bk, num_heads=None if mask.head_dependent else heads).stats()
    fn = jax.jit(functools.partial(attention.dot_product_attention, mask=mask,
                                   implementation='xla'))
    t_mask = common.time_fn(fn, q, k, v, repeats=3)
    dense = jax.numpy.asarray(mask.materialize(num_heads=heads))[None]
    nn_fn = jax.jit(lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, mask=m))
    t_nn = common.time_fn(nn_fn, q, k, v, dense, repeats=3)
    pairs = attn_bench.visible_pairs(mask, t, t, heads)
    rows.append(dict(
        mask=name, q_len=t, heads=heads, head_dim=head_dim, block_q=bq,
        block_kv=bk, density=stats['density'],
        tile_fraction=stats['tile_fraction'],
        predicted_speedup=stats['speedup_bound'],
        measured_speedup=t_full / t_mask,
        measured_over_predicted=(t_full / t_mask) / stats['speedup_bound'],
        xla_full_s=t_full, xla_mask_s=t_mask, jax_nn_dense_mask_s=t_nn,
        speedup_vs_jax_nn=t_nn / t_mask,
        eff_flops=attn_bench.attention_flops(pairs, 1, head_dim, head_dim) /
        t_mask,
        matmul_flops_per_s=matmul))
  return rows
