r"""Short device check of the attention kernels: conformance, then timing vs jax.nn.

  python -m experiments.benchmarks.hardware --workdir=/tmp/hw
  python -m experiments.benchmarks.hardware --workdir=/tmp/hw --lengths=4096 \
      --dtypes=bfloat16 --budget_s=120

On a GPU (TPU) it checks `pallas_gpu` (`pallas_tpu`); on CPU both Pallas kernels run in
interpret mode on the tiny `cpu_smoke` preset (the default there). Two parts:

- conformance: a compact set of problems (causal, sliding window, documents via
  segment ids, GQA, an ALiBi score_mod ("Train Short, Test Long", Press et al. 2022)
  with differentiable slopes, -inf key-padding bias, dropout, and traced MoBA-style
  block lists: a `DynamicBlockMask` of per-(batch, kv head) top-k blocks, own block
  kept, causal inside; blocks of T / 4, or 128 from T = 512 for Mosaic) in bfloat16
  and float32.
  Forward, lse and the gradients for q, k, v (and the slopes) are compared with the
  golden reference: float64 on CPU, float32 at HIGHEST matmul precision on the device
  itself (`--golden`). Pass: error <= fudge x (same-dtype reference's error) + floor x
  max(1, |golden|) (FlexAttention's three-way check), constants in `TOLERANCES`.
- timing: forward and forward+backward (jax.grad of a scalar) at `--lengths` for the
  structures causal, sliding window 512, documents (4 causal segments, segment ids) and
  GQA (8 query heads, 2 kv heads, causal), in `--dtypes`, for the device kernel(s), the
  blocked `xla` implementation and `jax.nn.dot_product_attention` (cuDNN on GPU where it
  accepts the inputs, else its XLA path). The contenders of a row are timed in
  interleaved rounds (median per contender, `jax.block_until_ready`); ratios are to
  jax.nn. Each row records its status: a compile error, OOM or unsupported input is a
  row, not an abort; rows whose predicted memory exceeds the device's are skipped, and
  rows beyond `--budget_s` (wall time since the start) are recorded as skipped.

Writes <workdir>/results.json ({meta, conformance, timing}), conformance.csv,
timing.csv and results.md. The 'device' preset is sized for under 8 minutes on one
H100/H200: 16 conformance rows, then 24 timing rows (bfloat16 first, shortest lengths
first) of 3 contenders x (fwd, fwd+bwd), i.e. about 150 compilations, at most 5 timed
rounds per row and about 20 s of rounds; rows that would start after `--budget_s`
(default 390 s since the start) are recorded as skipped. Not yet run on a GPU or TPU.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

import attention
from attention import masks
from experiments.benchmarks import common
from kernels import problem as problem_lib

DTYPES = {'bfloat16': jnp.bfloat16, 'float32': jnp.float32}
STRUCTURES = ('causal', 'sliding_window', 'documents', 'gqa')
CASES = ('causal', 'sliding_window', 'documents', 'gqa', 'alibi_score_mod',
         'key_padding_bias', 'dropout', 'dynamic_blocks')
GOLDENS = ('auto', 'float64', 'float32_highest')
JAX_NN = 'jax.nn'
DEVICE_KERNELS = {'gpu': ('pallas_gpu',), 'tpu': ('pallas_tpu',),
                  'cpu': ('pallas_gpu', 'pallas_tpu')}

# Conformance pass criterion, per dtype: error <= fudge * err(same-dtype reference vs
# golden) + floor * max(1, max |golden|) (fudge 0: the floor alone, and the same-dtype
# reference is not run). float32 on a device allows TF32-class dot products (the
# default precision of XLA and Triton on NVIDIA GPUs for float32).
TOLERANCES = {
    ('bfloat16', 'cpu'): (2.0, 1e-2),
    ('float32', 'cpu'): (0.0, 2e-5),
    ('bfloat16', 'device'): (2.0, 1e-2),
    ('float32', 'device'): (0.0, 2e-3),
}


@dataclasses.dataclass(frozen=True)
class Config:
  """What one run checks; `PRESETS` holds the defaults, flags override fields."""
  preset: str
  lengths: tuple[int, ...]
  dtypes: tuple[str, ...]
  structures: tuple[str, ...] = STRUCTURES
  cases: tuple[str, ...] = CASES
  kernels: tuple[str, ...] | None = None  # None: DEVICE_KERNELS of the backend.
  timing_kernels: tuple[str, ...] | None = None  # None: `kernels`.
  golden: str = 'auto'
  repeats: int = 5
  budget_s: float = 390.0
  row_time_cap_s: float = 20.0  # timed rounds of one row stop after about this long
  batch: int = 1
  heads: int = 8
  gqa_kv_heads: int = 2
  head_dim: int = 64
  window: int = 512
  documents: int = 4
  # Conformance shape: (batch, length, query heads, kv heads of the GQA case, head_dim).
  conformance_shape: tuple[int, int, int, int, int] = (2, 256, 4, 2, 64)
  conformance_window: int = 64
  parts: tuple[str, ...] = ('conformance', 'timing')
  max_memory_fraction: float = 0.7  # of the device's memory, for the skip prediction
  # LLVM -O0 for every top-level compilation: interpret-mode compiles about 3x faster
  # on CPU (tests), CPU timings then meaningless.
  fast_compile: bool = False


PRESETS = {
    'device': Config(preset='device', lengths=(4096, 16384, 32768),
                     dtypes=('bfloat16', 'float32')),
    'cpu_smoke': Config(preset='cpu_smoke', lengths=(64, 128),
                        dtypes=('bfloat16', 'float32'), repeats=1, budget_s=600.0,
                        row_time_cap_s=5.0, heads=4, gqa_kv_heads=2, head_dim=32,
                        window=16, conformance_shape=(2, 64, 2, 1, 32),
                        conformance_window=16),
}


def default_preset(backend: str | None = None) -> str:
  return 'cpu_smoke' if (backend or jax.default_backend()) == 'cpu' else 'device'


def make_config(preset: str | None = None, **overrides: Any) -> Config:
  """The preset (default: by backend) with the non-None `overrides` applied."""
  preset = preset or default_preset()
  if preset not in PRESETS:
    raise ValueError(f'preset must be one of {sorted(PRESETS)}, got {preset!r}.')
  changes = {k: v for k, v in overrides.items() if v is not None}
  unknown = set(changes) - {f.name for f in dataclasses.fields(Config)}
  if unknown:
    raise ValueError(f'unknown Config fields {sorted(unknown)}.')
  if 'kernels' in changes and 'timing_kernels' not in changes:
    changes['timing_kernels'] = changes['kernels']
  for name in ('lengths', 'dtypes', 'structures', 'cases', 'kernels',
               'timing_kernels', 'parts'):
    if name in changes:
      changes[name] = tuple(changes[name])
  cfg = dataclasses.replace(PRESETS[preset], **changes)
  _check_config(cfg)
  return cfg


def _check_config(cfg: Config) -> None:
  for name, values, known in (('dtypes', cfg.dtypes, tuple(DTYPES)),
                              ('structures', cfg.structures, STRUCTURES),
                              ('cases', cfg.cases, CASES),
                              ('parts', cfg.parts, ('conformance', 'timing'))):
    bad = [v for v in values if v not in known]
    if bad:
      raise ValueError(f'{name} must be among {list(known)}, got {bad}.')
  if cfg.golden not in GOLDENS:
    raise ValueError(f'golden must be one of {GOLDENS}, got {cfg.golden!r}.')
  for name, kernels in (('kernels', cfg.kernels),
                        ('timing_kernels', cfg.timing_kernels)):
    bad = [k for k in kernels or () if k not in attention.available_implementations()]
    if bad:
      raise ValueError(f'{name} must be among '
                       f'{attention.available_implementations()}, got {bad}.')
  if not cfg.lengths or any(int(t) < 8 for t in cfg.lengths):
    raise ValueError(f'lengths must be non-empty, each >= 8, got {cfg.lengths}.')
  if cfg.repeats < 1:
    raise ValueError(f'repeats must be >= 1, got {cfg.repeats}.')
  if cfg.budget_s <= 0:
    raise ValueError(f'budget_s must be > 0, got {cfg.budget_s}.')
  if cfg.heads % cfg.gqa_kv_heads:
    raise ValueError(f'heads ({cfg.heads}) must be a multiple of gqa_kv_heads '
                     f'({cfg.gqa_kv_heads}).')


def device_kernels(cfg: Config, backend: str, timing: bool = False
                   ) -> tuple[str, ...]:
  """The kernels checked (`timing`: timed) on `backend`."""
  if timing and cfg.timing_kernels is not None:
    return cfg.timing_kernels
  return cfg.kernels if cfg.kernels is not None else DEVICE_KERNELS.get(backend, ())


def resolve_golden(cfg: Config, backend: str) -> str:
  """'float64' on CPU, 'float32_highest' on a device (no float64 on GPU/TPU)."""
  if cfg.golden != 'auto':
    return cfg.golden
  return 'float64' if backend == 'cpu' else 'float32_highest'


def _short_error(e: BaseException, limit: int = 400) -> str:
  text = f'{type(e).__name__}: {e}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + '...'


# ----------------------------------------------------------------------------------------
# Conformance.
# ----------------------------------------------------------------------------------------


def alibi(slopes, score, b, h, q_idx, kv_idx):
  """ALiBi: score - slope_h * (q - k) (Press et al. 2022), elementwise, broadcasting."""
  del b
  return score - slopes[h].astype(score.dtype) * (q_idx - kv_idx).astype(score.dtype)


@dataclasses.dataclass(frozen=True)
class Case:
  """One conformance problem: static kwargs, traced arrays, differentiable params."""
  name: str
  kv_heads: int
  static: dict[str, Any]
  arrays: dict[str, Any]
  params: dict[str, Any]

  def kwargs(self, arrays: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    kw = dict(self.static)
    kw.update(arrays)
    if 'slopes' in params:
      kw['score_mod'] = problem_lib.ScoreMod(alibi, params['slopes'], name='alibi')
    return kw


def conformance_cases(cfg: Config) -> list[Case]:
  """The compact set of `cfg.cases` at `cfg.conformance_shape`."""
  b, t, n, kh, _ = cfg.conformance_shape
  rng = np.random.default_rng(1)
  cuts = sorted(rng.choice(np.arange(1, t), size=2, replace=False))
  seg = np.stack([np.repeat([0, 1, 2], np.diff([0, *cuts, t])),
                  np.repeat([0, 1], [t // 3, t - t // 3])])[:b].astype(np.int32)
  pad = np.zeros((b, 1, 1, t), np.float32)
  pad[-1, ..., t - t // 4:] = -np.inf  # the last batch item's last quarter is padding
  slopes = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)  # ALiBi's geometric slopes
  window = masks.sliding_window(t, cfg.conformance_window - 1, 0)
  every = {
      'causal': Case('causal', n, dict(is_causal=True), {}, {}),
      'sliding_window': Case('sliding_window', n, dict(mask=window), {}, {}),
      'documents': Case('documents', n, {}, dict(segment_ids=jnp.asarray(seg)), {}),
      'gqa': Case('gqa', kh, dict(is_causal=True), {}, {}),
      'alibi_score_mod': Case('alibi_score_mod', n, dict(is_causal=True), {},
                              dict(slopes=jnp.asarray(slopes, jnp.float32))),
      'key_padding_bias': Case('key_padding_bias', n, {},
                               dict(bias=jnp.asarray(pad)), {}),
      'dropout': Case('dropout', n, dict(is_causal=True, dropout_rate=0.1),
                      dict(dropout_key=jnp.asarray([17, 4], jnp.uint32)), {}),
      'dynamic_blocks': Case('dynamic_blocks', kh, dict(is_causal=True),
                             dict(mask=dynamic_blocks(b, kh, t)), {}),
  }
  return [every[name] for name in cfg.cases]


def dynamic_blocks(batch: int, kv_heads: int, t: int) -> masks.DynamicBlockMask:
  """MoBA-style traced lists: per (batch, kv head) the own block + top-1 past block."""
  block = 128 if t >= 512 else max(t // 4, 1)
  nb = -(-t // block)
  scores = jax.random.normal(jax.random.key(7), (batch, kv_heads, nb, nb))
  past = jnp.tril(jnp.ones((nb, nb), bool), -1)
  return masks.top_k_blocks(jnp.where(past, scores, -jnp.inf), min(2, nb), q_len=t,
                            kv_len=t, block_q=block, block_kv=block,
                            always=jnp.eye(nb, dtype=bool))


def _case_inputs(case: Case, shape, seed: int = 0):
  b, t, n, _, h = shape
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, case.kv_heads, h), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, case.kv_heads, h), jnp.float32)
  w_out = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
  w_lse = jax.random.normal(keys[4], (b, n, t), jnp.float32)
  return q, k, v, w_out, w_lse


def _jit(fn, fast_compile: bool):
  if fast_compile:
    return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0})
  return jax.jit(fn)


def _value_and_grads(implementation: str, case: Case, fast_compile: bool = False):
  """jit(q, k, v, arrays, params, w_out, w_lse) -> (out, lse, dq, dk, dv, dparams)."""

  def loss(q, k, v, params, arrays, w_out, w_lse):
    out, lse = attention.dot_product_attention(
        q, k, v, return_residuals=True, implementation=implementation,
        **case.kwargs(arrays, params))
    finite = jnp.isfinite(lse)
    total = (jnp.sum(out.astype(w_out.dtype) * w_out) +
             jnp.sum(jnp.where(finite, lse.astype(w_lse.dtype), 0.0) * w_lse))
    return total, (out, lse)

  grad = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)

  def fn(q, k, v, arrays, params, w_out, w_lse):
    (dq, dk, dv, dparams), (out, lse) = grad(q, k, v, params, arrays, w_out, w_lse)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, **{
        f'd{name}': g for name, g in dparams.items()})

  return _jit(fn, fast_compile)


def _to_numpy(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(jnp.asarray(v, jnp.float32) if v.dtype == jnp.bfloat16 else v,
                        np.float64) for k, v in tree.items()}


def _golden(case: Case, golden: str, inputs, arrays, params,
            fast_compile: bool = False) -> dict[str, np.ndarray]:
  """The reference at float64 (x64 on the host) or float32 HIGHEST (on the device)."""
  fn = _value_and_grads('reference', case, fast_compile)
  if golden == 'float64':
    with jax.enable_x64(True):
      up = lambda x: jnp.asarray(np.asarray(x, np.float64))
      f64 = lambda d: {k: up(v) if jnp.issubdtype(v.dtype, jnp.floating) else v
                       for k, v in d.items()}
      return _to_numpy(fn(*[up(x) for x in inputs[:3]], arrays, f64(params),
                          *[up(x) for x in inputs[3:]]))
  if golden == 'float32_highest':
    with jax.default_matmul_precision('highest'):
      return _to_numpy(fn(*inputs[:3], arrays, params, *inputs[3:]))
  raise ValueError(f'golden must be float64 or float32_highest, got {golden!r}.')


def _max_err(got: np.ndarray, want: np.ndarray) -> float:
  """max |got - want|, -inf matching -inf counts as equal; NaN or a mismatch: inf."""
  if got.shape != want.shape:
    return math.inf
  if np.isnan(got).any() or not np.array_equal(np.isneginf(got), np.isneginf(want)):
    return math.inf
  both = np.isneginf(got) & np.isneginf(want)
  diff = np.abs(np.where(both, 0.0, got) - np.where(both, 0.0, want))
  return float(np.max(diff, initial=0.0))


def check_case(implementation: str, case: Case, dtype_name: str, golden: str,
               shape, platform_kind: str, golden_cache: dict[str, Any],
               fast_compile: bool = False) -> dict[str, Any]:
  """One conformance row: max abs errors per output, tolerances and pass/fail."""
  dtype = DTYPES[dtype_name]
  row = dict(part='conformance', implementation=implementation, case=case.name,
             dtype=dtype_name, golden=golden, shape=list(shape[:3]) +
             [case.kv_heads, shape[4]])
  start = time.perf_counter()
  inputs = _case_inputs(case, shape)
  cast = [x.astype(dtype) for x in inputs[:3]]
  # The golden sees the dtype-rounded inputs, so only the kernel's arithmetic differs.
  rounded = tuple(x.astype(jnp.float32) for x in cast) + inputs[3:]
  key = (case.name, dtype_name)
  fudge, floor = TOLERANCES[(dtype_name, platform_kind)]
  try:
    if key not in golden_cache:
      want = _golden(case, golden, rounded, case.arrays, case.params, fast_compile)
      same = want if not fudge else _to_numpy(_value_and_grads(
          'reference', case, fast_compile)(*cast, case.arrays, case.params,
                                           *inputs[3:]))
      golden_cache[key] = (want, same)
    want, same = golden_cache[key]
    got = _to_numpy(_value_and_grads(implementation, case, fast_compile)(
        *cast, case.arrays, case.params, *inputs[3:]))
  except Exception as e:  # pylint: disable=broad-except
    row.update(status='failed', passed=False, error=_short_error(e),
               seconds=time.perf_counter() - start)
    return row
  passed = True
  for name in want:
    scale = max(1.0, float(np.max(np.abs(np.where(np.isfinite(want[name]),
                                                  want[name], 0.0)), initial=0.0)))
    err = _max_err(got[name], want[name])
    tol = fudge * _max_err(same[name], want[name]) + floor * scale
    row[f'{name}_err'] = err
    row[f'{name}_tol'] = tol
    passed &= bool(err <= tol)
  row.update(status='ok', passed=passed, seconds=time.perf_counter() - start)
  return row


def run_conformance(cfg: Config, backend: str, deadline: float) -> list[dict[str, Any]]:
  """Every (kernel, case, dtype) row; rows past the deadline are recorded as skipped."""
  golden = resolve_golden(cfg, backend)
  platform_kind = 'cpu' if golden == 'float64' else 'device'
  rows, cache = [], {}
  for case in conformance_cases(cfg):
    for dtype_name in cfg.dtypes:
      for impl in device_kernels(cfg, backend):
        if time.perf_counter() > deadline:
          rows.append(dict(part='conformance', implementation=impl, case=case.name,
                           dtype=dtype_name, golden=golden, status='skipped: budget',
                           passed=False))
          continue
        rows.append(check_case(impl, case, dtype_name, golden, cfg.conformance_shape,
                               platform_kind, cache, cfg.fast_compile))
  return rows


# ----------------------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Structure:
  """A timed problem: our API kwargs, jax.nn's kwargs (None: not expressible).

  `*_arrays` are the array kwargs, passed to the compiled functions as arguments (a
  closed-over array would be embedded in the program as a constant).
  """
  name: str
  heads: int
  kv_heads: int
  ours: dict[str, Any]
  jax_nn: dict[str, Any] | None
  visible_pairs: int
  ours_arrays: dict[str, Any] = dataclasses.field(default_factory=dict)
  jax_nn_arrays: dict[str, Any] = dataclasses.field(default_factory=dict)
  dense_mask_bytes: int = 0


def structure(name: str, t: int, cfg: Config) -> Structure:
  """causal | sliding_window | documents (causal, segment ids) | gqa (causal)."""
  n, b = cfg.heads, cfg.batch
  causal_pairs = t * (t + 1) // 2
  if name == 'causal':
    return Structure(name, n, n, dict(is_causal=True), dict(is_causal=True),
                     causal_pairs)
  if name == 'gqa':
    return Structure(name, n, cfg.gqa_kv_heads, dict(is_causal=True),
                     dict(is_causal=True), causal_pairs)
  if name == 'sliding_window':
    w = min(cfg.window, t)
    pairs = int(np.sum(np.minimum(np.arange(t) + 1, w)))
    # Each query sees itself and w - 1 keys back (w keys).
    return Structure(name, n, n, dict(mask=masks.sliding_window(t, w - 1, 0)),
                     dict(is_causal=True, local_window_size=(w - 1, 0)), pairs)
  if name == 'documents':
    d = cfg.documents
    lengths = [t // d + (1 if i < t % d else 0) for i in range(d)]
    seg = jnp.asarray(np.tile(np.repeat(np.arange(d), lengths), (b, 1)), jnp.int32)
    dense = seg[:, None, :, None] == seg[:, None, None, :]  # [B, 1, T, T]
    pairs = sum(x * (x + 1) // 2 for x in lengths)
    return Structure(name, n, n, dict(is_causal=True), dict(is_causal=True), pairs,
                     ours_arrays=dict(segment_ids=seg),
                     jax_nn_arrays=dict(mask=dense), dense_mask_bytes=b * t * t)
  raise ValueError(f'structure must be one of {STRUCTURES}, got {name!r}.')


def device_memory_bytes() -> int:
  """The device's memory limit (host RAM on CPU)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def predicted_bytes(contender: str, st: Structure, b: int, t: int, h: int,
                    dtype_name: str, backward: bool) -> int:
  """A rough peak: inputs/outputs/grads, plus the dense logits of XLA jax.nn."""
  item = jnp.dtype(DTYPES[dtype_name]).itemsize
  qkv = b * t * h * item * (2 * st.heads + 2 * st.kv_heads)
  total = qkv * (2 if backward else 1) + st.dense_mask_bytes
  if contender == 'jax.nn/xla':
    # [B, N, T, S] float32 logits and probabilities (and their cotangents backward).
    total += b * st.heads * t * t * 4 * (5 if backward else 2)
  return total


