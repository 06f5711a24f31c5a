"""`hybridkv profile`: the calibration set, the CLI end to end on tiny-vl, and the shipped profile reproduces."""
import json
import os

import pytest
from testing_models import ROOT, model_dir

from hybridkv_vllm.cli import main
from hybridkv_vllm.core import HeadProfile, ModelIdentity
from hybridkv_vllm.core.profile import classify
from hybridkv_vllm.profiler.calibration import CALIBRATION, CalibrationError, MultimodalPrompt, context_text
from hybridkv_vllm.profiler.images import ImageSourceError, image_path, load_image

SHIPPED = ROOT / "configs" / "profiles" / "smollm2-vl.json"
SHIPPED_CMD_MODEL = "models/smollm2-vl"      # the --model argument the shipped profile was made with


def test_calibration_sources_load_from_installed_packages():
    from transformers import AutoTokenizer

    from hybridkv_vllm.profiler.run import QUERY_WINDOW, REFERENCE_TOKENS

    assert len(CALIBRATION) == 8
    assert len({p.name for p in CALIBRATION}) == 8
    tok = AutoTokenizer.from_pretrained(model_dir("tiny-vl"))
    for prompt in CALIBRATION:
        for source in prompt.images:
            img = load_image(source)
            assert img.mode == "RGB" and min(img.size) > 100
        # every prompt's text alone reaches past the largest default reference length and its following window
        text = context_text(prompt, tok)
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= max(REFERENCE_TOKENS) + QUERY_WINDOW
        assert "GPL-3" not in prompt.context                 # the eval's haystack stays out of calibration


