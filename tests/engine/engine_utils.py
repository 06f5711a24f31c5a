"""Helpers for tests that run vLLM's CPU build in-process (the engine helpers live in the package:
``hybridkv_vllm.adapter.engine_probe``, shared with the benchmarks)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from hybridkv_vllm.adapter.engine_probe import free_blocks, held_blocks  # noqa: F401 (re-exported)
from hybridkv_vllm.adapter.engine_probe import make_llm as _make_llm
from hybridkv_vllm.adapter.engine_probe import run_to_completion, scheduler_of  # noqa: F401 (re-exported)
from hybridkv_vllm.eval.prompts import haystack_chat_prompt
from hybridkv_vllm.profiler.synthetic import synthetic_profile as _synthetic_profile

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-vl"
HAYSTACK = Path("/usr/share/common-licenses/GPL-3")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_llm(model_dir: Path, hybridkv: dict | None, **kwargs):
    """``engine_probe.make_llm``, checked to run the model runner the test chose (:func:`model_runner`)."""
    llm = _make_llm(model_dir, hybridkv, **kwargs)
    chosen = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if chosen is not None:
        want = "v2" if chosen == "1" else "v1"
        assert runner_of(llm) == want, f"the engine runs Model Runner {runner_of(llm)}, the test chose {want}"
    return llm


def synthetic_profile(path: Path, seed: int = 0, low: float = 0.8, model: Path = MODEL) -> Path:
    return _synthetic_profile(path, model, seed=seed, low=low)


def text_prompt(n_chars: int, question: str = "What is this text about? Answer briefly.") -> str:
    return haystack_chat_prompt(n_chars, question)


def _head_of(layer_name: str) -> tuple[int, int]:
    import re
    layer = int(re.search(r"layers\.(\d+)\.", layer_name).group(1))
    head = re.search(r"\.hkv_h(\d+)$", layer_name)
    return layer, int(head.group(1)) if head else 0


def expected_blocks(llm, profile_path, budget: float, prompt_len: int, num_tokens: int,
                    floor_blocks: int = 2) -> list[int]:
    """Blocks a compressed request holds per KV-cache group, from the profile and the budget alone: the core
    allocator's tokens per head at ``budget``, a group keeping its largest head's, plus the tail blocks."""
    from hybridkv_vllm.core.budgets import BudgetConfig, allocate
    from hybridkv_vllm.core.profile import HeadProfile
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    bs = groups[0].kv_cache_spec.block_size
    tokens = allocate(HeadProfile.load(profile_path),
                      BudgetConfig(budget=budget, block_size=bs, floor_blocks=floor_blocks)).tokens_for(prompt_len)
    full = -(-num_tokens // bs)
    expected = []
    for group in groups:
        heads = [_head_of(name) for name in group.layer_names]
        kept = max(int(tokens[l, h]) for l, h in heads) // bs
        expected.append(kept + full - prompt_len // bs if kept < prompt_len // bs else full)
    return expected


def full_blocks(llm, num_tokens: int) -> list[int]:
    """Blocks an uncompressed request holds per group."""
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    return [-(-num_tokens // g.kv_cache_spec.block_size) for g in groups]


def counter_total(name: str, **labels) -> float:
    """Sum of a counter's samples in this process's default registry (in-process engines), over other labels."""
    from prometheus_client import REGISTRY
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


#: Greedy equality across implementations (vLLM's CPU kernels vs transformers + the core reference, both float32):
#: the two compute the same logits up to summation order, a few 1e-4 apart on this machine, more on another
#: ISA. Where the reference's two best logits are closer than this, either side may pick either token and the
#: continuations part; nowhere else may they differ.
NEAR_TIE = 2e-2


def assert_greedy_matches(got: list[int], want: list[int], want_logits, what: str) -> None:
    """``got`` (vLLM) equals ``want`` (the reference, whose step logits are ``want_logits [n, V]``) token for token,
    up to a near tie of the reference (``NEAR_TIE``), at which ``got``'s token must be one of the tied ones;
    after it nothing is compared (the prompts differ from there on)."""
    assert len(got) == len(want), f"{what}: {len(got)} tokens, the reference made {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        logits = want_logits[i].float()
        best = float(logits.max())
        margin = best - float(logits[g])
        assert margin < NEAR_TIE, (f"{what}: greedy token {i} is {g}, the reference's is {w}, and the reference "
                                   f"ranks {g} {margin:.4f} below its best (not a near tie: < {NEAR_TIE}); "
                                   f"equal before: {want[:i]}")
        return


#: vLLM's model runners the engine tests run under: Model Runner V2 (vLLM's default on CUDA, the only runner in
#: 0.34; on the CPU build through the Triton stand-in, tests/triton_cpu_standin.py) and Model Runner V1 (the CPU
#: build's default without Triton, deleted in vLLM 0.34).
RUNNERS = ("v2", "v1")


@contextmanager
def model_runner(name: str):
    """Engines made inside run Model Runner ``name`` ("v1" / "v2"). vLLM caches its environment variables once an
    engine has started (``envs.enable_envs_cache``); the cache is dropped so that the next engine reads this one."""
    from vllm import envs
    envs.disable_envs_cache()
    old = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = {"v1": "0", "v2": "1"}[name]
    try:
        yield name
    finally:
        if old is None:
            os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
        else:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = old


def _runner_name(worker) -> str:
    modules = {cls.__module__ for cls in type(worker.model_runner).__mro__}
    return "v2" if "vllm.v1.worker.gpu.model_runner" in modules else "v1"


def runner_of(llm) -> str:
    """Which model runner the engine's workers really run (every worker: tensor-parallel ones too)."""
    names = set(llm.collective_rpc(_runner_name))
    assert len(names) == 1, f"the workers run different model runners: {names}"
    return names.pop()
