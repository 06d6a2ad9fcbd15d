"""Autoregressive generation with a KV cache: greedy or sampled, left-padded batches.

`generate` prefills the prompt into a cache (`CausalDecoder.init_cache`) in one call,
then appends one token per step with the same jitted step (compiled once per model
structure and batch shape). Left-padded prompts get positions cumsum(mask) - 1 (as
Hugging Face's `generate`), so each row continues exactly as its unpadded prompt.
Sampling uses one key per step, `jax.random.fold_in(key, step)`.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits: jax.Array, key: jax.Array | None, *,
                  temperature: float | jax.Array = 1.0,
                  top_k: int | jax.Array | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
  """Next tokens [B] int32 from logits [B, V]: argmax (key None) or a sample.

  A sample draws from softmax(logits / temperature) restricted to the top_k largest
  logits (all when top_k is None; ties at the k-th value are kept), then to the
  nucleus of mass top_p (Holtzman et al. 2020, "The Curious Case of Neural Text
  Degeneration"; as transformers' TopPLogitsWarper: the largest logits whose
  probabilities reach top_p, at least one). temperature, top_k and top_p may be
  traced.
  """
  if logits.ndim != 2:
    raise ValueError(f'logits must be [B, V], got {tuple(logits.shape)}.')
  if key is None:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def python(x, default):  # Arrays (possibly traced) are not checked.
    return x if x is None or isinstance(x, (bool, int, float)) else default

  _check_sampling(key, python(temperature, 1.0), python(top_k, None),
                  python(top_p, None), logits.shape[-1])
  return _sample(logits, key, temperature,
                 logits.shape[-1] if top_k is None else top_k,
                 1.0 if top_p is None else top_p)


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
  """Logits [B, V] outside the top_k and then the top_p nucleus set to -inf."""
  v = logits.shape[-1]
  ascending = jnp.sort(logits, axis=-1)  # [B, V]
  index = jnp.clip(v - jnp.asarray(top_k, jnp.int32), 0, v - 1)
  kth = ascending[:, index][:, None]  # [B, 1]
  logits = jnp.where(logits >= kth, logits, -jnp.inf)
  ascending = jnp.where(ascending >= kth, ascending, -jnp.inf)
  # Nucleus: drop the smallest logits whose cumulative probability is <= 1 - p.
  mass = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)  # [B, V]
  dropped = jnp.sum(mass <= 1.0 - jnp.asarray(top_p, mass.dtype), axis=-1)
  dropped = jnp.minimum(dropped, v - 1)  # Keep at least the largest.
  floor = jnp.take_along_axis(ascending, dropped[:, None], axis=-1)  # [B, 1]
  return jnp.where(logits >= floor, logits, -jnp.inf)


def _sample(logits, key, temperature, top_k, top_p):
  """A draw from softmax(logits / temperature) over the top_k / top_p logits."""
  logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _next_token(logits, key, step, temperature, top_k, top_p, sample):
  """Greedy or sampled (traced `sample`) token of step `step`."""
  drawn = _sample(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jnp.where(sample, drawn, greedy)


def _check_sampling(key, temperature, top_k, top_p, vocab_size: int) -> None:
  if key is None:
    return
  if not (isinstance(temperature, (int, float)) and temperature > 0):
    raise ValueError(
        f'temperature must be a positive float, got {temperature!r}.')
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(
      top_k, (int, np.integer)) or not 1 <= top_k <= vocab_size):
    raise ValueError(
        f'top_k must be None or an int in [1, vocab_size={vocab_size}], got '
        f'{top_k!r}.')
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(
      top_p, (int, float)) or not 0 < top_p <= 1):
    raise ValueError(f'top_p must be None or a float in (0, 1], got {top_p!r}.')


def left_pad_positions(attention_mask: jax.Array) -> jax.Array:
  """[B, T] int32 positions cumsum(mask) - 1 of a left-padded batch (pads: 1, HF)."""
  mask = attention_mask.astype(jnp.int32)
  positions = jnp.cumsum(mask, axis=1) - 1
  return jnp.where(mask > 0, positions, 1).astype(jnp.int32)


def _constrain(cache, shardings):
  if shardings is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, shardings)


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings'))
def _prefill(graphdef, state, cache, prompt, positions, mask, interventions, *,
             shardings):
  model = nnx.merge(graphdef, state)
  out = model(prompt, positions=positions, attention_mask=mask, cache=cache,
              interventions=interventions)
  return out.logits[:, -1], _constrain(out.cache, shardings)


@functools.partial(jax.jit, static_argnames=('graphdef', 'shardings'),
                   donate_argnames=('cache',))
def _step(graphdef, state, cache, logits, done, key, step, temperature, top_k,
          top_p, sample, eos, pad, interventions, *, shardings):
  """Picks the token of `logits`, appends it; (token, done, next logits, cache)."""
  token, done = _pick(logits, done, key, step, temperature, top_k, top_p, sample,
                      eos, pad)
  model = nnx.merge(graphdef, state)
  positions = cache.next_positions()[:, None]  # [B, 1]
  out = model(token[:, None], positions=positions, cache=cache,
              interventions=interventions)
  return token, done, out.logits[:, 0], _constrain(out.cache, shardings)


def _pick(logits, done, key, step, temperature, top_k, top_p, sample, eos, pad):
  """(token, done): `pad` for finished rows; a row is done once it emits an eos."""
  token = _next_token(logits, key, step, temperature, top_k, top_p, sample)
  token = jnp.where(done, pad, token)
  return token, done | jnp.isin(token, eos)


_last = jax.jit(_pick)


def _token_ids(name: str, ids, vocab_size: int) -> tuple[int, ...]:
  """A token id or a non-empty sequence of them, each in [0, vocab_size)."""
  seq = (ids,) if isinstance(ids, (int, np.integer)) else ids
  try:
    seq = tuple(seq)
  except TypeError:
    seq = ()
  if not seq or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                    or not 0 <= i < vocab_size for i in seq):
    raise ValueError(
        f'{name} must be an int or a non-empty sequence of ints in '
        f'[0, vocab_size={vocab_size}), got {ids!r}.')
  return tuple(int(i) for i in seq)


def generate(model: nnx.Module, prompt: jax.Array,
             attention_mask: jax.Array | None = None, *, max_new_tokens: int,
             key: jax.Array | None = None, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             interventions: Sequence[Any] = (),
             return_logits: bool = False
            ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Continues left-padded prompts by up to `max_new_tokens` tokens.

  As Hugging Face's `generate`: a row that emits an `eos_token_id` is finished and
  continues with `pad_token_id`; generation stops early once every row is finished.

  Args:
    model: a `CausalDecoder`.
    prompt: [B, T] int tokens, left-padded.
    attention_mask: [B, T] bool / int, 1 = real token (default all real); each row
      is zeros then ones and has at least one real token.
    max_new_tokens: number of tokens to append (>= 1).
    key: None for greedy decoding, else a `jax.random.key` for sampling (step i
      uses `fold_in(key, i)`).
    temperature: sampling temperature (> 0).
    top_k: sample among the top_k logits only (None: all).
    top_p: then among the nucleus of probability mass top_p only (None: all).
    eos_token_id: end-of-sequence id(s) (None: always `max_new_tokens` tokens).
    pad_token_id: what finished rows append (default: the first eos id).
    interventions: applied in every forward (prefill and each step).
    return_logits: also return the logits each new token was chosen from.

  Returns:
    tokens [B, T + n] int32: the prompt (pads included) and the n new tokens, n =
    max_new_tokens unless every row finished after n < max_new_tokens steps; with
    return_logits, (tokens, logits [B, n, V] float32), the logits each new token was
    chosen from (finished rows' logits included as computed).
  """
  prompt = jnp.asarray(prompt)
  if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
    raise ValueError(
        f'prompt must be an int array [B, T], got {prompt.dtype} '
        f'{tuple(prompt.shape)}.')
  b, t = prompt.shape
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(
        f'max_new_tokens must be a positive int, got {max_new_tokens!r}.')
  config = model.config
  _check_sampling(key, temperature, top_k, top_p, config.vocab_size)
  eos = ()
  if eos_token_id is not None:
    eos = _token_ids('eos_token_id', eos_token_id, config.vocab_size)
  if pad_token_id is not None:
    pad_token_id, = _token_ids('pad_token_id', pad_token_id, config.vocab_size)
  pad = jnp.int32(pad_token_id if pad_token_id is not None else
                  (eos[0] if eos else 0))
  eos_ids = jnp.asarray(eos, jnp.int32).reshape(-1)  # [E] (E = 0: never done)
  if config.positions == 'learned' and t + max_new_tokens > config.max_positions:
    raise ValueError(
        f'prompt length {t} + max_new_tokens {max_new_tokens} exceeds '
        f'max_positions={config.max_positions} (learned position table).')
  if attention_mask is None:
    mask = jnp.ones((b, t), bool)
  else:
    mask = jnp.asarray(attention_mask)
    if mask.shape != (b, t):
      raise ValueError(
          f'attention_mask must have the prompt shape {(b, t)}, got '
          f'{tuple(mask.shape)}.')
    host = np.asarray(mask).astype(np.int64)
    if not (np.all(np.diff(host, axis=1) >= 0) and np.all(host[:, -1] == 1)
            and np.isin(host, (0, 1)).all()):
      raise ValueError(
          'attention_mask must be 0 / 1 and left-padded (each row zeros then '
          'ones, ending in a real token).')
    mask = mask.astype(bool)
  positions = left_pad_positions(mask)
  cache = model.init_cache(b, t + max_new_tokens)
  shardings = None
  first = cache.kv_positions.sharding
  if isinstance(first, jax.sharding.NamedSharding):
    shardings = jax.tree.map(lambda x: x.sharding, cache)
  graphdef, state = nnx.split(model)
  interventions = tuple(interventions)
  sample = jnp.asarray(key is not None)
  key = jax.random.key(0) if key is None else key
  temperature = jnp.float32(temperature)
  top_k = jnp.int32(config.vocab_size if top_k is None else top_k)
  top_p = jnp.float32(1.0 if top_p is None else top_p)
  logits, cache = _prefill(graphdef, state, cache, prompt.astype(jnp.int32),
                           positions, mask, interventions, shardings=shardings)
  done = jnp.zeros((b,), bool)
  new, seen = [], [logits]
  for i in range(max_new_tokens - 1):
    token, done, logits, cache = _step(
        graphdef, state, cache, logits, done, key, jnp.int32(i), temperature,
        top_k, top_p, sample, eos_ids, pad, interventions, shardings=shardings)
    new.append(token)
    if eos and bool(done.all()):  # One host sync per step, only with an eos.
      break
    seen.append(logits)
  else:
    new.append(_last(logits, done, key, jnp.int32(max_new_tokens - 1),
                     temperature, top_k, top_p, sample, eos_ids, pad)[0])
  tokens = jnp.concatenate([prompt.astype(jnp.int32), jnp.stack(new, axis=1)],
                           axis=1)
  if return_logits:
    return tokens, jnp.stack(seen, axis=1)
  return tokens


__all__ = ['filter_logits', 'generate', 'left_pad_positions', 'sample_logits']
