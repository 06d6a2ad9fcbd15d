"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin et al., 2024).

Multi-head attention is a sum over heads, MHA(x) = sum_i H_i W_O^i; MoH (arXiv
2410.11842) makes it a weighted sum over a per-token subset of heads,

    MoH(x_t) = sum_i g_ti H_ti W_O^i = W_O concat_i(g_ti H_ti),

with h heads split into h_s shared heads (always on) and E = h - h_s routed heads of
which each token keeps its top-k (Eq. 5 of the paper; the constants as the authors'
released code, SkyworkAI/MoH, MoH-ViT/attention.py):

    routed:   p_t = softmax(W_r x_t) [E];  g_t^r = k * p_t 1[topk] / sum_{topk} p_t
    shared:   g_t^s = h_s * softmax(W_s x_t) [h_s]          (all ones when h_s = 1)
    two-stage [a1, a2] = 2 * softmax(W_h x_t);  g_t = [a1 g_t^s, a2 g_t^r]

(h_s = 0: g_t = g_t^r, no W_h). With uniform logits and k = E every gate is 1: plain
multi-head attention. The load-balance loss (Eq. 6; coefficient 0.01 in the paper) is

    P_i = mean_t p_ti,  f_i = mean_t 1[i in topk_t],  L_b = E^2 mean_i(P_i f_i).

Parameter-free router (the paper's continue-tuning of LLaMA3; released
MoH-LLaMA3/Inference_code/modeling_llama.py): logit_ti = ||q_ti|| / std_i(||q_ti||)
over the routed heads (std with Bessel's correction, as torch.std), top-k of the
softmax, binary gates (1 for shared heads and kept routed heads). RoPE is a rotation,
so the norms are the same before and after it.

Head skipping (inference): for each routed head the tokens that keep it are gathered
into a STATIC budget of C slots (default ceil(k / E * T), the balanced load), only those
queries attend (keys / values of every token), and the outputs are scattered back and
weighted. Causal attention of a gathered query uses its original position: a traced
`DynamicBlockMask` lists the kv blocks up to the largest position of each gathered q
block (blocks past it are never computed); those every query of the block sees
entirely run without mask work, the boundary blocks in a second call with a
`ScoreMod` over the gathered positions (causality exact token by token), and the two
are merged by log-sum-exp. Overflow: when more than C tokens keep a head, the
C with the largest gates are computed and the rest are dropped (that head contributes
nothing for them, as if their gate were 0); the dropped count is reported per (batch,
head) as 'overflow', never silently.

Einsum letters: b batch, t positions, c gathered slots, n query heads, e routed heads,
s shared heads, k kv heads, h head dim, v value head dim, d model dim.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from attention import api
from attention.masks import dynamic
from attention.variants import hyper_attention
from kernels import problem as problem_lib

LOAD_BALANCE_WEIGHT = 0.01  # The paper's coefficient of L_b.


# ----------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {type(value).__name__}.')
  value = int(value)
  if value < low or (high is not None and value > high):
    rng = f'[{low}, {high}]' if high is not None else f'>= {low}'
    raise ValueError(f'{name} must be in {rng}, got {value}.')
  return value


def _check_split(num_heads: int, num_shared_heads: Any, top_k: Any) -> tuple[int, int]:
  """(h_s, k) validated against h heads: h_s in [0, h - 1], k in [1, h - h_s]."""
  h_s = _check_int('num_shared_heads', num_shared_heads, 0, num_heads - 1)
  k = _check_int('top_k', top_k, 1, num_heads - h_s)
  return h_s, k


def _check_rank(name: str, x: Any, rank: int) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim != rank:
    raise ValueError(f'{name} must have rank {rank}, got shape {tuple(x.shape)}.')
  return x


def _float(x: jax.Array) -> jax.Array:
  """x in at least float32 (float64 stays float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ----------------------------------------------------------------------------------
# Gates.
# ----------------------------------------------------------------------------------


class Routing(NamedTuple):
  """The gates of one MoH layer.

  gates: [B, T, N] g_ti (shared heads first); zero for routed heads that are off.
  probs: [B, T, E] routed softmax p_t.
  selected: [B, T, E] bool, the top-k routed heads of each token.
  load_balance: scalar L_b (without the 0.01 coefficient).
  """
  gates: jax.Array
  probs: jax.Array
  selected: jax.Array
  load_balance: jax.Array


def top_k_selection(probs: jax.Array, top_k: int) -> jax.Array:
  """bool [..., E]: each row's top_k entries (ties to the lower index)."""
  _, idx = jax.lax.top_k(probs, top_k)  # [..., k]
  hot = jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.int32)  # [..., k, E]
  return jnp.sum(hot, axis=-2) > 0


