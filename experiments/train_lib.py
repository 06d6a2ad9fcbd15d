"""Training library behind `python -m experiments.train` (importable by tests/notebooks).

`train_and_evaluate(config, workdir)` trains the model of `config.model` on
`config.data`:

* optimizer: AdamW ("Decoupled Weight Decay Regularization", Loshchilov & Hutter 2019)
  with linear warmup + cosine decay ("SGDR", Loshchilov & Hutter 2017) and global-norm
  gradient clipping; weight decay on matrices only; optional gradient accumulation
  (the global batch is split into `grad_accum_steps` microbatches whose gradients are
  summed before one update, exactly the gradient of the whole batch);
* sharding: a (data, fsdp, tensor) mesh; parameters and optimizer state are placed by
  logical-axis rules (`experiments.sharding`), batches over data x fsdp;
* checkpoints: the state (step, params, optimizer state, RNG key) and the data iterator
  position every `checkpoint_every` steps (async, keep `keep_checkpoints`); a run
  started in a workdir with checkpoints resumes from the newest usable one and
  reproduces the uninterrupted run exactly (an unusable newer checkpoint is reported
  in one line and moved to `<workdir>/checkpoints_corrupt/<step>`; with none usable,
  `checkpointing.CheckpointError`);
* a non-finite loss or gradient norm stops the run (`NonFiniteError` naming the step)
  before anything of that step is saved, so the last checkpoint stays the last good one;
* metrics: JSON lines + TensorBoard (`experiments.metrics`), a console progress line,
  evaluation every `eval_every` steps and at the end.

Loss: weighted token (or example) cross-entropy, normalised by the total weight of the
global batch, plus the auxiliary losses the attention variants return (e.g. MoH load
balancing), summed over layers.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from experiments import checkpointing
from experiments import data as data_lib
from experiments import metrics as metrics_lib
from experiments import models
from experiments import sharding
from experiments.models import registry

State = dict[str, Any]


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm became NaN/Inf; training was stopped."""


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}.')


# Up-front size bounds (checked before anything is built or compiled). Attention
# over T tokens costs O(T^2) per head: at T = 16384 one head's float32 logits are
# 1 GiB, and mask checks and the reference implementation materialise them, so
# longer sequences are rejected rather than discovered after minutes of compiling.
MAX_SEQ_LEN = 16384
# implementation='reference' materialises float64 [B, N, T, S] logits per layer:
# bound microbatch * num_heads * T^2 * 8 bytes.
MAX_REFERENCE_LOGITS_BYTES = 4 << 30


