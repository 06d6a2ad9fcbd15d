"""Implementations behind `attention.dot_product_attention` (see kernels/README.md).

Every implementation takes the same validated `AttentionProblem` (kernels/problem.py);
`kernels.AttentionProblem`, `kernels.ScoreMod` and `kernels.make_problem` are that
module's (resolved lazily: kernels.problem imports `attention`, whose package imports
kernels.problem).
"""

_EXPORTS = ('AttentionProblem', 'ScoreMod', 'make_problem')
__all__ = list(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    from kernels import problem  # pylint: disable=g-import-not-at-top
    return getattr(problem, name)
  raise AttributeError(f'module kernels has no attribute {name!r}')