def routed_head_gates(logits: jax.Array, top_k: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(p, selected, g^r): p = softmax(logits), top_k kept, renormalised times k.

  Args:
    logits: [..., E] router logits W_r x.
    top_k: k in [1, E].
  """
  logits = _float(jnp.asarray(logits))
  top_k = _check_int('top_k', top_k, 1, logits.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)  # [..., E]
  selected = top_k_selection(probs, top_k)
  kept = jnp.where(selected, probs, 0.0)
  denom = jnp.maximum(jnp.sum(kept, -1, keepdims=True), jnp.finfo(kept.dtype).eps)
  return probs, selected, top_k * kept / denom


def shared_head_gates(logits: jax.Array) -> jax.Array:
  """g^s = h_s * softmax(logits) over the h_s shared heads ([..., h_s])."""
  logits = _float(jnp.asarray(logits))
  return logits.shape[-1] * jax.nn.softmax(logits, axis=-1)


def head_type_weights(logits: jax.Array) -> jax.Array:
  """[a1, a2] = 2 * softmax(W_h x) ([..., 2]): shared vs routed weights."""
  logits = _float(jnp.asarray(logits))
  if logits.shape[-1] != 2:
    raise ValueError(f'logits must end in 2 (shared, routed), got {logits.shape}.')
  return 2.0 * jax.nn.softmax(logits, axis=-1)


def load_balance_loss(probs: jax.Array, selected: jax.Array) -> jax.Array:
  """L_b = E^2 mean_i(P_i f_i), P_i = mean_t p_ti, f_i = mean_t 1[i in topk_t].

  Means over every token of the batch; f carries no gradient (an indicator).
  """
  e = probs.shape[-1]
  p_mean = jnp.mean(probs.reshape(-1, e), axis=0)  # [E]
  f = jnp.mean(selected.reshape(-1, e).astype(probs.dtype), axis=0)  # [E]
  return e * e * jnp.mean(p_mean * jax.lax.stop_gradient(f))


def moh_gates(x: jax.Array, w_r: jax.Array, w_s: jax.Array | None,
              w_h: jax.Array | None, *, num_shared_heads: int,
              top_k: int) -> Routing:
  """MoH's learned router (Eq. 5): the gates of every (token, head).

  Args:
    x: [B, T, D] the layer input.
    w_r: [D, E] routed-head router.
    w_s: [D, h_s] shared-head router (None or unused when h_s <= 1: gates 1 / h_s
      * h_s = 1).
    w_h: [D, 2] two-stage head-type router (None when h_s = 0).
    num_shared_heads: h_s >= 0; top_k: k in [1, E].
  """
  x = _check_rank('x', x, 3)
  w_r = _check_rank('w_r', w_r, 2)
  e = w_r.shape[1]
  h_s, top_k = _check_split(num_shared_heads + e, num_shared_heads, top_k)
  if w_r.shape[0] != x.shape[-1]:
    raise ValueError(f'w_r must have shape [D, E] with D = {x.shape[-1]}, got '
                     f'{tuple(w_r.shape)}.')
  xf = _float(x)
  logits_r = jnp.einsum('btd,de->bte', xf, w_r.astype(xf.dtype))  # [B, T, E]
  probs, selected, g_r = routed_head_gates(logits_r, top_k)
  loss = load_balance_loss(probs, selected)
  if h_s == 0:
    return Routing(g_r, probs, selected, loss)
  if w_h is None or tuple(w_h.shape) != (x.shape[-1], 2):
    raise ValueError(f'w_h must have shape [D, 2] = {(x.shape[-1], 2)} when '
                     f'num_shared_heads > 0, got {None if w_h is None else w_h.shape}.')
  if h_s == 1:
    g_s = jnp.ones(x.shape[:2] + (1,), xf.dtype)  # h_s * softmax of one logit
  else:
    if w_s is None or tuple(w_s.shape) != (x.shape[-1], h_s):
      raise ValueError(f'w_s must have shape [D, h_s] = {(x.shape[-1], h_s)}, got '
                       f'{None if w_s is None else w_s.shape}.')
    g_s = shared_head_gates(
        jnp.einsum('btd,ds->bts', xf, w_s.astype(xf.dtype)))  # [B, T, h_s]
  a = head_type_weights(jnp.einsum('btd,dj->btj', xf, w_h.astype(xf.dtype)))
  gates = jnp.concatenate([a[..., :1] * g_s, a[..., 1:] * g_r], axis=-1)  # [B, T, N]
  return Routing(gates, probs, selected, loss)


def query_norm_logits(query: jax.Array, num_shared_heads: int) -> jax.Array:
  """The parameter-free router's logits ||q_ti|| / std_i ||q_ti|| ([B, T, E]).

  std over the routed heads of each token with Bessel's correction (torch.std, as
  the released MoH-LLaMA3 code); where it is 0 (or E = 1) the logits are 0.
  """
  query = _check_rank('query', query, 4)
  h_s = _check_int('num_shared_heads', num_shared_heads, 0, query.shape[2] - 1)
  norms = jnp.linalg.norm(_float(query[:, :, h_s:]), axis=-1)  # [B, T, E]
  e = norms.shape[-1]
  if e == 1:
    return jnp.zeros_like(norms)
  std = jnp.std(norms, axis=-1, keepdims=True, ddof=1)
  return jnp.where(std > 0, norms / jnp.where(std > 0, std, 1.0), 0.0)


def query_norm_gates(query: jax.Array, *, num_shared_heads: int,
                     top_k: int) -> Routing:
  """Parameter-free MoH routing of a converted multi-head model (binary gates).

  Shared heads always on (gate 1); routed heads: the top_k of softmax(
  `query_norm_logits`) get gate 1, the rest 0 (released MoH-LLaMA3 inference code).
  """
  query = _check_rank('query', query, 4)
  h_s, top_k = _check_split(query.shape[2], num_shared_heads, top_k)
  probs = jax.nn.softmax(query_norm_logits(query, h_s), axis=-1)  # [B, T, E]
  selected = top_k_selection(probs, top_k)
  gates = jnp.concatenate(
      [jnp.ones(query.shape[:2] + (h_s,), probs.dtype),
       selected.astype(probs.dtype)], axis=-1)  # [B, T, N]
  return Routing(gates, probs, selected, load_balance_loss(probs, selected))


# ----------------------------------------------------------------------------------
# Attention: dense (training) and head skipping (inference).
# ----------------------------------------------------------------------------------


def _kv_for_heads(x: jax.Array, heads: np.ndarray, num_q_heads: int) -> jax.Array:
  """The kv heads of query heads `heads`, laid out so head j of the result's GQA
  mapping is heads[j]'s kv head: a slice when the heads are whole groups, else one
  kv head per query head."""
  group = num_q_heads // x.shape[2]
  if len(heads) and heads[0] % group == 0 and len(heads) % group == 0:
    lo = heads[0] // group
    return x[:, :, lo:lo + len(heads) // group]
  return jnp.take(x, jnp.asarray(heads // group), axis=2)


def _check_gates(query: jax.Array, gates: Any) -> jax.Array:
  gates = jnp.asarray(gates)
  if gates.shape != query.shape[:3]:
    raise ValueError(f'gates must have shape [B, T, N] = {tuple(query.shape[:3])}, '
                     f'got {tuple(gates.shape)}.')
  return gates


def mixture_of_heads_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                               gates: jax.Array, *, mask: Any = None,
                               is_causal: bool = False,
                               sinks: jax.Array | None = None,
                               logits_soft_cap: float | None = None,
                               implementation: str | None = None) -> jax.Array:
  """g_ti H_ti for every head (dense; training): attention of all heads, weighted.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, H_v] (GQA: N % K = 0).
    gates: [B, T, N] (e.g. `moh_gates(...).gates`).
    mask, is_causal, sinks, logits_soft_cap, implementation: as
      `attention.dot_product_attention`.

  Returns:
    [B, T, N, H_v]; W_O of its concatenated heads is the MoH layer's output.
  """
  gates = _check_gates(query, gates)
  out = api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=mask, is_causal=is_causal, sinks=sinks,
      logits_soft_cap=logits_soft_cap, implementation=implementation)
  return (out * gates[..., None].astype(out.dtype)).astype(out.dtype)


def default_budget(seq_len: int, num_routed_heads: int, top_k: int,
                   capacity_factor: float = 1.0) -> int:
  """ceil(capacity_factor * k / E * T) slots per routed head, clipped to [1, T]."""
  if not capacity_factor > 0:
    raise ValueError(f'capacity_factor must be > 0, got {capacity_factor}.')
  c = math.ceil(capacity_factor * top_k * seq_len / num_routed_heads - 1e-9)
  return max(1, min(seq_len, c))


class SkipPlan(NamedTuple):
  """Which (token, routed head) pairs head skipping computes.

  indices: int32 [B, E, C] token of each slot, ascending; padding slots hold the
    last position and are not valid.
  valid: bool [B, E, C].
  kept: bool [B, T, E] the computed pairs (selected minus overflow).
  overflow: int32 [B, E] selected pairs dropped because the budget C was full
    (the lowest gates of that head).
  """
  indices: jax.Array
  valid: jax.Array
  kept: jax.Array
  overflow: jax.Array


def plan_head_skipping(routed_gates: jax.Array, budget: int) -> SkipPlan:
  """Gathers each routed head's tokens (gate != 0) into `budget` slots.

  Over budget, the tokens with the largest gates are kept (ties to the lower
  position) and the rest counted in `overflow`.

  Args:
    routed_gates: [B, T, E]; zero where a head is off.
    budget: C in [1, T].
  """
  routed_gates = _check_rank('routed_gates', routed_gates, 3)
  b, t, e = routed_gates.shape
  budget = _check_int('budget', budget, 1, t)
  g = jnp.moveaxis(routed_gates, 1, 2)  # [B, E, T]
  on = g != 0
  order = jnp.argsort(jnp.where(on, -g, jnp.inf), axis=-1, stable=True)
  order = order[..., :budget].astype(jnp.int32)  # largest gates first
  valid = jnp.take_along_axis(on, order, axis=-1)  # [B, E, C]
  key = jnp.sort(jnp.where(valid, order, t + order), axis=-1)  # valid first, ascending
  valid = key < t
  indices = jnp.where(valid, key, 0)
  last = jnp.max(indices, axis=-1, keepdims=True)
  indices = jnp.where(valid, indices, last).astype(jnp.int32)
  bi = jnp.arange(b)[:, None, None]
  ei = jnp.arange(e)[None, :, None]
  kept = jnp.zeros((b, e, t), jnp.int32).at[bi, ei, indices].add(
      valid.astype(jnp.int32)) > 0
  count = jnp.sum(on, axis=-1, dtype=jnp.int32)
  overflow = jnp.maximum(count - budget, 0).astype(jnp.int32)
  return SkipPlan(indices, valid, jnp.moveaxis(kept, 1, 2), overflow)


def _causal_position_mod(positions, score, b, h, q_idx, kv_idx):
  """score where kv position <= the gathered query's original position, else -inf."""
  pos = positions[b, h, jnp.minimum(q_idx, positions.shape[-1] - 1)]
  return jnp.where(kv_idx <= pos, score, -jnp.inf)


