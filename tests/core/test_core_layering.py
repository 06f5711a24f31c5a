"""The core imports neither vllm nor transformers (DESIGN §0): every module under hybridkv_vllm.core is
imported in a fresh interpreter, which must end up with neither in ``sys.modules``."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import hybridkv_vllm.core

MODULES = sorted(m.name for m in pkgutil.walk_packages(hybridkv_vllm.core.__path__, "hybridkv_vllm.core."))


def test_modules_discovered():
    assert {"hybridkv_vllm.core.profile", "hybridkv_vllm.core.reference", "hybridkv_vllm.core.policy"} <= set(MODULES)


def test_core_imports_no_engine():
    code = (f"import sys, hybridkv_vllm.core, {', '.join(MODULES)}; "
            "bad = [m for m in ('vllm', 'transformers') if m in sys.modules]; "
            "assert not bad, f'core pulled in {bad}'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