def _contender(contender: str, st: Structure):
  """((q, k, v, arrays) -> out, arrays) for an API implementation or 'jax.nn/...'."""
  if contender.startswith(JAX_NN):
    impl = contender.split('/', 1)[1]
    kw = dict(st.jax_nn)
    return (lambda q, k, v, arrays: jax.nn.dot_product_attention(
        q, k, v, implementation=impl, **kw, **arrays)), st.jax_nn_arrays
  return (lambda q, k, v, arrays: attention.dot_product_attention(
      q, k, v, implementation=contender, **st.ours, **arrays)), st.ours_arrays


def _timed_call(fn, q, k, v, arrays, backward: bool):
  """(function, args) timed: fn itself, or its backward with a run-time cotangent
  of the output (`common.vjp_fn`; not grad of a sum, whose constant cotangent XLA
  folds)."""
  args = (q, k, v, arrays)
  if not backward:
    return fn, args
  return common.vjp_fn(fn), (common.random_cotangent(fn, *args),) + args


def _compile(fn, args, fast_compile: bool = False) -> tuple[Any, float, int]:
  start = time.perf_counter()
  compiled = _jit(fn, fast_compile).lower(*args).compile()
  seconds = time.perf_counter() - start
  try:
    stats = compiled.memory_analysis()
    mem = int(stats.argument_size_in_bytes + stats.output_size_in_bytes +
              stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    mem = -1
  return compiled, seconds, mem


def interleaved_median(fns: dict[str, Callable[[], Any]], rounds: int,
                       time_cap_s: float) -> tuple[dict[str, float],
                                                   dict[str, str], int]:
  """Median wall time (s) of each callable over interleaved rounds.

  One untimed warm-up call each (the first run after compilation), then `rounds`
  rounds each calling every callable once in a rotated order, so slow phases of the
  machine hit all contenders alike; rounds stop early after `time_cap_s`. A callable
  that raises is dropped and its error returned. Returns (medians, errors, rounds).
  """
  errors: dict[str, str] = {}
  live = []
  for name, fn in fns.items():
    try:
      jax.block_until_ready(fn())
      live.append(name)
    except Exception as e:  # pylint: disable=broad-except
      errors[name] = _short_error(e)
  samples: dict[str, list[float]] = {name: [] for name in live}
  start = time.perf_counter()
  done = 0
  for r in range(rounds):
    if r and time.perf_counter() - start > time_cap_s:
      break
    shift = r % max(1, len(live))
    for name in live[shift:] + live[:shift]:
      if name in errors:
        continue
      try:
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name]())
        samples[name].append(time.perf_counter() - t0)
      except Exception as e:  # pylint: disable=broad-except
        errors[name] = _short_error(e)
    done += 1
  medians = {name: statistics.median(s) for name, s in samples.items()
             if s and name not in errors}
  return medians, errors, done


