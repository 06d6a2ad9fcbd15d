"""Tests of the Hugging Face checkpoint import (experiments.models.hf_checkpoint).

The oracle is transformers' own forward: tiny models with random weights are built
locally with `transformers` (torch, float32, eval mode), saved with safetensors, loaded
here, and their logits compared on several prompts with and without padding.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from flax import nnx

from experiments.models import hf_checkpoint
from experiments.models.decoder import CausalDecoder
from experiments.models.decoder import DecoderConfig

VOCAB = 96
RTOL = 1e-4  # max |logits - reference| / max |reference| over real positions.
_LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64)


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Random weights of a useful scale (HF's init has zero biases, unit norms)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and ('norm' in name or 'ln_' in name):
        p.copy_(1.0 + 0.2 * noise)  # Norm scales.
      elif p.ndim == 1:
        p.copy_(0.2 * noise)  # Biases.
      elif 'embed' in name or 'wte' in name or 'wpe' in name:
        p.copy_(0.7 * noise)
      else:
        p.copy_(0.25 * noise)  # ~ 1.4 / sqrt(fan_in) for fan_in 32.


def _build(tmp_path_factory, name: str, config, model_cls, *, seed: int,
           **save_kwargs):
  torch.manual_seed(seed)
  model = model_cls._from_config(config, attn_implementation='eager')
  model = model.to(torch.float32).eval()
  _randomize(model, seed)
  directory = tmp_path_factory.mktemp(name)
  model.save_pretrained(directory, **save_kwargs)
  return directory, model


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  config = transformers.LlamaConfig(**_LLAMA_SIZES, rms_norm_eps=1e-5,
                                    rope_theta=500.0)
  return _build(tmp_path_factory, 'llama', config,
                transformers.LlamaForCausalLM, seed=0)


@pytest.fixture(scope='module')
def llama_tied(tmp_path_factory):
  """Tied embeddings, llama3 rope scaling, attention and MLP biases; sharded save."""
  config = transformers.LlamaConfig(
      **_LLAMA_SIZES, tie_word_embeddings=True, attention_bias=True,
      mlp_bias=True,
      # head_dim 8, theta 100: wavelengths 6.3, 20, 63, 199 cover llama3's high
      # (< 32 / 4), medium and low (> 32 / 1) frequency bands.
      rope_parameters={'rope_type': 'llama3', 'rope_theta': 100.0,
                       'factor': 8.0, 'low_freq_factor': 1.0,
                       'high_freq_factor': 4.0,
                       'original_max_position_embeddings': 32})
  return _build(tmp_path_factory, 'llama_tied', config,
                transformers.LlamaForCausalLM, seed=1, max_shard_size='20KB')


@pytest.fixture(scope='module')
def llama_yarn(tmp_path_factory):
  """YaRN rope: head_dim 8, theta 100, original 16 positions: the ramp keeps the
  fastest frequency and interpolates the others; attention factor 1.139."""
  config = transformers.LlamaConfig(
      **_LLAMA_SIZES, rope_parameters={
          'rope_type': 'yarn', 'rope_theta': 100.0, 'factor': 4.0,
          'original_max_position_embeddings': 16})
  return _build(tmp_path_factory, 'llama_yarn', config,
                transformers.LlamaForCausalLM, seed=6)


@pytest.fixture(scope='module')
def mistral(tmp_path_factory):
  config = transformers.MistralConfig(**_LLAMA_SIZES, sliding_window=4)
  return _build(tmp_path_factory, 'mistral', config,
                transformers.MistralForCausalLM, seed=2)


@pytest.fixture(scope='module')
def qwen2(tmp_path_factory):
  config = transformers.Qwen2Config(
      **_LLAMA_SIZES,
      rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                       'rope_theta': 1000.0})
  return _build(tmp_path_factory, 'qwen2', config,
                transformers.Qwen2ForCausalLM, seed=3)


@pytest.fixture(scope='module')
def qwen3(tmp_path_factory):
  """q / k norms, attention biases, head_dim 16 != hidden / heads, and a window on
  layer 1 only (window 4 < prompt 12)."""
  config = transformers.Qwen3Config(
      **_LLAMA_SIZES, head_dim=16, attention_bias=True, use_sliding_window=True,
      sliding_window=4, max_window_layers=1)
  assert config.layer_types == ['full_attention', 'sliding_attention']
  return _build(tmp_path_factory, 'qwen3', config,
                transformers.Qwen3ForCausalLM, seed=5)


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
  config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                   n_positions=64, vocab_size=VOCAB,
                                   bos_token_id=0, eos_token_id=0)
  return _build(tmp_path_factory, 'gpt2', config,
                transformers.GPT2LMHeadModel, seed=4)


def _prompts(seed: int, t: int = 12) -> tuple[np.ndarray, np.ndarray]:
  """tokens [3, t] and real lengths [3] (t, 2t/3, t/3 + 1)."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, VOCAB, (3, t)).astype(np.int64),
          np.array([t, 2 * t // 3, t // 3 + 1]))


def _reference(model, tokens, mask=None, positions=None) -> np.ndarray:
  kwargs = {}
  if mask is not None:
    kwargs['attention_mask'] = torch.tensor(mask, dtype=torch.long)
  if positions is not None:
    kwargs['position_ids'] = torch.tensor(positions, dtype=torch.long)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens), **kwargs)
  return out.logits.double().numpy()


