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
from attention.routing.seer_attention import attention_block_target
from attention.routing.seer_attention import attn_gate_scores
from attention.routing.seer_attention import AttnGate
from attention.routing.seer_attention import distillation_loss
from attention.routing.seer_attention import gate_value_and_grad
from attention.routing.seer_attention import seer_kl_loss
from attention.routing.seer_attention import seer_mask
from attention.routing.seer_attention import seer_sparse_attention
from attention.routing.seer_attention import SeerAttention
from attention.routing.seer_attention import top_k_for_density
from attention.routing.seer_attention import train_attn_gates
from attention.routing.anchor_attention import anchor_mask
from attention.routing.biformer import bi_level_routing_attention
from attention.routing.biformer import bi_level_routing_mask
from attention.routing.biformer import BiLevelRoutingAttention
from attention.routing.biformer import region_routing
from attention.routing.dynamic_mask_attention import dma_bias
from attention.routing.dynamic_mask_attention import dma_keep_mask
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
# Not re-exported: the functions dynamic_mask_attention and anchor_attention share
# their module's name (re-exporting them would hide the modules); call them as
# attention.routing.dynamic_mask_attention.dynamic_mask_attention, etc.
