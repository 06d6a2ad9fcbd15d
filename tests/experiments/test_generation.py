"""KV-cache decoding and `generate`: equal to the full forward, padding, sampling.

The shapes and models are those of test_decoder.py (B=4 prompts of T=8, 4 new
tokens), so both files share compiled functions.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.models import decoder as decoder_lib
from experiments.models import generation
from tests.experiments.test_decoder import B
from tests.experiments.test_decoder import forward
from tests.experiments.test_decoder import GEN_MASK
from tests.experiments.test_decoder import gpt2_config
from tests.experiments.test_decoder import left_pad_positions
from tests.experiments.test_decoder import LLAMA
from tests.experiments.test_decoder import randomized
from tests.experiments.test_decoder import T
from tests.experiments.test_decoder import tokens_for

NEW = 4
FULL_MASK = np.concatenate([GEN_MASK, np.ones((B, NEW), bool)], axis=1)


def full_forward(model, tokens):
  """Logits [B, T + NEW, V] of the whole left-padded sequence in one forward."""
  return forward(model, tokens, jnp.asarray(left_pad_positions(FULL_MASK)),
                 jnp.asarray(FULL_MASK))


@pytest.mark.parametrize('config', [LLAMA, gpt2_config()],
                         ids=['llama', 'gpt2'])
def test_greedy_generate_equals_full_forward(config):
  model = randomized(config)
  prompt = tokens_for(B, T, seed=7)
  out, step_logits = generation.generate(
      model, prompt, jnp.asarray(GEN_MASK, jnp.int32), max_new_tokens=NEW,
      return_logits=True)
  assert out.shape == (B, T + NEW) and out.dtype == jnp.int32
  np.testing.assert_array_equal(out[:, :T], prompt)
  # Causal: one forward of the result re-runs every step at once.
  logits = full_forward(model, out)[:, T - 1:-1]  # [B, NEW, V]
  np.testing.assert_allclose(step_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out[:, T:], jnp.argmax(logits, -1))
  # Row 1 (left-padded by 3) continues as its unpadded prompt: the plain
  # forward of prompt + continuation gives the same logits and argmaxes.
  alone = forward(model, out[1:2, 3:])[0, 4:-1]  # [NEW, V]
  np.testing.assert_allclose(step_logits[1], alone, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, tokens, positions, mask, cache):
  out = nnx.merge(graphdef, state)(tokens, positions=positions,
                                   attention_mask=mask, cache=cache)
  return out.logits, out.cache


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, token, cache):
  out = decoder_lib.decode_step(nnx.merge(graphdef, state), token, cache)
  return out.logits, out.cache


def test_prefill_then_decode_steps_equal_full_forward():
  """Teacher-forced decode_step (T=1 against the S=12 cache) == one forward."""
  model = randomized(LLAMA)
  g, st = nnx.split(model)
  tokens = tokens_for(B, T + NEW, seed=5)
  positions = jnp.asarray(left_pad_positions(FULL_MASK))
  logits, cache = _prefill(g, st, tokens[:, :T], positions[:, :T],
                           jnp.asarray(GEN_MASK), model.init_cache(B, T + NEW))
  steps = [logits]
  for i in range(T, T + NEW):
    logits, cache = _decode(g, st, tokens[:, i], cache)  # Default positions.
    steps.append(logits)
  got = np.asarray(jnp.concatenate(steps, axis=1))
  want = np.asarray(full_forward(model, tokens))
  np.testing.assert_allclose(got[FULL_MASK], want[FULL_MASK], rtol=1e-5,
                             atol=1e-5)
  assert np.isfinite(got).all()  # Padding queries see nothing: zeros, not NaN.
  assert int(cache.length) == T + NEW
  np.testing.assert_array_equal(cache.kv_valid, FULL_MASK)
  np.testing.assert_array_equal(np.asarray(cache.kv_positions)[FULL_MASK],
                                np.asarray(positions)[FULL_MASK])


def test_sampling_reproducible_key_dependent_and_top_k():
  model = randomized(LLAMA)
  prompt = tokens_for(B, T, seed=9)
  run = functools.partial(generation.generate, model, prompt,
                          jnp.asarray(GEN_MASK), max_new_tokens=NEW,
                          temperature=2.0)
  first = run(key=jax.random.key(0))
  np.testing.assert_array_equal(first, run(key=jax.random.key(0)))
  assert not np.array_equal(first, run(key=jax.random.key(1)))
  # top_k=1 is greedy; top_k=3 draws only among the top 3 logits of each step.
  np.testing.assert_array_equal(run(key=jax.random.key(3), top_k=1), run())
  sampled = run(key=jax.random.key(4), top_k=3)
  top3 = jax.lax.top_k(full_forward(model, sampled)[:, T - 1:-1], 3)[1]
  assert (top3 == sampled[:, T:, None]).any(-1).all()


def test_sample_logits_matches_softmax_frequencies():
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0]])
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.jit(jax.vmap(lambda k: generation.sample_logits(
      logits, k, temperature=0.5, top_k=3)))(keys)[:, 0]
  p = np.exp(np.array([0.0, 1.0, 2.0]) / 0.5)
  p = np.append(p / p.sum(), 0.0)
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  np.testing.assert_allclose(freq, p, atol=0.03)
  assert freq[3] == 0.0
  np.testing.assert_array_equal(generation.sample_logits(logits, None), [2])
  key = jax.random.key(0)
  for kwargs, match in ((dict(temperature=0.0), 'temperature must be'),
                        (dict(top_k=5), r'top_k must be .*vocab_size=4'),
                        (dict(top_p=0.0), 'top_p must be'),
                        (dict(top_p=1.5), 'top_p must be')):
    with pytest.raises(ValueError, match=match):
      generation.sample_logits(logits, key, **kwargs)
  # Traced values are not checked (nor rejected).
  assert jax.jit(lambda p: generation.sample_logits(logits, key, top_p=p))(
      jnp.float32(0.5)).shape == (1,)


def test_decode_errors():
  model = randomized(gpt2_config())
  cache = model.init_cache(1, 4)
  full = dataclasses.replace(cache, length=jnp.int32(4))
  with pytest.raises(ValueError, match='cache overflow.*max_len=4'):
    decoder_lib.decode_step(model, jnp.asarray([1]), full)
  with pytest.raises(ValueError, match='cache overflow'):
    model(tokens_for(1, 5), cache=cache)
  with pytest.raises(ValueError, match=r'tokens must be \[B\] or \[B, 1\]'):
    decoder_lib.decode_step(model, jnp.zeros((1, 2), jnp.int32), cache)
  with pytest.raises(TypeError, match='cache must be a KVCache'):
    decoder_lib.decode_step(model, jnp.asarray([1]), None)
  with pytest.raises(ValueError, match='cache must hold'):
    model(tokens_for(2, 2), cache=cache)
  with pytest.raises(ValueError, match='max_len must be a positive int'):
    model.init_cache(1, 0)
  prompt = tokens_for(2, 4)
  for kwargs, match in (
      (dict(attention_mask=jnp.asarray([[1, 1, 1, 0]] * 2)), 'left-padded'),
      (dict(attention_mask=jnp.asarray([[0, 0, 0, 0], [1] * 4])), 'left-padded'),
      (dict(attention_mask=jnp.ones((2, 3))), 'attention_mask must have'),
      (dict(max_new_tokens=0), 'max_new_tokens'),
      (dict(key=jax.random.key(0), temperature=0.0), 'temperature'),
      (dict(key=jax.random.key(0), top_k=100), 'top_k'),
      (dict(max_new_tokens=40), 'max_positions=32'),
      (dict(eos_token_id=10 ** 6), 'eos_token_id must be'),
      (dict(eos_token_id=[]), 'eos_token_id must be'),
      (dict(eos_token_id=True), 'eos_token_id must be'),
      (dict(eos_token_id=1, pad_token_id=-1), 'pad_token_id must be')):
    kwargs = {'max_new_tokens': 2, **kwargs}
    with pytest.raises(ValueError, match=match):
      generation.generate(model, prompt, **kwargs)
  with pytest.raises(ValueError, match=r'prompt must be an int array'):
    generation.generate(model, prompt[0], max_new_tokens=2)


def test_eos_finishes_rows_and_stops_when_all_are_done():
  model = randomized(LLAMA)
  prompt = tokens_for(B, T, seed=7)
  mask = jnp.asarray(GEN_MASK)
  steps = 6
  free, free_logits = generation.generate(model, prompt, mask,
                                          max_new_tokens=steps,
                                          return_logits=True)
  free = np.asarray(free)
  # The oracle, written out: a row keeps its tokens up to its first eos and is
  # padded after it; the output ends at the step where the last row finished.
  eos = int(free[1, T + 2])  # Row 1 emits it at step 2 (or earlier).

  def expected(eos_ids, pad):
    rows, ends = [], []  # ends: new tokens up to and with the first eos
    for row in free[:, T:]:
      hits = np.nonzero(np.isin(row, eos_ids))[0]
      end = hits[0] + 1 if hits.size else steps
      rows.append(np.concatenate([row[:end], np.full(steps - end, pad)]))
      ends.append(end)
    n = max(ends)
    return np.concatenate([free[:, :T], np.stack(rows)[:, :n]], axis=1), ends

  for eos_ids, pad in (([eos], 5), ([eos], None), ([int(free[0, T]), eos], 3)):
    got, logits = generation.generate(
        model, prompt, mask, max_new_tokens=steps, eos_token_id=eos_ids,
        pad_token_id=pad, return_logits=True)
    want, ends = expected(eos_ids, eos_ids[0] if pad is None else pad)
    np.testing.assert_array_equal(got, want)
    n = want.shape[1] - T
    assert logits.shape == (B, n, free_logits.shape[-1])
    for r, end in enumerate(ends):  # Up to its eos a row is the free run.
      np.testing.assert_allclose(logits[r, :end], free_logits[r, :end],
                                 rtol=1e-5, atol=1e-5)
  # Every row's first token is an eos: one step, nothing padded.
  first = generation.generate(model, prompt, mask, max_new_tokens=steps,
                              eos_token_id=[int(i) for i in free[:, T]])
  np.testing.assert_array_equal(first, free[:, :T + 1])
  # An eos that is never emitted changes nothing.
  unused = int(np.setdiff1d(np.arange(LLAMA.vocab_size), free)[0])
  np.testing.assert_array_equal(
      generation.generate(model, prompt, mask, max_new_tokens=steps,
                          eos_token_id=unused), free)


@pytest.mark.parametrize('top_k, top_p', [(None, 0.3), (None, 0.9), (3, 0.5),
                                          (5, 1.0), (None, 1e-6)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
  """The kept set equals transformers' TopK then TopP warpers (the oracle)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  logits = np.random.default_rng(0).standard_normal((6, 40)).astype(np.float32) * 2
  got = np.asarray(generation.filter_logits(
      jnp.asarray(logits), 40 if top_k is None else top_k, top_p))
  scores = torch.tensor(logits)
  if top_k is not None:
    scores = transformers.TopKLogitsWarper(top_k)(None, scores)
  scores = transformers.TopPLogitsWarper(top_p)(None, scores).numpy()
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(scores))
  np.testing.assert_array_equal(got[np.isfinite(got)],
                                logits[np.isfinite(got)])
  assert np.isfinite(got).any(-1).all()  # At least one token per row.


