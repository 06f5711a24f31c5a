"""The harness's workloads: NIAH passkey prompts, long-text prompts and multimodal prompts.

- **NIAH passkey**: a haystack cut from a freely licensed text already on the machine (Debian's GPL-3 licence,
  ``/usr/share/common-licenses/GPL-3``), paragraph-aligned, with the needle sentence inserted at a relative depth.
  The passkey is 5 digits drawn from a generator seeded by (length, depth), so prompts are reproducible.
- **long text**: a later stretch of the same text with an instruction (summarise / list), for greedy agreement
  and KL at long context.
- **multimodal**: images from installed packages with instructions, **disjoint** from the calibration set
  (:data:`hybridkv_vllm.profiler.calibration.CALIBRATION`): other images, other instructions; the calibration
  texts are other licences than the GPL-3 haystack.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from hybridkv_vllm.profiler.calibration import MultimodalPrompt

__all__ = ["HAYSTACK_PATH", "MULTIMODAL_EVAL", "NiahPrompt", "TextPrompt", "haystack_chat_prompt",
           "haystack_paragraphs", "long_text_prompts", "niah_prompts"]

HAYSTACK_PATH = Path("/usr/share/common-licenses/GPL-3")

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
NIAH_INSTRUCTION = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the pass key.")
NIAH_QUESTION = "What is the pass key? Answer with the number only."


@dataclass(frozen=True)
class NiahPrompt:
    name: str
    text: str
    passkey: str
    depth: float
    target_tokens: int


@dataclass(frozen=True)
class TextPrompt:
    name: str
    text: str


MULTIMODAL_EVAL: tuple[MultimodalPrompt, ...] = (
    MultimodalPrompt("coffee-and-horse", ("skimage:coffee.png", "skimage:horse.png"),
                     "Write a short story that connects these two pictures. Mention a detail from each."),
    MultimodalPrompt("camera-moon", ("skimage:camera.png", "skimage:moon.png"),
                     "Which of the two images was taken outdoors? Explain your reasoning step by step."),
    MultimodalPrompt("hubble-colors", ("skimage:hubble_deep_field.jpg", "skimage:color.png"),
                     "List every colour you can see in these images and say where each one appears."),
    MultimodalPrompt("retina-clock", ("skimage:retina.jpg", "skimage:clock_motion.png"),
                     "What kind of images are these? Give a title to each and explain what it shows."),
)


def haystack_chat_prompt(n_chars: int, question: str = "What is this text about? Answer briefly.",
                         path: Path = HAYSTACK_PATH) -> str:
    """The haystack's first ``n_chars`` characters and a question, in the ChatML template (SmolLM2, Qwen)."""
    return f"<|im_start|>user\n{path.read_text()[:n_chars]}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def haystack_paragraphs(path: Path = HAYSTACK_PATH) -> list[str]:
    """The haystack text as paragraphs (blank-line separated, internal whitespace collapsed)."""
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"haystack {path} not readable ({exc}); it ships with Debian's base-files") from exc
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", raw)]
    return [p for p in paras if p]


def _take(paragraphs: list[str], n_tokens: int, count_tokens, start: int = 0) -> list[str]:
    """Paragraphs from ``start`` (wrapping around) until ``n_tokens`` tokens are reached."""
    out: list[str] = []
    total = 0
    i = start
    while total < n_tokens:
        p = paragraphs[i % len(paragraphs)]
        out.append(p)
        total += count_tokens(p + "\n\n")
        i += 1
    return out


def niah_prompts(count_tokens, lengths: tuple[int, ...], depths: tuple[float, ...], seed: int = 0,
                 path: Path = HAYSTACK_PATH) -> list[NiahPrompt]:
    """NIAH passkey prompts: one per (haystack length in tokens, needle depth in [0, 1]).

    ``count_tokens(text) -> int`` is the model's tokenizer; the chat template adds ~60 tokens on top.
    """
    paras = haystack_paragraphs(path)
    prompts = []
    for n in lengths:
        hay = _take(paras, n, count_tokens)
        for depth in depths:
            rng = random.Random(f"{seed}-{n}-{depth}")
            key = f"{rng.randint(10000, 99999)}"
            at = round(depth * len(hay))
            body = hay[:at] + [NEEDLE.format(key=key)] + hay[at:]
            text = NIAH_INSTRUCTION + "\n\n" + "\n\n".join(body) + "\n\n" + NIAH_QUESTION
            prompts.append(NiahPrompt(name=f"niah-{n}-d{depth:.2f}", text=text, passkey=key, depth=depth,
                                      target_tokens=n))
    return prompts


def long_text_prompts(count_tokens, n_tokens: int, path: Path = HAYSTACK_PATH) -> list[TextPrompt]:
    """Two long-context prompts (summarise, list obligations) over different stretches of the haystack."""
    paras = haystack_paragraphs(path)
    a = _take(paras, n_tokens, count_tokens, start=20)
    b = _take(paras, n_tokens, count_tokens, start=60)
    return [
        TextPrompt("summarise", "\n\n".join(a) + "\n\nSummarise the text above in five bullet points."),
        TextPrompt("obligations", "\n\n".join(b) + "\n\nList what the text above requires a person who conveys "
                   "the work to do, one numbered point each, quoting the section numbers."),
    ]
