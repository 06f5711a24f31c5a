"""The calibration set ``hybridkv-calib-v2``: 8 long prompts (about 4.1-4.6k tokens), each images + a long text +
an instruction, built only from what installed packages carry: images from scikit-image and matplotlib (see
:mod:`hybridkv_vllm.profiler.images`) and licence texts from Debian's ``base-files``
(``/usr/share/common-licenses``). Heads are scored at fixed reference lengths (DESIGN §2), so every prompt is
longer than the largest default reference length (4096 tokens); the text around each reference length is what the
statistic reads.

Kept apart from what ``hybridkv eval`` measures: its NIAH haystack is the GPL-3 text and its image prompts use
other images and instructions (``tests/eval/test_eval_quick.py`` checks both).

The set is data in code, so it ships with the package and is versioned with it: changing a prompt means a new
``CALIBRATION_NAME`` (profiles record it in ``provenance.calibration``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CALIBRATION", "CALIBRATION_NAME", "CONTEXT_TOKENS", "LICENSES", "CalibrationError", "MultimodalPrompt",
           "context_text"]

CALIBRATION_NAME = "hybridkv-calib-v2"
LICENSES = Path("/usr/share/common-licenses")
CONTEXT_TOKENS = 4200


class CalibrationError(ValueError):
    """A calibration text source is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class MultimodalPrompt:
    """One user turn: images (sources ``"<package>:<file>"``), then ``context_tokens`` tokens of the licence
    texts ``context`` (concatenated, in order), then the instruction."""

    name: str
    images: tuple[str, ...]
    instruction: str
    context: tuple[str, ...] = ()
    context_tokens: int = 0


def context_text(prompt: MultimodalPrompt, tokenizer, root: Path = LICENSES) -> str:
    """The prompt's text before the instruction: its licence texts (whitespace inside paragraphs collapsed),
    cut to ``context_tokens`` tokens of ``tokenizer``; ``""`` without context."""
    if not prompt.context:
        return ""
    parts = []
    for name in prompt.context:
        try:
            raw = (root / name).read_text(encoding="utf-8")
        except OSError as exc:
            raise CalibrationError(f"calibration text {root / name} not readable ({exc}); it ships with Debian's "
                                   "base-files") from exc
        parts += [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    ids = tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]
    if len(ids) < prompt.context_tokens:
        raise CalibrationError(f"calibration prompt {prompt.name!r}: {list(prompt.context)} hold {len(ids)} tokens, "
                               f"fewer than the {prompt.context_tokens} it needs")
    return tokenizer.decode(ids[:prompt.context_tokens]) + "\n\n"


def _p(name: str, images: tuple[str, ...], context: tuple[str, ...], instruction: str) -> MultimodalPrompt:
    return MultimodalPrompt(name, images, instruction, context, CONTEXT_TOKENS)


# Instructions vary on purpose (describe, count, read, compare, locate, summarise) so the text queries attend in
# different ways; each prompt pairs different texts.
CALIBRATION: tuple[MultimodalPrompt, ...] = (
    _p("astronaut-apache", ("skimage:astronaut.png",), ("Apache-2.0", "MPL-2.0"),
       "Describe the photo: who is in it and what they wear. Then say which licence terms above cover patents."),
    _p("coins-mpl", ("skimage:coins.png",), ("MPL-2.0", "Artistic"),
       "How many coins are in the image? Then list the obligations the text above puts on distributors."),
    _p("text-lgpl", ("skimage:text.png",), ("LGPL-2.1",),
       "Read the text written in the image. Then explain how the licence above treats linked libraries."),
    _p("motorcycles-gfdl", ("skimage:motorcycle_left.png", "skimage:motorcycle_right.png"), ("GFDL-1.3",),
       "Compare the two images. Then summarise what the licence above requires of modified versions."),
    _p("cat-mpl11", ("skimage:chelsea.png",), ("MPL-1.1", "Apache-2.0"),
       "Where is the animal's face in the picture? Then name the licence above and its main conditions."),
    _p("hopper-artistic", ("matplotlib:grace_hopper.jpg",), ("Artistic", "GPL-1", "Apache-2.0"),
       "Describe the uniform in the photo. Then compare the first two licences above in three sentences."),
    _p("page-gpl1", ("skimage:page.png",), ("GPL-1", "MPL-2.0"),
       "Transcribe the first line of the scanned page. Then list the warranty terms stated in the text above."),
    _p("rocket-lgpl2", ("skimage:rocket.jpg",), ("LGPL-2",),
       "What is happening in this scene? Then say what the text above allows a user to do."),
)
