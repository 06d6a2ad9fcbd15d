"""Implementations behind `attention.dot_product_attention` (see kernels/README.md)."""
