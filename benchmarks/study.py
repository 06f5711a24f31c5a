"""What the fidelity studies (``ablation_*.py``, ``validation_*.py``) share: their command line, what they load
(the model, its head profile, the budgets; one CPU thread, so figures compare across runs) and how they write their
table (the file and the terminal)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hybridkv_vllm.core import HeadProfile
from hybridkv_vllm.hf.inputs import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[1]


def parser(doc: str, budgets: str = "0.05,0.1", profile: bool = True) -> argparse.ArgumentParser:
    """``--model``, ``--profile`` (unless ``profile=False``), ``--budgets`` and ``--out``; a study adds its own."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-vl")
    if profile:
        p.add_argument("--profile", type=Path, default=ROOT / "configs" / "profiles" / "smollm2-vl.json")
    p.add_argument("--budgets", default=budgets)
    p.add_argument("--out", type=Path, required=True)
    return p


def start(args: argparse.Namespace) -> tuple[float, LoadedModel, HeadProfile | None, list[float]]:
    """``(start time, model, profile or None, budgets)``, on one CPU thread."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    profile = HeadProfile.load(args.profile) if getattr(args, "profile", None) else None
    return started, load_model(args.model), profile, [float(b) for b in args.budgets.split(",")]


def write(out: Path, lines: list[str]) -> int:
    """The table to ``out`` and the terminal; the exit status."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
