"""Check every vLLM symbol the plugin touches (``hybridkv_vllm.adapter.vllm_surface.SURFACE``) against vLLM releases,
and write the report (``docs/vllm_surface.md``).

    .venv/bin/python scripts/check_vllm_surface.py 0.33.0 0.34.0 --out docs/vllm_surface.md

Each release's wheel is downloaded without dependencies (``pip download vllm==X --no-deps``) and only its ``.py``
files are unzipped; nothing is installed or imported. The installed vLLM is checked as well (the first column).
``--sources VERSION=DIR`` uses an already unzipped tree (the directory holding ``vllm/``) instead of downloading.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from hybridkv_vllm import VLLM_REQUIREMENT
from hybridkv_vllm.adapter.vllm_surface import SURFACE, Finding, check_tree, problems

#: How the plugin meets a symbol that a release lacks (by symbol), for the report.
HOW_MET = {
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states":
        "Model Runner V1 hooks are applied only where V1 exists (patches.patch_v1_runner); V2's are always applied",
    "vllm.v1.worker.gpu_model_runner.GPUModelRunner._build_attention_metadata":
        "as above",
    "vllm.v1.core.sched.output.CachedRequestData":
        "read only by the V1 hook, with getattr (V2 receives resumed requests as new ones)",
}


#: Changes a symbol check cannot see (read from the 0.33 / 0.34 sources; ../shared/research/peers_and_vllm_0.34.md).
BEHAVIOUR = [
    ("0.34: Model Runner V1 deleted, V2 the only runner",
     "the V2 hooks (add_requests, finish_requests, prepare_attn, prepare_dummy_attn) are the plugin's main path; "
     "the engine tests run under V2 and V1 on vLLM 0.32's CPU build"),
    ("0.34: default block size 64 (was 16)",
     "budgets, units and tables are sized from `cache_config.block_size` at start-up; the backend declares "
     "`MultipleOf(32)`, so 64 is accepted (engine test at `--block-size 64`)"),
    ("0.34: vLLM's CPU kernels moved from `vllm._custom_ops` to `vllm._cpu_ops`",
     "`kv_ops.cpu_ops()` takes `_cpu_ops` where it exists (no CPU wheel of 0.34 exists to run it)"),
    ("0.34: extensible KV cache sized from the memory free after warm-up (CUDA)",
     "NOT MET yet: device buffers the plugin allocates after warm-up are outside vLLM's budget (issue: CUDA "
     "start-up); serve with `--gpu-memory-utilization` below 1.0 until then"),
    ("0.33: KV-cache planning moved to `vllm/v1/core/kv_cache_planning.py`", "the plugin does not import it"),
]


def _installed_root() -> Path:
    import importlib.util
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise SystemExit("vLLM is not installed here")
    return Path(spec.origin).parent.parent


def _installed_version() -> str:
    from importlib.metadata import version
    return version("vllm")


def _download(version: str, into: Path) -> Path:
    wheel_dir = into / f"wheel-{version}"
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps", "--only-binary=:all:",
                    "-q", "-d", str(wheel_dir)], check=True)
    wheel = next(wheel_dir.glob("vllm-*.whl"))
    root = into / f"src-{version}"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root, [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    return root


def _cell(finding: Finding) -> str:
    if not finding.problem:
        return "ok"
    return ("missing (optional): " if not finding.symbol.required else "**BROKEN**: ") + finding.problem


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("versions", nargs="*", help="vLLM releases to check, e.g. 0.33.0 0.34.0")
    ap.add_argument("--sources", action="append", default=[], metavar="VERSION=DIR",
                    help="an unzipped source tree to use for VERSION instead of downloading it")
    ap.add_argument("--out", type=Path, help="write the markdown report here (default: print it)")
    args = ap.parse_args(argv)

    given = dict(item.split("=", 1) for item in args.sources)
    columns: list[tuple[str, list[Finding]]] = [(f"{_installed_version()} (installed)", check_tree(_installed_root()))]
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            root = Path(given[version]) if version in given else _download(version, Path(tmp))
            columns.append((version, check_tree(root)))

    lines = ["# vLLM symbols the plugin touches, checked per release", "",
             f"Declared range: `{VLLM_REQUIREMENT}` (setup.py and the start-up check). Written by "
             f"`scripts/check_vllm_surface.py {' '.join(args.versions)}`: each release's Python sources, read with "
             "`ast` (nothing imported). The list itself is `hybridkv_vllm/adapter/vllm_surface.py`; "
             "`tests/adapter/test_vllm_surface.py` checks it against the installed vLLM in `make test`.", ""]
    lines.append("| symbol | parameters / fields relied on | " + " | ".join(c for c, _ in columns) + " |")
    lines.append("|---|---|" + "---|" * len(columns))
    for i, symbol in enumerate(SURFACE):
        relied = ", ".join(symbol.params + symbol.fields) or "-"
        cells = " | ".join(_cell(findings[i]) for _, findings in columns)
        lines.append(f"| `{symbol.where}` | {relied} | {cells} |")
    lines += ["", "## What is missing or changed, and how the plugin meets it", ""]
    any_gap = False
    for column, findings in columns:
        for finding in findings:
            if finding.problem:
                any_gap = True
                how = HOW_MET.get(finding.symbol.where, "NOT MET: the plugin breaks on this release")
                lines.append(f"- {column}: `{finding.symbol.where}`: {finding.problem}. {how}.")
    if not any_gap:
        lines.append("- nothing: every symbol is present as the plugin uses it.")
    lines += ["", "## Behaviour changes a symbol check cannot see", ""]
    lines += [f"- {change}: {how}." for change, how in BEHAVIOUR]
    broken = [(c, f) for c, findings in columns for f in problems(findings)]
    lines += ["", f"Required symbols broken: {len(broken)}.", ""]
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
