"""Attention variants and masks selected by name from config strings.

A model never imports a specific attention variant or mask: it asks this registry.

* Variants and layers: the library's registry (`attention.registry`), re-exported
  here (`get_variant`, `make_layer`, `register_variant`, `register_layer`, ...).

* Masks: a spec string `'name'` or `'name:arg,arg,key=value'` names a generator in
  `attention.masks` (any public function with a size parameter `shape`, `q_len`,
  `seq_len` or `length`); arguments are Python literals. `'none'` means no mask. The
  size arguments (and `num_heads`, when the generator takes it and the spec does not
  give it) are filled in from the model, so `'causal'`, `'sliding_window:128,0'` or
  `'chunked_causal:chunk=64'` resolve as soon as `attention.masks` defines them.
"""

from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Callable

import numpy as np

from attention import masks as attention_masks
# The variant / layer registry lives in the library; re-exported for the models.
from attention.registry import (  # pylint: disable=unused-import
    _LAYERS, _VARIANTS, AuxLosses, LayerFactory, VariantFn, available_layers,
    available_variants, check_name, get_variant, is_layer, make_layer,
    register_layer, register_variant, softmax_attention)

_SIZE_PARAMS = ('shape', 'q_len', 'seq_len', 'length')
NO_MASK = 'none'


def _size_param(fn: Callable[..., Any]) -> str | None:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return None
  for name in _SIZE_PARAMS:
    if name in params:
      return name
  return None


def available_masks() -> tuple[str, ...]:
  """Names of the mask generators in `attention.masks`, plus 'none'."""
  names = [NO_MASK]
  for name in dir(attention_masks):
    obj = getattr(attention_masks, name)
    if (not name.startswith('_') and inspect.isfunction(obj) and
        _size_param(obj) is not None):
      names.append(name)
  return tuple(sorted(names))


def parse_mask_spec(spec: str) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
  """'name:1,2,key=3' -> ('name', (1, 2), {'key': 3}); arguments are literals."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f'mask spec must be a non-empty str, got {spec!r}.')
  name, _, arg_text = spec.partition(':')
  name = name.strip()
  args, kwargs = [], {}
  if arg_text.strip():
    try:
      call = ast.parse(f'f({arg_text})', mode='eval').body
      args = [ast.literal_eval(a) for a in call.args]
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(
          f'mask spec {spec!r}: arguments must be Python literals like '
          f'"sliding_window:128,0" or "name:key=3" ({e}).') from None
    if any(k is None for k in kwargs):
      raise ValueError(f'mask spec {spec!r}: **kwargs are not allowed.')
  return name, tuple(args), kwargs


@functools.lru_cache(maxsize=256)
def make_mask(spec: str, *, q_len: int, kv_len: int,
              num_heads: int) -> attention_masks.Mask | None:
  """The `attention.masks.Mask` for `spec` at these sizes (None for 'none')."""
  name, args, kwargs = parse_mask_spec(spec)
  if name == NO_MASK:
    if args or kwargs:
      raise ValueError(f'mask spec {spec!r}: "none" takes no arguments.')
    return None
  available = available_masks()
  if name not in available:
    raise ValueError(
        f'mask must be one of {available} (optionally "name:args"), got '
        f'{spec!r}.')
  fn = getattr(attention_masks, name)
  params = inspect.signature(fn).parameters
  size = _size_param(fn)
  filled: dict[str, Any] = {}
  if size == 'shape':
    filled['shape'] = (q_len, kv_len)
  elif size == 'q_len':
    filled['q_len'] = q_len
    if 'kv_len' in params:
      filled['kv_len'] = kv_len
  else:
    if q_len != kv_len:
      raise ValueError(
          f'mask {name!r} takes one length ({size}) but q_len={q_len} != '
          f'kv_len={kv_len}.')
    filled[size] = q_len
  if 'num_heads' in params and 'num_heads' not in kwargs:
    filled['num_heads'] = num_heads
  clash = sorted(set(filled) & set(kwargs))
  if clash:
    raise ValueError(
        f'mask spec {spec!r}: {clash} are set by the model, not the spec.')
  # Positional spec arguments fill the generator's positional parameters in order
  # (after those the model fills in); never keyword-only ones: 'sliding_window:4,0,99'
  # must not quietly become offset=99.
  positional = [p for p, param in params.items()
                if p not in filled and p not in kwargs and param.kind in (
                    param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)]
  if len(args) > len(positional):
    keyword_only = [p for p, param in params.items()
                    if param.kind == param.KEYWORD_ONLY and p not in filled]
    by_name = (f'; give keyword-only parameters by name ({", ".join(keyword_only)}'
               f'), e.g. "{name}:...,{keyword_only[0]}=..."'
               if keyword_only else '')
    raise ValueError(
        f'mask spec {spec!r}: attention.masks.{name} takes at most '
        f'{len(positional)} positional arguments ({", ".join(positional)}), got '
        f'{len(args)}{by_name}.')
  try:
    bound = inspect.signature(fn).bind(
        **filled, **kwargs, **dict(zip(positional, args)))
  except TypeError as e:
    raise ValueError(
        f'mask spec {spec!r} does not match attention.masks.{name}'
        f'{inspect.signature(fn)}: {e}.') from None
  mask = fn(*bound.args, **bound.kwargs)
  if not isinstance(mask, attention_masks.Mask):
    raise TypeError(
        f'attention.masks.{name} returned {type(mask).__name__}, not a Mask.')
  return mask


# Dense row checks materialise [heads, q_len, kv_len] booleans; above this many
# elements (64 MiB) the check is skipped (such masks are structured generators whose
# rows are tested in attention/masks; the training config bounds seq_len anyway).
MAX_CHECKED_MASK_ELEMENTS = 1 << 26


@functools.lru_cache(maxsize=256)
def check_mask_rows(spec: str, *, q_len: int, kv_len: int, num_heads: int,
                    causal: bool) -> None:
  """Raises ValueError if `spec` leaves a query row with no visible key.

  Such a row attends to nothing (its output is zeros), which is never intended: a
  mis-parsed or mis-sized spec. With `causal` (decoders, k <= q ANDed with the mask)
  every row must see at least its own position, the only key causality always
  allows; otherwise every row must see at least one key.
  """
  mask = make_mask(spec, q_len=q_len, kv_len=kv_len, num_heads=num_heads)
  if mask is None:
    return
  heads = num_heads if mask.head_dependent else 1
  if heads * q_len * kv_len > MAX_CHECKED_MASK_ELEMENTS:
    return
  dense = mask.materialize(num_heads if mask.head_dependent else None)
  dense = dense.reshape((-1, q_len, kv_len))  # [H or 1, T, S]
  if causal:  # k <= q (as attention.masks.causal): row q must see key q.
    rows = np.arange(min(q_len, kv_len))
    ok = dense[:, rows, rows]  # [H, min(T, S)]
    need = 'see its own position (causal model)'
  else:
    ok = dense.any(-1)  # [H, T]
    need = 'see at least one key'
  if not ok.all():
    h, row = np.argwhere(~ok)[0]
    raise ValueError(
        f'mask {spec!r} at q_len={q_len}, kv_len={kv_len}: query row {int(row)}'
        f'{f" (head {int(h)})" if mask.head_dependent else ""} and '
        f'{int(np.sum(~ok)) - 1} other(s) do not {need}; check the spec\'s '
        f'arguments ({mask!r}).')
