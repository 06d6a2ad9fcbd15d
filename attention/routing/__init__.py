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
from attention.routing.anchor_attention import anchor_attention
from attention.routing.anchor_attention import anchor_mask
from attention.routing.biformer import bi_level_routing_attention
from attention.routing.biformer import bi_level_routing_mask
from attention.routing.biformer import BiLevelRoutingAttention
from attention.routing.biformer import region_routing
from attention.routing.dynamic_mask_attention import dma_bias
from attention.routing.dynamic_mask_attention import dma_keep_mask
from attention.routing.dynamic_mask_attention import dynamic_mask_attention
from attention.routing.dynamic_mask_attention import DynamicMaskAttention
from attention.routing.minference import block_sparse_mask
from attention.routing.minference import modality_permutation
from attention.routing.minference import modality_vertical_slash_attention
from attention.routing.minference import modality_vertical_slash_mask
from attention.routing.minference import vertical_slash_attention
from attention.routing.minference import vertical_slash_mask
from attention.routing.sparsifiner import connectivity_loss
from attention.routing.sparsifiner import connectivity_mask
from attention.routing.sparsifiner import connectivity_scores
from attention.routing.sparsifiner import Sparsifiner
