"""The conformance suite every attention implementation subclasses (tokamax's test_base).

One base class, `AttentionTestBase`, runs the same cases against an implementation of
the `kernels.problem` contract; a subclass names the implementation and its options:

    class TestXlaConformance(conformance.AttentionTestBase):
      IMPLEMENTATION = 'xla'

Each case is checked with FlexAttention's three-way rule ("FlexAttention: A Programming
Model for Generating Optimized Attention Kernels", Dong et al. 2024): with golden =
`kernels.reference` in float64 (inputs rounded to the case dtype first),

    err(implementation vs golden) <= FUDGE[dtype] * err(reference in dtype vs golden)
                                     + FLOOR[dtype] * max(1, max |golden|)

for the output, the log-sum-exp and the gradients of a random linear function of both
w.r.t. q, k, v, bias, sinks and score_mod tables; NaN and -inf patterns must match the
golden exactly, and rows that see nothing must be exactly zero (output and dq).

Cases combine several features each (Pallas interpret mode compiles slowly): masks of
every generator family (static Mask objects, dense arrays traced under jit, head-
dependent masks, random `&`/`|`/`~` programs), GQA/MQA, cross-attention, lengths that
are not multiples of the tiles, bias with -inf keys and -inf rows, every
`attention.score_mods` mod and plain closures over tables, soft-cap, sinks, segments,
dropout (the counter-based mask: same key, same result as the reference), float32 and
bfloat16, decoding (T = 1) and empty rows, and traced block masks (`DynamicBlockMask`
built under jit by top-k, a threshold, a block matrix or a union; per-batch and per-
head lists, inner causal, empty lists) combined with the features above. A subclass may list features it cannot run
in `UNSUPPORTED` (feature -> reason); the contract requires none.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention
from attention import masks
from attention import score_mods
from attention.api import _BUILTIN
from kernels import problem as problem_lib
from kernels import reference

# The three-way tolerances, one place for every implementation.
FUDGE = {'float32': 4.0, 'bfloat16': 3.0}
FLOOR = {'float32': 2e-6, 'bfloat16': 4e-3}
# Sanity bound of the same-dtype reference itself (relative to max(1, max |golden|)).
REFERENCE_BOUND = {'float32': 1e-4, 'bfloat16': 6e-2}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

ALL_FEATURES = frozenset({
    'mask_object', 'dense_mask', 'head_dependent_mask', 'mask_program', 'gqa', 'mqa',
    'cross_attention', 'padding', 'bias', 'neg_inf_bias', 'score_mod',
    'score_mod_closure', 'soft_cap', 'sinks', 'segments', 'lse', 'dropout',
    'bfloat16', 'decode', 'empty_rows', 'nan', 'gradients', 'block_options',
    'dynamic_mask'})


# ----------------------------------------------------------------------------------------
# Cases.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
  """One attention problem.

  floats: name -> (float64 master array, 'input' (cast to the case dtype) or 'f32'
    (float32 outside the golden)); always holds q, k, v. Their values are rounded to
    the run dtype before the golden sees them.
  aux: non-float inputs (bool masks, segment ids, dropout key): jit arguments, so they
    are traced.
  kwargs: (floats, aux) -> keyword arguments of `dot_product_attention`, built inside
    the differentiated function (so tables closed over by a score_mod are traced).
  grads: names in `floats` to differentiate (empty: forward only).
  """
  floats: dict[str, tuple[np.ndarray, str]]
  aux: dict[str, Any]
  kwargs: Callable[[dict[str, jax.Array], dict[str, Any]], dict[str, Any]]
  grads: tuple[str, ...]
  features: frozenset[str]
  lse_nan: np.ndarray | None = None  # [B, N, T] rows whose lse must be NaN


def _qkv(rng, b, t, s, n, kh, hd=16, hv=8, q_scale=1.5):
  return {'q': (rng.normal(size=(b, t, n, hd)) * q_scale, 'input'),
          'k': (rng.normal(size=(b, s, kh, hd)), 'input'),
          'v': (rng.normal(size=(b, s, kh, hv)), 'input')}


def case_gqa_bias_sinks_softcap() -> Case:
  """GQA 8/2, T=37, S=45, bias [B,1,T,S] with -inf keys and -inf rows, sinks, cap."""
  rng = np.random.default_rng(1)
  b, t, s = 2, 37, 45
  floats = _qkv(rng, b, t, s, 8, 2)
  bias = rng.normal(size=(b, 1, t, s))
  bias[1, :, :, -6:] = -np.inf  # key padding of batch 1
  bias[0, :, 4, :] = -np.inf  # a row that sees nothing (the sink still counts)
  bias[0, :, 9, :] = -np.inf
  floats['bias'] = (bias, 'input')
  floats['sinks'] = (rng.normal(size=(8,)), 'f32')
  return Case(
      floats, {},
      lambda f, a: dict(bias=f['bias'], sinks=f['sinks'], logits_soft_cap=3.0),
      ('q', 'k', 'v', 'bias', 'sinks'),
      frozenset({'gqa', 'padding', 'bias', 'neg_inf_bias', 'sinks', 'soft_cap',
                 'lse', 'gradients'}))


def case_causal_mqa_segments_dropout() -> Case:
  """MQA 8/1, causal, packed segments, dropout 0.25, T = S = 48."""
  rng = np.random.default_rng(2)
  b, t = 2, 48
  floats = _qkv(rng, b, t, t, 8, 1)
  seg = np.stack([np.repeat([0, 1, 2], [20, 9, 19]), np.repeat([0, 1], [5, 43])])
  return Case(
      floats, {'seg': jnp.asarray(seg, jnp.int32), 'key': jax.random.key(3)},
      lambda f, a: dict(is_causal=True, segment_ids=a['seg'], dropout_rate=0.25,
                        dropout_key=a['key']),
      ('q', 'k', 'v'),
      frozenset({'mqa', 'mask_object', 'segments', 'dropout', 'lse', 'gradients'}))


def case_cross_traced_mask_alibi() -> Case:
  """Cross-attention T=20 < S=56, traced bool mask with empty rows, ALiBi slopes."""
  rng = np.random.default_rng(3)
  b, t, s, n = 2, 20, 56, 8
  floats = _qkv(rng, b, t, s, n, 4)
  mask = rng.random((b, 1, t, s)) < 0.6
  mask[0, 0, 3] = False
  mask[1, 0, 17:] = False
  floats['slopes'] = (score_mods.alibi_slopes(n), 'f32')
  return Case(
      floats, {'mask': jnp.asarray(mask)},
      lambda f, a: dict(mask=a['mask'], scale=0.3,
                        score_mod=score_mods.alibi(n, slopes=f['slopes'])),
      ('q', 'k', 'v', 'slopes'),
      frozenset({'cross_attention', 'gqa', 'dense_mask', 'empty_rows', 'score_mod',
                 'padding', 'lse', 'gradients'}))


def case_sliding_window_t5() -> Case:
  """MHA, sliding window mask object, T5 decoder bias (table gradients), T=S=64."""
  rng = np.random.default_rng(4)
  b, t, n = 1, 64, 8
  floats = _qkv(rng, b, t, t, n, n, hd=8, hv=16)
  floats['table'] = (rng.normal(size=(8, n)), 'f32')
  mask = masks.sliding_window(t, 11)
  return Case(
      floats, {},
      lambda f, a: dict(mask=mask, score_mod=score_mods.t5_relative_bias(
          n, num_buckets=8, max_distance=20, bidirectional=False, table=f['table'])),
      ('q', 'k', 'v', 'table'),
      frozenset({'mask_object', 'score_mod', 'lse', 'gradients'}))


def case_chunked_documents_relative_logits() -> Case:
  """(chunked causal, documents, traced array) mask tuple, relative logits, sinks."""
  rng = np.random.default_rng(5)
  b, t, n = 2, 40, 8
  floats = _qkv(rng, b, t, t, n, 2)
  floats['table'] = (rng.normal(size=(9, n)), 'f32')
  floats['sinks'] = (rng.normal(size=(n,)), 'f32')
  extra = rng.random((1, n, t, t)) < 0.85
  mask_objs = (masks.chunked_causal(t, 16), masks.documents([13, 20, 7], causal=False))
  return Case(
      floats, {'extra': jnp.asarray(extra)},
      lambda f, a: dict(mask=mask_objs + (a['extra'],), sinks=f['sinks'],
                        score_mod=score_mods.relative_logits(n, 4, table=f['table'])),
      ('q', 'k', 'v', 'table', 'sinks'),
      frozenset({'mask_object', 'dense_mask', 'gqa', 'padding', 'score_mod', 'sinks',
                 'lse', 'gradients'}))


def case_per_head_swin_dropout() -> Case:
  """Head-dependent masks, Swin 2D bias on a 4 x 6 grid (T=S=24), dropout 0.1."""
  rng = np.random.default_rng(6)
  b, t, n = 1, 24, 8
  floats = _qkv(rng, b, t, t, n, 4)
  floats['table'] = (rng.normal(size=(7 * 11, n)), 'f32')
  heads = [masks.causal(t), masks.sliding_window(t, 5, 5), masks.full(t),
           masks.chunked_causal(t, 7), masks.prefix_lm(t, 5),
           masks.sink_window(t, 2, 8), ~masks.causal(t), masks.causal(t, offset=-3)]
  mask = masks.per_head(heads)
  return Case(
      floats, {'key': jax.random.key(6)},
      lambda f, a: dict(mask=mask, dropout_rate=0.1, dropout_key=a['key'],
                        score_mod=score_mods.relative_bias_2d((4, 6), n,
                                                              table=f['table'])),
      ('q', 'k', 'v', 'table'),
      frozenset({'head_dependent_mask', 'mask_object', 'empty_rows', 'gqa',
                 'score_mod', 'dropout', 'lse', 'gradients'}))


def case_mask_program_closure() -> Case:
  """A mask program (&, |, ~), a plain score_mod closing over a per-head table."""
  rng = np.random.default_rng(7)
  b, t, s, n = 2, 33, 50, 16
  floats = _qkv(rng, b, t, s, n, 4, hd=8, hv=8)
  floats['table'] = (rng.normal(size=(n, 3)), 'f32')
  window = masks.sliding_window(t, 6, 6, kv_len=s, offset=12)
  mask = (window | masks.prefix_lm(t, 4, kv_len=s)) & ~masks.chunked_causal(
      t, 5, kv_len=s)

  def kwargs(f, a):
    tab = f['table']

    def mod(score, b, h, q_idx, kv_idx):  # closes over the traced table
      return score * tab[h, 0] + tab[h, 1] * jnp.sin(0.3 * (q_idx - kv_idx)) + tab[h, 2]

    return dict(mask=mask, score_mod=mod)

  return Case(floats, {}, kwargs, ('q', 'k', 'v', 'table'),
              frozenset({'mask_program', 'mask_object', 'cross_attention', 'gqa',
                         'padding', 'score_mod_closure', 'empty_rows', 'lse',
                         'gradients'}))


def case_decode_compose() -> Case:
  """Decoding T=1, GQA 16/2, -inf key padding, sinks, distance bias + soft cap."""
  rng = np.random.default_rng(8)
  b, s, n = 3, 37, 16
  floats = _qkv(rng, b, 1, s, n, 2, hd=16, hv=16, q_scale=3.0)
  bias = np.zeros((b, 1, 1, s))
  bias[0, ..., 30:] = -np.inf
  bias[2, ...] = -np.inf  # nothing visible: the sink takes all the mass
  floats['bias'] = (bias, 'input')
  floats['sinks'] = (rng.normal(size=(n,)), 'f32')
  floats['table'] = (rng.normal(size=(12,)), 'f32')
  return Case(
      floats, {},
      lambda f, a: dict(bias=f['bias'], sinks=f['sinks'], score_mod=score_mods.compose(
          score_mods.distance_bias(f['table'], min_distance=-20),
          score_mods.soft_cap(2.5))),
      ('q', 'k', 'v', 'bias', 'sinks', 'table'),
      frozenset({'decode', 'gqa', 'padding', 'bias', 'neg_inf_bias', 'sinks',
                 'score_mod', 'lse', 'gradients'}))


def case_empty_rows_score_mod() -> Case:
  """Rows hidden by a -inf score_mod, a fully masked batch item, segments, no sinks."""
  rng = np.random.default_rng(9)
  b, t, s, n = 2, 24, 40, 8
  floats = _qkv(rng, b, t, s, n, 8)
  q_seg = np.stack([np.repeat([0, 1], [12, 12]), np.full(t, 5)])
  kv_seg = np.stack([np.repeat([0, 1, 2], [10, 20, 10]), np.full(s, 4)])  # b=1: none

  def mod(score, b, h, q_idx, kv_idx):
    # Not additive in score (its derivative is not 1) and without params: the
    # backward must still go through the mod.
    return jnp.where((q_idx % 7 == 2) | (kv_idx > 35), -jnp.inf,
                     score * (1.0 + 0.25 * (h % 3)) + 0.1 * h)

  return Case(
      floats, {'q_seg': jnp.asarray(q_seg), 'kv_seg': jnp.asarray(kv_seg)},
      lambda f, a: dict(segment_ids=(a['q_seg'], a['kv_seg']), score_mod=mod,
                        mask=masks.causal(t, s, offset=16)),
      ('q', 'k', 'v'),
      frozenset({'empty_rows', 'segments', 'cross_attention', 'score_mod_closure',
                 'mask_object', 'lse', 'gradients'}))


def case_nan_propagates() -> Case:
  """NaN in q / k / v reaches exactly the outputs the golden says (forward only)."""
  rng = np.random.default_rng(10)
  b, t, s, n = 2, 19, 27, 8
  floats = _qkv(rng, b, t, s, n, 2)
  floats['q'][0][0, 5, 3] = np.nan
  floats['k'][0][1, 7, 1] = np.nan
  floats['v'][0][0, 20, 0, 2] = np.nan
  # A NaN logit among the visible keys makes the row's lse NaN (v does not enter it).
  lse_nan = np.zeros((b, n, t), bool)
  lse_nan[0, 3, 5] = True
  lse_nan[1, 4:8, 3:] = True  # kv head 1 = query heads 4..7; key 7 visible for t >= 3
  return Case(floats, {}, lambda f, a: dict(mask=masks.causal(t, s, offset=4)), (),
              frozenset({'nan', 'gqa', 'cross_attention', 'mask_object', 'lse'}),
              lse_nan=lse_nan)


# ----- traced block masks (attention.masks.DynamicBlockMask) -----
# The lists are built inside the jitted program from traced aux arrays (scores, block
# matrices), so every implementation runs them as traced inputs; the golden is the
# reference, which materialises the equivalent dense mask.


def _moba_scores(rng, bm, hm, nq, nk):
  """Random block scores, -inf for future blocks (MoBA's eligibility)."""
  scores = rng.normal(size=(bm, hm, nq, nk)).astype(np.float32)
  future = np.arange(nk)[None, :] > np.arange(nq)[:, None]
  return np.where(future, -np.inf, scores).astype(np.float32)


def case_dynamic_topk_causal_gqa_sinks() -> Case:
  """MoBA-style top-3 of 6 blocks per (batch, kv head) (Bm=B, Hm=K), causal, sinks."""
  rng = np.random.default_rng(21)
  b, t, n, kh, blk = 2, 96, 8, 2, 16
  floats = _qkv(rng, b, t, t, n, kh)
  floats['sinks'] = (rng.normal(size=(n,)), 'f32')
  nq = t // blk
  diag = np.eye(nq, dtype=bool)[None, None]

  def kwargs(f, a):
    dyn = masks.top_k_blocks(a['scores'], 3, q_len=t, kv_len=t, block_q=blk,
                             block_kv=blk, always=a['diag'])
    return dict(mask=dyn, is_causal=True, sinks=f['sinks'])

  return Case(floats, {'scores': jnp.asarray(_moba_scores(rng, b, kh, nq, nq)),
                       'diag': jnp.asarray(diag)},
              kwargs, ('q', 'k', 'v', 'sinks'),
              frozenset({'dynamic_mask', 'gqa', 'mask_object', 'sinks', 'lse',
                         'gradients'}))


def case_dynamic_blocks_padding_bias_empty() -> Case:
  """Cross T=45, S=70 (padding), 16 x 32 blocks, Hm=1, an empty row, bias + cap."""
  rng = np.random.default_rng(22)
  b, t, s, n, kh = 2, 45, 70, 4, 4
  floats = _qkv(rng, b, t, s, n, kh, hd=16, hv=16)
  bias = rng.normal(size=(b, 1, t, s))
  bias[1, :, :, 60:] = -np.inf
  floats['bias'] = (bias, 'input')
  blocks = np.array([[[1, 0, 1], [0, 0, 0], [1, 1, 0]]], bool)[None]  # [1, 1, 3, 3]

  def kwargs(f, a):
    dyn = masks.from_block_matrix(a['blocks'], q_len=t, kv_len=s, block_q=16,
                                  block_kv=32, budget=2)
    return dict(mask=dyn, bias=f['bias'], logits_soft_cap=4.0)

  return Case(floats, {'blocks': jnp.asarray(blocks)}, kwargs,
              ('q', 'k', 'v', 'bias'),
              frozenset({'dynamic_mask', 'cross_attention', 'padding', 'bias',
                         'neg_inf_bias', 'soft_cap', 'empty_rows', 'lse',
                         'gradients'}))


def case_dynamic_per_head_segments_alibi() -> Case:
  """Per query head lists (Hm=N), cumulative threshold, segments, dense mask, ALiBi."""
  rng = np.random.default_rng(23)
  b, t, n, kh, blk = 2, 64, 8, 4, 16
  floats = _qkv(rng, b, t, t, n, kh, hd=8, hv=16)
  floats['slopes'] = (score_mods.alibi_slopes(n), 'f32')
  nq = t // blk
  mass = rng.random((b, n, nq, nq)).astype(np.float32)
  mass[0, 2, 1] = 0.0  # no eligible block: an empty row (count 0)
  seg = np.stack([np.repeat([0, 1], [30, 34]), np.repeat([0, 1, 2], [10, 40, 14])])
  dense = rng.random((b, 1, t, t)) < 0.8

  def kwargs(f, a):
    dyn = masks.cumulative_threshold_blocks(a['mass'], 0.6, 3, q_len=t, kv_len=t,
                                            block_q=blk, block_kv=blk)
    return dict(mask=(dyn, a['dense']), segment_ids=a['seg'],
                score_mod=score_mods.alibi(n, slopes=f['slopes']))

  return Case(floats, {'mass': jnp.asarray(mass), 'seg': jnp.asarray(seg, jnp.int32),
                       'dense': jnp.asarray(dense)},
              kwargs, ('q', 'k', 'v', 'slopes'),
              frozenset({'dynamic_mask', 'gqa', 'segments', 'dense_mask', 'score_mod',
                         'empty_rows', 'lse', 'gradients'}))


def _halve_head_one(score, b, h, q_idx, kv_idx):
  """A param-free score_mod that is not additive (d mod / d score = 0.5 on head 1)."""
  del b, q_idx, kv_idx
  return jnp.where(h == 1, 0.5 * score, score)


def case_dynamic_union_window_dropout_mqa() -> Case:
  """MQA, top-1 per batch (Bm=B, Hm=1) union a sink window, inner causal, dropout,
  a param-free multiplicative score_mod."""
  rng = np.random.default_rng(24)
  b, t, n, blk = 2, 64, 4, 16
  floats = _qkv(rng, b, t, t, n, 1)
  nq = t // blk
  window = masks.sink_window(t, 4, 20)

  def kwargs(f, a):
    dyn = masks.top_k_blocks(a['scores'], 1, q_len=t, kv_len=t, block_q=blk,
                             block_kv=blk)
    return dict(mask=masks.union(dyn, window), is_causal=True, dropout_rate=0.2,
                dropout_key=a['key'], score_mod=_halve_head_one)

  return Case(floats, {'scores': jnp.asarray(_moba_scores(rng, b, 1, nq, nq)),
                       'key': jax.random.key(24)},
              kwargs, ('q', 'k', 'v'),
              frozenset({'dynamic_mask', 'mqa', 'mask_object', 'dropout', 'lse',
                         'score_mod_closure', 'gradients'}))


def case_dynamic_closure_full_budget_decode() -> Case:
  """Decoding-like T=5 (one q block), S=80, full budget, plain closure score_mod."""
  rng = np.random.default_rng(25)
  b, t, s, n, kh = 1, 5, 80, 8, 2
  floats = _qkv(rng, b, t, s, n, kh, hd=16, hv=8, q_scale=2.0)
  floats['table'] = (rng.normal(size=(n,)), 'f32')
  blocks = np.array([[[[1, 1, 0, 1, 1]], [[0, 1, 1, 1, 0]]]], bool)  # [1, 2, 1, 5]

  def kwargs(f, a):
    tab = f['table']
    dyn = masks.from_block_matrix(a['blocks'], q_len=t, kv_len=s, block_q=8,
                                  block_kv=16)

    def mod(score, b, h, q_idx, kv_idx):
      return score + tab[h] * jnp.cos(0.1 * kv_idx)

    return dict(mask=dyn, score_mod=mod)

  return Case(floats, {'blocks': jnp.asarray(blocks)}, kwargs,
              ('q', 'k', 'v', 'table'),
              frozenset({'dynamic_mask', 'decode', 'gqa', 'padding',
                         'score_mod_closure', 'lse', 'gradients'}))


CASES = {
    'gqa_bias_sinks_softcap': case_gqa_bias_sinks_softcap,
    'causal_mqa_segments_dropout': case_causal_mqa_segments_dropout,
    'cross_traced_mask_alibi': case_cross_traced_mask_alibi,
    'sliding_window_t5': case_sliding_window_t5,
    'chunked_documents_relative_logits': case_chunked_documents_relative_logits,
    'per_head_swin_dropout': case_per_head_swin_dropout,
    'mask_program_closure': case_mask_program_closure,
    'decode_compose': case_decode_compose,
    'empty_rows_score_mod': case_empty_rows_score_mod,
    'nan_propagates': case_nan_propagates,
    'dynamic_topk_causal_gqa_sinks': case_dynamic_topk_causal_gqa_sinks,
    'dynamic_blocks_padding_bias_empty': case_dynamic_blocks_padding_bias_empty,
    'dynamic_per_head_segments_alibi': case_dynamic_per_head_segments_alibi,
    'dynamic_union_window_dropout_mqa': case_dynamic_union_window_dropout_mqa,
    'dynamic_closure_full_budget_decode': case_dynamic_closure_full_budget_decode,
}
# (case, dtype) pairs; bfloat16 on the two broadest cases.
CASE_DTYPES = [(name, 'float32') for name in CASES] + [
    ('gqa_bias_sinks_softcap', 'bfloat16'),
    ('causal_mqa_segments_dropout', 'bfloat16'),
    ('dynamic_topk_causal_gqa_sinks', 'bfloat16')]


# ----------------------------------------------------------------------------------------
# Running a case.
# ----------------------------------------------------------------------------------------


def _cast(floats, dtype, golden: bool):
  """The case's floats for a run: rounded to the run dtype, float64 for the golden."""
  out = {}
  for name, (x, policy) in floats.items():
    run_dtype = dtype if policy == 'input' else jnp.float32
    rounded = jnp.asarray(x, jnp.float32).astype(run_dtype)
    out[name] = (jnp.asarray(np.asarray(rounded.astype(jnp.float32), np.float64))
                 if golden else rounded)
  return out


def _program(fn, case: Case, cotangents: bool):
  """f(floats, aux[, w_out, w_lse]) -> (out, lse[, grads]) through `fn`."""

  def forward(floats, aux):
    q, k, v = floats['q'], floats['k'], floats['v']
    problem = problem_lib.make_problem(q, k, v, return_residuals=True,
                                       **case.kwargs(floats, aux))
    return fn(q, k, v, problem)

  if not cotangents:
    return forward

  def with_grads(floats, aux, w_out, w_lse):
    diff = {n: floats[n] for n in case.grads}
    rest = {n: x for n, x in floats.items() if n not in diff}
    (out, lse), vjp = jax.vjp(lambda d: forward({**rest, **d}, aux), diff)
    grads, = vjp((w_out.astype(out.dtype), w_lse.astype(lse.dtype)))
    return out, lse, grads

  return with_grads


def _np64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32) if x.dtype == jnp.bfloat16
                    else x, np.float64)


