"""The calibration set ``hybridkv-calib-v1``: 8 image + instruction prompts built from images that installed packages
carry (see :mod:`hybridkv_vllm.profiler.images`). Instructions vary on purpose (describe, count, read text, compare,
locate) so the text queries that follow the image attend in different ways.

The set is data in code, so it ships with the package and is versioned with it: changing a prompt means a new
``CALIBRATION_NAME`` (profiles record it in ``provenance.calibration``)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CALIBRATION_NAME", "CALIBRATION_V1", "MultimodalPrompt"]

CALIBRATION_NAME = "hybridkv-calib-v1"


@dataclass(frozen=True, slots=True)
class MultimodalPrompt:
    """One user turn: images (sources ``"<package>:<file>"``) followed by an instruction."""

    name: str
    images: tuple[str, ...]
    instruction: str


CALIBRATION_V1: tuple[MultimodalPrompt, ...] = (
    MultimodalPrompt("describe-astronaut", ("skimage:astronaut.png",),
                     "Describe this photo in detail: who is in it, what they wear and what is in the background."),
    MultimodalPrompt("count-coins", ("skimage:coins.png",),
                     "How many coins are in this image? Count them row by row and give the total."),
    MultimodalPrompt("read-text", ("skimage:text.png",),
                     "Read all the text written in this image and write it out exactly."),
    MultimodalPrompt("compare-motorcycles", ("skimage:motorcycle_left.png", "skimage:motorcycle_right.png"),
                     "Compare the two images. What is the same in both, and what differs between them?"),
    MultimodalPrompt("locate-cat", ("skimage:chelsea.png",),
                     "Where in the picture is the animal's face, and what colour are its eyes?"),
    MultimodalPrompt("describe-grace-hopper", ("matplotlib:grace_hopper.jpg",),
                     "Who might this person be? Describe the uniform and the insignia you can see."),
    MultimodalPrompt("read-page", ("skimage:page.png",),
                     "This is a scanned page. Transcribe the first two lines and say what the page is about."),
    MultimodalPrompt("rocket-scene", ("skimage:rocket.jpg",),
                     "What is happening in this scene? List the objects you see from left to right."),
)
