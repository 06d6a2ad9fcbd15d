"""Training a family of one-layer attention models on in-context regression.

One jitted program trains every model of a run (softmax models with H = 1, 2, 4, 8
heads, and optionally linear-attention baselines) on the same fresh batches, for all
seeds at once (vmap over a leading seed axis, sharded over the available devices).
Each call runs `log_every` steps in a `lax.scan`; the batch of step t is drawn inside
the scan from fold_in(seed_key, t), so a resumed run sees exactly the data of an
uninterrupted one. The batch is drawn as `data_pieces(batch)` independent pieces
(piece j from fold_in(fold_in(seed_key, t), j)) and the pieces are split over a
'data' mesh axis (shard_map; gradients averaged with psum), so the data and the
result do not depend on how many devices share the work: on a 2-core CPU with two
host devices, both cores generate data and differentiate (about 1.6x the
single-device rate). Adam (Kingma & Ba) with the paper's settings (He et al., ICML
2025: lr 1e-3, betas (0.9, 0.999), batch 256, no weight decay).

State (checkpointed with orbax `CheckpointManager`): params, Adam state, step, the
per-seed PRNG key data, a parameter snapshot every `log_every` steps (the weight
trajectories of the analyses) and the mean loss of every chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from experiments import checkpointing
from experiments import metrics as metrics_lib
from experiments.icl import data
from experiments.icl import model

RNG_IMPLS = ('threefry2x32', 'unsafe_rbg', 'rbg')


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything that defines a training run (hashable; static under jit)."""
  name: str
  task: data.Task
  length: int
  heads: tuple[int, ...]
  linear_heads: tuple[int, ...] = ()
  linear_normalize: bool = False
  batch: int = 256
  lr: float = 1e-3
  steps: int = 500_000
  log_every: int = 2500
  seeds: tuple[int, ...] = (0,)
  projection: str = 'folded'
  rng_impl: str = 'threefry2x32'

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name.isidentifier():
      raise ValueError(f'name must be an identifier, got {self.name!r}.')
    if not isinstance(self.task, data.Task):
      raise TypeError(f'task must be a data.Task, got {type(self.task).__name__}.')
    model.group_matrix(self.heads)
    if self.linear_heads:
      model.group_matrix(self.linear_heads)
    for field in ('length', 'batch', 'steps', 'log_every'):
      v = getattr(self, field)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f'{field} must be a positive int, got {v!r}.')
    if self.steps % self.log_every:
      raise ValueError(f'steps ({self.steps}) must be a multiple of log_every '
                       f'({self.log_every}).')
    if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
            and self.lr > 0):
      raise ValueError(f'lr must be a positive finite float, got {self.lr!r}.')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0
        for s in self.seeds):
      raise ValueError(f'seeds must be distinct non-negative ints, got '
                       f'{self.seeds!r}.')
    if self.projection not in model.PROJECTIONS:
      raise ValueError(f'projection must be one of {model.PROJECTIONS}, got '
                       f'{self.projection!r}.')
    if self.rng_impl not in RNG_IMPLS:
      raise ValueError(f'rng_impl must be one of {RNG_IMPLS}, got '
                       f'{self.rng_impl!r}.')

  @property
  def num_records(self) -> int:
    return self.steps // self.log_every

  @property
  def num_models(self) -> int:
    return len(self.heads) + len(self.linear_heads)


def _init_one(spec: RunSpec, seed: int) -> dict[str, Any]:
  key = jax.random.key(seed)
  k_soft, k_lin = jax.random.split(jax.random.fold_in(key, 1))
  dd, t = spec.task.token_dim, spec.task.num_tasks

  def init(k, heads):
    # Each model's init depends only on (seed, its head count), so a model trains
    # identically alone or alongside others.
    parts = [model.init_params(jax.random.fold_in(k, h), (h,), dd, t)
             for h in heads]
    return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

  params = {'softmax': init(k_soft, spec.heads)}
  if spec.linear_heads:
    params['linear'] = init(k_lin, spec.linear_heads)
  data_key = jax.random.key_data(
      jax.random.key(seed, impl=spec.rng_impl))
  return {'params': params, 'key': data_key}


def _optimizer(spec: RunSpec) -> optax.GradientTransformation:
  return optax.adam(spec.lr, b1=0.9, b2=0.999)


def loss_fn(spec: RunSpec, params: dict[str, Any], batch: data.Batch
            ) -> tuple[jax.Array, jax.Array]:
  """Sum over models of the mean squared error on y_q, and the per-model MSE [M]."""
  ctx, q = batch.context, batch.query
  preds = [model.softmax_forward(params['softmax'], ctx, q, spec.heads,
                                 projection=spec.projection)]  # [B, M, T]
  if spec.linear_heads:
    preds.append(model.linear_forward(params['linear'], ctx, q,
                                      spec.linear_heads,
                                      normalize=spec.linear_normalize))
  pred = jnp.concatenate(preds, axis=1)  # [B, M, T]
  per_model = jnp.mean((pred - batch.yq[:, None, :]) ** 2, axis=(0, 2))  # [M]
  return jnp.sum(per_model), per_model


