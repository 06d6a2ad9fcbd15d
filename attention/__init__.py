"""attnlab attention: functional attention variants, masks and the dispatch API."""

from attention import masks
from attention.api import available_implementations
from attention.api import dot_product_attention
from attention.api import register_implementation

__all__ = [
    'available_implementations',
    'dot_product_attention',
    'masks',
    'register_implementation',
]
