"""Conformance of 'pallas_tpu' and 'pallas_gpu' (kernels/pallas/) in interpret mode.

On CPU both run with `interpret=True` (their default off TPU / GPU). Interpret-mode
programs are large; LLVM -O0 cuts their CPU compile time (numerics unchanged: XLA:CPU
uses no fast-math either way). A traced DynamicBlockMask fixes the kernels' tiles
(its blocks), so its cases run without the 32 x 32 `block_sizes` option (passing
sizes that disagree is a ValueError, tested in test_pallas_dynamic.py).
"""

from kernels.pallas import gpu as pallas_gpu
from kernels.pallas import tpu as pallas_tpu
from tests.kernels import conformance

_FAST_COMPILE = {'xla_backend_optimization_level': 0}


class _DynamicTiles:
  """Drops `block_sizes` for problems whose DynamicBlockMask sets the tiles."""

  def _impl_fn(self, options):
    fixed = super()._impl_fn(options)
    free = super()._impl_fn({k: v for k, v in options.items()
                             if k != 'block_sizes'})

    def fn(q, k, v, problem):
      return (fixed if problem.block_mask is None else free)(q, k, v, problem)

    return fn


class TestPallasTpuConformance(_DynamicTiles, conformance.AttentionTestBase):
  IMPLEMENTATION = 'pallas_tpu'
  # 32 x 32 tiles (interpret mode takes multiples of 8): several tiles per case.
  OPTIONS = dict(block_sizes=pallas_tpu.BlockSizes(32, 32), interpret=True)
  JIT_COMPILER_OPTIONS = _FAST_COMPILE
  HYPOTHESIS_EXAMPLES = 3

  @classmethod
  def block_options(cls, block_q, block_kv):
    return dict(block_sizes=pallas_tpu.BlockSizes(block_q, block_kv))


class TestPallasGpuConformance(_DynamicTiles, conformance.AttentionTestBase):
  IMPLEMENTATION = 'pallas_gpu'
  OPTIONS = dict(block_sizes=pallas_gpu.BlockSizes(32, 32), interpret=True)
  JIT_COMPILER_OPTIONS = _FAST_COMPILE
  HYPOTHESIS_EXAMPLES = 3

  @classmethod
  def block_options(cls, block_q, block_kv):
    return dict(block_sizes=pallas_gpu.BlockSizes(block_q, block_kv))

  @classmethod
  def block_choices(cls):
    return (16, 32)  # powers of two >= 16 (tl.dot)