def _ours(model, tokens, mask=None, positions=None) -> np.ndarray:
  kwargs = {}
  if mask is not None:
    kwargs['attention_mask'] = jnp.asarray(mask, bool)
  if positions is not None:
    kwargs['positions'] = jnp.asarray(positions, jnp.int32)
  out = model(jnp.asarray(tokens, jnp.int32), **kwargs)
  return np.asarray(out.logits, np.float64)


def _rel_err(ours: np.ndarray, ref: np.ndarray, real: np.ndarray) -> float:
  assert np.isfinite(ours[real]).all()
  return float(np.abs(ours[real] - ref[real]).max() / np.abs(ref[real]).max())


def _check_parity(name: str, directory, hf_model, seed: int) -> None:
  config, model = hf_checkpoint.load_hf_checkpoint(directory)
  assert isinstance(model, CausalDecoder)
  assert config == model.config
  tokens, lengths = _prompts(seed)
  b, t = tokens.shape
  errors = {}
  # No padding: every prompt full length.
  real = np.ones((b, t), bool)
  errors['full'] = _rel_err(_ours(model, tokens), _reference(hf_model, tokens),
                            real)
  # Right padding: prompts of different lengths, default positions arange(T).
  right = np.arange(t)[None] < lengths[:, None]  # [B, T]
  padded = np.where(right, tokens, 0)
  errors['right'] = _rel_err(_ours(model, padded, right),
                             _reference(hf_model, padded, right), right)
  # Left padding: the same prompts at the end, positions cumsum(mask) - 1.
  left = np.arange(t)[None] >= (t - lengths)[:, None]
  shifted = np.stack([np.roll(row, t - n) for row, n in zip(padded, lengths)])
  shifted = np.where(left, shifted, 0)
  positions = np.maximum(np.cumsum(left, axis=1) - 1, 0)
  ours_left = _ours(model, shifted, left, positions)
  errors['left'] = _rel_err(ours_left, _reference(hf_model, shifted, left,
                                                  positions), left)
  # The left-padded prompts' logits equal the right-padded ones (same tokens and
  # positions, only the pad placement differs).
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(ours_left[i, t - n:],
                               _ours(model, padded, right)[i, :n],
                               rtol=0, atol=1e-4 * np.abs(ours_left).max())
  print(f'{name}: max relative logit error {errors}')
  assert max(errors.values()) < RTOL, errors


def test_parity_llama(llama):
  _check_parity('llama', *llama, seed=10)


