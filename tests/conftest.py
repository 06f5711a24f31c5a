"""Loaded before any test module imports vLLM: Model Runner V2 on the CPU build needs the Triton stand-in."""
import triton_cpu_standin

triton_cpu_standin.install()
