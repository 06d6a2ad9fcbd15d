"""Blocked online-softmax ("flash") attention in pure JAX: the CPU fast path.

The forward pass is FlashAttention's online softmax (Dao et al., "FlashAttention: Fast
and Memory-Efficient Exact Attention with IO-Awareness", 2022; the loop order of
FlashAttention-2, Dao 2023): for each block of queries, a running row maximum, row sum
and output are updated block by block over keys, so no T x S array ever exists. Which
tiles are visited comes from the compiled `BlockMask` (the block-sparse "MaskInfo" idea
of JAX's splash attention): EMPTY tiles are skipped, FULL tiles are computed without
mask work, and only PARTIAL tiles read a (deduplicated) bitmap. The row sums come out
of the P V dot through a column of ones appended to V.

Two forms of a forward step, both exact: the online-softmax step (two dots), and
`_fused_tile` (three dots), which XLA:CPU runs as two multi-threaded library calls.
The fused form is the default only where a step's dots are too small for XLA:CPU to
spread over cores and the batch is small (`_auto_fused`); dropout always takes the
online step (its row sums must stay undropped).

The backward pass is a `jax.custom_vjp` that recomputes the probabilities tile by tile
from the saved log-sum-exp: an outer loop over key blocks (the transposed lists of the
BlockMask) keeps dK / dV for those keys local, and dQ is accumulated in place. Its tiles
are laid out keys-on-rows (K Q^T), which keeps all five dots in the layout XLA:CPU's
fast dot kernels take. Memory is O(T + S) (plus whatever bias or dense mask the caller
passes in full). A score_mod ("FlexAttention", Dong et al. 2024) is applied per tile
on broadcast index arrays, and its parameters' gradients are accumulated per tile
(`jax.vjp` of the mod) in the loop carry.

Static structure: the BlockMask, the work lists and the lane grouping are NumPy arrays
built at trace time from the static mask object (cached), so a jitted caller compiles
once per (shapes, mask, score_mod code). Query blocks are visited in order of their
work; optionally several of them ("lanes", grouped by similar work, padding steps
masked) share each step. On XLA:CPU one 512 x 256 tile per step was fastest (a 2-core
machine), so lanes are only used by default when tiles are tiny.

KV chunks (forward only): a step may cover `kv_chunk` consecutive kv blocks of one
query block, read as one dynamic slice of the keys, with a [block_q, kv_chunk *
block_kv] bitmap concatenated from the member blocks (FULL: all True, EMPTY: all False)
and deduplicated; chunks made only of FULL blocks skip mask work. A sliding window then
costs one step per query block over about its window + block_q keys instead of several
block-aligned tiles. `tiling_for` picks (block_q, block_kv, kv_chunk) with a small
fitted cost model; causal masks get 512 x 256 tiles one per step. Loops whose trip
count is the same for every query block are static (a single step is inlined).

Traced block masks: a problem whose `block_mask` is a `DynamicBlockMask` (block lists
chosen under jit by a router, e.g. MoBA's top-k, "MoBA: Mixture of Block Attention for
Long-Context LLMs", Lu et al. 2025) runs `kernels.xla.dynamic` instead, with tiles
exactly the mask's (block_q, block_kv) (the tiling options do not apply). Nothing is
planned on the host there: all (batch, head unit, q block) rows advance together, one
list slot per step (a loop whose trip count is the largest list count, `rows_per_step`
rows at a time), gathering the listed K / V tiles for one batched dot; slots past a
row's count are masked, so only listed blocks are computed and no T x S array exists.
The static inner mask is compiled once at trace time to per-tile bitmaps (a plain
causal one is evaluated from the indices). Its backward (own custom_vjp) recomputes
the probabilities from the lse, keeps dQ in the carry and scatter-adds dK / dV and the
bias gradient. New lists of the same shapes do not recompile.

Layout: `plan` (NumPy planning from the BlockMask), `tiling` (the cost model and the
automatic tilings), `blocked` (tiles, forward, backward, custom_vjp), `dynamic` (the
traced DynamicBlockMask path); this module is the entry point.
"""

