"""Triton import shim: kernel modules import on machines without Triton (then only the references run).

The vLLM pattern (``vllm/triton_utils``): when Triton is absent, ``triton.jit`` is an identity decorator and
``tl.constexpr`` a plain annotation, so each kernel file still imports and ``run()`` falls back to its reference.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit, cdiv=lambda a, b: -(-a // b))
    tl = SimpleNamespace(constexpr=int)

LOG2E = 1.4426950408889634  # log2(e): the kernels use exp2
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def use_triton(*tensors, backend: str = "auto") -> bool:
    """The dispatch rule every ``run()`` shares.

    ``backend="auto"``: Triton when every tensor is on CUDA (or the interpreter is on), else the reference.
    ``"triton"`` / ``"torch"`` force one path (``"triton"`` raises ``RuntimeError`` if Triton is missing).
    """
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but Triton is not installed")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if not HAS_TRITON:
        return False
    return all(t.is_cuda for t in tensors)


def table_3d(block_table, num_kv_heads: int):
    """A block table ``[B, M]`` (shared by all KV heads) or ``[B, H, M]`` (per head) as a ``[B, H, M]`` view.

    The 2-D form is expanded with a zero head stride (no copy), so kernels address both the same way.
    """
    if block_table.dim() == 2:
        return block_table[:, None, :].expand(block_table.shape[0], num_kv_heads, block_table.shape[1])
    if block_table.dim() == 3 and block_table.shape[1] == num_kv_heads:
        return block_table
    raise ValueError(f"block_table must be [B, M] or [B, {num_kv_heads}, M], got {tuple(block_table.shape)}")
