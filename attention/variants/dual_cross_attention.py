"""Dual cross-attention learning (DCAL): global-local and pair-wise cross-attention.

"Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object
Re-Identification" (Zhu et al., CVPR 2022).

* Attention rollout (Abnar & Zuidema 2020, as DCAL Eq. 2): with S_l the head-averaged
  attention matrix of self-attention layer l and E the identity (residual paths),

      S_bar_l = 0.5 S_l + 0.5 E,     S_hat_i = S_bar_i S_bar_{i-1} ... S_bar_1

  (each S_bar_l is row-stochastic, so S_hat_i is too). The row of the CLS token
  scores the tokens; the R tokens with the highest accumulated scores are the "local"
  queries. A ViT without a CLS token (mean pooled, as this codebase's) scores token j
  by the mean over the query rows of S_hat (the rollout of the mean-pooled output).
* Global-local cross-attention (GLCA, Eq. 3): f(Q^l, K^g, V^g) = softmax(Q^l K^g^T /
  sqrt(d)) V^g with Q^l the queries of the R selected tokens and K^g, V^g the keys /
  values of all tokens.
* Pair-wise cross-attention (PWCA, Eq. 4, training only): the queries of image 1
  attend the concatenated keys / values of images 1 and 2,
  f(Q_1, K_c, V_c) = softmax(Q_1 K_c^T / sqrt(d)) V_c, K_c = [K_1; K_2], V_c =
  [V_1; V_2]; image 2 is a distractor that makes the softmax harder.

The GLCA / PWCA branches need state across layers (the rollout) and pairs of images,
which the single-layer registry interface cannot pass, so they are wired as a model
around the ViT in `experiments/models/dcal.py`.

Einsum letters: b batch, n head, t query token, s key token.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention import _checks
from attention import api as attention_api


def attention_rollout(attention_maps: Sequence[jax.Array] | jax.Array
                      ) -> jax.Array:
  """S_hat_L = prod_{l = L..1} (0.5 mean_heads(S_l) + 0.5 E) -> [B, T, T].

  Args:
    attention_maps: L arrays [B, N, T, T] (row-stochastic attention probabilities
      of layers 1..L, rows = queries), or one array [L, B, N, T, T].
  """
  if hasattr(attention_maps, 'ndim'):
    _checks.check_array('attention_maps', attention_maps, ndim=5, floating=True)
    maps = [attention_maps[i] for i in range(attention_maps.shape[0])]
  else:
    maps = list(attention_maps)
  if not maps:
    raise ValueError('attention_maps must hold at least one layer, got none.')
  for i, a in enumerate(maps):
    _checks.check_array(f'attention_maps[{i}]', a, ndim=4, floating=True)
    if a.shape[-1] != a.shape[-2] or tuple(a.shape) != tuple(maps[0].shape):
      raise ValueError(f'attention_maps[{i}] must have the shape [B, N, T, T] = '
                       f'{tuple(maps[0].shape)} with T == T, got {tuple(a.shape)}.')
  t = maps[0].shape[-1]
  eye = jnp.eye(t, dtype=jnp.promote_types(maps[0].dtype, jnp.float32))
  rollout = None
  for a in maps:  # Layer 1 first: S_hat_l = S_bar_l S_hat_{l-1}.
    s_bar = 0.5 * jnp.mean(a.astype(eye.dtype), axis=1) + 0.5 * eye  # [B, T, T]
    rollout = s_bar if rollout is None else jnp.einsum('bts,bsu->btu', s_bar,
                                                       rollout)
  return rollout


def token_scores(rollout: jax.Array, cls_index: int | None = None) -> jax.Array:
  """[B, T]: the CLS row of the rollout, or (cls_index None) the mean of its rows."""
  _checks.check_array('rollout', rollout, ndim=3, floating=True)
  if cls_index is None:
    return jnp.mean(rollout, axis=1)
  t = rollout.shape[1]
  if isinstance(cls_index, bool) or not isinstance(cls_index, (int, np.integer)) \
      or not 0 <= cls_index < t:
    raise ValueError(f'cls_index must be an int in [0, {t}) or None, got '
                     f'{cls_index!r}.')
  return rollout[:, int(cls_index)]


def select_top_r(scores: jax.Array, r: int) -> jax.Array:
  """int32 [B, R]: the R highest-scoring tokens (descending; ties: lower index)."""
  _checks.check_array('scores', scores, ndim=2, floating=True)
  t = scores.shape[1]
  if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or not 1 <= r <= t:
    raise ValueError(f'r must be an int in [1, {t}] (the number of tokens), got '
                     f'{r!r}.')
  return jax.lax.top_k(jax.lax.stop_gradient(scores), int(r))[1].astype(jnp.int32)


def global_local_cross_attention(query: jax.Array, key: jax.Array,
                                 value: jax.Array, indices: jax.Array, *,
                                 implementation: str | None = None) -> jax.Array:
  """GLCA: the queries of the tokens `indices` [B, R] attend all keys.

  query [B, T, N, H], key / value [B, T, K, H(_v)]; returns [B, R, N, H_v] (row r
  is the output of token indices[:, r]).
  """
  _checks.check_array('query', query, ndim=4, floating=True)
  _checks.check_array('indices', indices, ndim=2)
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f'indices must have an integer dtype, got {indices.dtype}.')
  if indices.shape[0] != query.shape[0]:
    raise ValueError(f'indices must have shape [B={query.shape[0]}, R], got '
                     f'{tuple(indices.shape)}.')
  q_local = jnp.take_along_axis(query, indices[:, :, None, None], axis=1)
  return attention_api.dot_product_attention(  # [B, R, N, H_v]
      q_local, key, value, implementation=implementation)


def pairwise_cross_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             key_pair: jax.Array, value_pair: jax.Array, *,
                             implementation: str | None = None) -> jax.Array:
  """PWCA: softmax(Q_1 [K_1; K_2]^T / sqrt(d)) [V_1; V_2] -> [B, T, N, H_v].

  key_pair / value_pair: the second image's keys / values, same shapes as key /
  value (concatenated along the token axis).
  """
  for name, x in (('key', key), ('value', value), ('key_pair', key_pair),
                  ('value_pair', value_pair)):
    _checks.check_array(name, x, ndim=4, floating=True)
  if tuple(key_pair.shape) != tuple(key.shape):
    raise ValueError(f'key_pair must have the shape of key {tuple(key.shape)}, '
                     f'got {tuple(key_pair.shape)}.')
  if tuple(value_pair.shape) != tuple(value.shape):
    raise ValueError(f'value_pair must have the shape of value '
                     f'{tuple(value.shape)}, got {tuple(value_pair.shape)}.')
  k = jnp.concatenate([key, key_pair], axis=1)  # [B, 2S, K, H]
  v = jnp.concatenate([value, value_pair], axis=1)  # [B, 2S, K, H_v]
  return attention_api.dot_product_attention(query, k, v,
                                             implementation=implementation)


def uncertainty_weighted_loss(losses: jax.Array, log_vars: jax.Array
                              ) -> jax.Array:
  """DCAL's dynamic loss weights (Kendall et al. 2018):
  L = 0.5 sum_i (exp(-w_i) L_i + w_i), with learnable w_i."""
  _checks.check_array('losses', losses, ndim=1, floating=True)
  _checks.check_array('log_vars', log_vars, ndim=1, floating=True)
  if losses.shape != log_vars.shape:
    raise ValueError(f'log_vars must have the shape of losses {losses.shape}, got '
                     f'{log_vars.shape}.')
  return 0.5 * jnp.sum(jnp.exp(-log_vars) * losses + log_vars)


__all__ = ['attention_rollout', 'global_local_cross_attention',
           'pairwise_cross_attention', 'select_top_r', 'token_scores',
           'uncertainty_weighted_loss']