from __future__ import annotations

import jax
import numpy as np

from attention.masks import base as masks_base
from attention.masks import block as masks_block
from kernels import problem as problem_lib
from kernels.xla import blocked
from kernels.xla import dynamic
from kernels.xla import plan as plan_lib
from kernels.xla import tiling
# Re-exports used by the tests and benchmarks.
from kernels.xla.blocked import (  # pylint: disable=unused-import
    _Config, _flash, _flash_jit, _forward, _backward, _fused_tile, _Tiles)
from kernels.xla.plan import (  # pylint: disable=unused-import
    EMPTY, FULL, PARTIAL, _AllVisible, _HeadGroup, _Lists, _Plan, _build_lists,
    _chunk_work, _make_plan)
from kernels.xla.tiling import (  # pylint: disable=unused-import
    _auto_bwd_tiling, _auto_fused, _auto_tiling, _check_block_arg, _check_length,
    _check_mask_obj, _chunk_counts, _step_rate, _tiling_cost, block_sizes_for,
    bwd_tiling_for, default_block_sizes, tiling_for)

__all__ = ['attention', 'visited_fraction', 'tiling_for', 'bwd_tiling_for',
           'block_sizes_for', 'default_block_sizes']


def unsupported(query: jax.Array, key: jax.Array, value: jax.Array,
                problem: problem_lib.AttentionProblem) -> str | None:
  """Why this problem cannot run here (None: it can; every problem can)."""
  del query, key, value, problem
  return None


