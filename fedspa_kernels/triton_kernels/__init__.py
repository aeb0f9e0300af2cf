"""Triton kernels, imported lazily on first use (so TRITON_INTERPRET can be set before, and so the package
imports without triton installed)."""