def test_parity_llama_tied_llama3_biases_sharded(llama_tied):
  directory, _ = llama_tied
  assert (directory / hf_checkpoint.INDEX_FILE).is_file()
  assert not (directory / hf_checkpoint.WEIGHTS_FILE).exists()
  assert len(list(directory.glob('*.safetensors'))) > 1
  config = hf_checkpoint.config_from_hf(json.loads(
      (directory / 'config.json').read_text()))
  assert config.tie_embeddings and config.qkv_bias and config.out_bias
  assert config.mlp_bias and config.rope_scaling['rope_type'] == 'llama3'
  _check_parity('llama_tied_llama3', *llama_tied, seed=11)


def test_parity_llama_yarn(llama_yarn):
  config, _ = hf_checkpoint.load_hf_checkpoint(llama_yarn[0])
  assert config.rope_scaling['rope_type'] == 'yarn'
  _check_parity('llama_yarn', *llama_yarn, seed=16)


@pytest.mark.parametrize('rope', [
    dict(factor=4.0, original_max_position_embeddings=16),
    dict(factor=8.0, original_max_position_embeddings=32, beta_fast=8.0,
         beta_slow=2.0, truncate=False),
    dict(factor=2.0, original_max_position_embeddings=64, mscale=1.0,
         mscale_all_dim=0.5),
    dict(factor=16.0, original_max_position_embeddings=24, attention_factor=1.3),
], ids=['defaults', 'betas_untruncated', 'mscale', 'attention_factor'])
def test_yarn_frequencies_match_transformers(rope):
  """Inverse frequencies and attention factor vs transformers' own function."""
  from transformers import modeling_rope_utils  # pylint: disable=g-import-not-at-top
  from experiments.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top
  hf = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2, max_position_embeddings=256,
      rope_parameters=dict(rope_type='yarn', rope_theta=500.0, **rope))
  want_inv, want_factor = modeling_rope_utils._compute_yarn_parameters(hf)  # pylint: disable=protected-access
  ours = hf_checkpoint.config_from_hf(hf.to_dict())
  assert ours.head_dim == 32
  inv = decoder_lib.rope_inv_freq(ours.head_dim, ours.rope_theta,
                                  ours.rope_scaling)
  np.testing.assert_allclose(inv, want_inv.numpy(), rtol=2e-6)
  assert abs(decoder_lib.rope_attention_factor(ours.rope_scaling) -
             want_factor) < 1e-9
  plain = decoder_lib.rope_inv_freq(ours.head_dim, ours.rope_theta)
  assert not np.allclose(inv, plain) and not np.allclose(inv, plain / rope[
      'factor'])  # A blend: neither the original nor the interpolated one.


def test_parity_mistral_prompt_longer_than_window(mistral):
  directory, _ = mistral
  config = hf_checkpoint.config_from_hf(json.loads(
      (directory / 'config.json').read_text()))
  assert config.sliding_window == 4 < _prompts(12)[0].shape[1]
  _check_parity('mistral', *mistral, seed=12)


def test_parity_qwen2(qwen2):
  directory, _ = qwen2
  config = hf_checkpoint.config_from_hf(json.loads(
      (directory / 'config.json').read_text()))
  assert config.qkv_bias and not config.out_bias and config.sliding_window is None
  assert config.rope_scaling == {'rope_type': 'linear', 'factor': 2.0}
  _check_parity('qwen2', *qwen2, seed=13)


def test_parity_qwen3_qk_norm_biases_some_layers_windowed(qwen3):
  config, _ = hf_checkpoint.load_hf_checkpoint(qwen3[0])
  assert config.qk_norm and config.qkv_bias and config.head_dim == 16
  assert (config.sliding_window, config.window_layers) == (4, (1,))
  _check_parity('qwen3', *qwen3, seed=15)


def test_parity_gpt2(gpt2):
  _check_parity('gpt2', *gpt2, seed=14)