def attention(query: jax.Array, key: jax.Array, value: jax.Array,
              problem: problem_lib.AttentionProblem, *,
              block_q: int | None = None, block_kv: int | None = None,
              kv_chunk: int | None = None, lanes: int | None = None,
              bwd_block_q: int | None = None, bwd_block_kv: int | None = None,
              fused: bool | None = None, rows_per_step: int | None = None):
  """Blocked flash attention of a validated problem (see `kernels.problem`).

  Same semantics as `kernels.reference.attention` (FlashAttention's online softmax,
  Dao et al. 2022, over the active tiles of the compiled BlockMask, or over the
  listed blocks of a traced `problem.block_mask`), including score_mod, dropout,
  sinks and segments. The inputs were validated by
  `kernels.problem.make_problem`; only the options below are checked here.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, Hv].
    problem: the `AttentionProblem` built from these arrays.
    block_q, block_kv: tile sizes (None: chosen by `tiling_for`); lengths are padded
      to multiples of them. Use `functools.partial(attention, block_q=..)` to
      override.
    kv_chunk: consecutive kv blocks per forward step (None: chosen by `tiling_for`);
      1 visits one block_q x block_kv tile per step.
    lanes: query (forward) / key (backward) blocks processed side by side per step
      (None: as many as keep a step near 2M logits, at most 8).
    bwd_block_q, bwd_block_kv: tile sizes of the backward pass (None: chosen by
      `bwd_tiling_for`).
    fused: forward step form: True runs each tile as `_fused_tile` (three dots in
      two multi-threaded XLA:CPU calls), False as one online-softmax step (two
      dots); None picks by `_auto_fused`. Both are exact. Dropout always uses the
      online step.
    rows_per_step: with a DynamicBlockMask only: (batch, head, q block) rows that
      advance together per loop (None: `kernels.xla.dynamic.default_rows_per_step`,
      about 2^19 logits per step).
      The tile options above do not apply there: its tiles are the mask's blocks.

  Returns:
    out [B, T, N, Hv] in query's dtype, and with `problem.return_residuals` the
    log-sum-exp [B, N, T] (float32, float64 for float64 inputs; -inf where a row sees
    nothing).
  """
  if not isinstance(problem, problem_lib.AttentionProblem):
    raise TypeError('problem must be a kernels.problem.AttentionProblem (built by '
                    f'make_problem), got {type(problem).__name__}.')
  if problem.block_mask is not None:
    return dynamic.attention(query, key, value, problem, rows_per_step=rows_per_step)
  block_q = _check_block_arg('block_q', block_q)
  block_kv = _check_block_arg('block_kv', block_kv)
  kv_chunk = _check_block_arg('kv_chunk', kv_chunk)
  lanes = _check_block_arg('lanes', lanes)
  bwd_block_q = _check_block_arg('bwd_block_q', bwd_block_q)
  bwd_block_kv = _check_block_arg('bwd_block_kv', bwd_block_kv)
  if fused is not None and not isinstance(fused, bool):
    raise TypeError(f'fused must be a bool or None, got {type(fused).__name__}.')
  b, t, n, _ = query.shape
  s, kh = key.shape[1], key.shape[2]
  mask_obj = problem.mask_obj
  block_q, block_kv, kv_chunk = _auto_tiling(t, s, mask_obj, block_q, block_kv,
                                             kv_chunk, query.shape[-1])
  bwd_q, bwd_kv = _auto_bwd_tiling(t, s, (block_q, block_kv, kv_chunk),
                                   bwd_block_q, bwd_block_kv)
  structure = mask_obj if mask_obj is not None else _AllVisible((t, s))
  plan = _make_plan(structure, n, kh, block_q, block_kv, b * n, lanes, kv_chunk)
  bwd_plan = None
  if (bwd_q, bwd_kv) != (block_q, block_kv) or kv_chunk != 1:
    bwd_plan = _make_plan(structure, n, kh, bwd_q, bwd_kv, b * n, lanes, 1)
  if fused is None:
    fused = _auto_fused(block_q, block_kv, kv_chunk, query.shape[-1],
                        group=n // kh, batch_items=b * kh)
  cfg = _Config(plan=plan, scale=problem.scale, soft_cap=problem.logits_soft_cap,
                bwd_plan=bwd_plan, fused=fused and not problem.has_dropout,
                dropout_rate=problem.dropout_rate, q_len=t, kv_len=s)
  out, lse = _flash_jit(cfg, query, key, value, problem.bias, problem.sinks,
                        problem.mask, problem.q_segment_ids,
                        problem.kv_segment_ids, problem.score_mod,
                        problem.dropout_seed if problem.has_dropout else None)
  if problem.return_residuals:
    return out, lse
  return out


def visited_fraction(q_len: int, kv_len: int, mask_obj: masks_base.Mask | None,
                     num_heads: int = 1, block_q: int | None = None,
                     block_kv: int | None = None,
                     kv_chunk: int | None = None) -> float:
  """Logits the forward pass computes over the padded T x S area (per head).

  With chunks of kv blocks this counts whole chunks (including their EMPTY members),
  so it can exceed the fraction of active tiles; unset tiling arguments are chosen by
  `tiling_for`.
  """
  _check_length('q_len', q_len)
  _check_length('kv_len', kv_len)
  _check_mask_obj(mask_obj, q_len, kv_len)
  _check_length('num_heads', num_heads)
  block_q = _check_block_arg('block_q', block_q)
  block_kv = _check_block_arg('block_kv', block_kv)
  kv_chunk = _check_block_arg('kv_chunk', kv_chunk)
  block_q, block_kv, kv_chunk = _auto_tiling(q_len, kv_len, mask_obj, block_q,
                                             block_kv, kv_chunk)
  structure = mask_obj if mask_obj is not None else _AllVisible((q_len, kv_len))
  bm = masks_block.compile_mask(
      structure, block_q, block_kv,
      num_heads=num_heads if structure.head_dependent else None)
  steps = 0
  for u in np.asarray(bm.head_map):
    n_full, n_part = _chunk_counts(bm.block_state[u], kv_chunk)
    steps += int(n_full.sum() + n_part.sum())
  return float(steps * kv_chunk) / (
      len(bm.head_map) * bm.num_q_blocks * bm.num_kv_blocks)
