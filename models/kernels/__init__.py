"""Compute kernels and their PyTorch references (same signatures); `run.kernels` picks one."""
