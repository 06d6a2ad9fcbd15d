"""Sparse-mask generators and their block-sparse compilation."""

from attention.masks.base import And
from attention.masks.base import Causal
from attention.masks.base import causal
from attention.masks.base import Dense
from attention.masks.base import from_array
from attention.masks.base import Mask
from attention.masks.base import Not
from attention.masks.base import Or
from attention.masks.block import BlockMask
from attention.masks.block import compile_mask
from attention.masks.block import from_dense
