"""`hybridkv profile`: the calibration set, the CLI end to end on tiny-vl, and the shipped profile reproduces."""
import json
import os

import pytest
from testing_models import ROOT, model_dir

from hybridkv_vllm.cli import main
from hybridkv_vllm.core import HeadProfile, ModelIdentity
from hybridkv_vllm.profiler.calibration import CALIBRATION_V1
from hybridkv_vllm.profiler.images import ImageSourceError, image_path, load_image

SHIPPED = ROOT / "configs" / "profiles" / "smollm2-vl.json"
SHIPPED_CMD_MODEL = "models/smollm2-vl"      # the --model argument the shipped profile was made with


def test_calibration_images_load_from_installed_packages():
    assert len(CALIBRATION_V1) == 8
    assert len({p.name for p in CALIBRATION_V1}) == 8
    for prompt in CALIBRATION_V1:
        for source in prompt.images:
            img = load_image(source)
            assert img.mode == "RGB" and min(img.size) > 100


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
    assert profile.provenance["calibration"] == "hybridkv-calib-v1 (8 prompts)"
    assert profile.provenance["created"] == "2026-01-01T00:00:00+00:00"
    assert all(0.0 <= e.score < 1.0 for layer in profile.layers for e in layer)
    assert (report / "report.md").read_text().count("| ") > 2
    assert (report / "score_histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # deterministic: a second run with the same date is byte-identical
    again = run_profile(tmp_path, model, "b", "--created", "2026-01-01T00:00:00+00:00", "--theta", "0.5")
    assert out.read_bytes() == again.read_bytes()


def _without_created(doc):
    doc = json.loads(json.dumps(doc))
    doc["provenance"].pop("created")
    return doc


@pytest.mark.model
def test_shipped_profile_reproduces(tmp_path, monkeypatch):
    model_dir("smollm2-vl")
    monkeypatch.chdir(ROOT)                       # the shipped profile records --model as given (relative)
    out = tmp_path / "smollm2-vl.json"
    assert main(["profile", "--model", SHIPPED_CMD_MODEL, "--out", str(out), "--no-progress"]) == 0
    shipped = json.loads(SHIPPED.read_text())
    assert _without_created(json.loads(out.read_text())) == _without_created(shipped)


def test_shipped_profile_validates():
    from transformers import AutoConfig

    cfg_path = ROOT / SHIPPED_CMD_MODEL
    expect = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(cfg_path)) if cfg_path.exists() else None
    profile = HeadProfile.load(SHIPPED, expect=expect)
    assert profile.model.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert profile.provenance["model_path"] == SHIPPED_CMD_MODEL
    assert os.path.basename(SHIPPED) == "smollm2-vl.json"
