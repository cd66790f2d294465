"""Triton kernels of the model blocks. Each has a torch twin that defines its numerics."""