def _check(name, got, ref, gold, dtype):
  """The three-way check of one array (float64 NumPy arrays of one shape)."""
  assert got.shape == gold.shape, (name, got.shape, gold.shape)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(gold),
                                err_msg=f'{name}: NaN pattern differs from the golden')
  np.testing.assert_array_equal(np.isinf(got) & (got < 0), np.isinf(gold) & (gold < 0),
                                err_msg=f'{name}: -inf pattern differs')
  np.testing.assert_array_equal(np.isinf(got) & (got > 0), np.isinf(gold) & (gold > 0),
                                err_msg=f'{name}: +inf pattern differs')
  finite = np.isfinite(gold)
  if not finite.any():
    return
  err = np.max(np.abs(got[finite] - gold[finite]))
  err_ref = np.max(np.abs(ref[finite] - gold[finite]))
  scale = max(1.0, float(np.max(np.abs(gold[finite]))))
  # The same-dtype reference must itself be close, or the bound would be vacuous.
  assert err_ref <= REFERENCE_BOUND[dtype] * scale, (
      f'{name} ({dtype}): reference error {err_ref:.3g} vs golden (scale {scale:.3g})')
  bound = FUDGE[dtype] * err_ref + FLOOR[dtype] * scale
  assert err <= bound, (
      f'{name} ({dtype}): error vs float64 golden {err:.3g} > {FUDGE[dtype]} x '
      f'reference error {err_ref:.3g} + {FLOOR[dtype]} x {scale:.3g} = {bound:.3g}')


