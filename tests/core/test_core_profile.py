"""Head profile: round trip, validation errors, model matching, TP slicing, classification rule."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybridkv_vllm.core.errors import ProfileError
from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity, classify, schema


def _write(tmp_path, doc) -> str:
    path = tmp_path / "p.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(path)


def test_schema_is_draft_2020_12_and_valid():
    import jsonschema

    s = schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(s)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_exact(tmp_path, seed, make_identity, make_profile):
    prof = make_profile(make_identity(num_layers=4, num_kv_heads=3, num_q_heads=9), seed=seed)
    path = tmp_path / "p.json"
    prof.save(path)
    back = HeadProfile.load(path, expect=prof.model)
    assert back == prof
    assert back.to_dict() == prof.to_dict()
    assert torch.equal(back.scores, prof.scores) and torch.equal(back.weights, prof.weights)


def test_from_scores_classification_rule(make_identity):
    ident = make_identity(num_layers=2, num_kv_heads=2)
    scores = torch.tensor([[0.95, 0.5], [0.9, 0.899999]], dtype=torch.float64)
    prof = HeadProfile.from_scores(ident, scores, theta=0.9)
    assert prof.is_static.tolist() == [[True, False], [True, False]]
    for (layer, h), s in zip([(0, 0), (1, 0)], [0.95, 0.9]):
        assert prof.weights[layer, h].item() == pytest.approx(1 - s + 1e-3, abs=0, rel=1e-12)
    assert prof.weights[0, 1].item() == 1.0 and prof.weights[1, 1].item() == 1.0
    assert classify(0.5, 0.4) == ("static", 1 - 0.5 + 1e-3)
    assert prof.is_static.dtype == torch.bool and prof.scores.shape == (2, 2)


def test_malformed_json(tmp_path):
    with pytest.raises(ProfileError, match="malformed JSON"):
        HeadProfile.load(_write(tmp_path, '{"schema_version": 1, '))


def test_missing_field_names_it(tmp_path, profile):
    doc = profile.to_dict()
    del doc["model"]["fingerprint"]
    with pytest.raises(ProfileError, match="fingerprint") as err:
        HeadProfile.load(_write(tmp_path, doc))
    assert "schema error" in str(err.value)


def test_bad_head_type_is_schema_error(tmp_path, profile):
    doc = profile.to_dict()
    doc["layers"][1]["heads"][0]["type"] = "sometimes"
    with pytest.raises(ProfileError, match=r"schema error at layers\[1\]\.heads\[0\]\.type: 'sometimes'"):
        HeadProfile.load(_write(tmp_path, doc))


@pytest.mark.parametrize("version", [3, 7])
def test_unknown_schema_version(tmp_path, profile, version):
    doc = profile.to_dict()
    doc["schema_version"] = version
    with pytest.raises(ProfileError) as err:
        HeadProfile.load(_write(tmp_path, doc))
    assert f"unsupported head-profile schema_version {version} (this build reads 2)" in str(err.value)


def test_version_1_profile_is_refused_with_its_reason(tmp_path, profile):
    """A v1 profile (scores at the calibration prompts' own lengths) is refused, saying why and what to do."""
    doc = profile.to_dict()
    doc["schema_version"] = 1
    del doc["classification"]["reference_tokens"]
    with pytest.raises(ProfileError) as err:
        HeadProfile.load(_write(tmp_path, doc))
    assert "schema_version 1 is no longer read" in str(err.value)
    assert "re-run `hybridkv profile`" in str(err.value)


def test_reference_tokens_round_trip_and_are_checked(tmp_path, profile):
    from hybridkv_vllm.core.profile import ClassificationParams

    prof = replace(profile, classification=ClassificationParams(reference_tokens=(512, 4096)))
    path = tmp_path / "p.json"
    prof.save(path)
    assert HeadProfile.load(path).classification.reference_tokens == (512, 4096)
    for bad in ([0], [512, 512], ["512"], 512):
        doc = prof.to_dict()
        doc["classification"]["reference_tokens"] = bad
        with pytest.raises(ProfileError, match="classification.reference_tokens"):
            HeadProfile.load(_write(tmp_path, doc))
    doc = prof.to_dict()
    del doc["classification"]["reference_tokens"]
    with pytest.raises(ProfileError, match="reference_tokens"):
        HeadProfile.load(_write(tmp_path, doc))


@pytest.mark.parametrize("field,value", [("num_layers", 5), ("num_kv_heads", 4), ("fingerprint", "sha256:" + "0" * 64)])
def test_other_model_mismatch_named(tmp_path, profile, field, value):
    path = tmp_path / "p.json"
    profile.save(path)
    other = replace(profile.model, **{field: value})
    with pytest.raises(ProfileError, match="another model") as err:
        HeadProfile.load(path, expect=other)
    msg = str(err.value)
    assert f"{field}: profile has {getattr(profile.model, field)!r}, model has {value!r}" in msg


def test_shape_checks(tmp_path, profile):
    doc = profile.to_dict()
    doc["layers"] = doc["layers"][:-1]
    with pytest.raises(ProfileError, match="layers has 2 entries, model.num_layers is 3"):
        HeadProfile.load(_write(tmp_path, doc))
    doc = profile.to_dict()
    doc["layers"][0]["heads"] = doc["layers"][0]["heads"][:1]
    with pytest.raises(ProfileError, match=r"layers\[0\].heads has 1 entries"):
        HeadProfile.load(_write(tmp_path, doc))
    doc = profile.to_dict()
    doc["layers"][0]["layer"], doc["layers"][1]["layer"] = 1, 0
    with pytest.raises(ProfileError, match="in order"):
        HeadProfile.load(_write(tmp_path, doc))


def test_from_hf_config_text_and_vl():
    import transformers                          # a hard dependency (setup.py): fail, do not skip, without it
    text = transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    hidden_size=32, intermediate_size=64, vocab_size=100,
                                    architectures=["Qwen2ForCausalLM"])
    ident = ModelIdentity.from_hf_config(text)
    assert (ident.num_layers, ident.num_q_heads, ident.num_kv_heads, ident.head_dim) == (2, 4, 2, 8)
    assert ident.architecture == "Qwen2ForCausalLM" and ident.fingerprint.startswith("sha256:")
    assert ModelIdentity.from_hf_config(text) == ident
    vl = transformers.Qwen2_5_VLConfig(text_config=dict(num_hidden_layers=3, num_attention_heads=6,
                                                        num_key_value_heads=2, hidden_size=48,
                                                        intermediate_size=64, vocab_size=100),
                                       architectures=["Qwen2_5_VLForConditionalGeneration"])
    vid = ModelIdentity.from_hf_config(vl)
    assert (vid.num_layers, vid.num_q_heads, vid.num_kv_heads, vid.head_dim) == (3, 6, 2, 8)
    assert vid.architecture == "Qwen2_5_VLForConditionalGeneration"
    bigger = transformers.Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      hidden_size=32, intermediate_size=65, vocab_size=100,
                                      architectures=["Qwen2ForCausalLM"])
    assert ModelIdentity.from_hf_config(bigger).fingerprint != ident.fingerprint