def test_missing_calibration_text_is_named(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-vl"))
    prompt = MultimodalPrompt("x", (), "Summarise.", ("No-Such-Licence",), 100)
    with pytest.raises(CalibrationError, match="No-Such-Licence"):
        context_text(prompt, tok, root=tmp_path)
    (tmp_path / "Short").write_text("two words")
    with pytest.raises(CalibrationError, match="fewer than the 100"):
        context_text(MultimodalPrompt("x", (), "Summarise.", ("Short",), 100), tok, root=tmp_path)


@pytest.mark.parametrize("source", ["astronaut.png", "skimage:", "pip:foo.png", "skimage:no_such_image.png"])
def test_bad_image_source_is_named(source):
    with pytest.raises(ImageSourceError, match="image source"):
        image_path(source)


def run_profile(tmp_path, model, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main(["profile", "--model", str(model), "--out", str(out), "--no-progress", *extra]) == 0
    return out


def test_profile_cli_on_tiny_vl(tmp_path, capsys):
    from transformers import AutoConfig

    model = model_dir("tiny-vl")
    report = tmp_path / "report"
    out = run_profile(tmp_path, model, "a", "--report-dir", str(report), "--created", "2026-01-01T00:00:00+00:00",
                      "--theta", "0.5")
    text = capsys.readouterr().out
    assert "static" in text and "dynamic" in text and "total:" in text
    ident = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(model))
    profile = HeadProfile.load(out, expect=ident)                   # validates schema + model identity
    assert profile.classification.theta == 0.5
    assert profile.provenance["num_prompts"] == 8
    assert profile.provenance["calibration"] == "hybridkv-calib-v2 (8 prompts)"
    assert profile.classification.reference_tokens == (512, 1024, 2048, 4096)
    reached = profile.provenance["prompts_per_reference_length"]
    assert set(reached) == {"512", "1024", "2048", "4096"} and all(1 <= n <= 8 for n in reached.values())
    assert reached["4096"] == 8            # at 512 a two-image prompt may still be inside its images: no text queries
    assert profile.provenance["created"] == "2026-01-01T00:00:00+00:00"
    assert all(0.0 <= e.score <= 1.0 for layer in profile.layers for e in layer)
    assert (report / "report.md").read_text().count("| ") > 2
    assert (report / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # deterministic: a second run with the same date is byte-identical
    again = run_profile(tmp_path, model, "b", "--created", "2026-01-01T00:00:00+00:00", "--theta", "0.5")
    assert out.read_bytes() == again.read_bytes()


# Per-head scores are compared within SCORE_TOL, everything else exactly. A score is a selection recall (the share
# of 32 following text queries' attention on the keys 32 earlier queries attend to most) averaged over 8 prompts
# and 4 reference lengths (core/sparsity.py). Another machine's BLAS rounds the fp32 softmax differently (~1e-6
# relative); the one discrete step, a key swapped at the edge of the top-k, moves a score by that key's share of
# the following queries' attention divided by 32 queries, 8 prompts and 4 lengths: an edge key holds little
# attention (it ranks ~10 % of the context down), so each swap stays far below 1e-3. 1e-3 is still far below any
# difference that would mean the statistic changed. Head types are compared exactly:
# test_shipped_scores_clear_of_theta guarantees no shipped score lies within SCORE_TOL of theta, so no such wobble
# can flip one. Weights are 1 - s + 1e-3 (static) or 1.0 (dynamic): a score moved by d moves its weight by d, so
# they share the tolerance.
SCORE_TOL = 1e-3


def _split(doc):
    """(doc without provenance.created, per-head scores and weights removed; {(layer, kv_head): (score, weight)})."""
    doc = json.loads(json.dumps(doc))
    doc["provenance"].pop("created")
    numbers = {}
    for layer in doc["layers"]:
        for head in layer["heads"]:
            numbers[layer["layer"], head["kv_head"]] = (head.pop("score"), head.pop("weight"))
    return doc, numbers


def test_shipped_scores_clear_of_theta():
    """No shipped score is within SCORE_TOL of theta, and each head's type and weight follow from its score."""
    shipped = json.loads(SHIPPED.read_text())
    theta = shipped["classification"]["theta"]
    heads = [(layer["layer"], h) for layer in shipped["layers"] for h in layer["heads"]]
    near = [(li, h["kv_head"], h["score"]) for li, h in heads if abs(h["score"] - theta) <= SCORE_TOL]
    assert not near, f"shipped scores within {SCORE_TOL} of theta={theta} (their type may flip elsewhere): {near}"
    for li, h in heads:
        assert (h["type"], h["weight"]) == classify(h["score"], theta), f"layer {li} head {h['kv_head']}"


@pytest.mark.model
def test_shipped_profile_reproduces(tmp_path, monkeypatch):
    model_dir("smollm2-vl")
    monkeypatch.chdir(ROOT)                       # the shipped profile records --model as given (relative)
    out = tmp_path / "smollm2-vl.json"
    assert main(["profile", "--model", SHIPPED_CMD_MODEL, "--out", str(out), "--no-progress", "--threads", "2"]) == 0
    fresh_doc, fresh = _split(json.loads(out.read_text()))
    shipped_doc, shipped = _split(json.loads(SHIPPED.read_text()))
    assert fresh_doc == shipped_doc               # version, model identity, theta, provenance, head types: exact
    assert fresh.keys() == shipped.keys()
    off = {key: (fresh[key], shipped[key]) for key in shipped
           if any(abs(a - b) > SCORE_TOL for a, b in zip(fresh[key], shipped[key]))}
    assert not off, f"(score, weight) fresh vs shipped differ by more than {SCORE_TOL}: {off}"


def test_shipped_profile_validates():
    from transformers import AutoConfig

    cfg_path = ROOT / SHIPPED_CMD_MODEL
    expect = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(cfg_path)) if cfg_path.exists() else None
    profile = HeadProfile.load(SHIPPED, expect=expect)
    assert profile.model.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert profile.provenance["model_path"] == SHIPPED_CMD_MODEL
    assert os.path.basename(SHIPPED) == "smollm2-vl.json"


@pytest.mark.parametrize("low, high, kind", [(0.5, 0.8, "dynamic"), (0.92, 0.99, "static"), (0.8, 0.99, None)])
def test_one_type_profiles_are_warned_about_with_theta_and_range(low, high, kind):
    """A profile whose heads all got one type is not hybrid: the warning names θ and the score range."""
    import torch

    from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity
    from hybridkv_vllm.profiler.run import one_type_warning
    identity = ModelIdentity(architecture="T", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8,
                             fingerprint="0" * 16)
    scores = torch.linspace(low, high, 6, dtype=torch.float64).reshape(3, 2)
    warning = one_type_warning(HeadProfile.from_scores(identity, scores, theta=0.9))
    if kind is None:
        assert warning is None
    else:
        assert f"every one of the 6 heads is {kind}" in warning and "theta=0.9" in warning
        assert f"[{low:.4f}, {high:.4f}]" in warning
