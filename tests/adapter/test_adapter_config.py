"""`--additional-config '{"hybridkv": ...}'` validation: every problem named, with the key and the value."""
from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources

import pytest

from hybridkv_vllm.adapter.config import ENV_VAR, SCHEMA_RESOURCE, parse_config
from hybridkv_vllm.core.errors import ConfigError


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{}")
    return str(path)


def test_defaults_and_values(profile):
    cfg = parse_config({"hybridkv": {"profile": profile, "budget": 0.2, "r": 2, "obs_window": 16}})
    assert (cfg.budget, cfg.r, cfg.min_prompt_tokens, cfg.selection) == (0.2, 2.0, 256, {"obs_window": 16})
    assert cfg.selection_config(32).chunk_size == 32 and cfg.budget_config(32).block_size == 32
    assert cfg.cold_tier_gib is None
    assert parse_config({"hybridkv": {"profile": profile, "cold_tier_gib": 2}}).cold_tier_gib == 2.0


def test_schema_defaults_are_the_effective_defaults(profile):
    """The defaults the schema documents are those a section without the key gets (the core's, for r), so the
    schema, the module doc and the code cannot drift apart."""
    schema = json.loads(resources.files(SCHEMA_RESOURCE[0]).joinpath(SCHEMA_RESOURCE[1]).read_text("utf-8"))
    documented = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    cfg = parse_config({"hybridkv": {"profile": profile}})
    effective = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    assert documented and {k: effective[k] for k in documented} == documented
    # sub_chunks has no fixed default: units of 8 tokens, whatever the block size
    assert "default" not in schema["properties"]["sub_chunks"]
    assert [cfg.selection_config(bs).retrieval_units().chunk_size for bs in (16, 32, 64)] == [8, 8, 8]


@pytest.mark.parametrize("section, message", [
    (None, "--additional-config"),
    ({"budget": 0.1}, "hybridkv.profile is missing"),
    ({"profile": "/no/such.json"}, "no such file"),
    ({"profile": "P", "budget": 0}, "budget=0"),
    ({"profile": "P", "budget": 1.01}, "budget=1.01"),
    ({"profile": "P", "budget": "0.1"}, "hybridkv.budget='0.1'"),
    ({"profile": "P", "r": -1}, "r=-1"),
    ({"profile": "P", "floor_blocks": 1.5}, "floor_blocks=1.5"),
    ({"profile": "P", "bugdet": 0.1}, "unknown hybridkv setting(s) ['bugdet']"),
    ({"profile": "P", "obs_window": 0}, "obs_window=0"),
    ({"profile": "P", "cold_tier_gib": 0}, "cold_tier_gib=0"),
    ({"profile": "P", "cold_tier_gib": "8"}, "hybridkv.cold_tier_gib='8'"),
    ({"profile": "P", "budget": float("nan")}, "hybridkv.budget=nan: expected a finite number"),
    ({"profile": "P", "budget": True}, "hybridkv.budget=True"),
    ({"profile": "P", "floor_blocks": 0}, "hybridkv.floor_blocks=0: expected an integer >= 1"),
    ({"profile": "P", "kv_ops": "cuda"}, "hybridkv.kv_ops='cuda': expected one of"),
    ({"profile": 7}, "hybridkv.profile=7"),
])
def test_bad_settings_are_named(profile, section, message, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    if isinstance(section, dict) and section.get("profile") == "P":
        section = dict(section, profile=profile)
    with pytest.raises(ConfigError) as info:
        parse_config({} if section is None else {"hybridkv": section})
    assert message in str(info.value)


def test_environment_fallback(profile, monkeypatch):
    monkeypatch.setenv(ENV_VAR, json.dumps({"profile": profile, "budget": 0.3}))
    assert parse_config({}).budget == 0.3
    monkeypatch.setenv(ENV_VAR, "{not json")
    with pytest.raises(ConfigError, match=ENV_VAR):
        parse_config({})


def test_schema_and_config_know_the_same_keys():
    """The JSON schema is the single list of settings: every field of the config (and selection key) is in it."""
    from dataclasses import fields

    from hybridkv_vllm.adapter.config import SELECTION_KEYS, HybridKVConfig, _validator
    schema_keys = set(_validator().schema["properties"])
    assert schema_keys == {f.name for f in fields(HybridKVConfig)} - {"selection"} | set(SELECTION_KEYS)


def test_numbers_are_floats(profile):
    cfg = parse_config({"hybridkv": {"profile": profile, "budget": 1, "r": 2, "cold_tier_gib": 3}})
    assert (type(cfg.budget), type(cfg.r), type(cfg.cold_tier_gib)) == (float, float, float)
