"""Head statistic ablation: is a head's score stable across context lengths, and which statistic keeps NIAH?

One pass over the calibration set (``hybridkv-calib-v2``) scores every KV head at each reference length with two
statistics, both text-centric and averaged over the GQA group:

- ``concentration``: ``1 - k90 / n`` of the observation window's queries (v1's statistic, here at fixed lengths;
  v1 itself took it on the text after the image of 150-550-token prompts);
- ``recall``: the shipped statistic, :func:`hybridkv_vllm.core.sparsity.selection_recall` at a 10 % keep.

It prints, per statistic, the static heads (theta 0.9) at each reference length and how many heads keep the type
they get from the mean over lengths (the profile's score), then NIAH passkey hits of ``hybridkv eval``'s prompts at
5 % and 10 % for a profile made from each statistic (16- and 8-token retrieval units) next to SnapKV and the full
cache.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_head_statistic.py \\
        --out benchmarks/results/fidelity/ablation_head_statistic.md          # ~8 min on 1 CPU thread (SmolLM2)
"""
from __future__ import annotations

import platform
import time

import torch

from hybridkv_vllm.core import BudgetConfig, HeadProfile, ModelIdentity, make_policy, mass_concentration
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.core.sparsity import SparsityAccumulator
from hybridkv_vllm.eval.harness import EvalConfig, niah_hits
from hybridkv_vllm.profiler.run import REFERENCE_TOKENS, recall_scorer, run_calibration

import study

ROOT = study.ROOT

# The settings the committed results were made with (before r, sub_chunks and obs_window became the validated
# defaults)
R = 1.0
OBS_WINDOW = 32
WORKLOAD = EvalConfig(niah_lengths=(1000, 2000, 3400))
THETA, BLOCK = 0.9, 16


def main() -> int:
    parser = study.parser(__doc__, profile=False)
    parser.add_argument("--skip-niah", action="store_true", help="only the length table")
    args = parser.parse_args()
    started, lm, _, budgets = study.start(args)
    ident = ModelIdentity.from_hf_config(lm.model.config)
    accs = {name: SparsityAccumulator(ident.num_layers, ident.num_kv_heads, groups=REFERENCE_TOKENS)
            for name in ("concentration", "recall")}
    recall = recall_scorer(accs["recall"])

    def both(layer, q, keys, scale, queries):
        recall(layer, q, keys, scale, queries)
        for ref, (obs, _) in queries.items():
            score = mass_concentration(q[:, obs].transpose(0, 1), keys, obs, scale, mass=0.9)
            accs["concentration"].add(layer, score, group=ref)

    run_calibration(lm, both, progress=False)
    n_heads = ident.num_layers * ident.num_kv_heads
    lines = [f"# Head statistic ablation: `{args.model.name}`", "",
             f"{n_heads} KV heads; calibration `hybridkv-calib-v2` (8 prompts, ~4.5k tokens); theta {THETA}; "
             f"{platform.machine()}, {torch.get_num_threads()} thread(s).", "",
             "Static heads at each reference length (the score of that length alone) and, in brackets, heads whose "
             "type at that length equals the profile's (mean over lengths):", "",
             "| statistic | " + " | ".join(f"{r} tokens" for r in REFERENCE_TOKENS) + " | profile (mean) |",
             "|---|" + "---:|" * (len(REFERENCE_TOKENS) + 1)]
    profiles = {}
    for name, acc in accs.items():
        mean_static = acc.scores() >= THETA
        cells = []
        for r, s in acc.group_scores().items():
            static = s >= THETA
            cells.append(f"{int(static.sum())} ({int((static == mean_static).sum())}/{n_heads})")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(mean_static.sum())} |")
        profiles[name] = HeadProfile.from_scores(ident, torch.round(acc.scores(), decimals=6), theta=THETA)
    if not args.skip_niah:
        policies = {(f"hybridkv, {name} profile ({int(p.is_static.sum())} static)", f"{BLOCK // sub}-token units", b):
                    make_policy("hybridkv", p, BudgetConfig(b, r=R, block_size=BLOCK),
                                SelectionConfig(chunk_size=BLOCK, sub_chunks=sub, obs_window=OBS_WINDOW))
                    for name, p in profiles.items() for sub in (1, 2) for b in budgets}
        policies.update({("snapkv", "-", b): make_policy("snapkv", profiles["recall"],
                                                          BudgetConfig(b, r=R, block_size=BLOCK)) for b in budgets})
        full = make_policy("full", profiles["recall"], BudgetConfig(1.0, block_size=BLOCK))
        hits, full_hits, n = niah_hits(lm, full, policies, WORKLOAD)
        lines += ["", f"NIAH passkey hits (of {n}; full cache {full_hits}), `hybridkv eval`'s prompts and check:", "",
                  "| method | retrieval unit | " + " | ".join(f"{b:.0%}" for b in budgets) + " |",
                  "|---|---|" + "---:|" * len(budgets)]
        for method, unit in dict.fromkeys((m, u) for m, u, _ in policies):
            lines.append(f"| {method} | {unit} | " + " | ".join(str(hits[method, unit, b]) for b in budgets) + " |")
    model = args.model.resolve()
    shown = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s. Command: `HF_HUB_OFFLINE=1 .venv/bin/python "
              f"benchmarks/ablation_head_statistic.py --model {shown} --out {args.out}`"]
    return study.write(args.out, lines)


if __name__ == "__main__":
    raise SystemExit(main())
