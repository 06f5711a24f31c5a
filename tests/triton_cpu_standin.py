"""A stand-in "cpu" entry in Triton's backend table, so that vLLM's CPU build runs Model Runner V2 in the tests.

vLLM accepts Triton on its CPU build only if ``triton.backends.backends`` has a "cpu" entry
(``vllm/triton_utils/importing.py``), and Model Runner V2 requires Triton (``VllmConfig.use_v2_model_runner``).
Triton's pip wheel has no CPU backend; under ``TRITON_INTERPRET=1`` (``make test``) no backend compiles anything,
so an entry whose driver reports itself inactive is enough for V2's Triton kernels to run on the interpreter.
It must be registered before vLLM is first imported (vLLM reads the table once). Tests only: the product never
registers it (an operator on the CPU build keeps Model Runner V1, vLLM's CPU default without Triton).

With the entry, vLLM's default runner on the CPU build becomes V2, as on CUDA; ``VLLM_USE_V2_MODEL_RUNNER=0``
selects V1 (tests/engine/conftest.py: the ``runner`` fixture).
"""
from __future__ import annotations

import os
import sys
import types


class _InactiveDriver:
    @staticmethod
    def is_active() -> bool:
        return False


def install() -> bool:
    """Register the entry (idempotent). False when Triton is absent, vLLM was imported first, or the interpreter is
    off (``TRITON_INTERPRET=1``, which ``make test`` sets): without it vLLM would launch compiled kernels here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if "vllm.triton_utils.importing" in sys.modules:
        return "cpu" in _backends()
    try:
        backends = _backends()
    except ImportError:
        return False
    backends.setdefault("cpu", types.SimpleNamespace(compiler=None, driver=_InactiveDriver))
    return True


def _backends() -> dict:
    from triton.backends import backends
    return backends