def jax_nn_contenders(backend: str, dtype_name: str) -> list[str]:
  """cuDNN first on GPU for 16-bit inputs (it needs fp16/bf16), then jax.nn's XLA."""
  if backend == 'gpu' and dtype_name == 'bfloat16':
    return [f'{JAX_NN}/cudnn', f'{JAX_NN}/xla']
  return [f'{JAX_NN}/xla']


def timing_rows(st_name: str, t: int, dtype_name: str, cfg: Config, backend: str,
                limit_bytes: int) -> list[dict[str, Any]]:
  """One row per contender of (structure, T, dtype), timed side by side."""
  st = structure(st_name, t, cfg)
  b, h = cfg.batch, cfg.head_dim
  dtype = DTYPES[dtype_name]
  keys = jax.random.split(jax.random.key(t), 3)
  q = jax.random.normal(keys[0], (b, t, st.heads, h), dtype)
  k = jax.random.normal(keys[1], (b, t, st.kv_heads, h), dtype)
  v = jax.random.normal(keys[2], (b, t, st.kv_heads, h), dtype)
  base = dict(part='timing', structure=st_name, dtype=dtype_name, T=t, B=b,
              N=st.heads, K=st.kv_heads, H=h)
  fwd_flop = 4.0 * b * st.heads * h * st.visible_pairs
  rows: dict[str, dict[str, Any]] = {}
  fns: dict[str, Callable[[], Any]] = {}
  contenders = list(device_kernels(cfg, backend, timing=True)) + ['xla']
  nn_candidates = jax_nn_contenders(backend, dtype_name) if st.jax_nn else []
  for name in contenders + [JAX_NN]:
    row = dict(base, implementation=name)
    rows[name] = row
    if name == JAX_NN and not nn_candidates:
      row.update(status='skipped', note=f'jax.nn cannot express {st_name}')
      continue
    notes = []
    for tag, backward in (('fwd', False), ('fwd_bwd', True)):
      # jax.nn: the first candidate that compiles (cuDNN, else its XLA path).
      for cand in nn_candidates if name == JAX_NN else [name]:
        row[f'{tag}_impl'] = cand
        need = predicted_bytes(cand, st, b, t, h, dtype_name, backward)
        row[f'{tag}_predicted_gib'] = need / 2**30
        if need > cfg.max_memory_fraction * limit_bytes:
          row[f'{tag}_status'] = (f'skipped: predicted {need / 2**30:.1f} GiB > '
                                  f'{cfg.max_memory_fraction:.0%} of '
                                  f'{limit_bytes / 2**30:.1f} GiB')
          continue
        fn, arrays = _contender(cand, st)
        try:
          timed, args = _timed_call(fn, q, k, v, arrays, backward)
          exe, seconds, mem = _compile(timed, args, cfg.fast_compile)
        except Exception as e:  # pylint: disable=broad-except
          msg = _short_error(e)
          row[f'{tag}_status'] = ('unsupported: ' if 'does not support' in msg
                                  else 'failed: ') + msg
          notes.append(f'{tag} {cand}: {row[f"{tag}_status"][:120]}')
          continue
        row[f'{tag}_compile_s'] = seconds
        if mem > cfg.max_memory_fraction * limit_bytes:
          row[f'{tag}_status'] = (f'skipped: compiled memory {mem / 2**30:.1f} GiB > '
                                  f'{cfg.max_memory_fraction:.0%} of '
                                  f'{limit_bytes / 2**30:.1f} GiB')
          continue
        row[f'{tag}_status'] = 'ok'
        fns[f'{name}|{tag}'] = functools.partial(exe, *args)
        break
    if notes and name == JAX_NN:
      row['note'] = '; '.join(notes)
  medians, errors, rounds = interleaved_median(fns, cfg.repeats, cfg.row_time_cap_s)
  for key, err in errors.items():
    name, tag = key.split('|')
    rows[name][f'{tag}_status'] = 'failed: ' + err
  for key, seconds in medians.items():
    name, tag = key.split('|')
    rows[name][f'{tag}_ms'] = seconds * 1e3
    rows[name][f'{tag}_tflops'] = (fwd_flop * (3.5 if tag == 'fwd_bwd' else 1.0) /
                                   seconds / 1e12)
  nn = rows[JAX_NN]
  for row in rows.values():
    row['rounds'] = rounds
    for tag in ('fwd', 'fwd_bwd'):
      if f'{tag}_ms' in row and f'{tag}_ms' in nn:
        row[f'{tag}_vs_jax_nn'] = row[f'{tag}_ms'] / nn[f'{tag}_ms']
    if 'status' not in row:
      states = [row.get(f'{tag}_status', 'missing') for tag in ('fwd', 'fwd_bwd')]
      if all(s == 'ok' for s in states):
        row['status'] = 'ok'
      elif any(s == 'ok' for s in states):
        row['status'] = 'partial'
      elif all(s.startswith('skipped') for s in states):
        row['status'] = 'skipped'
      elif all(s.startswith('unsupported') for s in states):
        row['status'] = 'unsupported'
      else:
        row['status'] = 'failed'
  del q, k, v, fns
  gc.collect()
  return list(rows.values())