@pytest.mark.parametrize('fixture', ['llama', 'qwen3', 'gpt2'])
def test_generate_matches_hf_generate_with_eos(fixture, request):
  """Greedy `generate` with left padding and an eos equals transformers' own."""
  from experiments.models import generation  # pylint: disable=g-import-not-at-top
  directory, hf_model = request.getfixturevalue(fixture)
  _, model = hf_checkpoint.load_hf_checkpoint(directory)
  tokens, lengths = _prompts(seed=5, t=6)
  b, t = tokens.shape
  left = np.arange(t)[None] >= (t - lengths)[:, None]  # [B, T]
  prompt = np.where(left, tokens, 1)
  steps = 8
  free = np.asarray(generation.generate(model, jnp.asarray(prompt, jnp.int32),
                                        jnp.asarray(left), max_new_tokens=steps))
  eos = int(free[1, t + 2])  # Row 1 finishes by step 2; the others may not.
  pad = (eos + 1) % VOCAB
  ours = np.asarray(generation.generate(
      model, jnp.asarray(prompt, jnp.int32), jnp.asarray(left),
      max_new_tokens=steps, eos_token_id=eos, pad_token_id=pad))
  with torch.no_grad():
    ref = hf_model.generate(
        input_ids=torch.tensor(prompt), attention_mask=torch.tensor(
            left, dtype=torch.long), max_new_tokens=steps, do_sample=False,
        eos_token_id=eos, pad_token_id=pad).numpy()
  np.testing.assert_array_equal(ours, ref)
  assert (ours[1, t + 3:] == pad).all() and b == 3


