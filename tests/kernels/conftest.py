"""Kernel tests: Triton under the interpreter on the CPU (default), or natively with ``TRITON_INTERPRET=0`` on CUDA.

``TRITON_INTERPRET`` must be set before Triton is first imported, so it is set here, at collection time.
"""
import importlib.util
import os
import sys
from pathlib import Path

_TRITON_PREIMPORTED = "triton" in sys.modules
_ENV_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]
try:  # installed (editable) -> the real package; a bare checkout (e.g. the GPU box) -> load kernels/ under its name
    import hybridkv_kernels  # noqa: F401
except ImportError:  # pragma: no cover
    spec = importlib.util.spec_from_file_location("hybridkv_kernels", _ROOT / "kernels" / "__init__.py",
                                                  submodule_search_locations=[str(_ROOT / "kernels")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["hybridkv_kernels"] = module
    spec.loader.exec_module(module)
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
# ``@triton.jit`` (Triton's own ``tl.*`` helpers included) picks interpreter or compiler when it is imported, so
# a Triton imported earlier in the session (by another test folder) ignores the variable set above.
_LATE = _TRITON_PREIMPORTED and _ENV_PREVIOUS is None


@pytest.fixture(scope="session")
def device() -> str:
    """Where the Triton path runs: the CPU under the interpreter, else CUDA (skipped when absent)."""
    if _LATE:
        pytest.fail("Triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                    "export TRITON_INTERPRET=1 (CPU) or 0 (CUDA) for the whole session")
    if INTERPRET:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device")
    return "cuda"