def run_timing(cfg: Config, backend: str, deadline: float) -> list[dict[str, Any]]:
  """All timing rows: per dtype (in `cfg.dtypes` order), shortest lengths first.

  Rows past the deadline are recorded as skipped, so an exhausted budget loses the
  longest lengths of the last dtype first.
  """
  limit = device_memory_bytes()
  rows = []
  for dtype_name in cfg.dtypes:
    for t in sorted(cfg.lengths):
      for st_name in cfg.structures:
        if time.perf_counter() > deadline:
          for name in list(device_kernels(cfg, backend, timing=True)) + ['xla',
                                                                          JAX_NN]:
            rows.append(dict(part='timing', structure=st_name, dtype=dtype_name, T=t,
                             implementation=name, status='skipped',
                             note='budget_s exceeded'))
          continue
        try:
          rows += timing_rows(st_name, t, dtype_name, cfg, backend, limit)
        except Exception as e:  # pylint: disable=broad-except
          rows.append(dict(part='timing', structure=st_name, dtype=dtype_name, T=t,
                           implementation='*', status='failed',
                           note=_short_error(e)))
  return rows


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    if math.isinf(value) or math.isnan(value):
      return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
      return f'{value:.2e}'
    return f'{value:.4g}'
  return '' if value is None else str(value)