def data_pieces(batch: int) -> int:
  """Independent pieces the batch of a step is drawn in: the largest of 8, 4, 2, 1
  dividing `batch` (data parallelism over up to that many devices)."""
  return next(p for p in (8, 4, 2, 1) if batch % p == 0)


def make_mesh(spec: RunSpec, max_devices: int | None = None
              ) -> jax.sharding.Mesh:
  """A ('seed', 'data') mesh: seeds split first, then the batch pieces.

  Args:
    spec: the run.
    max_devices: use at most this many devices. None: all devices, except on CPU at
      most `os.cpu_count()` (simulated host devices beyond the cores add threads,
      not throughput).
  """
  devices = jax.devices()
  limit = len(devices)
  if max_devices is None and devices[0].platform == 'cpu':
    limit = min(limit, os.cpu_count() or 1)
  elif max_devices is not None:
    if isinstance(max_devices, bool) or not isinstance(
        max_devices, (int, np.integer)) or max_devices < 1:
      raise ValueError(f'max_devices must be a positive int or None, got '
                       f'{max_devices!r}.')
    limit = min(limit, int(max_devices))
  num_seeds = len(spec.seeds)
  seed_par = max(k for k in range(1, limit + 1) if num_seeds % k == 0)
  pieces = data_pieces(spec.batch)
  data_par = max(k for k in range(1, limit // seed_par + 1) if pieces % k == 0)
  grid = np.asarray(devices[:seed_par * data_par]).reshape(seed_par, data_par)
  return jax.sharding.Mesh(grid, ('seed', 'data'))


def init_state(spec: RunSpec) -> dict[str, Any]:
  """Fresh training state with a leading seed axis [S, ...] on params/opt/key."""
  per_seed = [_init_one(spec, s) for s in spec.seeds]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *per_seed)
  opt = jax.vmap(_optimizer(spec).init)(stacked['params'])
  history = jax.tree.map(
      lambda p: jnp.zeros((spec.num_records + 1,) + p.shape, p.dtype).at[0].set(p),
      stacked['params'])
  return {
      'params': stacked['params'],
      'opt': opt,
      'key': stacked['key'],
      'step': jnp.zeros((), jnp.int32),
      'history': history,
      'loss': jnp.zeros((spec.num_records, len(spec.seeds), spec.num_models),
                        jnp.float32),
  }


@functools.lru_cache(maxsize=16)
def make_chunk_fn(spec: RunSpec, mesh: jax.sharding.Mesh
                  ) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """Jitted: advances the state by `log_every` steps and records a snapshot.

  The state must be placed with `shard_state(state, mesh)`. Inside, each device
  trains its seeds (vmap) on its share of the batch pieces; gradients and losses are
  averaged over the 'data' axis, so every data replica applies the same update.
  """
  opt = _optimizer(spec)
  pieces = data_pieces(spec.batch)
  data_par = mesh.shape['data']
  local_pieces, piece_size = pieces // data_par, spec.batch // pieces

  def one_seed(params, opt_state, key_data, step0, first_piece):
    key = jax.random.wrap_key_data(key_data, impl=spec.rng_impl)
    piece_ids = first_piece + jnp.arange(local_pieces)

    def sample(step_key, j):
      return data.sample(spec.task, jax.random.fold_in(step_key, j), piece_size,
                         spec.length)

    def body(carry, i):
      p, s = carry
      step_key = jax.random.fold_in(key, step0 + i)
      batch = jax.vmap(sample, in_axes=(None, 0))(step_key, piece_ids)
      batch = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), batch)
      # Differentiate w.r.t. a device-varying copy of the replicated params, so g is
      # this device's gradient (differentiating the replicated params directly
      # would psum it implicitly); equal local batches: the mean of the local means
      # is the batch mean.
      (_, per_model), g = jax.value_and_grad(
          lambda p_: loss_fn(spec, p_, batch), has_aux=True)(
              jax.lax.pcast(p, 'data', to='varying'))
      g, per_model = jax.lax.pmean((g, per_model), 'data')
      updates, s = opt.update(g, s, p)
      return (optax.apply_updates(p, updates), s), per_model

    (params, opt_state), losses = jax.lax.scan(
        body, (params, opt_state), jnp.arange(spec.log_every, dtype=jnp.int32))
    return params, opt_state, jnp.mean(losses, axis=0)

  def local(params, opt_state, key_data, step0):
    first_piece = jax.lax.axis_index('data') * local_pieces
    return jax.vmap(one_seed, in_axes=(0, 0, 0, None, None))(
        params, opt_state, key_data, step0, first_piece)

  P = jax.sharding.PartitionSpec
  sharded = jax.shard_map(local, mesh=mesh,
                          in_specs=(P('seed'), P('seed'), P('seed'), P()),
                          out_specs=(P('seed'), P('seed'), P('seed')))

  def chunk(state):
    params, opt_state, loss = sharded(state['params'], state['opt'],
                                      state['key'], state['step'])
    record = state['step'] // spec.log_every
    history = jax.tree.map(lambda h, p: h.at[record + 1].set(p),
                           state['history'], params)
    return {
        'params': params,
        'opt': opt_state,
        'key': state['key'],
        'step': state['step'] + spec.log_every,
        'history': history,
        'loss': state['loss'].at[record].set(loss),
    }

  return jax.jit(chunk, donate_argnums=0)


