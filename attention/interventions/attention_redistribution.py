"""VAR: Visual Attention Redistribution, for any target token set.

"See What You Are Told: Visual Attention Sink in Large Multimodal Models" (Kang et
al., ICLR 2025; code seilk/VisAttnSink). Per layer (not the last):

  1. sink tokens by massive activation on the layer's input hidden state:
     phi(x) = max_{d in D_sink} |x_d| / RMS(x), sink if phi > 20 (D_sink: the model's
     massive-activation dimensions, `massive_activation_dims`);
  2. target-centric (head, query) pairs: target mass sum_{j in T} A_ij >= 0.2 and the
     share of that mass on sinks, sum_{j in T and S} A_ij / sum_{j in T} A_ij, <= rho;
  3. in those, with budget Omega_i = p sum_{j in S} A_ij:
     A'_ij = (1 - p) A_ij for j in S,  A'_ij = A_ij + Omega_i A_ij / sum_{k in T\\S} A_ik
     for j in T\\S, other keys unchanged (rows keep summing to 1).

Reading followed: the paper's. The sink mass is scaled by (1 - p) and the removed
fraction Omega = p * (sink mass) moves to T\\S; p is exposed (p = 0.6 by default).
(The authors' code instead keeps a fraction p of the sink attention and moves
1 - p; use p' = 1 - p for that reading.) S are all massive-activation tokens (the
BOS sink included), T the given target set (an image, a document, a passage).

Blocked form: one kernel pass on the values [v 1_S, v 1_{T\\S}, 1_S, 1_T, 1_{T and S},
1_{T\\S}] gives the partial outputs and masses; out'_i = out_i - p outS_i +
Omega_i / m_{T\\S, i} out_{T\\S, i} on the selected (head, query) pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attention.interventions import base

__all__ = ['VAR', 'massive_activation_dims', 'massive_activation_ratio',
           'var_redistribute', 'var_sink_tokens', 'var_selected_rows']


def massive_activation_dims(hidden_states: Any, top: int = 1) -> tuple[int, ...]:
  """The `top` hidden dims with the largest |activation| over all tokens.

  hidden_states [..., D] (concrete: one or more layers' inputs); dims ordered by
  their max |x_d|, largest first ("Massive Activations in Large Language Models",
  Sun et al. 2024, find a handful of such dims per model).
  """
  x = np.asarray(hidden_states, np.float64)
  if x.ndim < 2:
    raise ValueError(f'hidden_states must be [..., D] with tokens, got shape {x.shape}.')
  if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or not (
      1 <= top <= x.shape[-1]):
    raise ValueError(f'top must be an int in [1, D={x.shape[-1]}], got {top!r}.')
  peak = np.abs(x).reshape(-1, x.shape[-1]).max(0)  # [D]
  order = np.argsort(-peak, kind='stable')
  return tuple(int(d) for d in order[:top])


def massive_activation_ratio(hidden: jax.Array, dims: tuple[int, ...]) -> jax.Array:
  """phi(x) = max_{d in dims} |x_d| / RMS(x) for hidden [..., D] -> [...] (0 if x = 0)."""
  x = jnp.asarray(hidden).astype(jnp.promote_types(hidden.dtype, jnp.float32))
  peak = jnp.max(jnp.abs(x[..., jnp.asarray(dims)]), axis=-1)
  rms = jnp.sqrt(jnp.mean(x * x, axis=-1))
  return jnp.where(rms > 0, peak / jnp.where(rms > 0, rms, 1.0), 0.0)


def var_sink_tokens(hidden: jax.Array, dims: tuple[int, ...],
                    threshold: float = 20.0) -> jax.Array:
  """bool [...]: tokens whose massive-activation ratio phi exceeds `threshold`."""
  return massive_activation_ratio(hidden, dims) > threshold


def var_selected_rows(target_mass: jax.Array, target_sink_mass: jax.Array,
                      rest_mass: jax.Array, min_target_mass: float,
                      rho: float) -> jax.Array:
  """Target-centric (head, query) pairs: mass on T >= min, sink share of it <= rho.

  Also requires mass on T\\S > 0 (somewhere to move the budget).
  """
  return ((target_mass >= min_target_mass) &
          (target_sink_mass <= rho * target_mass) & (rest_mass > 0))


def var_redistribute(probs: jax.Array, sinks: jax.Array, targets: jax.Array, *,
                     p: float = 0.6, rho: float = 0.5,
                     min_target_mass: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """Steps 2-3 on probs [B, N, T, S] with sink / target keys [B, S] bool.

  Returns (probs', selected [B, N, T] bool).
  """
  s = sinks[:, None, None, :]  # [B, 1, 1, S]
  tg = targets[:, None, None, :]
  zero = jnp.zeros((), probs.dtype)
  m_sink = jnp.sum(jnp.where(s, probs, zero), -1)  # [B, N, T]
  m_target = jnp.sum(jnp.where(tg, probs, zero), -1)
  m_target_sink = jnp.sum(jnp.where(tg & s, probs, zero), -1)
  m_rest = jnp.sum(jnp.where(tg & ~s, probs, zero), -1)  # T \ S
  sel = var_selected_rows(m_target, m_target_sink, m_rest, min_target_mass, rho)
  omega = p * m_sink
  gain = (omega / jnp.where(m_rest > 0, m_rest, 1.0))[..., None]  # [B, N, T, 1]
  new = jnp.where(s, (1.0 - p) * probs,
                  jnp.where(tg & ~s, probs + gain * probs, probs))
  return jnp.where(sel[..., None], new, probs), sel


def _check_token_set(name: str, x: Any, b: int, s: int) -> None:
  if not hasattr(x, 'shape') or not hasattr(x, 'dtype') or x.dtype != jnp.bool_:
    raise TypeError(f'{name} must be a bool array [B, S], got '
                    f'{getattr(x, "dtype", type(x).__name__)}.')
  if tuple(x.shape) != (b, s):
    raise ValueError(f'{name} must have shape [B, S] = {(b, s)}, got '
                     f'{tuple(x.shape)}.')


@dataclasses.dataclass(frozen=True, eq=False)
class VAR(base.Intervention):
  """VAR towards `targets` [B, S] bool; not applied in the last layer.

  Attributes:
    targets: [B, S] bool, the target token set T (keys).
    sink_dims: the massive-activation dims D_sink (`massive_activation_dims`).
    sinks: optional [B, S] bool sink tokens overriding the hidden-state rule (for
      decoding against a cache, whose keys' hidden states the site lacks).
    p: the budget fraction in [0, 1].
    rho: the maximal sink share of the target mass, in [0, 1].
    min_target_mass: the minimal target mass of a selected (head, query), in [0, 1].
    phi_threshold: phi above which a token is a sink (> 0).
  """
  targets: jax.Array | None = base.array_field()
  sinks: jax.Array | None = base.array_field()
  sink_dims: tuple[int, ...] | None = None
  p: float = 0.6
  rho: float = 0.5
  min_target_mass: float = 0.2
  phi_threshold: float = 20.0

  stage = 'probs'
  blocked = 'probs'

  def __post_init__(self):
    super().__post_init__()
    if self.targets is None:
      raise ValueError('targets must be a bool array [B, S] (the target token set).')
    object.__setattr__(self, 'sink_dims',
                       base.check_index_tuple('sink_dims', self.sink_dims))
    if self.sinks is None and self.sink_dims is None:
      raise ValueError('sink_dims must be given (the massive-activation dims, see '
                       'massive_activation_dims) unless sinks [B, S] is.')
    object.__setattr__(self, 'p', base.check_fraction('p', self.p))
    object.__setattr__(self, 'rho', base.check_fraction('rho', self.rho))
    object.__setattr__(self, 'min_target_mass', base.check_fraction(
        'min_target_mass', self.min_target_mass))
    phi = self.phi_threshold
    if isinstance(phi, (bool, np.bool_)) or not isinstance(
        phi, (int, float, np.integer, np.floating)) or not (
            np.isfinite(phi) and phi > 0):
      raise ValueError(f'phi_threshold must be a positive finite float, got {phi!r}.')
    object.__setattr__(self, 'phi_threshold', float(phi))

  def check_shapes(self, site, shapes):
    b, s, t = shapes['B'], shapes['S'], shapes['T']
    _check_token_set('targets', self.targets, b, s)
    if self.sinks is not None:
      _check_token_set('sinks', self.sinks, b, s)
      return
    if site.hidden is None or t != s:
      raise ValueError(
          'VAR finds sinks from site.hidden [B, T, D] of the keys themselves (T == S, '
          f'got T={t}, S={s}, hidden {"None" if site.hidden is None else "given"}); '
          'pass sinks [B, S] otherwise.')
    if max(self.sink_dims) >= site.hidden.shape[-1]:
      raise ValueError(f'sink_dims must be < D={site.hidden.shape[-1]}, got '
                       f'{self.sink_dims}.')

  def sink_tokens(self, site: base.AttentionSite) -> jax.Array:
    """bool [B, S]: the given sinks, or phi(site.hidden) > phi_threshold."""
    if self.sinks is not None:
      return self.sinks
    return var_sink_tokens(site.hidden, self.sink_dims, self.phi_threshold)

  def edit_probs(self, probs, site):
    if site.is_last_layer:
      return probs
    new, _ = var_redistribute(probs, self.sink_tokens(site), self.targets, p=self.p,
                              rho=self.rho, min_target_mass=self.min_target_mass)
    return self.select_heads(new, probs, axis=1)

  def blocked_probs(self, ctx):
    if ctx.site.is_last_layer:
      return ctx.out
    dt = ctx.out.dtype
    s = self.sink_tokens(ctx.site)  # [B, S]
    tg = self.targets
    kh = ctx.v.shape[2]

    def ind(x):  # [B, S] -> [B, S, K, 1]
      return jnp.broadcast_to(x[:, :, None, None], x.shape + (kh, 1)).astype(dt)

    v = ctx.v.astype(dt)
    rest = tg & ~s
    ext = jnp.concatenate([v * ind(s), v * ind(rest), ind(s), ind(tg), ind(tg & s),
                           ind(rest)], axis=-1)  # [B, S, K, 2 Hv + 4]
    w = ctx.weighted(ext)  # [B, T, N, 2 Hv + 4]
    hv = v.shape[-1]
    out_s, out_rest = w[..., :hv], w[..., hv:2 * hv]
    m_sink, m_target, m_target_sink, m_rest = (w[..., 2 * hv + i:2 * hv + i + 1]
                                               for i in range(4))
    sel = var_selected_rows(m_target, m_target_sink, m_rest, self.min_target_mass,
                            self.rho)
    gain = self.p * m_sink / jnp.where(m_rest > 0, m_rest, 1.0)
    new = jnp.where(sel, ctx.out - self.p * out_s + gain * out_rest, ctx.out)
    return self.select_heads(new, ctx.out, axis=2)
