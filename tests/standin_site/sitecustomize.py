"""Tensor-parallel vLLM workers are spawned as fresh interpreters: this folder on their ``PYTHONPATH`` registers the
Triton stand-in there before vLLM is imported (tests/triton_cpu_standin.py), so they can run Model Runner V2 like the
test process (tests/engine/test_tensor_parallel.py sets it)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton_cpu_standin  # noqa: E402

triton_cpu_standin.install()
