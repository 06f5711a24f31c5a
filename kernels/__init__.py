"""hybridkv_kernels: Triton kernels for HybridKV, each beside the PyTorch reference that defines it."""
