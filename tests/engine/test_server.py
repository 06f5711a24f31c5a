"""`vllm serve --attention-backend HYBRIDKV` end to end: OpenAI chat with images, bad requests answered 4xx
while the server keeps serving, and bad configurations refused at start-up with a message naming the problem."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request

import pytest

from hybridkv_vllm.serving import free_port, image_data_url, serve_command, wait_healthy

from engine_utils import MODEL, make_llm

pytestmark = pytest.mark.engine


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, shipped_profile):
    work = tmp_path_factory.mktemp("server")
    port = free_port()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(work), VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = work / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(serve_command(MODEL, shipped_profile, 0.1, port, "smollm2-vl"), stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(proc, port, log, timeout=400)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_chat_with_image_and_bad_requests(server):
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")
    image = {"type": "image_url", "image_url": {"url": image_data_url()}}
    question = {"type": "text", "text": "Here is a picture. What is the capital of France? Answer in one sentence."}
    reply = client.chat.completions.create(model="smollm2-vl", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": [image, question]}])
    assert reply.choices[0].message.content.strip()
    assert reply.usage.prompt_tokens > 256                      # long enough to be compressed

    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}
    status, _ = _post(server, {"model": "smollm2-vl", "max_tokens": 8,
                               "messages": [{"role": "user", "content": [bad_image, question]}]})
    assert 400 <= status < 500
    status, _ = _post(server, {"model": "smollm2-vl", "max_tokens": -3,
                               "messages": [{"role": "user", "content": "hi"}]})
    assert 400 <= status < 500
    status, _ = _post(server, {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    assert 400 <= status < 500
    # per-request control: a bad budget is a 400 naming it; a request may opt out or bring its own budget
    for bad in (2, 0, "lots", "nan"):
        status, body = _post(server, {"model": "smollm2-vl", "max_tokens": 4, "vllm_xargs": {"hybridkv_budget": bad},
                                      "messages": [{"role": "user", "content": "hi"}]})
        assert status == 400, (bad, status, body)
        assert "hybridkv_budget" in json.dumps(body), body
    status, body = _post(server, {"model": "smollm2-vl", "max_tokens": 4, "vllm_xargs": {"hybridkv_resolved": 1},
                                  "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "hybridkv_resolved" in json.dumps(body)
    for own in ("off", 0.3):
        status, body = _post(server, {"model": "smollm2-vl", "max_tokens": 16, "temperature": 0,
                                      "vllm_xargs": {"hybridkv_budget": own},
                                      "messages": [{"role": "user", "content": [image, question]}]})
        assert status == 200 and body["choices"][0]["message"]["content"].strip(), (own, body)

    again = client.chat.completions.create(model="smollm2-vl", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": [image, question]}])
    assert again.choices[0].message.content == reply.choices[0].message.content


def test_server_refuses_a_profile_for_another_model(tmp_path):
    """The tiny model's profile, served with the embedded model: the server exits and says why."""
    from transformers import AutoConfig

    from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity
    import torch
    tiny = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(MODEL.parent / "tiny-vl"))
    wrong = tmp_path / "tiny.json"
    HeadProfile.from_scores(tiny, torch.full((tiny.num_layers, tiny.num_kv_heads), 0.95)).save(wrong)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    run = subprocess.run(serve_command(MODEL, wrong, 0.1, free_port(), "smollm2-vl"), env=env, timeout=400,
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "made for another model" in run.stdout + run.stderr
    assert "num_layers" in run.stdout + run.stderr


@pytest.mark.parametrize("case", ["missing_profile", "budget_out_of_range", "prefix_caching", "no_such_file",
                                  "floor_zero", "sub_chunks_not_dividing"])
def test_engine_refuses_bad_configuration(case, profile_path):
    config = {"profile": str(profile_path), "budget": 0.1}
    kwargs, expect = {}, ""
    if case == "missing_profile":
        config.pop("profile")
        expect = "hybridkv.profile is missing"
    elif case == "budget_out_of_range":
        config["budget"] = 1.5
        expect = "budget=1.5"
    elif case == "sub_chunks_not_dividing":
        config["sub_chunks"] = 3                 # blocks of 32 tokens
        expect = "sub_chunks=3 must divide chunk_size=32"
    elif case == "floor_zero":
        config["floor_blocks"] = 0
        expect = "hybridkv.floor_blocks=0: expected an integer >= 1"
    elif case == "prefix_caching":
        kwargs["enable_prefix_caching"] = True
        expect = "--no-enable-prefix-caching"
    else:
        config["profile"] = "/nonexistent/profile.json"
        expect = "no such file"
    with pytest.raises(Exception) as info:
        make_llm(MODEL, config, **kwargs)
    assert expect in str(info.value) or expect in repr(info.value.__cause__)
