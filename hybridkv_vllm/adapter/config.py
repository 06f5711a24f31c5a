"""HybridKV's serving configuration: ``--additional-config '{"hybridkv": {...}}'`` (or ``$HYBRIDKV_CONFIG``).

vLLM admits no new CLI flags from plugins, so the settings ride in vLLM's ``additional_config``; a JSON
environment variable is the fallback for launchers that cannot pass it. The section is validated against its JSON
schema (``configs/schema/serving_config.v1.json``, with jsonschema); every problem is reported at engine start-up as
a :class:`ConfigError` that names the key, the value and what is expected.

Keys (defaults in brackets):
  profile            path of the head-profile JSON (required)
  budget             kept share of the KV cache, in (0, 1] [0.1]
  r                  per-head budget ratio dynamic : static [2.0: the core's default, chosen on a validation set]
  floor_blocks       minimum blocks per head, >= 1 [2]
  min_prompt_tokens  shorter prompts bypass compression [256]
  max_groups         most KV-cache groups the head tiers may use [16]
  cold_tier_gib      host memory the dynamic heads' cold tier may use, in GiB [unbounded: at most max_num_seqs x
                     max_model_len, logged at start-up]: a request that would pass it is served uncompressed
                     (requests.py)
  cold_tier_memory   where the cold tier's pages live: "host" (pinned host memory on a GPU) or "device" (beside
                     vLLM's pool: no memory saving for dynamic heads on a GPU, fewer bytes read) ["host"]
  kv_ops             the decode executor's KV-ops implementation: "cpu" (vLLM's CPU kernels), "triton" (the
                     project's Triton kernels; on the CPU build they run under TRITON_INTERPRET=1, for tests) or
                     "auto" (cpu on the CPU build, triton on CUDA) ["auto"]
  sink_tokens, recent_tokens, obs_window, pool_kernel, sink_chunks, recent_chunks   selection (DESIGN §4)
  sub_chunks         retrieval units per KV block of dynamic heads (must divide --block-size) [the core's default,
                     chosen on a validation set: units of 8 tokens, i.e. 4 at --block-size 32]
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from hybridkv_vllm.core.budgets import BudgetConfig
from hybridkv_vllm.core.errors import BudgetError, ConfigError
from hybridkv_vllm.core.selection import SelectionConfig

ENV_VAR = "HYBRIDKV_CONFIG"
SELECTION_KEYS = ("sink_tokens", "recent_tokens", "obs_window", "pool_kernel", "sink_chunks", "recent_chunks",
                  "sub_chunks")


@dataclass(frozen=True)
class HybridKVConfig:
    profile: Path
    budget: float = 0.1
    r: float = BudgetConfig(budget=1.0).r          # the core's default (core/budgets.py says why)
    floor_blocks: int = 2
    min_prompt_tokens: int = 256
    max_groups: int = 16
    cold_tier_gib: float | None = None
    kv_ops: str = "auto"
    cold_tier_memory: str = "host"
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


SCHEMA_RESOURCE = ("hybridkv_vllm.configs", "schema/serving_config.v1.json")
_VALIDATOR = None


def _validator():
    """The section's JSON schema (draft 2020-12) with ``integer`` meaning a Python ``int`` (not ``3.0``, not a bool)
    and ``number`` excluding bools."""
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema
        base = jsonschema.Draft202012Validator
        checker = base.TYPE_CHECKER.redefine_many({
            "integer": lambda _c, v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda _c, v: isinstance(v, (int, float)) and not isinstance(v, bool)})
        schema = json.loads(resources.files(SCHEMA_RESOURCE[0]).joinpath(SCHEMA_RESOURCE[1]).read_text("utf-8"))
        _VALIDATOR = jsonschema.validators.extend(base, type_checker=checker)(schema)
    return _VALIDATOR


def _schema_error(raw: dict[str, Any]) -> str | None:
    """The first schema violation, as ``hybridkv.<key>=<value>: expected <what the schema says>``."""
    import jsonschema
    validator = _validator()
    error = jsonschema.exceptions.best_match(validator.iter_errors(raw))
    if error is None:
        return None
    if error.validator == "additionalProperties":
        known = sorted(validator.schema["properties"])
        return f"unknown hybridkv setting(s) {sorted(set(raw) - set(known))}; known: {known}"
    if error.validator == "required":
        return ('hybridkv.profile is missing: the head-profile JSON to serve with '
                '(make one with `hybridkv profile --model DIR --out FILE`)')
    key = error.absolute_path[0]
    return f"hybridkv.{key}={raw[key]!r}: expected {validator.schema['properties'][key]['description']}"


def parse_config(additional_config: dict[str, Any] | None) -> HybridKVConfig:
    """Validate the ``hybridkv`` section against its JSON schema (configs/schema/serving_config.v1.json: types,
    ranges, unknown keys), then the profile file's existence and the budget rule's own checks."""
    raw = _raw_config(additional_config)
    nonfinite = [k for k, v in raw.items() if isinstance(v, float) and not math.isfinite(v)]
    message = f"hybridkv.{nonfinite[0]}={raw[nonfinite[0]]!r}: expected a finite number" if nonfinite \
        else _schema_error(raw)
    if message is not None:
        raise ConfigError(message)
    profile = Path(raw["profile"]).expanduser()
    if not profile.is_file():
        raise ConfigError(f"hybridkv.profile={str(profile)!r}: no such file")
    defaults = {f.name: f.default for f in fields(HybridKVConfig) if f.name not in ("profile", "selection")}
    values = {key: raw.get(key, default) for key, default in defaults.items()}
    values.update({key: float(values[key]) for key in ("budget", "r", "cold_tier_gib") if values[key] is not None})
    cfg = HybridKVConfig(profile=profile, **values, selection={k: raw[k] for k in SELECTION_KEYS if k in raw})
    try:
        cfg.budget_config(block_size=16)
        cfg.selection_config(block_size=16 * cfg.selection.get("sub_chunks", 1))    # the block size is not known yet
    except BudgetError as exc:
        raise ConfigError(f"hybridkv: {exc}") from exc
    return cfg
