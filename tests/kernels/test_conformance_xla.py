"""Conformance of 'xla' (kernels/xla/: blocked online-softmax attention)."""

from tests.kernels import conformance


class TestXlaConformance(conformance.AttentionTestBase):
  IMPLEMENTATION = 'xla'
  # Small tiles so the fixed cases visit EMPTY / PARTIAL / FULL tiles and padding.
  OPTIONS = dict(block_q=16, block_kv=16)

  @classmethod
  def block_options(cls, block_q, block_kv):
    return dict(block_q=block_q, block_kv=block_kv)