def validate_config(config: ml_collections.ConfigDict,
                    info: data_lib.base.DataInfo | None = None) -> None:
  """Checks values a locked ConfigDict cannot (names, ranges, divisibility, sizes).

  Every message names the full field path (e.g. `data.batch_size`). Sizes: the
  attention length (`data.seq_len`, or the patch count of a ViT) must be at most
  `MAX_SEQ_LEN`, and with implementation='reference' the logits of one layer at
  most `MAX_REFERENCE_LOGITS_BYTES`.
  """
  m, d, t = config.model, config.data, config.train
  for key in ('dim', 'depth', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
              'patch_size'):
    _positive_int(f'model.{key}', m[key])
  for key in ('seq_len', 'batch_size', 'num_eval_batches'):
    _positive_int(f'data.{key}', d[key])
  if m.num_heads % m.num_kv_heads:
    raise ValueError(
        f'model.num_heads ({m.num_heads}) must be a multiple of '
        f'model.num_kv_heads ({m.num_kv_heads}).')
  if not 0.0 <= m.dropout_rate < 1.0:
    raise ValueError(
        f'model.dropout_rate must be in [0, 1), got {m.dropout_rate}.')
  length = d.seq_len
  if m.kind == 'vit' and d.name == 'bars':
    size = d.bars.image_size
    if size % m.patch_size:
      raise ValueError(
          f'data.bars.image_size ({size}) must be a multiple of model.patch_size '
          f'({m.patch_size}).')
    length = (size // m.patch_size) ** 2
  if length > MAX_SEQ_LEN:
    what = ('data.seq_len' if m.kind == 'lm' else
            'the ViT patch count (data.bars.image_size / model.patch_size)^2')
    raise ValueError(
        f'{what} ({length}) exceeds MAX_SEQ_LEN = {MAX_SEQ_LEN} of '
        f'experiments.train_lib (O(T^2) attention: one head\'s float32 logits at '
        f'T={length} are {4 * length * length / 2**30:.1f} GiB).')
  if m.attention.implementation == 'reference' and isinstance(
      t.grad_accum_steps, int) and t.grad_accum_steps >= 1:
    micro = max(d.batch_size // t.grad_accum_steps, 1)
    logits = micro * m.num_heads * length * length * 8
    if logits > MAX_REFERENCE_LOGITS_BYTES:
      raise ValueError(
          f"model.attention.implementation='reference' materialises "
          f'{logits / 2**30:.1f} GiB of float64 logits per layer (microbatch '
          f'{micro} x model.num_heads {m.num_heads} x data.seq_len^2 {length}^2); '
          f'the bound is {MAX_REFERENCE_LOGITS_BYTES / 2**30:.0f} GiB. Use a '
          f'smaller data.batch_size or more train.grad_accum_steps.')
  if m.kind not in ('lm', 'vit'):
    raise ValueError(f'model.kind must be "lm" or "vit", got {m.kind!r}.')
  if d.name not in data_lib.DATASETS:
    raise ValueError(
        f'data.name must be one of {data_lib.DATASETS}, got {d.name!r}.')
  registry.check_name(m.attention.variant)
  name = registry.parse_mask_spec(m.attention.mask)[0]
  if name not in registry.available_masks():
    raise ValueError(
        f'model.attention.mask must name one of {registry.available_masks()}, '
        f'got {m.attention.mask!r}.')
  if m.dtype not in models.DTYPES:
    raise ValueError(
        f'model.dtype must be one of {tuple(models.DTYPES)}, got {m.dtype!r}.')
  for key in ('num_steps', 'warmup_steps', 'log_every', 'eval_every',
              'checkpoint_every', 'keep_checkpoints', 'grad_accum_steps'):
    _positive_int(f'train.{key}', t[key], 0 if key == 'warmup_steps' else 1)
  if t.warmup_steps >= t.num_steps:
    raise ValueError(
        f'train.warmup_steps ({t.warmup_steps}) must be < train.num_steps '
        f'({t.num_steps}).')
  if not t.learning_rate > 0:
    raise ValueError(f'train.learning_rate must be > 0, got {t.learning_rate}.')
  if not 0.0 <= t.end_lr_fraction <= 1.0:
    raise ValueError(
        f'train.end_lr_fraction must be in [0, 1], got {t.end_lr_fraction}.')
  if t.grad_clip_norm < 0 or t.weight_decay < 0:
    raise ValueError(
        'train.grad_clip_norm and train.weight_decay must be >= 0, got '
        f'{t.grad_clip_norm} and {t.weight_decay}.')
  if d.batch_size % t.grad_accum_steps:
    raise ValueError(
        f'data.batch_size ({d.batch_size}) must be a multiple of '
        f'train.grad_accum_steps ({t.grad_accum_steps}).')
  if info is not None:
    want = 'lm' if m.kind == 'lm' else 'image'
    if info.kind != want:
      raise ValueError(
          f'model.kind={m.kind!r} needs {want} data, but data.name='
          f'{d.name!r} is {info.kind} data.')


def make_optimizer(config: ml_collections.ConfigDict
                  ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + warmup-cosine schedule + global-norm clipping (`config.train`)."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=config.warmup_steps, decay_steps=config.num_steps,
      end_value=config.learning_rate * config.end_lr_fraction)
  adamw = optax.adamw(
      schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
  if config.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                       adamw), schedule
  return adamw, schedule


def _loss_sums(model: nnx.Module, batch: dict[str, jax.Array],
               dropout_key: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, registry.AuxLosses]:
  """(weighted cross-entropy sum, weighted correct count, aux losses)."""
  logits, aux = model(batch['inputs'], dropout_key=dropout_key)
  targets, weights = batch['targets'], batch['weights']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(correct * weights), aux


class Trainer:
  """Builds the model, optimizer, mesh and jitted steps of one config."""

  def __init__(self, config: ml_collections.ConfigDict,
               info: data_lib.base.DataInfo,
               devices: list[jax.Device] | None = None):
    validate_config(config, info)
    self.config = config
    self.info = info
    self.mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
    batch_shards = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
    micro = config.data.batch_size // config.train.grad_accum_steps
    if micro % batch_shards:
      raise ValueError(
          f'the microbatch (data.batch_size / train.grad_accum_steps = {micro}) '
          f'must be a multiple of the data x fsdp mesh size ({batch_shards}).')
    self.tx, self.schedule = make_optimizer(config.train)
    # A mask that hides a whole query row (e.g. a mis-parsed spec) is a config
    # error, reported before anything is traced or compiled.
    try:
      length = _tokens_per_example(config, info)
      registry.check_mask_rows(
          config.model.attention.mask, q_len=length, kv_len=length,
          num_heads=config.model.num_heads, causal=config.model.kind == 'lm')
    except ValueError as e:
      raise ValueError(f'model.attention.mask: {e}') from None

    def build():
      return models.build_model(
          config.model, vocab_size=info.vocab_size,
          num_classes=info.num_classes, image_shape=info.image_shape,
          seed=config.seed)

    self._build = build
    abstract_model = nnx.eval_shape(build)
    self.graphdef, abstract_params = nnx.split(abstract_model)
    param_sh = sharding.param_shardings(abstract_params, self.mesh)
    rep = sharding.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init,
                                  nnx.to_pure_dict(abstract_params))
    opt_sh = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, param_sh,
        transform_non_params=lambda _: rep)
    self.state_shardings = {'step': rep, 'params': param_sh,
                            'opt_state': opt_sh, 'rng': rep}
    self._train_step = jax.jit(self._step, out_shardings=(
        self.state_shardings, rep), donate_argnums=(0,))
    self._eval_step = jax.jit(self._eval, out_shardings=rep)
    self._init = jax.jit(self._init_state, out_shardings=self.state_shardings)

  # ----- state -----
  def _init_state(self) -> State:
    params = nnx.to_pure_dict(nnx.state(self._build()))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': self.tx.init(params),
            'rng': jax.random.key_data(jax.random.key(self.config.seed + 1))}

  def init_state(self) -> State:
    return self._init()

  def abstract_state(self) -> State:
    """Shapes, dtypes and shardings of the state (the checkpoint restore target)."""
    return checkpointing.abstract_like(jax.eval_shape(self._init_state),
                                       self.state_shardings)

  def num_params(self) -> int:
    shapes = jax.eval_shape(self._init_state)['params']
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))

  # ----- steps -----
  def _step(self, state: State, batch: dict[str, jax.Array]
           ) -> tuple[State, dict[str, jax.Array]]:
    accum = self.config.train.grad_accum_steps
    total_weight = jnp.maximum(jnp.sum(batch['weights']), 1.0)
    micro = jax.tree.map(
        lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)
    step_key = jax.random.fold_in(
        jax.random.wrap_key_data(state['rng']), state['step'])
    dropout = self.config.model.dropout_rate > 0

    def objective(params, mb, key):
      model = nnx.merge(self.graphdef, params)
      ce_sum, correct, aux = _loss_sums(model, mb, key if dropout else None)
      aux_total = sum(aux.values(), jnp.zeros((), jnp.float32))
      return ce_sum / total_weight + aux_total / accum, (ce_sum, correct, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def body(carry, xs):
      grads, ce_sum, correct, aux_sum = carry
      index, mb = xs
      (_, (ce, cor, aux)), g = grad_fn(state['params'], mb,
                                       jax.random.fold_in(step_key, index))
      aux_sum = {k: aux_sum[k] + aux[k] / accum for k in aux_sum}
      return (jax.tree.map(jnp.add, grads, g), ce_sum + ce, correct + cor,
              aux_sum), None

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    aux_names = jax.eval_shape(
        objective, state['params'], jax.tree.map(lambda x: x[0], micro),
        step_key)[1][2]
    aux0 = {k: jnp.zeros((), jnp.float32) for k in aux_names}
    (grads, ce_sum, correct, aux_sum), _ = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros(()), aux0),
        (jnp.arange(accum), micro))
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state['opt_state'],
                                        state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = {'loss': ce_sum / total_weight,
               'accuracy': correct / total_weight,
               'grad_norm': grad_norm,
               'learning_rate': self.schedule(state['step']),
               **{f'aux_{k}': v for k, v in aux_sum.items()}}
    new_state = {'step': state['step'] + 1, 'params': params,
                 'opt_state': opt_state, 'rng': state['rng']}
    return new_state, metrics

  def _eval(self, params: Any, batch: dict[str, jax.Array]
           ) -> dict[str, jax.Array]:
    model = nnx.merge(self.graphdef, params)
    ce_sum, correct, _ = _loss_sums(model, batch, None)
    return {'ce_sum': ce_sum, 'correct': correct,
            'weight': jnp.sum(batch['weights'])}

  def train_step(self, state: State, batch: dict[str, np.ndarray]
                ) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer update on a host-local batch (donates `state`)."""
    return self._train_step(state, sharding.global_batch(batch, self.mesh))

  def evaluate(self, params: Any, batches: list[dict[str, np.ndarray]]
              ) -> dict[str, float]:
    """Weighted mean loss / accuracy (and perplexity) over `batches`."""
    sums = {'ce_sum': 0.0, 'correct': 0.0, 'weight': 0.0}
    for batch in batches:
      out = jax.device_get(self._eval_step(
          params, sharding.global_batch(batch, self.mesh)))
      for k in sums:
        sums[k] += float(out[k])
    weight = max(sums['weight'], 1.0)
    loss = sums['ce_sum'] / weight
    return {'loss': loss, 'accuracy': sums['correct'] / weight,
            'perplexity': _perplexity(loss)}


def _tokens_per_example(config: ml_collections.ConfigDict,
                        info: data_lib.base.DataInfo) -> int:
  """Sequence length (LM) or number of patches (ViT): the tokens/s unit."""
  if config.model.kind == 'vit':
    return (info.image_shape[0] // config.model.patch_size) ** 2
  return info.tokens_per_example


def _perplexity(loss: float) -> float:
  return math.exp(min(loss, 80.0))


CONFIG_FILE = 'config.json'


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes `config` as JSON to `<workdir>/config.json` (atomically); returns the path.

  A trainer workdir is then self-describing: the model can be rebuilt and its
  checkpoint restored from the workdir alone (e.g. by `experiments.recalibrate`).
  A resumed run rewrites the file with its own (possibly overridden) config.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(config.to_json(indent=2, sort_keys=True) + '\n')
  os.replace(tmp, path)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: list[jax.Device] | None = None
                      ) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it has checkpoints); returns a summary.

  Args:
    config: a config from `experiments/configs` (see `validate_config`).
    workdir: output directory (config.json, checkpoints/, metrics.jsonl,
      tensorboard/); config.json (the config as JSON, written by process 0 at the
      start) makes the workdir self-describing.
    devices: devices of the mesh (default: all).

  Returns:
    {'start_step', 'final_step', 'eval': last eval metrics, 'num_params'}.

  Raises:
    NonFiniteError: the loss or gradient norm became NaN/Inf (the message names the
      step; the last good checkpoint is kept).
  """
  if not isinstance(workdir, str) or not workdir:
    raise ValueError(f'workdir must be a non-empty str, got {workdir!r}.')
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    write_config(config, workdir)
  tc = config.train
  source = data_lib.make_source(
      config.data, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  trainer = Trainer(config, source.info, devices)
  primary = jax.process_index() == 0
  writer = metrics_lib.MetricsWriter(workdir, tensorboard=tc.tensorboard,
                                     enabled=primary)
  ckpt = checkpointing.Checkpointer(workdir, every=tc.checkpoint_every,
                                    keep=tc.keep_checkpoints,
                                    async_save=tc.async_checkpointing)
  summary: dict[str, Any] = {'num_params': trainer.num_params(), 'eval': {}}
  try:
    found = ckpt.restore_latest(trainer.abstract_state())
    if found is None:
      state = trainer.init_state()
    else:
      latest, state, data_state = found
      source.train.set_state(data_state)
      logging.info('Resumed from step %d (%s).', latest, ckpt.directory)
    start = int(jax.device_get(state['step']))
    writer.resume(start)  # One metrics row per step: drop rows after `start`.
    summary['start_step'] = start
    logging.info('Training %s (%d params) on %s, mesh %s, steps %d -> %d.',
                 config.model.kind, summary['num_params'], config.data.name,
                 dict(trainer.mesh.shape), start, tc.num_steps)
    tokens_per_step = config.data.batch_size * _tokens_per_example(
        config, source.info)
    progress = metrics_lib.Progress(start, tc.num_steps)
    eval_batches = None
    for step in range(start + 1, tc.num_steps + 1):
      state, metrics = trainer.train_step(state, next(source.train))
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not (math.isfinite(metrics['loss']) and
              math.isfinite(metrics['grad_norm'])):
        ckpt.wait()
        raise NonFiniteError(
            f'non-finite training at step {step}: loss={metrics["loss"]}, '
            f'grad_norm={metrics["grad_norm"]}. Stopped without saving step '
            f'{step}; the last good checkpoint is step {ckpt.latest_step()} in '
            f'{ckpt.directory}.')
      if step % tc.log_every == 0 or step == tc.num_steps:
        steps_per_sec, tokens_per_sec = progress.rates(step, tokens_per_step)
        metrics.update(perplexity=_perplexity(metrics['loss']),
                       steps_per_sec=steps_per_sec,
                       tokens_per_sec=tokens_per_sec)
        writer.write(step, 'train', metrics)
        progress.log(step, metrics)
      if step % tc.eval_every == 0 or step == tc.num_steps:
        if eval_batches is None:
          eval_batches = source.eval_batches()
        t0 = time.perf_counter()
        summary['eval'] = trainer.evaluate(state['params'], eval_batches)
        writer.write(step, 'eval', summary['eval'])
        logging.info('eval at step %d: %s (%.1fs)', step, summary['eval'],
                     time.perf_counter() - t0)
      if ckpt.should_save(step) or step == tc.num_steps:
        ckpt.save(step, state, source.train.get_state())
    ckpt.wait()
    summary['final_step'] = int(jax.device_get(state['step']))
  finally:
    ckpt.close()
    writer.close()
  return summary
