"""Pallas kernels (jax only): one folder per kernel with reference.py, tpu.py, gpu.py, api.py."""
