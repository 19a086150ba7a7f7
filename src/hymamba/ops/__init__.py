"""Selective-scan operators: reference, fast pure-PyTorch and compiled kernels."""
