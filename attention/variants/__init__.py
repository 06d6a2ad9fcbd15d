"""Attention variants of the papers, one file per method (spec: variants.md)."""

from attention.variants.flash_bias import alibi_factors
from attention.variants.flash_bias import alibi_flash_bias_attention
from attention.variants.flash_bias import augment_qk
from attention.variants.flash_bias import bias_from_factors
from attention.variants.flash_bias import flash_bias_attention
from attention.variants.flash_bias import linear_bias_factors
from attention.variants.flash_bias import svd_bias_factors
from attention.variants.relative_attention import alibi_attention
from attention.variants.relative_attention import music_transformer_attention
from attention.variants.relative_attention import relative_embeddings_for_length
from attention.variants.relative_attention import relative_logits_skewed
from attention.variants.relative_attention import RelativeAttention
from attention.variants.relative_attention import RelativeBias2DAttention
from attention.variants.relative_attention import skew
from attention.variants.relative_attention import T5BiasAttention
from attention.variants.mixture_of_heads import from_multi_head_attention
from attention.variants.mixture_of_heads import head_skipping_attention
from attention.variants.mixture_of_heads import mixture_of_heads_attention
from attention.variants.mixture_of_heads import MixtureOfHeadsAttention
from attention.variants.mixture_of_heads import moh_gates
from attention.variants.mixture_of_heads import query_norm_gates
