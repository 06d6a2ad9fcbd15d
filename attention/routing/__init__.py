"""Content-dependent block-sparse attention: routers and gates (spec: routing.md).

Each method is a pure function that builds a traced `attention.masks.DynamicBlockMask`
and runs `attention.dot_product_attention` over it, plus a thin Flax NNX module.
"""

from attention.routing.moba import moba_attention
from attention.routing.moba import moba_block_scores
from attention.routing.moba import moba_mask
from attention.routing.moba import MoBA
from attention.routing.vmoba import cell_permutation
from attention.routing.vmoba import global_threshold_blocks
from attention.routing.vmoba import layer_partition
from attention.routing.vmoba import vmoba_attention
from attention.routing.vmoba import vmoba_block_scores
from attention.routing.vmoba import vmoba_mask
from attention.routing.vmoba import VMoBA
from attention.routing.vmoba import VMoBAAttention
