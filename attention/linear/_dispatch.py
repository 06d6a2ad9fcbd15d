"""Implementation choice for the chunked forms: XLA or the Pallas chunk kernels.

`implementation`: None (best for the backend: the Pallas kernel on TPU / GPU where it
supports the inputs, else the chunked XLA form; on CPU always XLA), 'xla',
'pallas_tpu' or 'pallas_gpu' (on CPU these run in the Pallas interpreter). Kernels are
imported by name, lazily, so this library never imports a specific kernel module at
import time.
"""

from __future__ import annotations

import importlib

import jax

from attention.linear import _core

IMPLEMENTATIONS = (None, 'xla', 'pallas_tpu', 'pallas_gpu')
_KERNEL_MODULE = 'kernels.pallas.linear'
_BACKEND = {'pallas_tpu': 'tpu', 'pallas_gpu': 'gpu'}


def _kernel():
  return importlib.import_module(_KERNEL_MODULE)


def _reason(x: _core.Inputs, causal: bool) -> str | None:
  if not causal:
    return 'causal=False (the non-causal form is one matmul; use the XLA form)'
  return _kernel().unsupported(x.g, x.runs)


def check_implementation(implementation) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS}, got '
                     f'{implementation!r}.')


def run(x: _core.Inputs, *, causal: bool, chunk_size: int | None,
        implementation: str | None, xla_chunk_size: int):
  """(out in the output dtype, normalised where `x.normalize_eps` is set, final state
  or None) by the chosen implementation."""
  check_implementation(implementation)
  if chunk_size is not None:
    chunk_size = _core.check_chunk_size(chunk_size)
  if implementation is None:
    platform = jax.default_backend()
    candidate = {'tpu': 'pallas_tpu', 'gpu': 'pallas_gpu'}.get(platform)
    if candidate is not None and _reason(x, causal) is None:
      implementation = candidate
    else:
      implementation = 'xla'
  if implementation == 'xla':
    return _core.chunked(x, causal=causal, chunk_size=chunk_size or xla_chunk_size)
  reason = _reason(x, causal)
  if reason:
    raise ValueError(f'implementation={implementation!r} does not support these '
                     f'inputs: {reason}.')
  out, final = _kernel().chunked(x.q, x.k, x.v, x.g, x.initial_state,
                                 backend=_BACKEND[implementation],
                                 chunk_size=chunk_size)
  if x.normalize_eps is not None:
    out = _core.normalise(out, x.normalize_eps)
  return out.astype(x.out_dtype), final
