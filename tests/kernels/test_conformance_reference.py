"""Conformance of 'reference' (kernels/reference.py) in float32 / bfloat16.

The float64 golden is the same code, so this checks the harness and the reference's
low-precision behaviour (dtypes, NaN / -inf patterns, zero rows); its float64
semantics are tested against NumPy oracles in tests/attention/test_api.py.
"""

from tests.kernels import conformance


class TestReferenceConformance(conformance.AttentionTestBase):
  IMPLEMENTATION = 'reference'