def shard_state(state: dict[str, Any], mesh: jax.sharding.Mesh
                ) -> dict[str, Any]:
  """Places the state on `mesh`: the seed axis split, replicated over 'data'."""
  P = jax.sharding.PartitionSpec
  seed_axis = jax.sharding.NamedSharding(mesh, P('seed'))
  hist_axis = jax.sharding.NamedSharding(mesh, P(None, 'seed'))
  repl = jax.sharding.NamedSharding(mesh, P())
  out = {k: jax.device_put(state[k], seed_axis)
         for k in ('params', 'opt', 'key')}
  out['step'] = jax.device_put(state['step'], repl)
  out['history'] = jax.device_put(state['history'], hist_axis)
  out['loss'] = jax.device_put(state['loss'], hist_axis)
  return out


def model_labels(spec: RunSpec) -> list[str]:
  """Labels of the models in loss order: 'H=1', ..., then 'linear H=1', ..."""
  return ([f'H={h}' for h in spec.heads] +
          [f'linear H={h}' for h in spec.linear_heads])


class Progress:
  """A console progress line and JSON-lines metrics.

  The line labels each model's seed-mean loss ('H=1 0.41 | H=2 0.38 | ...') and
  shows steps/s and the ETA only once a rate is measurable: the first chunk
  includes compilation, so it says so instead of a rate.
  """

  def __init__(self, spec: RunSpec, metrics_path: str | None,
               min_interval: float = 2.0, stream=None):
    self.spec, self.metrics_path = spec, metrics_path
    self.min_interval = min_interval
    self.stream = stream or sys.stderr
    self.labels = model_labels(spec)
    self.t0 = self.last = time.perf_counter()
    self.step0: int | None = None

  def mark_compiled(self, step: int) -> None:
    """The rate is measured from here (`step`: the step after the first chunk)."""
    self.step0, self.t0 = step, time.perf_counter()

  def line(self, step: int, loss: np.ndarray, rate: float | None) -> str:
    frac = step / self.spec.steps
    bar = '#' * int(20 * frac) + '.' * (20 - int(20 * frac))
    mean = np.mean(np.asarray(loss), 0)
    losses = ' | '.join(f'{lab} {v:.4g}' for lab, v in zip(self.labels, mean))
    if rate is None:
      speed = 'first chunk (incl. compilation)'
    else:
      speed = (f'{rate:,.0f} steps/s ETA '
               f'{(self.spec.steps - step) / max(rate, 1e-9):.0f}s')
    return (f'[{self.spec.name}] {step}/{self.spec.steps} [{bar}] loss '
            f'{losses} | {speed}')

  def update(self, step: int, loss: np.ndarray, final: bool = False
             ) -> float | None:
    now = time.perf_counter()
    rate = None
    if self.step0 is not None and step > self.step0:
      rate = (step - self.step0) / max(now - self.t0, 1e-9)
    if self.metrics_path:
      with open(self.metrics_path, 'a') as f:
        f.write(json.dumps({'run': self.spec.name, 'step': step,
                            'loss_per_model': np.mean(loss, 0).tolist(),
                            'models': self.labels,
                            'steps_per_s': rate}) + '\n')
    if final or self.step0 == step or now - self.last >= self.min_interval:
      self.last = now
      self.stream.write(self.line(step, loss, rate) + '\n')
      self.stream.flush()
    return rate