def _gathered_causal_masks(positions: jax.Array, kv_len: int, block: int):
  """Block lists of the gathered queries [B, E, C] at `positions` (-1: none).

  Returns (full, boundary, mod): `full` lists the kv blocks every valid query of a q
  block sees entirely (no mask work), `boundary` the others up to the block's last
  position, where `mod` (a ScoreMod) applies causality by original position; kv blocks
  past a q block's last position are in neither (never computed).
  """
  b, e, c = positions.shape
  block_q, block_kv = min(block, c), min(block, kv_len)
  nq, nk = -(-c // block_q), -(-kv_len // block_kv)
  padded = jnp.pad(positions, ((0, 0), (0, 0), (0, nq * block_q - c)),
                   constant_values=-1).reshape(b, e, nq, block_q)
  last = jnp.max(padded, axis=-1)  # [B, E, nq]
  first = jnp.min(jnp.where(padded >= 0, padded, kv_len), axis=-1)  # [B, E, nq]
  starts = np.arange(nk) * block_kv  # [nk]
  ends = np.minimum(starts + block_kv, kv_len) - 1
  listed = starts[None, None, None] <= last[..., None]  # [B, E, nq, nk]
  full = listed & (ends[None, None, None] <= first[..., None])
  geometry = dict(q_len=c, kv_len=kv_len, block_q=block_q, block_kv=block_kv)
  return (dynamic.from_block_matrix(full, **geometry),
          dynamic.from_block_matrix(listed & ~full, **geometry),
          problem_lib.ScoreMod(_causal_position_mod, positions, 'moh_causal'))


def head_skipping_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                            gates: jax.Array, *, num_shared_heads: int,
                            budget: int | None = None, top_k: int | None = None,
                            capacity_factor: float = 1.0, is_causal: bool = False,
                            sinks: jax.Array | None = None,
                            logits_soft_cap: float | None = None,
                            implementation: str | None = None,
                            block_size: int = 512) -> tuple[jax.Array, dict]:
  """MoH inference: only each token's shared + kept routed heads are computed.

  Shared heads attend densely. Routed head e gathers its kept tokens' queries into C
  slots (`plan_head_skipping`), attends them to every key (causal by original
  position; see the module docstring), and the outputs are scattered back; the
  result is weighted by the gates. Equal to `mixture_of_heads_attention` with the
  gates of the dropped (overflow) pairs set to 0.

  Args:
    query: [B, T, N, H]; key: [B, S, K, H]; value: [B, S, K, H_v]; S = T when
      causal.
    gates: [B, T, N], shared heads first (zeros: routed heads that are off).
    num_shared_heads: h_s in [0, N - 1].
    budget: C, slots per routed head per batch row, in [1, T]; None:
      `default_budget(T, E, top_k, capacity_factor)` (top_k required then).
    top_k: the router's k (only for the default budget).
    capacity_factor: > 0, scales the default budget.
    is_causal, sinks, logits_soft_cap, implementation: as
      `attention.dot_product_attention` (no other masks: a gathered query has no
      fixed row of a [T, S] mask).
    block_size: tile of the causal gathered problem's block lists (512: fewest
      loop steps on XLA:CPU at T = 4096, 0.90x the time of 128 there).

  Returns:
    (out [B, T, N, H_v], stats) with stats: 'overflow' (int32 total of dropped
    pairs), 'overflow_per_head' [B, E], 'kept' [B, T, E], 'budget' (C),
    'skipped_fraction' (static: 1 - (h_s T + E C) / (N T), the share of query rows
    of the dense layer not computed), 'active_fraction' (the share of (token, head)
    pairs on).
  """
  query = _check_rank('query', query, 4)
  key = _check_rank('key', key, 4)
  value = _check_rank('value', value, 4)
  bsz, t, n, _ = query.shape
  gates = _check_gates(query, gates)
  h_s = _check_int('num_shared_heads', num_shared_heads, 0, n - 1)
  e = n - h_s
  if n % key.shape[2]:
    raise ValueError(f'query heads ({n}) must be a multiple of key heads '
                     f'({key.shape[2]}).')
  if budget is None:
    if top_k is None:
      raise ValueError('top_k must be given when budget is None (the default '
                       'budget is ceil(capacity_factor * top_k / E * T)).')
    top_k = _check_int('top_k', top_k, 1, e)
    budget = default_budget(t, e, top_k, capacity_factor)
  budget = _check_int('budget', budget, 1, t)
  block_size = _check_int('block_size', block_size, 1)
  if is_causal and key.shape[1] != t:
    raise ValueError(f'causal head skipping needs S = T, got S={key.shape[1]}, '
                     f'T={t}.')
  if sinks is not None:
    sinks = jnp.asarray(sinks)
    if sinks.shape != (n,):
      raise ValueError(f'sinks must have shape [N] = ({n},), got {sinks.shape}.')
  common = dict(logits_soft_cap=logits_soft_cap, implementation=implementation)
  heads = np.arange(n)
  parts = []
  if h_s:
    out_s = api.dot_product_attention(  # [B, T, h_s, H_v]
        query[:, :, :h_s], _kv_for_heads(key, heads[:h_s], n),
        _kv_for_heads(value, heads[:h_s], n), is_causal=is_causal,
        sinks=None if sinks is None else sinks[:h_s], **common)
    parts.append(out_s * gates[:, :, :h_s, None].astype(out_s.dtype))
  plan = plan_head_skipping(gates[:, :, h_s:], budget)
  bi, ei = jnp.arange(bsz)[:, None, None], jnp.arange(e)[None, :, None]
  q_r = jnp.moveaxis(query[:, :, h_s:], 1, 2)  # [B, E, T, H]
  q_g = jnp.moveaxis(q_r[bi, ei, plan.indices], 1, 2)  # [B, C, E, H]
  k_r = _kv_for_heads(key, heads[h_s:], n)
  v_r = _kv_for_heads(value, heads[h_s:], n)
  if is_causal:
    # Two exact parts merged by log-sum-exp: the blocks a gathered q block sees
    # entirely (no mask work), and its boundary blocks with causality by original
    # position (a score_mod); the sinks enter one part only.
    positions = jnp.where(plan.valid, plan.indices, -1)  # [B, E, C]
    full, boundary, score_mod = _gathered_causal_masks(positions, t, block_size)
    out_f, lse_f = api.dot_product_attention(  # [B, C, E, H_v], [B, E, C]
        q_g, k_r, v_r, mask=full, return_residuals=True,
        sinks=None if sinks is None else sinks[h_s:], **common)
    out_b, lse_b = api.dot_product_attention(
        q_g, k_r, v_r, mask=boundary, score_mod=score_mod, return_residuals=True,
        **common)
    out_g, _ = hyper_attention.merge_attention(out_f, lse_f, out_b, lse_b)
  else:
    out_g = api.dot_product_attention(  # [B, C, E, H_v]
        q_g, k_r, v_r, sinks=None if sinks is None else sinks[h_s:], **common)
  g_g = jnp.moveaxis(gates[:, :, h_s:], 1, 2)[bi, ei, plan.indices]  # [B, E, C]
  g_g = jnp.where(plan.valid, g_g, 0).astype(out_g.dtype)
  weighted = jnp.moveaxis(out_g, 1, 2) * g_g[..., None]  # [B, E, C, H_v]
  out_r = jnp.zeros((bsz, e, t, out_g.shape[-1]), out_g.dtype)
  out_r = out_r.at[bi, ei, plan.indices].add(weighted)  # padding slots add 0
  parts.append(jnp.moveaxis(out_r, 1, 2))  # [B, T, E, H_v]
  out = jnp.concatenate(parts, axis=2)  # [B, T, N, H_v]
  stats = dict(
      overflow=jnp.sum(plan.overflow), overflow_per_head=plan.overflow,
      kept=plan.kept, budget=budget,
      skipped_fraction=1.0 - (h_s * t + e * budget) / (n * t),
      active_fraction=(h_s * t + jnp.sum(plan.kept, axis=(1, 2))) / (n * t))
  return out, stats