def test_tp_slicing_contiguous_and_replicated(make_identity, make_profile):
    prof = make_profile(make_identity(num_layers=2, num_q_heads=8, num_kv_heads=4), seed=3)
    parts = [prof.slice_for_tp(r, 2) for r in range(2)]
    assert all(p.model.num_kv_heads == 2 and p.model.num_q_heads == 4 for p in parts)
    assert torch.equal(torch.cat([p.scores for p in parts], dim=1), prof.scores)
    assert [e.kv_head for e in parts[1].layers[0]] == [0, 1]
    wide = [prof.slice_for_tp(r, 8) for r in range(8)]
    for r, p in enumerate(wide):
        assert p.model.num_kv_heads == 1 and p.model.num_q_heads == 1
        assert torch.equal(p.scores[:, 0], prof.scores[:, r * 4 // 8])
    with pytest.raises(ProfileError, match="neither divides"):
        make_profile(make_identity(num_q_heads=6, num_kv_heads=3)).slice_for_tp(0, 2)
    with pytest.raises(ProfileError, match="valid TP position"):
        prof.slice_for_tp(2, 2)


def test_tp_slice_round_trips(tmp_path, make_identity, make_profile):
    prof = make_profile(make_identity(num_layers=2, num_q_heads=8, num_kv_heads=4)).slice_for_tp(1, 2)
    prof.save(tmp_path / "s.json")
    assert HeadProfile.load(tmp_path / "s.json") == prof


# ------------------------------------------------------------------------------------------ numbers and ranges
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literal_refused_with_path(tmp_path, profile, literal):
    text = json.dumps(profile.to_dict()).replace('"score": ' + json.dumps(profile.layers[1][0].score),
                                                 '"score": ' + literal, 1)
    assert literal in text
    with pytest.raises(ProfileError, match=rf"layers\[1\]\.heads\[0\]\.score is {literal}: .* must be finite"):
        HeadProfile.load(_write(tmp_path, text))


def test_overflowing_float_and_python_nan_refused(tmp_path, profile):
    text = json.dumps(profile.to_dict()).replace('"theta": 0.9', '"theta": 1e400', 1)
    with pytest.raises(ProfileError, match=r"classification\.theta is inf"):
        HeadProfile.load(_write(tmp_path, text))
    doc = profile.to_dict()
    doc["provenance"]["extra"] = {"runs": [1.0, float("nan")]}          # free-form, but still finite numbers
    with pytest.raises(ProfileError, match=r"provenance\.extra\.runs\[1\] is nan"):
        HeadProfile.from_dict(doc)


@pytest.mark.parametrize("field,value,message", [
    ("score", 1.5, "1.5 is greater than the maximum of 1"),
    ("score", -0.25, "-0.25 is less than the minimum of 0"),
    ("weight", 0, "0 is less than or equal to the minimum of 0"),
    ("weight", -1.0, "-1.0 is less than or equal to the minimum of 0"),
    ("weight", 2**64, "18446744073709551616 is greater than the maximum of 1000000"),
    ("weight", 1e300, "1e\\+300 is greater than the maximum of 1000000"),
    ("kv_head", 1.0, "1.0 is not of type 'integer'"),
])
def test_out_of_range_value_named_with_path(tmp_path, profile, field, value, message):
    doc = profile.to_dict()
    doc["layers"][2]["heads"][1][field] = value
    with pytest.raises(ProfileError, match=rf"schema error at layers\[2\]\.heads\[1\]\.{field}: {message}"):
        HeadProfile.load(_write(tmp_path, doc))


def test_weight_bounds_accept_hand_overrides(tmp_path, profile):
    doc = profile.to_dict()
    doc["layers"][0]["heads"][0]["weight"] = 1e6                       # the ceiling itself is allowed
    doc["layers"][0]["heads"][1]["weight"] = 1e-9
    back = HeadProfile.load(_write(tmp_path, doc))
    assert back.weights[0].tolist() == [1e6, 1e-9]


def test_save_refuses_non_finite(tmp_path, profile):
    bad = replace(profile, layers=((replace(profile.layers[0][0], weight=float("nan")),
                                    *profile.layers[0][1:]), *profile.layers[1:]))
    with pytest.raises(ProfileError, match="cannot save head profile"):
        bad.save(tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


# ---------------------------------------------------------------------------------------------------- fuzzing
_FUZZ_BASE = HeadProfile.from_scores(
    ModelIdentity(architecture="TinyForCausalLM", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8,
                  fingerprint="sha256:" + "ab" * 32),
    torch.tensor([[0.95, 0.5], [0.91, 0.2], [0.0, 1.0]], dtype=torch.float64), theta=0.9,
    provenance={"created": "2026-01-01T00:00:00+00:00", "tool_version": "test", "num_prompts": 2,
                "prompt_tokens": [10, 12]}).to_dict()
_RAW = "\x00raw:"                                      # a string replaced by raw JSON text after dumping
_VALUES = [float("nan"), float("inf"), float("-inf"), _RAW + "1e400", _RAW + "-1e400", 2**64, -(2**64), 10**400,
           1e300, -1, -0.5, 0, 0.0, -0.0, 0.5, 1, 1.5, 3.0, True, False, None, "", "x", "static", [], {}, [1.0],
           {"a": 1}]


def _paths(doc, where=()):
    yield where
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*where, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*where, i))


def _mutate(data, doc):
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = list(_paths(doc))
        where = data.draw(st.sampled_from(paths[1:]), label="path")
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["replace", "delete", "extra_key", "as_float"]), label="action")
        if action == "as_float":                        # 2 -> 2.0: the same JSON Schema integer, a Python float
            value = parent[where[-1]]
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= 2 ** 53:
                parent[where[-1]] = float(value)          # (a larger int has no float: the mutation is moot)
        elif action == "replace":
            parent[where[-1]] = copy.deepcopy(data.draw(st.sampled_from(_VALUES), label="value"))
        elif action == "delete":
            del parent[where[-1]]
        else:
            target = parent[where[-1]]
            if isinstance(target, dict):
                key = data.draw(st.sampled_from(["extra", "score", "weight", "layer"]), label="key")
                target[key] = copy.deepcopy(data.draw(st.sampled_from(_VALUES), label="value"))
    text = json.dumps(doc, indent=1)                    # allow_nan: writes the NaN / Infinity literals
    for raw in ("1e400", "-1e400"):
        text = text.replace(json.dumps(_RAW + raw), raw)
    if data.draw(st.booleans(), label="truncate"):
        text = text[:data.draw(st.integers(0, len(text)), label="cut")]
    return text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_profile_loads_or_raises_profile_error(tmp_path_factory, data):
    text = _mutate(data, _FUZZ_BASE)
    path = tmp_path_factory.mktemp("fuzz", numbered=True) / "p.json"
    path.write_text(text, encoding="utf-8")
    try:
        prof = HeadProfile.load(path)
    except ProfileError:
        return                                          # the named error; anything else fails the test
    for layer in prof.layers:
        for e in layer:
            assert e.type in ("static", "dynamic")
            assert math.isfinite(e.score) and 0.0 <= e.score <= 1.0
            assert math.isfinite(e.weight) and 0.0 < e.weight <= 1e6
    assert math.isfinite(prof.classification.theta) and 0.0 <= prof.classification.theta <= 1.0
    assert HeadProfile.from_dict(json.loads(json.dumps(prof.to_dict()))) == prof
