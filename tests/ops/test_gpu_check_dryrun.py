"""benchmarks/gpu_check.py, the one-shot check for a lent GPU machine, runs end to end here in its dry-run mode.

The GPU run happens once, on a machine without this project's tools, so the script must not first fail there: the
dry run takes every code path (the product imports, the test subprocesses and their vLLM deselection, the decode
layer step through ``run_layer`` / ``TritonKVOps``, the swap-in paths) on the CPU under ``TRITON_INTERPRET=1`` with
tiny shapes, and its section 3 compares the step's output with the PyTorch reference.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("environment", "kernel_tests", "decode_step", "cold_tier_swap_in", "end_to_end")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return proc, out


@pytest.mark.triton
def test_dry_run_exits_0_and_writes_both_reports(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    md = (out / "gpu_check.md").read_text()
    assert md in proc.stdout                                     # the markdown is printed too
    for n in range(1, 6):
        assert f"## {n}. " in md


@pytest.mark.triton
def test_every_section_ran_without_error(dry_run):
    _, out = dry_run
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] is True and doc["ok"] is True
    assert set(doc["sections"]) == set(SECTIONS)
    for name, section in doc["sections"].items():
        assert section["status"] == "ok" and section["error"] is None, (name, section["error"])
    env = doc["sections"]["environment"]["data"]
    assert env["dry_run"] is True and "--dry-run" in env["command"]
    groups = doc["sections"]["kernel_tests"]["data"]["groups"]
    assert all(g["rc"] == 0 for g in groups.values())
    # the dry run pretends vLLM is missing, as on the GPU machine: the executor's vLLM tests are deselected
    deselected = [i.split("::")[-1] for i in groups["core + executor"]["deselected"]]
    assert any("prefill" in i for i in deselected)                        # vLLM's Triton kernel
    assert any(i.startswith("test_decode_step") and "cpu" in i for i in deselected)   # vLLM's CPU kernels
    assert not any("triton" in i for i in deselected if not i.startswith("test_prefill"))


@pytest.mark.triton
def test_decode_step_matches_the_reference_within_tolerance(dry_run):
    _, out = dry_run
    data = json.loads((out / "gpu_check.json").read_text())["sections"]["decode_step"]["data"]
    assert data["rows"] and not data["errors"] and not data["skipped"]
    assert {(c["batch"], c["ctx"]) for c in data["checks"]} == {(r["batch"], r["ctx"]) for r in data["rows"]}
    for c in data["checks"]:
        # a real comparison: the bf16 output differs from the fp32 reference by rounding, never exactly 0 ...
        assert math.isfinite(c["max_abs_err"]) and 0 < c["max_abs_err"] <= c["tol"], c
        assert c["ref_max_abs"] > 0 and 0 < c["tol"] < 0.1
        # ... and the check can fail: the reference over a wrong chunk selection is far outside the tolerance
        assert c["control_err"] > c["tol"], c
        assert c["selection_agree"] == c["dynamic_heads"]
        assert 0 < c["dense_max_abs_err"] <= c["dense_tol"]
    for r in data["rows"]:
        assert r["chunks_moved_swap_step"] > 0                   # the swap variant really swaps chunks in
        assert r["step_bytes"] < r["dense_bytes"]


@pytest.mark.triton
def test_swap_in_paths_reproduce_the_cold_pages(dry_run):
    _, out = dry_run
    data = json.loads((out / "gpu_check.json").read_text())["sections"]["cold_tier_swap_in"]["data"]
    assert data["uva_kernel_error"] is None
    assert data["rows"] and all(r["host_path_correct"] and r["uva_kernel_correct"] for r in data["rows"])
    assert data["pinned_step"] and all(r["pinned_error"] is None for r in data["pinned_step"])
