"""Every vLLM symbol the plugin touches is in the installed vLLM as the plugin uses it; the source checker that
reports on other releases agrees with Python's own imports here and reports what is taken away; the declared vLLM
range is one statement, read by setup.py and the start-up check alike."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from hybridkv_vllm import VLLM_REQUIREMENT
from hybridkv_vllm.adapter import vllm_surface
from hybridkv_vllm.adapter.vllm_surface import SURFACE, Symbol, check_tree, problems

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm


def _installed_root() -> Path:
    return Path(importlib.util.find_spec("vllm").origin).parent.parent


def test_every_symbol_is_in_the_installed_vllm():
    findings = check_tree(_installed_root())
    assert [f"{f.symbol.where}: {f.problem}" for f in findings if f.problem] == []


def _resolve(symbol: Symbol):
    module_name = next(m for m in symbol.module.split("|") if importlib.util.find_spec(m) is not None)
    obj = importlib.import_module(module_name)
    for part in symbol.name.split("."):
        obj = getattr(obj, part)
    return obj


def test_the_source_checker_agrees_with_imports():
    """The oracle for the ``ast`` reading: importing each symbol and reading its signature (modules that need a GPU
    build, e.g. ``vllm.platforms.cuda``, are skipped; most import here)."""
    checked = 0
    for symbol in SURFACE:
        try:
            obj = _resolve(symbol)
        except (ImportError, RuntimeError, OSError):
            continue
        checked += 1
        if symbol.params:
            names = set(inspect.signature(obj).parameters)
            assert set(symbol.params) <= names, (symbol.where, names)
        for name in symbol.fields:
            has = (name in getattr(obj, "__dataclass_fields__", {}) or hasattr(obj, name)
                   or name in getattr(obj, "__annotations__", {}) or name in inspect.getsource(obj))
            assert has, (symbol.where, name)
    assert checked >= len(SURFACE) - 3


def _fake_vllm(tmp_path: Path, runner_source: str) -> Path:
    """A vLLM tree of one module: the V2 model runner as ``runner_source`` writes it."""
    pkg = tmp_path / "vllm"
    for sub in ("", "v1", "v1/worker", "v1/worker/gpu"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "v1/worker/gpu/model_runner.py").write_text(runner_source)
    return tmp_path


def test_a_removed_method_or_parameter_is_reported(tmp_path):
    root = _fake_vllm(tmp_path, "class Base:\n    def finish_requests(self, scheduler_output): ...\n"
                                "class GPUModelRunner(Base):\n"
                                "    def add_requests(self, output): ...\n"          # parameter renamed
                                "    def prepare_attn(self, input_batch, **kw): ...\n")
    found = {f.symbol.name: f.problem for f in check_tree(root) if f.symbol.module == vllm_surface.V2}
    assert found["GPUModelRunner.finish_requests"] == ""                              # inherited: found
    assert "lost parameters ['scheduler_output']" in found["GPUModelRunner.add_requests"]
    assert found["GPUModelRunner.prepare_attn"] == ""
    assert "missing" in found["GPUModelRunner.prepare_dummy_attn"]
    # the V1 runner is absent from this tree: reported, but not a problem (the plugin hooks V1 only where it exists)
    v1 = [f for f in check_tree(root) if f.symbol.module == vllm_surface.V1]
    assert v1 and all(f.problem for f in v1) and not set(problems(v1))


def test_committed_report_lists_every_symbol():
    report = (ROOT / "docs" / "vllm_surface.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \|", report, re.M)
    assert rows == [s.where for s in SURFACE], "re-run scripts/check_vllm_surface.py (see its docstring)"
    assert "Required symbols broken: 0." in report


def test_declared_range_is_stated_once():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    from hybridkv_vllm.adapter.patches import vllm_version_supported
    assert f'VLLM_REQUIREMENT = "{VLLM_REQUIREMENT}"' not in (ROOT / "setup.py").read_text()
    declared = {str(Requirement(r)) for r in requires("hybridkv-vllm") or []}
    assert str(Requirement(VLLM_REQUIREMENT)) in declared               # the installed metadata carries it
    assert vllm_version_supported()                                       # the vLLM these tests run on
    assert vllm_version_supported("0.32.0+cpu") and vllm_version_supported("0.34.2")
    assert not vllm_version_supported("0.31.9") and not vllm_version_supported("0.35.0")
