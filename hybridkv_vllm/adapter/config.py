"""HybridKV's serving configuration: ``--additional-config '{"hybridkv": {...}}'`` (or ``$HYBRIDKV_CONFIG``).

vLLM admits no new CLI flags from plugins, so the settings ride in vLLM's ``additional_config``; a JSON
environment variable is the fallback for launchers that cannot pass it. Every problem is reported at engine
start-up as a :class:`ConfigError` that names the key, the value and what is expected.

Keys (defaults in brackets):
  profile            path of the head-profile JSON (required)
  budget             kept share of the KV cache, in (0, 1] [0.1]
  r                  per-head budget ratio dynamic : static [1.0]
  floor_blocks       minimum blocks per head [2]
  min_prompt_tokens  shorter prompts bypass compression [256]
  max_groups         most KV-cache groups the head tiers may use [16]
  cold_tier_gib      host memory the dynamic heads' cold tier may use, in GiB [unbounded]: the engine refuses to
                     start if max_num_seqs x max_model_len could need more (runtime.py)
  kv_ops             the decode executor's KV-ops implementation: "cpu" (vLLM's CPU kernels) or "triton" (the
                     project's Triton kernels; on the CPU build they run under TRITON_INTERPRET=1, for tests) ["cpu"]
  sink_tokens, recent_tokens, obs_window, pool_kernel, sink_chunks, recent_chunks   selection (DESIGN §4)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hybridkv_vllm.core.budgets import BudgetConfig
from hybridkv_vllm.core.errors import BudgetError, ConfigError
from hybridkv_vllm.core.selection import SelectionConfig

ENV_VAR = "HYBRIDKV_CONFIG"
KV_OPS = ("cpu", "triton")
SELECTION_KEYS = ("sink_tokens", "recent_tokens", "obs_window", "pool_kernel", "sink_chunks", "recent_chunks")


@dataclass(frozen=True)
class HybridKVConfig:
    profile: Path
    budget: float = 0.1
    r: float = 1.0
    floor_blocks: int = 2
    min_prompt_tokens: int = 256
    max_groups: int = 16
    cold_tier_gib: float | None = None
    kv_ops: str = "cpu"
    selection: dict[str, int] = field(default_factory=dict)

    def budget_config(self, block_size: int) -> BudgetConfig:
        return BudgetConfig(budget=self.budget, r=self.r, block_size=block_size, floor_blocks=self.floor_blocks)

    def selection_config(self, block_size: int) -> SelectionConfig:
        return SelectionConfig(chunk_size=block_size, **self.selection)


def _raw_config(additional_config: dict[str, Any] | None) -> dict[str, Any]:
    section = (additional_config or {}).get("hybridkv")
    if section is None and os.environ.get(ENV_VAR):
        try:
            section = json.loads(os.environ[ENV_VAR])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"${ENV_VAR} is not valid JSON: {exc}") from exc
    if section is None:
        raise ConfigError('--attention-backend HYBRIDKV needs its settings: pass --additional-config '
                          '\'{"hybridkv": {"profile": "/path/profile.json", "budget": 0.1}}\' '
                          f"(or set ${ENV_VAR})")
    if not isinstance(section, dict):
        raise ConfigError(f'additional_config["hybridkv"] must be an object, got {type(section).__name__}')
    return section


def _number(raw: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ConfigError(f"hybridkv.{key}={value!r}: expected {'an integer' if kind is int else 'a number'}")
    return kind(value)


def parse_config(additional_config: dict[str, Any] | None) -> HybridKVConfig:
    """Validate the ``hybridkv`` section (types, ranges, unknown keys, the profile file's existence)."""
    raw = _raw_config(additional_config)
    known = {f.name for f in fields(HybridKVConfig)} - {"selection"} | set(SELECTION_KEYS)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown hybridkv setting(s) {unknown}; known: {sorted(known)}")
    if "profile" not in raw:
        raise ConfigError('hybridkv.profile is missing: the head-profile JSON to serve with '
                          '(make one with `hybridkv profile --model DIR --out FILE`)')
    profile = Path(str(raw["profile"])).expanduser()
    if not profile.is_file():
        raise ConfigError(f"hybridkv.profile={str(profile)!r}: no such file")
    cfg = HybridKVConfig(
        profile=profile,
        budget=_number(raw, "budget", float, 0.1),
        r=_number(raw, "r", float, 1.0),
        floor_blocks=_number(raw, "floor_blocks", int, 2),
        min_prompt_tokens=_number(raw, "min_prompt_tokens", int, 256),
        max_groups=_number(raw, "max_groups", int, 16),
        cold_tier_gib=_number(raw, "cold_tier_gib", float, 0) if "cold_tier_gib" in raw else None,
        kv_ops=raw.get("kv_ops", "cpu"),
        selection={k: _number(raw, k, int, 0) for k in SELECTION_KEYS if k in raw},
    )
    if cfg.kv_ops not in KV_OPS:
        raise ConfigError(f"hybridkv.kv_ops={cfg.kv_ops!r}: expected one of {list(KV_OPS)}")
    try:
        cfg.budget_config(block_size=16)
        cfg.selection_config(block_size=16)
    except BudgetError as exc:
        raise ConfigError(f"hybridkv: {exc}") from exc
    if cfg.cold_tier_gib is not None and cfg.cold_tier_gib <= 0:
        raise ConfigError(f"hybridkv.cold_tier_gib={cfg.cold_tier_gib}: expected a number of GiB > 0")
    if cfg.max_groups < 1 or cfg.min_prompt_tokens < 0:
        raise ConfigError(f"hybridkv.max_groups={cfg.max_groups}, min_prompt_tokens={cfg.min_prompt_tokens}: "
                          "expected max_groups >= 1 and min_prompt_tokens >= 0")
    return cfg
