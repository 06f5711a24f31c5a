"""Head profile: round trip, validation errors, model matching, TP slicing, classification rule."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

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
    for (l, h), s in zip([(0, 0), (1, 0)], [0.95, 0.9]):
        assert prof.weights[l, h].item() == pytest.approx(1 - s + 1e-3, abs=0, rel=1e-12)
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
    with pytest.raises(ProfileError, match="layers/1/heads/0/type"):
        HeadProfile.load(_write(tmp_path, doc))


@pytest.mark.parametrize("version", [2, 7])
def test_unknown_schema_version(tmp_path, profile, version):
    doc = profile.to_dict()
    doc["schema_version"] = version
    with pytest.raises(ProfileError) as err:
        HeadProfile.load(_write(tmp_path, doc))
    assert f"unsupported head-profile schema_version {version} (this build reads 1)" in str(err.value)


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
    transformers = pytest.importorskip("transformers")
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
