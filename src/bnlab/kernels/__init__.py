"""Kernels: the only place that decides how a hot loop is compiled (numba on the CPU, Triton on GPUs)."""
