"""The ``hybridkv`` console script: a plain argparse dispatch, one function per subcommand.

    hybridkv profile --model DIR --out FILE [--theta 0.9] [--reference-tokens 512,1024,2048,4096] [--report-dir DIR]
    hybridkv eval    --model DIR --profile FILE [--budgets 0.05,0.1,0.2,0.4] --out DIR [--quick]

Subcommands import their modules lazily, so ``hybridkv --help`` is fast and each subcommand pulls in only what it
needs. Every model is loaded offline (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


# One intra-op thread by default: on a small machine shared with other jobs, 2 OpenMP threads on 2 busy cores
# spin-wait and ran up to ~28x slower (measured: a 12-token generation test took 163 s with 2 threads, 6 s with 1).
DEFAULT_THREADS = 1


def _setup_torch(threads: int | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(threads or int(os.environ.get("HYBRIDKV_THREADS", DEFAULT_THREADS)))


def cmd_profile(args: argparse.Namespace) -> int:
    _setup_torch(args.threads)
    from hybridkv_vllm.hf.inputs import load_model
    from hybridkv_vllm.profiler.report import text_table, write_report
    from hybridkv_vllm.profiler.run import one_type_warning, profile_model

    lm = load_model(args.model)
    run = profile_model(lm, theta=args.theta, created=args.created, model_path=args.model,
                        progress=not args.no_progress, reference_tokens=args.reference_tokens)
    run.profile.save(args.out)
    print(text_table(run.profile))
    warning = one_type_warning(run.profile)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {args.out} ({len(run.prompt_tokens)} prompts, {sum(run.prompt_tokens)} tokens, "
          f"{run.seconds:.1f} s)")
    if args.report_dir:
        paths = write_report(run.profile, args.report_dir, seconds=run.seconds)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _setup_torch(args.threads)
    from hybridkv_vllm.eval.harness import run_from_args

    return run_from_args(args)


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--niah-lengths {text!r}: expected comma-separated integers") from exc
    if not values or min(values) < 16:
        raise argparse.ArgumentTypeError(f"--niah-lengths {text!r}: every length must be >= 16 tokens")
    return values


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: expected comma-separated fractions") from exc
    bad = [b for b in values if not 0.0 < b <= 1.0]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--budgets {text!r}: every budget must be in (0, 1]")
    return values


def _reference_tokens(text: str) -> tuple[int, ...]:
    from hybridkv_vllm.profiler.calibration import CONTEXT_TOKENS
    from hybridkv_vllm.profiler.run import QUERY_WINDOW

    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--reference-tokens {text!r}: expected comma-separated integers") from exc
    if not values or values[0] < QUERY_WINDOW or values[-1] + QUERY_WINDOW > CONTEXT_TOKENS:
        raise argparse.ArgumentTypeError(
            f"--reference-tokens {text!r}: every length must lie in [{QUERY_WINDOW}, "
            f"{CONTEXT_TOKENS - QUERY_WINDOW}] (a query window, and the text every calibration prompt holds less a "
            "window)")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridkv", description="HybridKV head-level KV-cache compression tools")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="classify KV heads as static/dynamic on the calibration set")
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--out", required=True, help="head-profile JSON to write")
    p.add_argument("--theta", type=float, default=0.9, help="static iff sparsity score >= theta (default 0.9)")
    p.add_argument("--reference-tokens", type=_reference_tokens, default="512,1024,2048,4096",
                   help="context lengths at which heads are scored, comma-separated (default 512,1024,2048,4096); "
                        "match the prompt lengths you serve")
    p.add_argument("--report-dir", help="also write report.md and score_histogram.png here")
    p.add_argument("--created", help="provenance.created (ISO-8601; default now) for reproducible output")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default 1, or $HYBRIDKV_THREADS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_profile)

    e = sub.add_parser("eval", help="fidelity harness: NIAH, greedy agreement, KL vs the full cache")
    e.add_argument("--model", required=True,
                   help="HF model directory (a VL model serves the text and the image prompts)")
    e.add_argument("--profile", required=True, help="head profile of --model")
    e.add_argument("--budgets", type=_budgets, default=[0.05, 0.1, 0.2, 0.4], help="comma-separated fractions")
    e.add_argument("--methods", default="full,hybridkv,streaming,snapkv,random", help="comma-separated policies")
    e.add_argument("--out", required=True, help="output folder (results.json, table.md, plot.png)")
    e.add_argument("--quick", action="store_true", help="tiny workload for smoke tests")
    e.add_argument("--gen-tokens", type=int, default=64, help="generated tokens compared (default 64)")
    e.add_argument("--niah-lengths", type=_lengths, default=None,
                   help="NIAH haystack lengths in tokens, comma-separated (default 1000,2000,4000)")
    e.add_argument("--sub-chunks", type=int, default=None,
                   help="retrieval units per 16-token chunk of dynamic heads (default 2: the core's 8-token units)")
    e.add_argument("--r", type=float, default=None,
                   help="per-head budget ratio dynamic : static (default: the core's, 2.0)")
    e.add_argument("--threads", type=int, help="torch intra-op threads (default 1, or $HYBRIDKV_THREADS)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; a named validation error (bad profile, budget, image source, ...) exits with 2."""
    args = build_parser().parse_args(argv)
    from hybridkv_vllm.core.errors import HybridKVError

    try:
        return int(args.func(args) or 0)
    except (HybridKVError, FileNotFoundError) as exc:
        print(f"hybridkv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