# ----------------------------------------------------------------------------------
# The layer.
# ----------------------------------------------------------------------------------


def _rope(x: jax.Array, base: float) -> jax.Array:
  """Rotary embedding (RoFormer, Su et al. 2021), rotate-half, positions 0..T-1."""
  t, h = x.shape[1], x.shape[-1]
  freqs = base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) / (h // 2))
  angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None]  # [T, H/2]
  sin, cos = jnp.sin(angles)[None, :, None], jnp.cos(angles)[None, :, None]
  x1, x2 = jnp.split(_float(x), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int,
           axes: tuple[str | None, ...]) -> nnx.Param:
  value = jax.random.normal(rngs.params(), shape, jnp.float32) / np.sqrt(fan_in)
  return nnx.Param(value, logical_axes=axes)


ROUTERS = ('learned', 'query_norm')


class MixtureOfHeadsAttention(nnx.Module):
  """MoH self-attention layer: W_q, W_k, W_v, W_O and the routers W_r, W_s, W_h.

  x [B, T, D] -> (y [B, T, D], aux). Training (skip_heads False): every head is
  computed and weighted, aux = {'moh_load_balance': load_balance_weight * L_b}
  (router 'learned'; {} for the parameter-free 'query_norm' router, which has no
  router parameters). Inference (skip_heads True): `head_skipping_attention`, aux {}
  (`forward_with_stats` also returns the skipping statistics).
  """

  def __init__(self, dim: int, num_heads: int, head_dim: int, *,
               num_shared_heads: int, top_k: int, num_kv_heads: int | None = None,
               causal: bool = False, router: str = 'learned',
               rope_base: float | None = 10000.0,
               load_balance_weight: float = LOAD_BALANCE_WEIGHT,
               budget: int | None = None, capacity_factor: float = 1.0,
               skip_heads: bool = False, implementation: str | None = None,
               rngs: nnx.Rngs):
    dim = _check_int('dim', dim, 1)
    num_heads = _check_int('num_heads', num_heads, 2)
    head_dim = _check_int('head_dim', head_dim, 1)
    self.num_shared_heads, self.top_k = _check_split(num_heads, num_shared_heads,
                                                     top_k)
    num_kv_heads = num_heads if num_kv_heads is None else _check_int(
        'num_kv_heads', num_kv_heads, 1)
    if num_heads % num_kv_heads:
      raise ValueError(f'num_kv_heads must divide num_heads ({num_heads}), got '
                       f'{num_kv_heads}.')
    if router not in ROUTERS:
      raise ValueError(f'router must be one of {ROUTERS}, got {router!r}.')
    if rope_base is not None and (not rope_base > 0 or head_dim % 2):
      raise ValueError(f'rope_base must be positive or None (with an even head_dim '
                       f'{head_dim}), got {rope_base}.')
    if budget is not None:
      _check_int('budget', budget, 1)
    if not load_balance_weight >= 0:
      raise ValueError(f'load_balance_weight must be >= 0, got '
                       f'{load_balance_weight}.')
    self.num_heads, self.causal, self.router = num_heads, bool(causal), router
    self.rope_base, self.load_balance_weight = rope_base, float(load_balance_weight)
    self.budget, self.capacity_factor = budget, float(capacity_factor)
    self.skip_heads, self.implementation = bool(skip_heads), implementation
    e, h_s = num_heads - self.num_shared_heads, self.num_shared_heads
    self.wq = _param(rngs, (dim, num_heads, head_dim), dim,
                     ('embed', 'heads', 'head_dim'))
    self.wk = _param(rngs, (dim, num_kv_heads, head_dim), dim,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wv = _param(rngs, (dim, num_kv_heads, head_dim), dim,
                     ('embed', 'kv_heads', 'head_dim'))
    self.wo = _param(rngs, (num_heads, head_dim, dim), num_heads * head_dim,
                     ('heads', 'head_dim', 'embed'))
    learned = router == 'learned'
    self.w_r = _param(rngs, (dim, e), dim, ('embed', None)) if learned else None
    self.w_s = (_param(rngs, (dim, h_s), dim, ('embed', None))
                if learned and h_s >= 2 else None)
    self.w_h = (_param(rngs, (dim, 2), dim, ('embed', None))
                if learned and h_s >= 1 else None)

  def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(q, k, v) of x [B, T, D], q and k before RoPE."""
    dt = x.dtype
    q = jnp.einsum('btd,dnh->btnh', x, self.wq[...].astype(dt))  # [B, T, N, H]
    k = jnp.einsum('btd,dkh->btkh', x, self.wk[...].astype(dt))  # [B, T, K, H]
    v = jnp.einsum('btd,dkh->btkh', x, self.wv[...].astype(dt))  # [B, T, K, H]
    return q, k, v

  def routing(self, x: jax.Array, q: jax.Array | None = None) -> Routing:
    """The gates of x [B, T, D] (q: its pre-RoPE queries, for 'query_norm')."""
    if self.router == 'query_norm':
      q = self.qkv(x)[0] if q is None else q
      return query_norm_gates(q, num_shared_heads=self.num_shared_heads,
                              top_k=self.top_k)
    val = lambda p: None if p is None else p[...]
    return moh_gates(x, self.w_r[...], val(self.w_s), val(self.w_h),
                     num_shared_heads=self.num_shared_heads, top_k=self.top_k)

  def _heads(self, x, skip):
    q, k, v = self.qkv(x)
    route = self.routing(x, q)
    if self.rope_base is not None:
      q, k = _rope(q, self.rope_base), _rope(k, self.rope_base)
    if skip:
      out, stats = head_skipping_attention(
          q, k, v, route.gates.astype(q.dtype), num_shared_heads=self.num_shared_heads,
          budget=self.budget, top_k=self.top_k, capacity_factor=self.capacity_factor,
          is_causal=self.causal, implementation=self.implementation)
    else:
      out = mixture_of_heads_attention(q, k, v, route.gates.astype(q.dtype),
                                       is_causal=self.causal,
                                       implementation=self.implementation)
      stats = {}
    y = jnp.einsum('btnv,nvd->btd', out.astype(x.dtype),
                   self.wo[...].astype(x.dtype))  # [B, T, D]
    return y, route, stats

  def __call__(self, x: jax.Array, *, skip_heads: bool | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
    skip = self.skip_heads if skip_heads is None else bool(skip_heads)
    y, route, _ = self._heads(x, skip)
    if skip or self.router != 'learned':
      return y, {}
    return y, {'moh_load_balance': self.load_balance_weight * route.load_balance}

  def forward_with_stats(self, x: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Head-skipping inference: (y, stats of `head_skipping_attention`)."""
    y, _, stats = self._heads(x, True)
    return y, stats


def from_multi_head_attention(params: Mapping[str, Any], *, num_shared_heads: int,
                              top_k: int, causal: bool = False,
                              rope_base: float | None = 10000.0,
                              **kwargs) -> MixtureOfHeadsAttention:
  """A MoH layer routing a trained multi-head layer with the parameter-free router.

  Args:
    params: 'wq' [D, N, H], 'wk' [D, K, H], 'wv' [D, K, H_v], 'wo' [N, H_v, D]
      (arrays or nnx.Params; the layout of `experiments.models.layers.Attention`).
    num_shared_heads: h_s (the first h_s heads are always on); top_k: routed heads
      kept per token.
    causal, rope_base, **kwargs: as `MixtureOfHeadsAttention` (router is
      'query_norm').
  """
  arrays = {}
  for name in ('wq', 'wk', 'wv', 'wo'):
    if name not in params:
      raise ValueError(f'params must hold wq, wk, wv, wo; missing {name!r}.')
    p = params[name]
    arrays[name] = jnp.asarray(p[...] if isinstance(p, nnx.Variable) else p)
  d, n, h = arrays['wq'].shape
  kvh = arrays['wk'].shape[1]
  if arrays['wv'].shape[-1] != h:
    raise ValueError('params wv must have the head_dim of wq (MoH layer H_v = H), '
                     f'got {arrays["wv"].shape[-1]} and {h}.')
  layer = MixtureOfHeadsAttention(
      d, n, h, num_shared_heads=num_shared_heads, top_k=top_k, num_kv_heads=kvh,
      causal=causal, router='query_norm', rope_base=rope_base, rngs=nnx.Rngs(0),
      **kwargs)
  for name, value in arrays.items():
    target = getattr(layer, name)
    if tuple(target.shape) != tuple(value.shape):
      raise ValueError(f'params {name} must have shape {tuple(target.shape)}, got '
                       f'{tuple(value.shape)}.')
    target[...] = value.astype(target.dtype)
  return layer


# ----------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------


def benchmark_head_skipping(*, batch: int = 1, seq_len: int = 4096,
                            num_heads: int = 8, head_dim: int = 64,
                            num_shared_heads: int = 2, top_k: int | None = None,
                            causal: bool = False, capacity_factor: float = 1.0,
                            repeats: int = 5, implementation: str | None = None,
                            layer: bool = True, seed: int = 0) -> dict[str, Any]:
  """Times the MoH layer's head-skipping inference forward against the dense layer.

  Both layers share W_q, W_k, W_v, W_O (D = N H); the dense layer is plain
  multi-head attention (every head on, the same implementation), the MoH layer
  routes with its learned router (random init) and skips. Each is jitted, warmed
  up once, then timed `repeats` times side by side in this process; medians
  reported. layer=False times the attention alone (`head_skipping_attention` vs
  `attention.dot_product_attention` on the layer's q, k, v and gates), without the
  projections both layers share.

  Returns:
    dict: dense_s, skip_s, ratio (skip / dense), skipped_fraction (static share of
    query rows not computed), overflow (dropped pairs), budget, and the settings.
  """
  e = num_heads - num_shared_heads
  top_k = max(1, e // 2) if top_k is None else top_k
  dim = num_heads * head_dim
  moh_layer = MixtureOfHeadsAttention(
      dim, num_heads, head_dim, num_shared_heads=num_shared_heads, top_k=top_k,
      causal=causal, capacity_factor=capacity_factor, implementation=implementation,
      rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(seed), (batch, seq_len, dim), jnp.float32)
  graphdef, state = nnx.split(moh_layer)

  @jax.jit
  def dense(state, x):
    m = nnx.merge(graphdef, state)
    q, k, v = m.qkv(x)
    if m.rope_base is not None:
      q, k = _rope(q, m.rope_base), _rope(k, m.rope_base)
    out = api.dot_product_attention(q, k, v, is_causal=causal,
                                    implementation=implementation)
    return jnp.einsum('btnv,nvd->btd', out, m.wo[...])  # [B, T, D]

  @jax.jit
  def skip(state, x):
    return nnx.merge(graphdef, state).forward_with_stats(x)

  inputs = (state, x)
  if not layer:  # the attention alone, on the layer's projections and gates
    q, k, v = jax.jit(lambda st, x: nnx.merge(graphdef, st).qkv(x))(state, x)
    gates = jax.jit(lambda st, x: nnx.merge(graphdef, st).routing(x).gates)(
        state, x)
    inputs = (q, k, v, gates)
    dense = jax.jit(lambda q, k, v, g: api.dot_product_attention(
        q, k, v, is_causal=causal, implementation=implementation))
    skip = jax.jit(lambda q, k, v, g: head_skipping_attention(
        q, k, v, g, num_shared_heads=num_shared_heads, top_k=top_k,
        capacity_factor=capacity_factor, is_causal=causal,
        implementation=implementation))

  def once(fn):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    return time.perf_counter() - t0

  once(dense), once(skip)  # compile + warm up
  dense_t, skip_t = [], []
  for _ in range(repeats):  # interleaved, so load changes hit both alike
    dense_t.append(once(dense))
    skip_t.append(once(skip))

  _, stats = skip(*inputs)
  d_s, s_s = float(np.median(dense_t)), float(np.median(skip_t))
  return dict(batch=batch, seq_len=seq_len, num_heads=num_heads, head_dim=head_dim,
              num_shared_heads=num_shared_heads, top_k=top_k, causal=causal,
              layer=layer,
              implementation=implementation, backend=jax.default_backend(),
              dense_s=d_s, skip_s=s_s, ratio=s_s / d_s,
              skipped_fraction=float(stats['skipped_fraction']),
              overflow=int(stats['overflow']), budget=int(stats['budget']))
