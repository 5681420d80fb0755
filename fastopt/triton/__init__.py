"""Triton kernels (``@triton.jit``) and their launchers, one module per kernel family.

Launchers are plain functions of tensors, so tests can call them on CPU tensors under
``TRITON_INTERPRET=1`` (set before this package is imported)."""
