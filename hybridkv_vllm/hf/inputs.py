"""Loading a model directory for the HF integration and turning chat prompts into model inputs.

One place decides how a prompt becomes token ids, so the profiler, the harness and the tests encode the same way:
the model's own chat template; images go through its processor (Qwen2.5-VL: one ``<|image_pad|>`` per merged
patch). ``visual_mask`` marks the image/video placeholder tokens (``config.image_token_id`` /
``video_token_id``); the ``<|vision_start|>``/``<|vision_end|>`` markers count as text.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hybridkv_vllm.hf.attention import ATTN_IMPLEMENTATION, register

__all__ = ["EncodedPrompt", "LoadedModel", "encode_chat", "load_model", "visual_token_ids"]


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode plus what encodes its prompts (a processor for VL models, else a tokenizer)."""

    path: Path
    model: torch.nn.Module
    processor: object
    tokenizer: object

    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, "text_config", None) or cfg

    @property
    def is_multimodal(self) -> bool:
        return getattr(self.model.config, "image_token_id", None) is not None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


@dataclass(frozen=True)
class EncodedPrompt:
    """Model inputs of one prompt (batch 1) and its visual-token mask.

    ``inputs`` holds ``input_ids [1, P]`` plus, for images, ``pixel_values``/``image_grid_thw`` (whatever the
    processor returns, minus ``attention_mask``: batch 1 has no padding). ``visual_mask`` is ``[P]`` bool.
    """

    inputs: dict
    visual_mask: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``path`` offline with ``attn_implementation="hybridkv"`` (plain SDPA until a handler is activated)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    register()
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ValueError(f"{path}: unknown architecture {arch!r} in config.json")
    model = cls.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = tokenizer
    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained(path)
    return LoadedModel(path=path, model=model, processor=processor, tokenizer=tokenizer)


def visual_token_ids(config) -> tuple[int, ...]:
    """The placeholder token ids that stand for visual features (empty for a text-only model)."""
    ids = (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
    return tuple(int(i) for i in ids if i is not None)


def encode_chat(lm: LoadedModel, text: str, images: Sequence = ()) -> EncodedPrompt:
    """Encode one user turn (``images`` first, then ``text``) with the chat template and a generation prompt.

    Parameters
    ----------
    lm : the loaded model.
    text : the user's text.
    images : PIL images, placed before the text.
    """
    if images and not lm.is_multimodal:
        raise ValueError(f"{lm.path}: a text-only model got {len(images)} image(s)")
    if images:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        chat = lm.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                tokenize=False)
        enc = dict(lm.processor(text=[chat], images=list(images), return_tensors="pt"))
    else:
        chat = lm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
        enc = dict(lm.tokenizer([chat], return_tensors="pt", add_special_tokens=False))
    enc.pop("attention_mask", None)
    ids = enc["input_ids"][0]
    mask = torch.zeros(ids.shape[0], dtype=torch.bool)
    for tid in visual_token_ids(lm.model.config):
        mask |= ids == tid
    return EncodedPrompt(inputs=enc, visual_mask=mask)
