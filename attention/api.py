"""`dot_product_attention`: the one softmax-attention entry point.

Validates the inputs once into a frozen `kernels.problem.AttentionProblem`, then
dispatches to a registered implementation ('reference', 'xla', 'pallas_tpu',
'pallas_gpu', ...). An implementation is a module exposing

    attention(query, key, value, problem, **options)

and optionally `unsupported(query, key, value, problem) -> str | None` (a reason it
cannot run this problem, used by automatic selection and to raise clear errors).
Adding one is a file plus one `register_implementation` line (or an entry in
`_BUILTIN`), and a subclass of the conformance test base (tests/kernels/conformance.py).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax

from kernels import problem as problem_lib

# name -> module path (imported lazily, so kernels may import `attention`).
_BUILTIN: dict[str, str] = {
    'reference': 'kernels.reference',
    'xla': 'kernels.xla',
    'pallas_tpu': 'kernels.pallas.tpu',
    'pallas_gpu': 'kernels.pallas.gpu',
}
_REGISTRY: dict[str, Any] = dict(_BUILTIN)

# Preference order per backend for implementation=None.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    'cpu': ('xla', 'reference'),
    'gpu': ('pallas_gpu', 'xla', 'reference'),
    'tpu': ('pallas_tpu', 'xla', 'reference'),
}


def register_implementation(name: str, module: str | Any) -> None:
  """Registers an implementation: a module path or a module-like object."""
  if not isinstance(name, str) or not name:
    raise ValueError(f'name must be a non-empty str, got {name!r}.')
  _REGISTRY[name] = module


def available_implementations() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def _load(name: str):
  target = _REGISTRY[name]
  if isinstance(target, str):
    target = importlib.import_module(target)
    _REGISTRY[name] = target
  return target


def _select(implementation: str | None, backend: str, arrays: tuple[Any, ...],
            problem: problem_lib.AttentionProblem) -> Callable[..., Any]:
  """The implementation function; `arrays` = (query, key, value)."""
  if implementation is not None:
    if implementation not in _REGISTRY:
      raise ValueError(
          f'implementation must be one of {available_implementations()} or None, '
          f'got {implementation!r}.')
    module = _load(implementation)
    check = getattr(module, 'unsupported', None)
    reason = check(*arrays, problem) if check is not None else None
    if reason:
      raise ValueError(
          f'implementation={implementation!r} does not support these inputs: '
          f'{reason}.')
    return module.attention
  for name in _PREFERENCE.get(backend, ('xla', 'reference')):
    if name not in _REGISTRY:
      continue
    module = _load(name)
    check = getattr(module, 'unsupported', None)
    if check is None or not check(*arrays, problem):
      return module.attention
  return _load('reference').attention


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: Any = None,
    is_causal: bool = False,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    score_mod: problem_lib.ScoreMod | Callable[..., jax.Array] | None = None,
    sinks: jax.Array | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    return_residuals: bool = False,
    implementation: str | None = None,
):
  """Scaled dot-product softmax attention ("Attention Is All You Need").

  logits = score_mod(soft_cap(scale * q k^T), b, h, q_idx, kv_idx) + bias, restricted
  to the visible keys (mask AND causal AND same segment); out = dropout(softmax(logits))
  v. With sinks, each head's softmax denominator has one more term exp(sink_h) whose
  value is zero (the learnable sink of "Efficient Streaming Language Models with
  Attention Sinks" as used in gpt-oss).

  Args:
    query: [B, T, N, H].
    key: [B, S, K, H], N a multiple of K (GQA/MQA: query head n uses kv head
      n // (N // K)).
    value: [B, S, K, H_v].
    bias: additive logits, broadcastable to [B, N, T, S] (rank 4).
    mask: boolean array broadcastable to [B, N, T, S] (True = visible), a
      `attention.masks.Mask` of shape (T, S) (head-dependent masks: N heads), or a
      tuple of these (all must hold).
    is_causal: also apply k <= q (top-left aligned, as `jax.nn.dot_product_attention`).
    scale: logits scale, default 1 / sqrt(H).
    logits_soft_cap: c > 0 gives c * tanh(logits / c) (Gemma 2), before score_mod.
    score_mod: `fn(score, b, h, q_idx, kv_idx) -> score` (FlexAttention's
      convention; elementwise on broadcast int32 indices; may close over arrays, which
      receive gradients) or a `kernels.problem.ScoreMod` (see `attention.score_mods`).
    sinks: [N] per-head sink logits (differentiable).
    segment_ids: [B, T] int (self-attention) or a pair ([B, T], [B, S]); tokens attend
      only within their segment (packed sequences).
    dropout_rate: attention dropout on the normalised probabilities, in [0, 1).
    dropout_key: a `jax.random.key` (required when dropout_rate > 0); the keep-mask
      is a counter-based function of (key, b, h, q_idx, kv_idx).
    return_residuals: also return the log-sum-exp [B, N, T] (float32; -inf where a row
      sees nothing).
    implementation: 'reference', 'xla', 'pallas_tpu', 'pallas_gpu' or None (best
      available for the default backend).

  Returns:
    out [B, T, N, H_v] in query's dtype (zeros for rows that see nothing), and the
    log-sum-exp if `return_residuals`.
  """
  problem = make_problem(
      query, key, value, bias=bias, mask=mask, is_causal=is_causal, scale=scale,
      logits_soft_cap=logits_soft_cap, score_mod=score_mod, sinks=sinks,
      segment_ids=segment_ids, dropout_rate=dropout_rate, dropout_key=dropout_key,
      return_residuals=return_residuals)
  if implementation is not None and not isinstance(implementation, str):
    raise TypeError(
        f'implementation must be a str or None, got {type(implementation).__name__}.')
  fn = _select(implementation, jax.default_backend(), (query, key, value), problem)
  return fn(query, key, value, problem)


def make_problem(query: jax.Array, key: jax.Array, value: jax.Array,
                 **kwargs) -> problem_lib.AttentionProblem:
  """The validated problem `dot_product_attention` hands its implementation."""
  return problem_lib.make_problem(query, key, value, **kwargs)