class AttentionTestBase:
  """Conformance cases; subclass with IMPLEMENTATION (a registered name).

  Attributes:
    IMPLEMENTATION: the name registered in `attention.api`.
    OPTIONS: keyword options of the implementation's `attention` for the fixed cases.
    UNSUPPORTED: feature -> reason, for what the implementation genuinely cannot run.
    JIT_COMPILER_OPTIONS: XLA compiler options of the implementation's runs.
    HYPOTHESIS_EXAMPLES: examples of the property test (None: the profile's).
  """

  IMPLEMENTATION: str = ''
  OPTIONS: dict[str, Any] = {}
  UNSUPPORTED: dict[str, str] = {}
  JIT_COMPILER_OPTIONS: dict[str, Any] | None = None
  HYPOTHESIS_EXAMPLES: int | None = 6

  @classmethod
  def block_options(cls, block_q: int, block_kv: int) -> dict[str, Any] | None:
    """Options for tiles of about (block_q, block_kv); None: no block options."""
    del block_q, block_kv
    return None

  @classmethod
  def block_choices(cls) -> tuple[int, ...]:
    """Tile sizes the property test draws from."""
    return (8, 16, 32)

  # ----- helpers -----
  def _module(self):
    return importlib.import_module(_BUILTIN.get(self.IMPLEMENTATION,
                                                self.IMPLEMENTATION))

  def _skip_unsupported(self, features):
    missing = sorted(set(features) & set(self.UNSUPPORTED))
    if missing:
      pytest.skip(f'{self.IMPLEMENTATION} does not support '
                  + '; '.join(f'{f}: {self.UNSUPPORTED[f]}' for f in missing))

  def _impl_fn(self, options):
    module = self._module()

    def fn(q, k, v, problem):
      check = getattr(module, 'unsupported', None)
      reason = check(q, k, v, problem) if check is not None else None
      assert reason is None, f'{self.IMPLEMENTATION}.unsupported: {reason}'
      return module.attention(q, k, v, problem, **options)

    return fn

  def run_case(self, case: Case, dtype: str, options: dict[str, Any] | None = None):
    """Runs `case` three ways and checks the implementation against the golden."""
    self._skip_unsupported(case.features | ({'bfloat16'} if dtype == 'bfloat16'
                                            else set()))
    options = dict(self.OPTIONS if options is None else options)
    run_dtype = DTYPES[dtype]
    grads = bool(case.grads)
    jit_impl = functools.partial(jax.jit, compiler_options=self.JIT_COMPILER_OPTIONS)
    b, t, n, _ = case.floats['q'][0].shape
    hv = case.floats['v'][0].shape[-1]
    rng = np.random.default_rng(99)
    w_out = rng.normal(size=(b, t, n, hv))
    w_lse = rng.normal(size=(b, n, t))

    # Golden: the float64 reference on the rounded inputs.
    with jax.enable_x64(True):
      gold_floats = _cast(case.floats, run_dtype, golden=True)
      # The lse cotangent is nonzero on rows that see nothing too: their lse is the
      # constant -inf, so they must contribute exactly zero gradient.
      gold_fn = jax.jit(_program(reference.attention, case, grads))
      gold = gold_fn(gold_floats, case.aux,
                     *((jnp.asarray(w_out), jnp.asarray(w_lse)) if grads else ()))
      gold = list(jax.tree_util.tree_map(_np64, gold))
    if case.lse_nan is not None:
      gold[1] = np.where(case.lse_nan, np.nan, gold[1])

    floats = _cast(case.floats, run_dtype, golden=False)
    args = (floats, case.aux) + ((jnp.asarray(w_out, jnp.float32),
                                  jnp.asarray(w_lse, jnp.float32)) if grads else ())
    ref = jax.jit(_program(reference.attention, case, grads))(*args)
    if self._module() is reference and not options:
      got = ref  # the same program: one compile fewer
    else:
      got = jit_impl(_program(self._impl_fn(options), case, grads))(*args)
    assert got[0].dtype == run_dtype and got[1].dtype == jnp.float32, (
        got[0].dtype, got[1].dtype)
    if grads:
      for name in case.grads:
        assert got[2][name].dtype == floats[name].dtype, name
    ref = jax.tree_util.tree_map(_np64, ref)
    got = jax.tree_util.tree_map(_np64, got)

    for i, what in enumerate(('out', 'lse')):
      _check(what, got[i], ref[i], gold[i], dtype)
    empty = np.isneginf(gold[1])  # [B, N, T]: rows that see nothing and no sink
    empty_btn = empty.transpose(0, 2, 1)  # [B, T, N]
    if empty.any():
      assert np.all(got[0][empty_btn] == 0), 'rows that see nothing must be zero'
    if grads:
      for name in case.grads:
        _check(f'd{name}', got[2][name], ref[2][name], gold[2][name], dtype)
      if empty.any():
        assert np.all(got[2]['q'][empty_btn] == 0), (
            'dq of rows that see nothing must be zero')
    return got, gold

  # ----- the fixed cases -----
  @pytest.mark.parametrize('name,dtype', CASE_DTYPES,
                           ids=[f'{n}-{d}' for n, d in CASE_DTYPES])
  def test_case(self, name, dtype):
    self.run_case(CASES[name](), dtype)

  def test_public_api_dispatch(self):
    """`dot_product_attention(implementation=...)` reaches this implementation."""
    self._skip_unsupported({'mask_object'})
    rng = np.random.default_rng(11)
    q, k, v = (jnp.asarray(x, jnp.float32) for x, _ in _qkv(rng, 1, 21, 21, 8, 2,
                                                              hd=8, hv=8).values())
    fn = jax.jit(functools.partial(attention.dot_product_attention, is_causal=True,
                                   implementation=self.IMPLEMENTATION),
                 compiler_options=self.JIT_COMPILER_OPTIONS)
    got = np.asarray(fn(q, k, v), np.float64)
    problem = problem_lib.make_problem(q, k, v, is_causal=True)
    want = np.asarray(self._module().attention(q, k, v, problem), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):
      gold = reference.attention(*(jnp.asarray(np.asarray(x, np.float64))
                                   for x in (q, k, v)),
                                 problem_lib.make_problem(
                                     *(jnp.asarray(np.asarray(x, np.float64))
                                       for x in (q, k, v)), is_causal=True))
    np.testing.assert_allclose(got, np.asarray(gold), atol=1e-5)

  # ----- property test -----
  def test_hypothesis_shapes_heads_blocks_masks(self):
    """Random shapes, head ratios, tiles and mask programs (forward and gradients)."""
    self._skip_unsupported({'mask_program', 'gqa', 'gradients'})
    settings = hypothesis.settings(
        max_examples=(self.HYPOTHESIS_EXAMPLES if self.HYPOTHESIS_EXAMPLES is not None
                      else hypothesis.settings.default.max_examples))

    @settings
    @hypothesis.given(st.data())
    def run(data):
      t = data.draw(st.integers(1, 64), label='T')
      s = data.draw(st.integers(1, 64), label='S')
      kh = data.draw(st.sampled_from([1, 2, 4]), label='K')
      g = data.draw(st.sampled_from([1, 2, 4]), label='N/K')
      hd = data.draw(st.sampled_from([8, 16]), label='head_dim')
      b = data.draw(st.integers(1, 2), label='B')
      mask = data.draw(_mask_programs(t, s), label='mask')
      options = None
      block = self.block_choices()
      opts = self.block_options(data.draw(st.sampled_from(block), label='block_q'),
                                data.draw(st.sampled_from(block), label='block_kv'))
      if opts is not None:
        options = {**self.OPTIONS, **opts}
      seed = data.draw(st.integers(0, 2 ** 16), label='seed')
      floats = _qkv(np.random.default_rng(seed), b, t, s, kh * g, kh, hd=hd, hv=hd)
      case = Case(floats, {}, lambda f, a: dict(mask=mask), ('q', 'k', 'v'),
                  frozenset({'mask_program', 'gradients'}))
      self.run_case(case, 'float32', options)

    run()


def _mask_programs(t: int, s: int, depth: int = 2):
  """A strategy of Masks of shape (t, s): generators combined with &, |, ~."""
  leaves = st.one_of(
      st.builds(lambda: masks.causal(t, s)),
      st.builds(lambda o: masks.causal(t, s, offset=o), st.integers(-8, 8)),
      st.builds(lambda left, right, o: masks.sliding_window(t, left, right, kv_len=s,
                                                            offset=o),
                st.integers(0, 12), st.integers(0, 12), st.integers(-6, 6)),
      st.builds(lambda c: masks.chunked_causal(t, c, kv_len=s), st.integers(1, 20)),
      st.builds(lambda p: masks.prefix_lm(t, p, kv_len=s), st.integers(0, 16)),
      st.builds(lambda seed: masks.from_array(
          np.random.default_rng(seed).random((t, s)) < 0.7), st.integers(0, 999)),
  )

  def extend(children):
    return st.one_of(
        st.builds(lambda a, b: a & b, children, children),
        st.builds(lambda a, b: a | b, children, children),
        st.builds(lambda a: ~a, children))

  return st.recursive(leaves, extend, max_leaves=2 ** depth)
