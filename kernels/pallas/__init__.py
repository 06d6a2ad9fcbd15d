"""Pallas block-sparse flash-attention kernels (TPU: `tpu`, GPU: `gpu`).

Both consume the compiled `attention.masks.BlockMask`; see kernels/README.md for what
was verified in interpret mode and what only hardware can confirm.
"""
