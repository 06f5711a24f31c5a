"""``hybridkv eval``: fidelity of HybridKV and the baselines against the full cache, on real weights.

Tasks (each prompt is prefilled **once**, densely; every (method, budget) then decodes from a fork of that prompt
state, see :class:`hybridkv_vllm.hf.generate.Session`):

- ``niah``: passkey retrieval in a GPL-3 haystack at several lengths and depths; greedy decoding of
  ``niah_new_tokens``; a hit iff the passkey appears in the output. Reported as accuracy, next to the full cache's.
- ``text`` / ``mm`` (long text prompts; multimodal prompts on a VL model): the full cache's greedy continuation
  of ``gen_tokens`` tokens is the reference. Each method is **teacher-forced** on it, and we report
  ``agreement`` = the fraction of those positions where the method's greedy (argmax) token equals the full cache's,
  and ``kl`` = mean ``KL(p_full || p_method)`` in nats over the same positions. Teacher forcing keeps one early
  divergence from counting as 64 misses, and gives KL and agreement from the same pass.
- ``full`` runs through the same code path (an oracle check: agreement 1, KL 0 up to float noise).

Methods share one :class:`BudgetConfig` per budget: HybridKV's per-head budgets come from the profile, the
baselines' are uniform (same total, see :mod:`hybridkv_vllm.core.policy`).
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hybridkv_vllm import __version__
from hybridkv_vllm.core.budgets import BudgetConfig
from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.policy import POLICIES, make_policy
from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.eval.metrics import mean_kl, passkey_found, top1_agreement
from hybridkv_vllm.eval.prompts import HAYSTACK_PATH, MULTIMODAL_EVAL, long_text_prompts, niah_prompts
from hybridkv_vllm.hf.generate import Session
from hybridkv_vllm.hf.inputs import LoadedModel, encode_chat, load_model
from hybridkv_vllm.profiler.images import load_image

__all__ = ["EvalConfig", "evaluate", "niah_hits", "run_from_args"]


@dataclass(frozen=True)
class EvalConfig:
    """Workload of one harness run (``quick()`` is the smoke-test size)."""

    budgets: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    methods: tuple[str, ...] = POLICIES
    niah_lengths: tuple[int, ...] = (1000, 2000, 4000)
    niah_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    niah_new_tokens: int = 12
    text_tokens: int = 2000
    num_text: int = 2
    num_mm: int = 2
    gen_tokens: int = 64
    sub_chunks: int = 0               # retrieval units per 16-token chunk of dynamic heads (0: the core's default)
    r: float = BudgetConfig(1.0).r                    # per-head ratio dynamic : static (the core's default)
    haystack: str = str(HAYSTACK_PATH)  # NIAH's haystack text (validation runs use another one)
    niah_seed: int = 0

    def quick(self) -> EvalConfig:
        return replace(self, niah_lengths=(160,), niah_depths=(0.25, 0.75), niah_new_tokens=6, text_tokens=160,
                       num_text=1, num_mm=1, gen_tokens=min(self.gen_tokens, 8))


#: The validation set (choosing the defaults' free parameters, ``benchmarks/validation_*.py``), kept apart from
#: the evaluation's prompts (``EvalConfig()``): another haystack (Debian's GFDL-1.2, for the needles and the long
#: texts), other needle depths and passkeys; the lengths of the first validation run.
VALIDATION = EvalConfig(haystack="/usr/share/common-licenses/GFDL-1.2", niah_lengths=(1000, 2000, 3400),
                        niah_depths=(0.25, 0.75), niah_seed=1)


def _policies(profile: HeadProfile, cfg: EvalConfig):
    """``[(method, budget, policy)]`` for every compressed method, plus the full-cache policy."""
    selection = SelectionConfig(sub_chunks=cfg.sub_chunks)
    full = make_policy("full", profile, BudgetConfig(1.0), selection)
    runs = [(m, b, make_policy(m, profile, BudgetConfig(b, r=cfg.r), selection))
            for b in cfg.budgets for m in cfg.methods if m != "full"]
    return full, runs


def niah_hits(lm: LoadedModel, full, policies: dict, cfg: EvalConfig) -> tuple[dict, int, int]:
    """Passkey hits of the NIAH prompts for each of ``policies`` (any keys), with the same prompts, greedy decoding
    and check as :func:`evaluate` (for ablations): ``(hits per key, the full cache's hits, number of prompts)``."""
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = niah_prompts(count, cfg.niah_lengths, cfg.niah_depths, seed=cfg.niah_seed, path=Path(cfg.haystack))
    hits, full_hits = dict.fromkeys(policies, 0), 0
    for p in prompts:
        session = Session(lm, encode_chat(lm, p.text), full)
        decode = lambda policy: lm.tokenizer.decode(session.greedy(policy, cfg.niah_new_tokens).tokens,  # noqa
                                                    skip_special_tokens=True)
        full_hits += passkey_found(decode(full), p.passkey)
        for key, policy in policies.items():
            hits[key] += passkey_found(decode(policy), p.passkey)
    return hits, full_hits, len(prompts)


def text_agreement(lm: LoadedModel, full, policies: dict, cfg: EvalConfig) -> tuple[dict, int]:
    """Mean teacher-forced top-1 agreement with the full cache's greedy continuation over the long-text prompts,
    for each of ``policies`` (any keys), with the same prompts and measure as :func:`evaluate`:
    ``(agreement per key, number of prompts)``."""
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    prompts = long_text_prompts(count, cfg.text_tokens, path=Path(cfg.haystack))[: cfg.num_text]
    total = dict.fromkeys(policies, 0.0)
    for p in prompts:
        session = Session(lm, encode_chat(lm, p.text), full)
        ref = session.greedy(full, cfg.gen_tokens, stop_at_eos=False)
        for key, policy in policies.items():
            total[key] += top1_agreement(ref.tokens, session.forced(policy, ref.tokens).logits)
    return {key: value / len(prompts) for key, value in total.items()}, len(prompts)


def _kept_fraction(session: Session, policy) -> float:
    counts = session.state_for(policy).kept_counts()
    return float(counts.double().mean()) / session.prompt.prompt_len


def evaluate(lm: LoadedModel, profile: HeadProfile, cfg: EvalConfig, progress: bool = True) -> dict:
    """Run every task; returns the ``results.json`` document (without the ``meta.wall_s`` of the caller)."""
    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    full, runs = _policies(profile, cfg)
    niah = niah_prompts(count, cfg.niah_lengths, cfg.niah_depths, seed=cfg.niah_seed, path=Path(cfg.haystack))
    texts = long_text_prompts(count, cfg.text_tokens, path=Path(cfg.haystack))[: cfg.num_text]
    mms = list(MULTIMODAL_EVAL[: cfg.num_mm]) if lm.is_multimodal else []
    total = (len(niah) + len(texts) + len(mms)) * (len(runs) + 1)
    bar = tqdm(total=total, desc="eval", unit="run", disable=not progress)
    rows: list[dict] = []
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    for p in niah:
        enc = encode_chat(lm, p.text)
        s = Session(lm, enc, full)
        ref = lm.tokenizer.decode(s.greedy(full, cfg.niah_new_tokens).tokens, skip_special_tokens=True)
        base = {"task": "niah", "prompt": p.name, "prompt_tokens": enc.prompt_len, "depth": p.depth}
        rows.append({**base, "method": "full", "budget": 1.0, "hit": passkey_found(ref, p.passkey), "output": ref,
                     "kept_fraction": 1.0})
        bar.update()
        for method, budget, policy in runs:
            out = lm.tokenizer.decode(s.greedy(policy, cfg.niah_new_tokens).tokens, skip_special_tokens=True)
            rows.append({**base, "method": method, "budget": budget, "hit": passkey_found(out, p.passkey),
                         "output": out, "kept_fraction": _kept_fraction(s, policy)})
            bar.update()
    seconds["niah"] = time.perf_counter() - t0

    for task, prompts in (("text", texts), ("mm", mms)):
        t0 = time.perf_counter()
        for p in prompts:
            images = [load_image(src) for src in getattr(p, "images", ())]
            enc = encode_chat(lm, getattr(p, "instruction", None) or p.text, images)
            s = Session(lm, enc, full)
            ref = s.greedy(full, cfg.gen_tokens, stop_at_eos=False)
            base = {"task": task, "prompt": p.name, "prompt_tokens": enc.prompt_len}
            for method, budget, policy in [("full", 1.0, full), *runs]:
                got = s.forced(policy, ref.tokens)
                rows.append({**base, "method": method, "budget": budget,
                             "agreement": top1_agreement(ref.tokens, got.logits), "kl": mean_kl(ref.logits, got.logits),
                             "kept_fraction": 1.0 if method == "full" else _kept_fraction(s, policy)})
                bar.update()
        seconds[task] = time.perf_counter() - t0
    bar.close()
    return {"rows": rows, "summary": summarise(rows, cfg), "task_seconds": seconds,
            "workload": {"niah": [p.name for p in niah], "text": [p.name for p in texts],
                         "mm": [p.name for p in mms]}}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(rows: list[dict], cfg: EvalConfig) -> list[dict]:
    """One entry per (method, budget): NIAH accuracy, agreement and KL per task, kept fraction.

    ``full`` is computed once and reported at every budget.
    """
    out = []
    for budget in cfg.budgets:
        for method in cfg.methods:
            pick = [r for r in rows if r["method"] == method and (method == "full" or r["budget"] == budget)]
            entry = {"method": method, "budget": budget}
            hits = [float(r["hit"]) for r in pick if r["task"] == "niah"]
            entry["niah_acc"] = _mean(hits)
            for task in ("text", "mm"):
                sel = [r for r in pick if r["task"] == task]
                entry[f"agreement_{task}"] = _mean([r["agreement"] for r in sel])
                entry[f"kl_{task}"] = _mean([r["kl"] for r in sel])
            sel = [r for r in pick if r["task"] in ("text", "mm")]
            entry["agreement"] = _mean([r["agreement"] for r in sel])
            entry["kl"] = _mean([r["kl"] for r in sel])
            entry["kept_fraction"] = _mean([r["kept_fraction"] for r in pick])
            out.append(entry)
    return out


def goals(summary: list[dict]) -> dict:
    """The issue's goals, evaluated on ``summary`` (None where a budget or method was not run)."""
    at = {(e["method"], e["budget"]): e for e in summary}
    res: dict = {}
    full10, hyb10 = at.get(("full", 0.1)), at.get(("hybridkv", 0.1))
    if full10 and hyb10 and hyb10["niah_acc"] is not None:
        res["niah_equal_full_at_10pct"] = {"hybridkv": hyb10["niah_acc"], "full": full10["niah_acc"],
                                           "met": hyb10["niah_acc"] >= full10["niah_acc"]}
    hyb20 = at.get(("hybridkv", 0.2))
    if hyb20 and hyb20["agreement"] is not None:
        res["agreement_ge_95pct_at_20pct"] = {"hybridkv": hyb20["agreement"], "met": hyb20["agreement"] >= 0.95}
    better = []
    for (method, budget), e in sorted(at.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if method in ("full", "hybridkv"):
            continue
        h = at.get(("hybridkv", budget))
        if h is None:
            continue
        for metric, higher in (("niah_acc", True), ("agreement", True), ("kl", False)):
            if h[metric] is None or e[metric] is None:
                continue
            ok = h[metric] >= e[metric] if higher else h[metric] <= e[metric]
            better.append({"budget": budget, "baseline": method, "metric": metric, "hybridkv": h[metric],
                           "baseline_value": e[metric], "hybridkv_at_least_as_good": ok})
    res["better_than_baselines"] = {"comparisons": better,
                                    "met": all(c["hybridkv_at_least_as_good"] for c in better) if better else None}
    return res


def run_from_args(args: argparse.Namespace) -> int:
    """The ``hybridkv eval`` command: load, evaluate, write ``results.json``, ``table.md``, ``plot.png``."""
    from hybridkv_vllm.eval.report import write_outputs

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in POLICIES]
    if unknown or not methods:
        raise ConfigError(f"--methods {args.methods!r}: expected a comma-separated subset of {','.join(POLICIES)}")
    cfg = EvalConfig(budgets=tuple(args.budgets), methods=methods, gen_tokens=args.gen_tokens)
    cfg = replace(cfg, **{k: v for k, v in (("sub_chunks", args.sub_chunks), ("r", args.r)) if v is not None})
    if args.quick:
        cfg = cfg.quick()
    if getattr(args, "niah_lengths", None):
        cfg = replace(cfg, niah_lengths=tuple(args.niah_lengths))
    t0 = time.perf_counter()
    lm = load_model(args.model)
    profile = HeadProfile.load(args.profile, expect=ModelIdentity.from_hf_config(lm.model.config))
    doc = evaluate(lm, profile, cfg, progress=not args.no_progress)
    wall = time.perf_counter() - t0
    doc["goals"] = goals(doc["summary"])
    doc["meta"] = {"model": str(args.model), "profile": str(args.profile), "config": asdict(cfg),
                   "quick": bool(args.quick), "tool_version": __version__, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {_cpus()} CPUs",
                   "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
                   "wall_s": round(wall, 1)}
    paths = write_outputs(doc, args.out)
    print(Path(paths["table"]).read_text(encoding="utf-8"))
    print(f"wall time {wall:.1f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
