"""vLLM's own Triton attention kernel, ``unified_attention``, which ``kv_ops.TritonKVOps`` uses for prefill rows.

Prefill attends densely through vLLM's kernel over the same pages the project's kernels read: a one-head virtual
layer's page is ``[2 * bs, D]`` (K rows, then V rows), so the pool seen as ``[NP, bs, 1, D]`` K and V views is the
paged layout the kernel takes (``num_kv_heads = 1``), and every (KV head, prefill row) pair is one of its
sequences with the head's global pages as its block table.

On CUDA the kernel module imports as vLLM ships it. On vLLM's CPU build ``vllm.triton_utils`` binds placeholders
instead of Triton (Triton has no CPU backend there), so under ``TRITON_INTERPRET=1`` (the tests) the two kernel
modules are imported once more, privately, with ``vllm.triton_utils`` bound to the real Triton for the duration of
the import: the interpreter then runs vLLM's kernel on CPU tensors. Nothing else in the process changes: the
modules vLLM already imported and ``vllm.triton_utils`` itself are restored.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from typing import Callable

_MODULES = ("vllm.v1.attention.ops.triton_attention_helpers", "vllm.v1.attention.ops.triton_unified_attention")


@functools.cache
def unified_attention() -> Callable:
    """``vllm.v1.attention.ops.triton_unified_attention.unified_attention``, bound to a working Triton."""
    import vllm.triton_utils as tu
    if tu.HAS_TRITON:
        return importlib.import_module(_MODULES[1]).unified_attention
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("HybridKV: vLLM disabled Triton on this platform; its Triton attention kernel runs here "
                           "only under TRITON_INTERPRET=1")
    import triton
    import triton.language as tl
    saved_bindings = (tu.triton, tu.tl, tu.HAS_TRITON)
    package = importlib.import_module(_MODULES[0].rpartition(".")[0])
    saved_modules = {name: sys.modules.pop(name) for name in _MODULES if name in sys.modules}
    saved_attrs = {name: getattr(package, name.rpartition(".")[2], None) for name in _MODULES}
    tu.triton, tu.tl, tu.HAS_TRITON = triton, tl, True
    try:
        return importlib.import_module(_MODULES[1]).unified_attention
    finally:
        tu.triton, tu.tl, tu.HAS_TRITON = saved_bindings
        for name in _MODULES:
            sys.modules.pop(name, None)
            short = name.rpartition(".")[2]
            if saved_attrs[name] is None:
                package.__dict__.pop(short, None)
            else:
                setattr(package, short, saved_attrs[name])
        sys.modules.update(saved_modules)