def _table(rows: list[dict[str, Any]], fields: Sequence[str]) -> str:
  if not rows:
    return '(no rows)'
  lines = ['| ' + ' | '.join(fields) + ' |', '|' + '---|' * len(fields)]
  for r in rows:
    lines.append('| ' + ' | '.join(_fmt(r.get(f)).replace('|', '/')
                                   for f in fields) + ' |')
  return '\n'.join(lines)


def markdown(meta: dict[str, Any], conformance: list[dict[str, Any]],
             timing: list[dict[str, Any]]) -> str:
  out = [f"# Hardware check: {meta['backend']} ({meta['device_kind']}), "
         f"preset {meta['preset']}, {meta['date']}",
         '', f"jax {meta['jax_version']}; kernels {', '.join(meta['kernels'])}; "
         f"golden {meta['golden']}; matmul ceiling "
         + ', '.join(f'{k} {v / 1e12:.3g} TFLOP/s'
                     for k, v in meta['matmul_flops'].items())
         + f"; wall time {meta['seconds']:.1f} s (budget {meta['budget_s']:.0f} s)."]
  if conformance:
    passed = sum(bool(r.get('passed')) for r in conformance)
    out += ['', f'## Conformance ({passed}/{len(conformance)} passed)', '']
    errs = [k for k in dict.fromkeys(k for r in conformance for k in r)
            if k.endswith('_err')]
    out.append(_table(conformance, ['implementation', 'case', 'dtype', 'passed'] +
                      errs + ['status', 'error']))
  if timing:
    out += ['', '## Timing (median ms; ratio = time / jax.nn time)', '']
    out.append(_table(timing, [
        'structure', 'dtype', 'T', 'implementation', 'fwd_impl', 'fwd_ms',
        'fwd_vs_jax_nn', 'fwd_bwd_ms', 'fwd_bwd_vs_jax_nn', 'fwd_tflops',
        'fwd_bwd_tflops', 'rounds', 'status', 'note']))
    problems = [r for r in timing if r.get('status') != 'ok']
    if problems:
      out += ['', '### Rows not fully timed', '']
      out.append(_table(problems, ['structure', 'dtype', 'T', 'implementation',
                                   'status', 'fwd_status', 'fwd_bwd_status',
                                   'note']))
  return '\n'.join(out) + '\n'


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def run_check(cfg: Config, workdir: str) -> dict[str, Any]:
  """Runs the configured parts, writes the results into `workdir`, returns them."""
  start = time.perf_counter()
  deadline = start + cfg.budget_s
  backend = jax.default_backend()
  os.makedirs(workdir, exist_ok=True)
  mm_n = 256 if cfg.preset == 'cpu_smoke' else 4096
  meta = dict(
      backend=backend, device_kind=jax.devices()[0].device_kind,
      device_count=jax.device_count(), preset=cfg.preset, host=platform.node(),
      date=time.strftime('%Y-%m-%d %H:%M:%S'), jax_version=jax.__version__,
      kernels=list(device_kernels(cfg, backend)),
      timing_kernels=list(device_kernels(cfg, backend, timing=True)),
      golden=resolve_golden(cfg, backend),
      budget_s=cfg.budget_s, config=dataclasses.asdict(cfg),
      matmul_flops={d: common.matmul_flops_per_s(mm_n, DTYPES[d], repeats=3)
                    for d in cfg.dtypes})
  conformance = (run_conformance(cfg, backend, deadline)
                 if 'conformance' in cfg.parts else [])
  timing = run_timing(cfg, backend, deadline) if 'timing' in cfg.parts else []
  meta['seconds'] = time.perf_counter() - start
  meta['conformance_passed'] = bool(conformance) and all(
      r.get('passed') for r in conformance)
  results = dict(meta=meta, conformance=conformance, timing=timing)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1, default=str)
  for name, rows in (('conformance', conformance), ('timing', timing)):
    if rows:
      _write_csv(os.path.join(workdir, f'{name}.csv'), rows)
  text = markdown(meta, conformance, timing)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(text)
  print(text)
  return results


