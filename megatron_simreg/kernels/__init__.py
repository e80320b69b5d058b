"""Fused GPU kernels (Triton); imported only when ``impl="triton"`` asks for them."""
