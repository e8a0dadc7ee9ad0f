"""Compute kernels behind one functional API each: a PyTorch reference and, where it pays, a fast path.

Imported as ``psm_train.kernels`` (mapped in pyproject.toml).
"""