def run(suite: str, workdir: str) -> list[dict[str, Any]]:
  """`experiments.benchmark` topic entry: the backend's default preset, all rows.

  Writes its own files under <workdir>/hardware/ (the topic's results.md would
  otherwise be overwritten by the suite's).
  """
  common.check_suite(suite)
  results = run_check(make_config(), os.path.join(workdir, 'hardware'))
  return results['conformance'] + results['timing']


# ----------------------------------------------------------------------------------------
# Binary.
# ----------------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this binary's flags on `flag_values` (those already there are kept).

  Called by `__main__` rather than at import, so importing this module (as the
  benchmark suite's topic discovery does) adds no global flags that could clash with
  other binaries' (e.g. `--preset`).
  """
  fv = flag_values
  if 'workdir' not in fv:
    flags.DEFINE_string('workdir', None, 'Output directory.', flag_values=fv)
  flags.DEFINE_enum('preset', None, sorted(PRESETS),
                    'Sizes (default: cpu_smoke on CPU, device elsewhere).',
                    flag_values=fv)
  flags.DEFINE_list('lengths', None, 'Timed sequence lengths, e.g. 4096,16384.',
                    flag_values=fv)
  flags.DEFINE_list('dtypes', None, f'Among {list(DTYPES)}.', flag_values=fv)
  flags.DEFINE_list('structures', None, f'Timed structures among {STRUCTURES}.',
                    flag_values=fv)
  flags.DEFINE_list('cases', None, f'Conformance cases among {CASES}.',
                    flag_values=fv)
  flags.DEFINE_list('kernels', None, 'Device kernels (API implementation names); '
                    'default pallas_gpu on GPU, pallas_tpu on TPU, both on CPU.',
                    flag_values=fv)
  flags.DEFINE_list('timing_kernels', None, 'Kernels timed (default: --kernels).',
                    flag_values=fv)
  flags.DEFINE_enum('golden', None, list(GOLDENS),
                    'Golden reference: float64 (CPU) or float32_highest (device).',
                    flag_values=fv)
  flags.DEFINE_integer('repeats', None, 'Timed rounds per row.', flag_values=fv)
  flags.DEFINE_float('budget_s', None, 'Stop adding rows after this many seconds.',
                     flag_values=fv)
  flags.DEFINE_list('parts', None, 'Parts to run: conformance, timing.',
                    flag_values=fv)
  flags.DEFINE_bool('fast_compile', None, 'LLVM -O0 for every compilation (CPU: '
                    'about 3x faster interpret-mode compiles; timings meaningless).',
                    flag_values=fv)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> Config:
  lengths = None if fv.lengths is None else [int(x) for x in fv.lengths]
  return make_config(fv.preset, lengths=lengths, dtypes=fv.dtypes,
                     structures=fv.structures, cases=fv.cases, kernels=fv.kernels,
                     timing_kernels=fv.timing_kernels,
                     golden=fv.golden, repeats=fv.repeats, budget_s=fv.budget_s,
                     parts=fv.parts, fast_compile=fv.fast_compile)


def run_from_flags(fv: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
  return run_check(config_from_flags(fv), fv.workdir or '/tmp/attnlab_hardware')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run_from_flags(flags.FLAGS)


if __name__ == '__main__':
  define_flags()
  app.run(main)
