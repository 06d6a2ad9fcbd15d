"""CAB-style speed / memory table of softmax attention implementations.

"CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling" (Zhang et al.,
2023) compares attention by pattern: non-causal self, causal self, non-causal cross and
causal cross. Every row is measured beside `jax.nn.dot_product_attention` on the same
inputs in the same run, and the run's 2048 x 2048 matmul FLOP/s is the ceiling.
Cross patterns use S = 2T keys; causal cross aligns bottom-right (offset S - T).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import masks
from experiments.benchmarks import common

PATTERNS = ('noncausal_self', 'causal_self', 'noncausal_cross', 'causal_cross')

_LENGTHS = {
    'quick': (256, 512),
    'cpu_core': (1024, 2048, 4096),
    'full': (1024, 2048, 4096, 8192, 16384),
}
# The dense reference builds [B, N, T, S]; skip it beyond this many logits.
_REFERENCE_MAX_LOGITS = 2**27


def visible_pairs(mask: masks.Mask | None, t: int, s: int, heads: int) -> int:
  """Visible (q, k) pairs summed over `heads` query heads, from the compiled blocks."""
  if mask is None:
    return t * s * heads
  bm = masks.compile_mask(mask, min(t, 512), min(s, 512),
                          num_heads=None if mask.head_dependent else heads)
  per_unique = []
  for state, pidx in zip(bm.block_state, bm.partial_index):
    partial = bm.partial_masks[pidx[state == masks.block.PARTIAL]]
    per_unique.append(int((state == masks.block.FULL).sum()) * bm.block_q *
                      bm.block_kv + int(partial.sum()))
  return int(np.asarray(per_unique)[bm.head_map].sum())


def attention_flops(pairs: int, batch: int, head_dim: int, value_dim: int,
                    backward: bool = False) -> float:
  """Useful FLOPs: 2 (H + H_v) per visible pair (summed over heads) and batch
  element; forward + backward counts 3.5x (backward recomputes q k^T: 5 matmuls)."""
  fwd = 2.0 * (head_dim + value_dim) * pairs * batch
  return fwd * (3.5 if backward else 1.0)


def _pattern(pattern: str, t: int) -> tuple[int, masks.Mask | None, bool]:
  """(S, mask object for our implementations, is_causal for jax.nn)."""
  if pattern == 'noncausal_self':
    return t, None, False
  if pattern == 'causal_self':
    return t, masks.causal(t, t), True
  if pattern == 'noncausal_cross':
    return 2 * t, None, False
  if pattern == 'causal_cross':
    return 2 * t, masks.causal(t, 2 * t, offset=t), False
  raise ValueError(f'pattern must be one of {PATTERNS}, got {pattern!r}.')


def _implementations() -> list[str]:
  names = [n for n in ('xla', 'reference')
           if n in attention.available_implementations()]
  backend = jax.default_backend()
  for n in ('pallas_tpu', 'pallas_gpu'):
    if n in attention.available_implementations() and n.endswith(backend):
      names.insert(0, n)
  return names


def _fwd_and_grad(fn):
  return jax.jit(fn), common.fwd_bwd_fn(fn)


def measure(pattern: str, t: int, *, batch: int = 1, heads: int = 8,
            head_dim: int = 64, dtype: Any = jnp.float32, repeats: int = 3,
            implementations: list[str] | None = None,
            matmul: float | None = None) -> list[dict[str, Any]]:
  """Rows for one (pattern, length): jax.nn baseline first, then each implementation."""
  s, mask_obj, jax_causal = _pattern(pattern, t)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, s, heads, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, s, heads, head_dim)), dtype)
  pairs = visible_pairs(mask_obj, t, s, heads)
  flops = attention_flops(pairs, batch, head_dim, head_dim)
  dense_mask = None
  if pattern == 'causal_cross':
    dense_mask = jnp.asarray(mask_obj.materialize())[None, None]
  candidates = {
      'jax.nn': functools.partial(jax.nn.dot_product_attention,
                                  is_causal=jax_causal, mask=dense_mask),
  }
  for name in implementations or _implementations():
    if name == 'reference' and batch * heads * t * s > _REFERENCE_MAX_LOGITS:
      continue
    candidates[name] = functools.partial(
        attention.dot_product_attention, mask=mask_obj, implementation=name)
  rows = []
  base = None
  for name, fn in candidates.items():
    fwd, fwd_bwd = _fwd_and_grad(fn)
    t_fwd = common.time_fn(fwd, q, k, v, repeats=repeats)
    t_bwd = common.time_fn(fwd_bwd, q, k, v, repeats=repeats)
    row = dict(
        variant='softmax', implementation=name, pattern=pattern, q_len=t,
        kv_len=s, batch=batch, heads=heads, head_dim=head_dim,
        dtype=jnp.dtype(dtype).name, fwd_s=t_fwd, fwd_bwd_s=t_bwd,
        mem_fwd_bytes=common.compiled_memory_bytes(fn, q, k, v),
        useful_flops_fwd=flops,
        eff_flops_fwd=flops / t_fwd,
        eff_flops_fwd_bwd=attention_flops(pairs, batch, head_dim, head_dim,
                                          backward=True) / t_bwd,
        matmul_flops_per_s=matmul)
    if base is None:
      base = row
    row['fwd_ratio_vs_jax_nn'] = t_fwd / base['fwd_s']
    row['fwd_bwd_ratio_vs_jax_nn'] = t_bwd / base['fwd_bwd_s']
    row['bwd_over_fwd'] = t_bwd / t_fwd
    rows.append(row)
  return rows


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """The CAB grid for `suite`."""
  del workdir
  common.check_suite(suite)
  matmul = common.matmul_flops_per_s()
  rows = []
  for t in _LENGTHS[suite]:
    for pattern in PATTERNS:
      rows.extend(measure(pattern, t, matmul=matmul,
                          repeats=3 if suite == 'quick' else 5))
  return rows