def test_params_follow_the_hf_layout(gpt2, qwen2):
  """Direct NumPy mapping of a few tensors (Conv1D [in, out] vs Linear [out, in])."""
  directory, _ = gpt2
  tensors = safetensors.numpy.load_file(directory / 'model.safetensors')
  _, model = hf_checkpoint.load_hf_checkpoint(directory)
  c_attn = tensors['transformer.h.1.attn.c_attn.weight']  # [D, 3D]
  np.testing.assert_array_equal(model.blocks[1].attn.wk[...],
                                c_attn[:, 32:64].reshape(32, 4, 8))
  np.testing.assert_array_equal(model.blocks[1].attn.bv[...],
                                tensors['transformer.h.1.attn.c_attn.bias'][64:]
                                .reshape(4, 8))
  np.testing.assert_array_equal(model.pos_embed.embedding[...],
                                tensors['transformer.wpe.weight'])
  assert not hasattr(model, 'lm_head')
  directory, _ = qwen2
  tensors = safetensors.numpy.load_file(directory / 'model.safetensors')
  _, model = hf_checkpoint.load_hf_checkpoint(directory)
  k_proj = tensors['model.layers.0.self_attn.k_proj.weight']  # [K H, D]
  np.testing.assert_array_equal(model.blocks[0].attn.wk[...],
                                k_proj.T.reshape(32, 2, 8))
  np.testing.assert_array_equal(model.lm_head[...], tensors['lm_head.weight'].T)
  # The loaded parameters carry the decoder's logical axes (sharding rules).
  fresh = nnx.eval_shape(lambda: CausalDecoder(model.config, rngs=nnx.Rngs(0)))
  axes = lambda m: {p: v.get_metadata()['logical_axes']
                    for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  assert axes(model) == axes(fresh)


def test_bf16_checkpoint_is_widened_exactly(llama, tmp_path):
  directory, hf_model = llama
  shutil.copy(directory / 'config.json', tmp_path / 'config.json')
  state = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
  safetensors.torch.save_file(state, tmp_path / 'model.safetensors')
  _, model = hf_checkpoint.load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert model.config.dtype == jnp.bfloat16
  assert model.embed.embedding[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(model.blocks[1].mlp.w_up[...], np.float32),
      state['model.layers.1.mlp.up_proj.weight'].float().numpy().T)
  logits = model(jnp.asarray(_prompts(0)[0], jnp.int32)).logits
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def _rewrite(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  """Copies a single-file checkpoint with its tensors dict edited by `edit`."""
  shutil.copy(src / 'config.json', dst / 'config.json')
  tensors = safetensors.numpy.load_file(src / 'model.safetensors')
  safetensors.numpy.save_file(edit(dict(tensors)), dst / 'model.safetensors')
  return dst


def test_gpt2_hub_layout_without_prefix_and_with_mask_buffers(gpt2, tmp_path):
  """openai-community/gpt2 style: names without 'transformer.', attn.bias buffers."""
  directory, _ = gpt2

  def edit(tensors):
    out = {k.removeprefix('transformer.'): v for k, v in tensors.items()}
    for i in range(2):
      out[f'h.{i}.attn.bias'] = np.tril(np.ones((64, 64), bool))[None, None]
      out[f'h.{i}.attn.masked_bias'] = np.array(-1e4, np.float32)
    out['lm_head.weight'] = tensors['transformer.wte.weight']  # Tied copy.
    return out

  _, reference = hf_checkpoint.load_hf_checkpoint(directory)
  _, model = hf_checkpoint.load_hf_checkpoint(_rewrite(directory, tmp_path, edit))
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                               nnx.to_flat_state(nnx.state(reference,
                                                           nnx.Param))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_llama_rotary_buffers_of_old_saves_are_checked(llama, tmp_path):
  directory, hf_model = llama
  inv_freq = hf_model.model.rotary_emb.inv_freq.numpy()  # [H / 2]

  def edit(tensors, scale=1.0):
    for i in range(2):
      tensors[f'model.layers.{i}.self_attn.rotary_emb.inv_freq'] = (
          scale * inv_freq)
    return tensors

  (tmp_path / 'a').mkdir()
  _, model = hf_checkpoint.load_hf_checkpoint(
      _rewrite(directory, tmp_path / 'a', edit))
  assert model.config.rope_theta == 500.0
  (tmp_path / 'b').mkdir()
  with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.rotary_emb."
                     r"inv_freq' .* differs from the inverse frequencies"):
    hf_checkpoint.load_hf_checkpoint(_rewrite(
        directory, tmp_path / 'b', lambda t: edit(t, 0.5)))


def test_tied_copy_that_differs_is_an_error(gpt2, tmp_path):
  directory, _ = gpt2

  def edit(tensors):
    tensors['lm_head.weight'] = tensors['transformer.wte.weight'] + 1.0
    return tensors

  with pytest.raises(ValueError, match=r"'lm_head.weight' differs"):
    hf_checkpoint.load_hf_checkpoint(_rewrite(directory, tmp_path, edit))


def test_missing_unexpected_and_misshapen_tensors(llama, tmp_path):
  directory, _ = llama
  name = 'model.layers.1.self_attn.v_proj.weight'

  def drop(tensors):
    del tensors[name]
    return tensors

  (tmp_path / 'a').mkdir()
  with pytest.raises(ValueError, match=rf"'{name}' \(expected shape \[16, 32\]\)"
                     r' is missing from .*model.safetensors'):
    hf_checkpoint.load_hf_checkpoint(_rewrite(directory, tmp_path / 'a', drop))

  def extra(tensors):
    tensors['model.layers.2.mlp.gate_proj.weight'] = np.zeros((64, 32), np.float32)
    tensors['model.extra'] = np.zeros((3,), np.float32)
    return tensors

  (tmp_path / 'b').mkdir()
  with pytest.raises(ValueError, match=r"2 tensors that a LlamaForCausalLM .* "
                     r"does not use: 'model.extra', 'model.layers.2.mlp"):
    hf_checkpoint.load_hf_checkpoint(_rewrite(directory, tmp_path / 'b', extra))

  (tmp_path / 'c').mkdir()
  bad = _rewrite(directory, tmp_path / 'c', lambda t: t)
  config = json.loads((bad / 'config.json').read_text())
  config['intermediate_size'] = 48
  (bad / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' "
                     r'in .* has shape \[64, 32\], expected \[48, 32\]'):
    hf_checkpoint.load_hf_checkpoint(bad)


def test_missing_files_are_named(llama, llama_tied, tmp_path):
  directory, _ = llama
  with pytest.raises(ValueError, match='does not exist'):
    hf_checkpoint.load_hf_checkpoint(tmp_path / 'nowhere')
  no_config = tmp_path / 'no_config'
  no_config.mkdir()
  shutil.copy(directory / 'model.safetensors', no_config / 'model.safetensors')
  with pytest.raises(ValueError, match=r'no_config/config.json does not exist'):
    hf_checkpoint.load_hf_checkpoint(no_config)
  no_weights = tmp_path / 'no_weights'
  no_weights.mkdir()
  shutil.copy(directory / 'config.json', no_weights / 'config.json')
  (no_weights / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(ValueError, match=r"neither model.safetensors nor model."
                     r"safetensors.index.json \(found: \['pytorch_model.bin'\]"):
    hf_checkpoint.load_hf_checkpoint(no_weights)
  assert not hf_checkpoint.is_hf_checkpoint(no_weights)
  assert hf_checkpoint.is_hf_checkpoint(directory)
  # Not a safetensors file.
  (no_weights / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{')
  with pytest.raises(ValueError, match=r'no_weights/model.safetensors is not a '
                     'readable safetensors file'):
    hf_checkpoint.load_hf_checkpoint(no_weights)
  # A shard that the index names but that is not there.
  sharded = tmp_path / 'sharded'
  shutil.copytree(llama_tied[0], sharded)
  index = json.loads((sharded / hf_checkpoint.INDEX_FILE).read_text())
  shard = index['weight_map']['model.norm.weight']
  (sharded / shard).unlink()
  with pytest.raises(ValueError, match=rf'shard file .*{shard} listed in .*index'
                     r'.json .* does not exist'):
    hf_checkpoint.load_hf_checkpoint(sharded)
  # A tensor the index maps to a shard that does not hold it.
  index['weight_map']['model.norm.weight'] = next(
      s for s in index['weight_map'].values() if s != shard)
  (sharded / hf_checkpoint.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"maps tensor 'model.norm.weight' to .*"
                     r'which does not hold it'):
    hf_checkpoint.load_hf_checkpoint(sharded)
  # A shard holding a tensor the index does not list.
  shutil.copy(llama_tied[0] / shard, sharded / shard)
  del index['weight_map']['model.norm.weight']
  (sharded / hf_checkpoint.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=rf"{shard} holds tensor "
                     r"'model.norm.weight' that .*index.json does not list"):
    hf_checkpoint.load_hf_checkpoint(sharded)


def test_unknown_architecture(llama, tmp_path):
  directory, _ = llama
  shutil.copy(directory / 'model.safetensors', tmp_path / 'model.safetensors')
  config = json.loads((directory / 'config.json').read_text())
  config['architectures'] = ['BertForMaskedLM']
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"'BertForMaskedLM'.*supported: "
                     'LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, '
                     'Qwen3ForCausalLM, GPT2LMHeadModel'):
    hf_checkpoint.load_hf_checkpoint(tmp_path)
  with pytest.raises(ValueError, match=r"model_type='bert'; supported"):
    hf_checkpoint.config_from_hf({'model_type': 'bert'})
  with pytest.raises(TypeError, match='config_json must be a dict'):
    hf_checkpoint.config_from_hf('config.json')


def _llama_json(**overrides):
  c = {'architectures': ['LlamaForCausalLM'], 'hidden_size': 32,
       'intermediate_size': 64, 'num_hidden_layers': 2,
       'num_attention_heads': 4, 'vocab_size': VOCAB}
  c.update(overrides)
  return c


def test_config_from_hf_defaults_and_legacy_rope_keys():
  # Absent keys take transformers' defaults.
  assert hf_checkpoint.config_from_hf(_llama_json()) == DecoderConfig(
      vocab_size=VOCAB, dim=32, depth=2, num_heads=4, num_kv_heads=4,
      head_dim=8, mlp_dim=64, norm='rms', norm_eps=1e-6, mlp='swiglu',
      positions='rope', rope_theta=10000.0, rope_scaling=None,
      max_positions=2048, qkv_bias=False, out_bias=False, mlp_bias=False,
      tie_embeddings=False, sliding_window=None, final_norm=True)
  # transformers < 5: top-level rope_theta and rope_scaling with 'type'.
  c = hf_checkpoint.config_from_hf(_llama_json(
      rope_theta=5e5, rope_scaling={'type': 'linear', 'factor': 4}))
  assert c.rope_theta == 5e5
  assert c.rope_scaling == {'rope_type': 'linear', 'factor': 4.0}
  c = hf_checkpoint.config_from_hf(_llama_json(rope_parameters={
      'rope_type': 'default', 'rope_theta': 123.0}))
  assert (c.rope_theta, c.rope_scaling) == (123.0, None)
  gpt2 = hf_checkpoint.config_from_hf({
      'architectures': ['GPT2LMHeadModel'], 'n_embd': 32, 'n_layer': 2,
      'n_head': 4, 'n_positions': 64, 'vocab_size': VOCAB, 'n_inner': None})
  assert (gpt2.mlp_dim, gpt2.norm, gpt2.norm_eps, gpt2.mlp, gpt2.positions,
          gpt2.tie_embeddings, gpt2.max_positions) == (
              128, 'layer', 1e-5, 'gelu_tanh', 'learned', True, 64)
  # Mistral's window defaults to 4096; null switches it off.
  mistral = _llama_json(architectures=['MistralForCausalLM'])
  assert hf_checkpoint.config_from_hf(mistral).sliding_window == 4096
  assert hf_checkpoint.config_from_hf(
      dict(mistral, sliding_window=None)).sliding_window is None


def test_config_from_hf_qwen2_windows():
  qwen = _llama_json(architectures=['Qwen2ForCausalLM'], sliding_window=8)
  c = hf_checkpoint.config_from_hf(qwen)
  assert (c.sliding_window, c.qkv_bias, c.out_bias) == (None, True, False)
  c = hf_checkpoint.config_from_hf(dict(qwen, use_sliding_window=True,
                                        max_window_layers=0))
  assert (c.sliding_window, c.window_layers) == (8, None)
  c = hf_checkpoint.config_from_hf(dict(qwen, use_sliding_window=True,
                                        max_window_layers=1))
  assert (c.sliding_window, c.window_layers) == (8, (1,))
  assert (c.layer_window(0), c.layer_window(1)) == (None, 8)
  c = hf_checkpoint.config_from_hf(dict(
      qwen, use_sliding_window=True,
      layer_types=['sliding_attention', 'full_attention']))
  assert c.window_layers == (0,)
  c = hf_checkpoint.config_from_hf(dict(qwen, use_sliding_window=True,
                                        max_window_layers=2))
  assert (c.sliding_window, c.window_layers) == (None, None)
  with pytest.raises(ValueError, match='layer_types must list 2'):
    hf_checkpoint.config_from_hf(dict(qwen, use_sliding_window=True,
                                      layer_types=['full_attention']))


def test_config_from_hf_yarn_position_defaults():
  # No factor (DeepSeek style): max_position_embeddings / original.
  c = hf_checkpoint.config_from_hf(_llama_json(
      max_position_embeddings=64, rope_parameters={
          'rope_type': 'yarn', 'original_max_position_embeddings': 16}))
  assert c.rope_scaling['factor'] == 4.0
  # A top-level original_max_position_embeddings wins (transformers' rule).
  c = hf_checkpoint.config_from_hf(_llama_json(
      max_position_embeddings=64, original_max_position_embeddings=32,
      rope_parameters={'rope_type': 'yarn', 'factor': 2.0,
                       'original_max_position_embeddings': 16}))
  assert c.rope_scaling['original_max_position_embeddings'] == 32
  # Without either, max_position_embeddings; defaults of the optional keys.
  c = hf_checkpoint.config_from_hf(_llama_json(
      max_position_embeddings=48, rope_parameters={'rope_type': 'yarn',
                                                   'factor': 2.0}))
  assert c.rope_scaling == {
      'rope_type': 'yarn', 'factor': 2.0, 'original_max_position_embeddings': 48.0,
      'beta_fast': 32.0, 'beta_slow': 1.0,
      'attention_factor': pytest.approx(0.1 * np.log(2.0) + 1.0),
      'truncate': True}


def test_config_from_hf_qwen3():
  qwen3 = _llama_json(architectures=['Qwen3ForCausalLM'], head_dim=16)
  c = hf_checkpoint.config_from_hf(qwen3)
  assert (c.qk_norm, c.qkv_bias, c.out_bias, c.head_dim) == (True, False, False,
                                                             16)
  c = hf_checkpoint.config_from_hf(dict(qwen3, attention_bias=True))
  assert (c.qkv_bias, c.out_bias) == (True, True)
  c = hf_checkpoint.config_from_hf({k: v for k, v in qwen3.items()
                                    if k != 'architectures'} | {
                                        'model_type': 'qwen3'})
  assert c.qk_norm


def test_decoder_config_window_layers_are_checked():
  base = dict(vocab_size=8, dim=8, depth=3, num_heads=2, num_kv_heads=2,
              head_dim=4, mlp_dim=8)
  for layers, match in (((2, 1), 'distinct increasing'), ((3,), r'depth=3'),
                        ((), 'distinct increasing'), ('0', 'sequence of layer'),
                        ((True,), 'sequence of layer')):
    with pytest.raises(ValueError, match=match):
      DecoderConfig(**base, sliding_window=4, window_layers=layers)
  with pytest.raises(ValueError, match='needs a sliding_window'):
    DecoderConfig(**base, window_layers=(0,))
  c = DecoderConfig(**base, sliding_window=4, window_layers=[0, 2])
  assert c.window_layers == (0, 2)
  assert [c.layer_window(i) for i in range(3)] == [4, None, 4]
  assert hash(c) != hash(DecoderConfig(**base, sliding_window=4))


@pytest.mark.parametrize('overrides, match', [
    (dict(rope_parameters={'rope_type': 'longrope', 'factor': 4.0}),
     "rope type 'longrope' is not supported"),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0}),
     "'yarn' needs a positive \"original_max_position_embeddings\""),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0,
                           'original_max_position_embeddings': 16,
                           'truncate': 'yes'}), "'truncate'] must be a bool"),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0,
                           'original_max_position_embeddings': 16,
                           'attention_factor': -1.0}),
     "'attention_factor'] must be a positive number"),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0,
                           'original_max_position_embeddings': 16,
                           'partial_rotary_factor': 0.5}),
     r"rope parameters \['partial_rotary_factor'\] are not supported"),
    (dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}),
     "'llama3' needs a positive \"low_freq_factor\""),
    (dict(rope_parameters={'full_attention': {'rope_type': 'default'}}),
     r"rope parameters \['full_attention'\] are not supported"),
    (dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                           'attention_factor': 0.5}),
     'attention_factor=0.5 is not supported'),
    (dict(hidden_act='gelu'), "hidden_act='gelu' is not supported"),
    (dict(hidden_size='32'), '"hidden_size" must be an int'),
    (dict(num_hidden_layers=None), 'config.json needs "num_hidden_layers"'),
    (dict(architectures=['MistralForCausalLM'], sliding_window=0),
     'sliding_window must be a positive int'),
])
def test_config_from_hf_rejects_llama(overrides, match):
  with pytest.raises(ValueError, match=match):
    hf_checkpoint.config_from_hf(_llama_json(**overrides))


@pytest.mark.parametrize('overrides, match', [
    (dict(activation_function='gelu'), "activation_function='gelu' is not"),
    (dict(scale_attn_by_inverse_layer_idx=True),
     'scale_attn_by_inverse_layer_idx=true is not supported'),
    (dict(scale_attn_weights=False), 'scale_attn_weights=false'),
    (dict(n_embd=30), r'n_embd \(30\) must be a multiple of n_head \(4\)'),
])
def test_config_from_hf_rejects_gpt2(overrides, match):
  config = {'architectures': ['GPT2LMHeadModel'], 'n_embd': 32, 'n_layer': 2,
            'n_head': 4, 'n_positions': 64, 'vocab_size': VOCAB}
  with pytest.raises(ValueError, match=match):
    hf_checkpoint.config_from_hf(dict(config, **overrides))