def train(spec: RunSpec, workdir: str | None, *, checkpoint_every: int = 0,
          stop_after_step: int | None = None, verbose: bool = True,
          max_devices: int | None = None
          ) -> tuple[dict[str, Any], dict[str, float]]:
  """Trains (or resumes) `spec`; returns the final state (host NumPy) and timing.

  Args:
    spec: the run.
    workdir: checkpoints go to `workdir/checkpoints/<name>`, metrics to
      `workdir/metrics.jsonl`; None disables both. Resumes from the newest usable
      checkpoint: unusable newer ones are reported in one line and moved to
      `workdir/checkpoints_corrupt/<name>/<step>`; with none usable,
      `checkpointing.CheckpointError`.
    checkpoint_every: save every this many steps (a multiple of log_every; 0 = only
      at the end and at `stop_after_step`).
    stop_after_step: stop (after checkpointing) once this step is reached, as if
      interrupted; used to test resumption.
    verbose: print the progress line.
    max_devices: devices to train on (see `make_mesh`); the result does not depend
      on it beyond float summation order.

  Returns:
    (state, timing) where timing has 'steps_per_s' (excluding compilation),
    'compile_s', 'wall_s', 'resumed_from'.
  """
  if checkpoint_every < 0 or checkpoint_every % spec.log_every:
    raise ValueError(f'checkpoint_every must be a non-negative multiple of '
                     f'log_every ({spec.log_every}), got {checkpoint_every}.')
  if stop_after_step is not None and (
      stop_after_step <= 0 or stop_after_step % spec.log_every):
    raise ValueError(f'stop_after_step must be a positive multiple of log_every '
                     f'({spec.log_every}), got {stop_after_step}.')
  t_start = time.perf_counter()
  state = init_state(spec)
  manager = None
  resumed_from = 0
  if workdir is not None:
    ckpt_dir = os.path.abspath(os.path.join(workdir, 'checkpoints', spec.name))
    manager = ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    _check_spec_file(ckpt_dir, spec)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def restore(step):
      # A standalone checkpointer per attempt: the manager infers its item layout
      # from the step directories and mis-reads the older ones once it has seen a
      # step whose item directory is missing.
      with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            os.path.join(ckpt_dir, str(step), 'default'), abstract)
      checkpointing.verify_restored(step, restored)
      return restored

    found = checkpointing.restore_newest_usable(
        ckpt_dir, list(manager.all_steps()), restore,
        corrupt_dir=os.path.abspath(os.path.join(
            workdir, checkpointing.CORRUPT_DIR, spec.name)),
        reload=manager.reload)
    if found is not None:
      state = found[1]
      resumed_from = int(state['step'])
    # One metrics row per step: drop this run's rows after the restored step.
    metrics_lib.truncate_after(os.path.join(workdir, 'metrics.jsonl'),
                               resumed_from,
                               keep=lambda row: row.get('run') != spec.name)
  mesh = make_mesh(spec, max_devices)
  state = shard_state(state, mesh)
  chunk = make_chunk_fn(spec, mesh)
  progress = Progress(spec, None if workdir is None else
                      os.path.join(workdir, 'metrics.jsonl'),
                      stream=None if verbose else open(os.devnull, 'w'))
  step = int(state['step'])
  if resumed_from and verbose:
    progress.stream.write(f'[{spec.name}] resumed from step {resumed_from} '
                          f'({ckpt_dir})\n')
  compile_s, timed_steps, timed_s = 0.0, 0, 0.0
  first = True
  while step < spec.steps and (stop_after_step is None or step < stop_after_step):
    t0 = time.perf_counter()
    state = chunk(state)
    step = int(state['step'])  # blocks until the chunk is done
    dt = time.perf_counter() - t0
    if first:
      compile_s, first = dt, False
      progress.mark_compiled(step)
    else:
      timed_steps += spec.log_every
      timed_s += dt
    record = step // spec.log_every - 1
    progress.update(step, np.asarray(state['loss'][record]),
                    final=step == spec.steps)
    if manager is not None and (
        (checkpoint_every and step % checkpoint_every == 0) or
        step == spec.steps or step == stop_after_step):
      manager.save(step, args=ocp.args.StandardSave(state))
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  host = jax.tree.map(np.asarray, state)
  timing = {
      'steps_per_s': timed_steps / timed_s if timed_s else float('nan'),
      'first_chunk_s': compile_s,
      'wall_s': time.perf_counter() - t_start,
      'resumed_from': resumed_from,
      'steps_run': step - resumed_from,
      'mesh': dict(mesh.shape),
  }
  return host, timing


def _check_spec_file(ckpt_dir: str, spec: RunSpec) -> None:
  """Refuses to resume a checkpoint written by a different run definition."""
  path = os.path.join(ckpt_dir, 'spec.json')
  desc = json.dumps(dataclasses.asdict(spec), sort_keys=True, default=str)
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if old != desc:
      raise ValueError(
          f'{ckpt_dir} holds a checkpoint of a different run; use a fresh '
          f'--workdir or the same settings. Stored: {old}; requested: {desc}.')
  else:
    with open(path, 'w') as f:
      f.write(desc)
