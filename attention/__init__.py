"""attnlab attention: functional attention variants, masks and the dispatch API."""

from attention import masks
from attention import score_mods
from attention.api import available_implementations
from attention.api import dot_product_attention
from attention.api import make_problem
from attention.api import register_implementation

__all__ = [
    'AttentionProblem',
    'ScoreMod',
    'available_implementations',
    'dot_product_attention',
    'make_problem',
    'masks',
    'register_implementation',
    'score_mods',
]


def __getattr__(name: str):
  # kernels.problem imports this package: resolve its names lazily.
  if name in ('AttentionProblem', 'ScoreMod'):
    from kernels import problem  # pylint: disable=g-import-not-at-top
    return getattr(problem, name)
  raise AttributeError(f'module attention has no attribute {name!r}')
