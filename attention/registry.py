"""The attention-variant registry: every variant and token-mixer layer by name.

One registry the library exports and the training binary resolves by name
(`attention.variant=moba` in a config):

* Variants: `get_variant('softmax')` returns a function with the [B, T, N, H] convention

      fn(query, key, value, *, mask, is_causal, sinks, logits_soft_cap, implementation)
          -> (out [B, T, N, H_v], aux_losses: dict[str, scalar])

  `aux_losses` is how a variant with trainable routing (e.g. MoH load balancing) adds
  terms to the training loss: the models sum them over layers and the trainer adds the
  total to the cross-entropy. `register_variant` adds a new one.

* Token-mixer layers: variants that own parameters beyond q / k / v (InLine's local
  term, agent biases, FocalNets, LightNet's gate, GLA's gates, routers and gates) are
  NNX layers built by `make_layer(name, dim, num_heads, head_dim, grid=, causal=,
  rngs=, layer_index=)`, each x [B, T, D] -> [B, T, D] or (y, aux_losses); a model
  block uses one in place of its attention when `attention.variant` names a layer
  (`available_layers()`, `register_layer`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from flax import nnx
import jax
import numpy as np

from attention import api as attention_api
from attention import focal_modulation
from attention import linear as attention_linear
from attention.linear import agent_attention
from attention.linear import flowformer
from attention.linear import inline_attention
from attention.linear import lightnet
from attention.routing import moba as routing_moba
from attention.routing import vmoba as routing_vmoba
from attention.routing import seer_attention as routing_seer
from attention.routing import biformer as routing_biformer
from attention.routing import dynamic_mask_attention as routing_dma
from attention.routing import minference as routing_minference
from attention.routing import sparsifiner as routing_sparsifiner
# --- variants: relative position attention, FlashBias ---
from attention.variants import flash_bias as variants_flash_bias
from attention.variants import relative_attention as variants_relative
from attention.variants import mixture_of_heads as variants_moh  # variants: MoH
# --- end variants: relative position attention, FlashBias ---
# --- variants: DaViT, CrossFormer ---
from attention.variants import channel_attention as variants_channel
from attention.variants import crossformer as variants_crossformer
# --- end variants: DaViT, CrossFormer ---
# --- variants: HyperAttention, landmark, GAAM ---
from attention.variants import gaussian_adaptive_attention as variants_gaam
from attention.variants import hyper_attention as variants_hyper
from attention.variants import landmark_attention as variants_landmark
# --- end variants: HyperAttention, landmark, GAAM ---


AuxLosses = dict[str, jax.Array]
VariantFn = Callable[..., tuple[jax.Array, AuxLosses]]


def softmax_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                      mask: Any, is_causal: bool,
                      sinks: jax.Array | None,
                      logits_soft_cap: float | None,
                      implementation: str | None
                     ) -> tuple[jax.Array, AuxLosses]:
  """Multi-head softmax attention ("Attention Is All You Need", Vaswani et al. 2017).

  GQA/MQA ("GQA", Ainslie et al. 2023) when key/value have fewer heads; sinks and
  soft-capping as in `attention.dot_product_attention`. No auxiliary losses.
  """
  out = attention_api.dot_product_attention(  # [B, T, N, H_v]
      query, key, value, mask=mask, is_causal=is_causal, sinks=sinks,
      logits_soft_cap=logits_soft_cap, implementation=implementation)
  return out, {}


def _linear_family(name: str, fn: Callable[..., Any],
                   naive: Callable[..., Any], causal_only: bool) -> VariantFn:
  """A registry variant from an `attention.linear` form (no mask, sinks or soft-cap).

  `implementation` 'reference' runs the naive quadratic form (the family's oracle);
  None / 'xla' / 'pallas_tpu' / 'pallas_gpu' go to the chunked forms' dispatch.
  """
  def variant(query, key, value, *, mask, is_causal, sinks, logits_soft_cap,
              implementation):
    for arg, val in (('mask', mask), ('sinks', sinks),
                     ('logits_soft_cap', logits_soft_cap)):
      if val is not None:
        raise ValueError(f'attention variant {name!r} takes no {arg} (causality '
                         f'comes from is_causal), got {val!r}.')
    if causal_only and not is_causal:
      raise ValueError(f'attention variant {name!r} is causal only (decayed '
                       f'state); got is_causal=False.')
    kw = {} if causal_only else dict(causal=is_causal)
    if implementation == 'reference':
      return naive(query, key, value, **kw)[0], {}
    return fn(query, key, value, implementation=implementation, **kw)[0], {}

  variant.__doc__ = f'{fn.__doc__.splitlines()[0]} (registry variant {name!r}).'
  return variant


def _parameter_free(name: str, fn: Callable[..., Any],
                    naive: Callable[..., Any] | None) -> VariantFn:
  """A registry variant from a parameter-free form `fn(q, k, v, causal=)` -> out.

  No mask, sinks or soft-cap; `implementation` None / 'xla' run `fn`, 'reference'
  the naive quadratic form where there is one.
  """
  impls = (None, 'xla') + (('reference',) if naive is not None else ())

  def variant(query, key, value, *, mask, is_causal, sinks, logits_soft_cap,
              implementation):
    for arg, val in (('mask', mask), ('sinks', sinks),
                     ('logits_soft_cap', logits_soft_cap)):
      if val is not None:
        raise ValueError(f'attention variant {name!r} takes no {arg} (causality '
                         f'comes from is_causal), got {val!r}.')
    if implementation not in impls:
      raise ValueError(f'attention variant {name!r}: implementation must be one of '
                       f'{impls}, got {implementation!r}.')
    form = naive if implementation == 'reference' else fn
    return form(query, key, value, causal=is_causal), {}

  variant.__doc__ = f'{fn.__doc__.splitlines()[0]} (registry variant {name!r}).'
  return variant


def _lightnet(fn):
  """LightNet's q activation (SiLU) around a form returning out (or (out, state))."""
  def form(query, key, value, *, causal):
    out = fn(jax.nn.silu(query), key, value, causal=causal)
    return out[0] if isinstance(out, tuple) else out
  form.__doc__ = ('LightNet attention ("You Only Scan Once", Qin et al. 2024), '
                  'q = SiLU(q).')
  return form


_VARIANTS: dict[str, VariantFn] = {
    'softmax': softmax_attention,
    # The linear family (attention.linear); GLA needs its gate projection, so it
    # is a layer (attention.linear.GatedLinearAttention), not a registry variant.
    'linear': _linear_family('linear', attention_linear.linear_attention,
                             attention_linear.naive_linear_attention, False),
    'lightning': _linear_family('lightning', attention_linear.lightning_attention,
                                attention_linear.naive_lightning_attention, True),
    'retention': _linear_family('retention', attention_linear.retention,
                                attention_linear.naive_retention, True),
    # Parameter-free linear-time variants (the global InLine term, no local conv).
    'inline': _parameter_free('inline', inline_attention.inline_attention,
                              inline_attention.naive_inline_attention),
    'flow': _parameter_free('flow', flowformer.flow_attention, None),
    'lightnet': _parameter_free(
        'lightnet', _lightnet(lightnet.lightnet_attention),
        _lightnet(lightnet.naive_lightnet_attention)),
    # --- routing: MoBA (attention.routing.moba) ---
    # Causal only; block_size ceil(T / 8), top_k 3 (own block included).
    'moba': routing_moba.make_registry_variant(top_k=3, num_blocks=8),
    # --- end routing: MoBA ---
    # --- routing: MInference (attention.routing.minference) ---
    # Causal, training-free vertical-slash pattern; settings registry_pattern(T).
    'minference': routing_minference.make_registry_variant(),
    # --- end routing: MInference ---
    # --- variants: relative position attention, FlashBias ---
    # ALiBi through its score_mod (causal: m (j - i); bidirectional: -m |i - j|).
    'alibi': variants_relative.alibi_attention,
    # Causal ALiBi as FlashBias's rank-2 augmented q / k (no bias, any kernel).
    'alibi_flashbias': variants_flash_bias.alibi_flash_bias_variant,
    # --- end variants: relative position attention, FlashBias ---
    # --- variants: HyperAttention (attention.variants.hyper_attention) ---
    # The reference code's settings (b = m = 256, exact below 4096, r = 7); fixed
    # key (see make_registry_variant); no mask / sinks / soft-cap.
    'hyper': variants_hyper.make_registry_variant(),
    # --- end variants: HyperAttention ---
}

LayerFactory = Callable[..., Any]


def _non_causal(name: str, build: Callable[..., Any]) -> LayerFactory:
  takes_index = _accepts(build, 'layer_index')

  def factory(dim, num_heads, head_dim, *, grid, causal, rngs, layer_index=0):
    if causal:
      raise ValueError(f'attention layer {name!r} is non-causal (it mixes the whole '
                       f'token grid); got causal=True.')
    if grid is None:
      raise ValueError(f'attention layer {name!r} needs the token grid '
                       f'(attention.grid, e.g. (14, 14); the ViT sets it).')
    extra = dict(layer_index=layer_index) if takes_index else {}
    return build(dim, num_heads, head_dim, grid=tuple(grid), rngs=rngs, **extra)
  return factory


def _accepts(fn: Callable[..., Any], name: str) -> bool:
  """Whether `fn` takes the keyword argument `name`."""
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


class _SparsifinerLayer(nnx.Module):
  """Sparsifiner ("Sparsifiner: Learning Sparse Instance-Dependent Attention for
  Efficient Vision Transformers", Wei et al. 2023) on a token grid, returning its
  connectivity distillation loss (the predictor's stage-1 MSE) as an aux loss."""

  def __init__(self, dim, num_heads, head_dim, *, grid, rngs):
    self.layer = routing_sparsifiner.Sparsifiner(
        dim, num_heads, head_dim, num_tokens=int(np.prod(grid)), cls_token=False,
        rngs=rngs)

  def __call__(self, x):
    y, loss = self.layer(x, return_loss=True)
    return y, {'sparsifiner_distill': loss}


def _gla(dim, num_heads, head_dim, *, grid, causal, rngs):
  del grid
  if not causal:
    raise ValueError("attention layer 'gla' is causal only; got causal=False.")
  return attention_linear.GatedLinearAttention(dim, num_heads, head_dim,
                                               rngs=rngs)


# --- routing: DMA (attention.routing.dynamic_mask_attention) ---
def _dma(dim, num_heads, head_dim, *, grid, causal, rngs):
  """DMA layer, window 16 keys per query: below the presets' sequence lengths, so the
  top-w selection is active (Doge uses 2048)."""
  del grid
  if not causal:
    raise ValueError("attention layer 'dma' is causal only; got causal=False.")
  return routing_dma.DynamicMaskAttention(dim, num_heads, head_dim, window=16,
                                          rngs=rngs)
# --- end routing: DMA ---


_LAYERS: dict[str, LayerFactory] = {
    'inline_local': _non_causal(
        'inline_local', lambda d, n, h, *, grid, rngs:
        inline_attention.InLineAttention(d, n, h, grid=grid, rngs=rngs)),
    'agent': _non_causal(
        'agent', lambda d, n, h, *, grid, rngs: agent_attention.AgentAttention(
            d, n, h, grid=grid, agent_grid=tuple(min(7, g) for g in grid),
            rngs=rngs)),
    'focal_modulation': _non_causal(
        'focal_modulation', lambda d, n, h, *, grid, rngs:
        focal_modulation.FocalModulation(d, grid=grid, rngs=rngs)),
    'lightnet_layer': lambda d, n, h, *, grid, causal, rngs: (
        lightnet.LightNetAttention(d, n, h, causal=causal, grid=grid,
                                   rngs=rngs)),
    'gla': _gla,
    # --- routing: VMoBA (attention.routing.vmoba) ---
    # One partition per name (the factory is not told the layer index, so a model
    # cannot cycle 1D/2D/3D by itself); tau 0.25, default_cell block shapes.
    **{f'vmoba_{p}': _non_causal(
        f'vmoba_{p}', lambda d, n, h, *, grid, rngs, p=p:
        routing_vmoba.VMoBAAttention(d, n, h, grid=grid, partition=p, rngs=rngs))
       for p in routing_vmoba.PARTITIONS},
    # 'vmoba': the partition cycles 1D / 2D / 3D with the layer index (the paper).
    'vmoba': _non_causal(
        'vmoba', lambda d, n, h, *, grid, rngs, layer_index=0:
        routing_vmoba.VMoBAAttention(d, n, h, grid=grid, layer_index=layer_index,
                                     rngs=rngs)),
    # --- end routing: VMoBA ---
    # --- routing: SeerAttention (attention.routing.seer_attention) ---
    # Owns q/k/v/out projections + an AttnGate; T / 8 blocks, row top-3. The LM
    # loss does not train the gate (see SeerAttention.gate_loss, train_attn_gates).
    'seer_attention': lambda d, n, h, *, grid, causal, rngs: (
        routing_seer.SeerAttention(d, n, h, causal=causal, num_blocks=8, top_k=3,
                                   rngs=rngs)),
    # The same layer whose gate trains jointly: its KL distillation loss (weight 10,
    # as the paper) is returned as an aux loss the trainer adds.
    'seer_attention_distill': lambda d, n, h, *, grid, causal, rngs: (
        routing_seer.SeerAttention(d, n, h, causal=causal, num_blocks=8, top_k=3,
                                   distill_weight=10.0, rngs=rngs)),
    # --- end routing: SeerAttention ---
    # --- routing: BiFormer, DMA (attention.routing.biformer, .dynamic_mask_attention) ---
    # BiFormer: regions / top_k default (S <= 7 per side, min(4, R // 2) regions).
    'biformer': _non_causal(
        'biformer', lambda d, n, h, *, grid, rngs:
        routing_biformer.BiLevelRoutingAttention(d, n, h, grid=grid, rngs=rngs)),
    'dma': _dma,
    # --- end routing: BiFormer, DMA ---
    # --- routing: Sparsifiner (attention.routing.sparsifiner) ---
    'sparsifiner': _non_causal('sparsifiner', lambda d, n, h, *, grid, rngs: (
        _SparsifinerLayer(d, n, h, grid=grid, rngs=rngs))),
    # --- end routing: Sparsifiner ---
    # --- variants: relative position attention ---
    # Music Transformer (skewed relative logits), distances clipped at 128.
    'relative': lambda d, n, h, *, grid, causal, rngs: (
        variants_relative.RelativeAttention(d, n, h, causal=causal, rngs=rngs)),
    # T5 bucketed bias (32 buckets, max distance 128; unidirectional when causal).
    't5_bias': lambda d, n, h, *, grid, causal, rngs: (
        variants_relative.T5BiasAttention(d, n, h, causal=causal, rngs=rngs)),
    # Swin 2D relative bias over the token grid (ViT).
    'relative_2d': _non_causal('relative_2d', lambda d, n, h, *, grid, rngs: (
        variants_relative.RelativeBias2DAttention(d, n, h, grid=grid, rngs=rngs))),
    # --- end variants: relative position attention ---
    # --- variants: MoH (attention.variants.mixture_of_heads) ---
    # h_s = N // 4 shared heads, top-k = half of the routed heads (at least 1);
    # returns the load-balance loss (x 0.01) as 'moh_load_balance'. LM and ViT.
    'moh': lambda d, n, h, *, grid, causal, rngs: (
        variants_moh.MixtureOfHeadsAttention(
            d, n, h, num_shared_heads=n // 4, top_k=max(1, (n - n // 4) // 2),
            causal=causal, rngs=rngs)),
    # --- end variants: MoH ---
    # --- variants: DaViT, CrossFormer ---
    # DaViT channel group attention (groups = heads, scale 1 / sqrt(C_g)).
    'channel_attention': _non_causal('channel_attention', lambda d, n, h, *, grid,
                                     rngs: variants_channel.ChannelAttention(
                                         d, n, h, rngs=rngs)),
    # DaViT dual attention: window attention (W <= 7) at even depth, channel at odd.
    'davit': _non_causal('davit', lambda d, n, h, *, grid, rngs, layer_index=0: (
        variants_channel.davit_layer(d, n, h, grid=grid, layer_index=layer_index,
                                     rngs=rngs))),
    # CrossFormer SDA (even depth) / LDA (odd), G = I <= 7; layer 0 adds a CEL.
    'crossformer': _non_causal('crossformer', lambda d, n, h, *, grid, rngs,
                               layer_index=0: (
        variants_crossformer.CrossFormerAttention(d, n, h, grid=grid,
                                                  layer_index=layer_index,
                                                  rngs=rngs))),
    # --- end variants: DaViT, CrossFormer ---
    # --- variants: landmark, GAAM ---
    # Landmark: causal, block 16, grouped softmax (layer.mode = 'retrieve' for
    # top-2 retrieval). GAAM: q / k recalibrated per head, then softmax attention.
    'landmark': variants_landmark.registry_layer,
    'gaam': variants_gaam.registry_layer,
    # --- end variants: landmark, GAAM ---
}


def _check_entry(name: Any, arg: str, obj: Any) -> None:
  """Raises unless `name` is a usable registry name and `obj` (argument `arg`) is
  callable."""
  if not isinstance(name, str) or not name or ':' in name:
    raise ValueError(f'name must be a non-empty str without ":", got {name!r}.')
  if not callable(obj):
    raise TypeError(f'{arg} must be callable, got {type(obj).__name__}.')


def register_layer(name: str, factory: LayerFactory) -> None:
  """Makes `factory(dim, num_heads, head_dim, *, grid, causal, rngs)` -> an NNX layer
  x [B, T, D] -> [B, T, D] (or (y, aux_losses)) selectable as
  `attention.variant=name`; a factory that also takes `layer_index` gets the block's
  depth."""
  _check_entry(name, 'factory', factory)
  _LAYERS[name] = factory


def available_layers() -> tuple[str, ...]:
  return tuple(sorted(_LAYERS))


def is_layer(name: str) -> bool:
  return name in _LAYERS


def check_name(name: str) -> None:
  """Raises ValueError unless `name` is a registry variant or a layer."""
  if name not in _VARIANTS and name not in _LAYERS:
    raise ValueError(
        f'attention variant must be one of {available_variants()} or a layer in '
        f'{available_layers()}, got {name!r}.')


def make_layer(name: str, dim: int, num_heads: int, head_dim: int, *,
               grid: tuple[int, ...] | None, causal: bool, rngs: Any,
               layer_index: int = 0, implementation: str | None = None) -> Any:
  """The token-mixer layer registered as `name`.

  `layer_index` (the block's depth) reaches factories that take it (e.g. VMoBA's
  partition cycling); others never see it. `implementation` (the model's
  `attention.implementation`), when given, is set on every submodule that dispatches
  `dot_product_attention` (those with an `implementation` attribute); a layer with
  no such submodule (the linear family, FocalNets) has its own forms.
  """
  if name not in _LAYERS:
    raise ValueError(f'attention layer must be one of {available_layers()}, got '
                     f'{name!r}.')
  factory = _LAYERS[name]
  extra = dict(layer_index=layer_index) if _accepts(factory, 'layer_index') else {}
  layer = factory(dim, num_heads, head_dim, grid=grid, causal=causal, rngs=rngs,
                  **extra)
  if implementation is not None:
    for _, node in nnx.iter_graph(layer):
      if isinstance(node, nnx.Module) and hasattr(node, 'implementation'):
        node.implementation = implementation
  return layer


def register_variant(name: str, fn: VariantFn) -> None:
  """Makes `fn` selectable as `attention.variant=name` in model configs."""
  _check_entry(name, 'fn', fn)
  _VARIANTS[name] = fn


def available_variants() -> tuple[str, ...]:
  return tuple(sorted(_VARIANTS))


def get_variant(name: str) -> VariantFn:
  """The attention function registered as `name`."""
  if name not in _VARIANTS:
    raise ValueError(
        f'attention variant must be one of {available_variants()}, got {name!r}.')
  return _VARIANTS[name]
