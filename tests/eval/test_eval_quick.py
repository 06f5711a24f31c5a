"""`hybridkv eval --quick` on tiny-vl: output structure, and `full` is an oracle (agreement 1, KL 0)."""
import json
from pathlib import Path

import pytest
import torch
from testing_models import model_dir

from hybridkv_vllm.cli import main
from hybridkv_vllm.eval.metrics import mean_kl, passkey_found, top1_agreement
from hybridkv_vllm.eval.prompts import HAYSTACK_PATH, MULTIMODAL_EVAL, haystack_paragraphs, niah_prompts
from hybridkv_vllm.profiler.calibration import CALIBRATION

METHODS = ["full", "hybridkv", "streaming", "snapkv", "random"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = model_dir("tiny-vl")
    profile = tmp / "tiny.json"
    assert main(["profile", "--model", str(model), "--out", str(profile), "--no-progress", "--theta", "0.5"]) == 0
    out = tmp / "out"
    assert main(["eval", "--model", str(model), "--profile", str(profile), "--budgets", "0.1,0.4", "--out", str(out),
                 "--quick", "--no-progress", "--niah-lengths", "200"]) == 0
    return out


def test_quick_outputs_and_structure(quick_run):
    doc = json.loads((quick_run / "results.json").read_text())
    assert set(doc) >= {"rows", "summary", "goals", "meta", "task_seconds", "workload"}
    assert doc["meta"]["quick"] is True and doc["meta"]["wall_s"] > 0
    assert doc["meta"]["config"]["niah_lengths"] == [200]                   # --niah-lengths overrides --quick's
    assert [(e["budget"], e["method"]) for e in doc["summary"]] == [(b, m) for b in (0.1, 0.4) for m in METHODS]
    for e in doc["summary"]:
        for key in ("niah_acc", "agreement", "kl", "agreement_text", "agreement_mm", "kl_text", "kl_mm"):
            assert e[key] is not None, (e["method"], key)
        assert 0.0 <= e["agreement"] <= 1.0 and e["kl"] >= 0.0
    assert {r["task"] for r in doc["rows"]} == {"niah", "text", "mm"}
    # no 20 % budget in this run, so the agreement goal is not evaluated
    assert set(doc["goals"]) == {"niah_equal_full_at_10pct", "better_than_baselines"}
    table = (quick_run / "table.md").read_text()
    assert table.count("| hybridkv |") == 2 and "## Goals" in table
    assert (quick_run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_cache_is_an_oracle(quick_run):
    doc = json.loads((quick_run / "results.json").read_text())
    full_rows = [r for r in doc["rows"] if r["method"] == "full" and r["task"] in ("text", "mm")]
    assert full_rows
    for r in full_rows:
        assert r["agreement"] == 1.0
        assert r["kl"] < 1e-9
    for e in doc["summary"]:
        if e["method"] == "full":
            assert e["agreement"] == 1.0 and e["kl"] < 1e-9 and e["kept_fraction"] == 1.0
        else:
            assert e["kept_fraction"] < 1.0


def test_metrics():
    logits = torch.randn(5, 11)
    assert mean_kl(logits, logits) == 0.0
    assert mean_kl(logits, torch.zeros(5, 11)) > 0.0
    assert top1_agreement(logits.argmax(-1), logits) == 1.0
    assert passkey_found("The pass key is 42277.", "42277")
    assert not passkey_found("The pass key is 422770.", "42277")


def test_niah_prompts_are_reproducible_and_hold_the_needle():
    count = lambda text: len(text.split())  # noqa: E731
    a = niah_prompts(count, (300,), (0.0, 0.5, 1.0))
    b = niah_prompts(count, (300,), (0.0, 0.5, 1.0))
    assert a == b and len(a) == 3
    for p in a:
        assert p.text.count(p.passkey) == 2 and len(p.passkey) == 5
    assert len(haystack_paragraphs()) > 50


def test_eval_prompts_differ_from_calibration():
    calib_images = {s for p in CALIBRATION for s in p.images}
    calib_text = {p.instruction for p in CALIBRATION}
    for p in MULTIMODAL_EVAL:
        assert not set(p.images) & calib_images
        assert p.instruction not in calib_text
    assert HAYSTACK_PATH.name not in {name for p in CALIBRATION for name in p.context}   # NIAH's haystack


def test_profile_of_another_model_is_a_named_error(tmp_path, capsys):
    from testing_models import ROOT

    code = main(["eval", "--model", str(model_dir("tiny-vl")), "--profile",
                 str(ROOT / "configs" / "profiles" / "smollm2-vl.json"), "--out", str(tmp_path), "--quick",
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "made for another model" in err and "num_layers: profile has 30, model has 2" in err


def test_unknown_method_is_a_named_error(tmp_path, capsys):
    code = main(["eval", "--model", str(model_dir("tiny-vl")), "--profile", "unused.json", "--methods",
                 "full,h2o", "--out", str(tmp_path), "--quick"])
    assert code == 2 and "--methods 'full,h2o'" in capsys.readouterr().err


@pytest.mark.parametrize("budgets", ["0,0.1", "0.1,1.5", "abc"])
def test_bad_budgets_are_rejected(budgets, capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "m", "--profile", "p", "--out", "o", "--budgets", budgets])
    assert "--budgets" in capsys.readouterr().err


def test_validation_set_is_apart_from_the_eval():
    """The prompts the defaults were chosen on (``VALIDATION``) share no needle prompt, passkey, depth, haystack
    or long-text prompt with ``hybridkv eval``'s."""
    from hybridkv_vllm.eval.harness import VALIDATION, EvalConfig
    from hybridkv_vllm.eval.prompts import long_text_prompts

    count = lambda text: len(text.split())  # noqa: E731
    evaluation = EvalConfig()
    assert Path(VALIDATION.haystack).name != Path(evaluation.haystack).name
    assert not set(VALIDATION.niah_depths) & set(evaluation.niah_depths)
    val = niah_prompts(count, VALIDATION.niah_lengths, VALIDATION.niah_depths, VALIDATION.niah_seed,
                       Path(VALIDATION.haystack))
    ev = niah_prompts(count, evaluation.niah_lengths, evaluation.niah_depths, evaluation.niah_seed,
                      Path(evaluation.haystack))
    assert not {p.passkey for p in val} & {p.passkey for p in ev}
    val_paras = set(haystack_paragraphs(Path(VALIDATION.haystack)))
    assert not val_paras & set(haystack_paragraphs(Path(evaluation.haystack)))
    val_text = long_text_prompts(count, VALIDATION.text_tokens, Path(VALIDATION.haystack))
    ev_text = long_text_prompts(count, evaluation.text_tokens, Path(evaluation.haystack))
    assert not {p.text for p in val_text} & {p.text for p in ev_text}


def test_text_agreement_is_the_harness_measure(tmp_path):
    """``text_agreement`` (the validation scripts' measure) gives the full cache 1.0 and a compressed policy what
    the harness's own rows give it on the same prompts."""
    from hybridkv_vllm.core import BudgetConfig, HeadProfile, make_policy
    from hybridkv_vllm.eval.harness import EvalConfig, text_agreement
    from hybridkv_vllm.hf.inputs import load_model
    from hybridkv_vllm.profiler.synthetic import synthetic_profile

    model = model_dir("tiny-vl")
    lm = load_model(model)
    profile = HeadProfile.load(synthetic_profile(tmp_path / "p.json", model, seed=1))
    cfg = EvalConfig().quick()
    full = make_policy("full", profile, BudgetConfig(1.0))
    policies = {"full": full, "hybridkv": make_policy("hybridkv", profile, BudgetConfig(0.1))}
    agree, n = text_agreement(lm, full, policies, cfg)
    assert n == cfg.num_text and agree["full"] == 1.0 and 0.0 <= agree["hybridkv"] <= 1.0
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model), "--profile", str(tmp_path / "p.json"), "--budgets", "0.1",
                 "--methods", "full,hybridkv", "--out", str(out), "--quick", "--no-progress"]) == 0
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"]
            if r["task"] == "text" and r["method"] == "hybridkv"]
    assert agree["hybridkv"] == pytest.approx(sum(r["agreement"] for r in rows) / len(rows))