def test_top_p_sampling_frequencies_and_generate():
  logits = jnp.asarray([[0.0, 1.0, 2.0, -1.0]])
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.jit(jax.vmap(lambda k: generation.sample_logits(
      logits, k, top_p=0.7)))(keys)[:, 0]
  # Probabilities .087 .237 .644 .032: the nucleus of 0.7 is {2, 1}.
  p = np.exp([1.0, 2.0])
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0, p[0] / p.sum(), p[1] / p.sum(), 0],
                             atol=0.03)
  model = randomized(LLAMA)
  prompt = tokens_for(B, T, seed=9)
  run = functools.partial(generation.generate, model, prompt,
                          jnp.asarray(GEN_MASK), max_new_tokens=NEW,
                          temperature=2.0)
  # A tiny nucleus is greedy; a nucleus of 0.5 draws only from it at each step.
  np.testing.assert_array_equal(run(key=jax.random.key(3), top_p=1e-6), run())
  sampled = run(key=jax.random.key(4), top_p=0.5)
  step_logits = full_forward(model, sampled)[:, T - 1:-1] / 2.0  # [B, NEW, V]
  kept = np.isfinite(np.asarray(generation.filter_logits(
      step_logits.reshape(B * NEW, -1), LLAMA.vocab_size, 0.5))).reshape(
          B, NEW, -1)
  assert np.take_along_axis(kept, np.asarray(sampled[:, T:, None]), -1).all()
  for bad in (0.0, 1.5, True):
    with pytest.raises(ValueError, match='top_p must be None or a float'):
      run(key=jax.random.key(0), top_p=bad)
