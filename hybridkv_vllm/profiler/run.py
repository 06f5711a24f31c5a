"""Profile a model: run the calibration prompts through HF transformers and classify every KV head (DESIGN §2).

Each prompt is one dense prefill. In every text layer the ``"hybridkv"`` attention function hands the layer's
queries and keys to :class:`_SparsityCapture`, which feeds :func:`core.sparsity.mass_concentration` (chunked over
queries: no ``[P, P]`` attention matrix is ever built) and returns ordinary dense attention. Scores are averaged over
prompts, rounded to ``SCORE_DECIMALS`` decimals (so the JSON does not depend on the last bits of a thread-count-
dependent reduction) and classified with :meth:`core.profile.HeadProfile.from_scores`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hybridkv_vllm import __version__
from hybridkv_vllm.core.profile import ClassificationParams, HeadProfile, ModelIdentity
from hybridkv_vllm.core.sparsity import SparsityAccumulator, query_positions
from hybridkv_vllm.hf.attention import activate
from hybridkv_vllm.hf.dense import dense_causal
from hybridkv_vllm.hf.inputs import LoadedModel, encode_chat
from hybridkv_vllm.profiler.calibration import CALIBRATION_NAME, CALIBRATION_V1, MultimodalPrompt
from hybridkv_vllm.profiler.images import load_image

__all__ = ["MASS", "SCORE_DECIMALS", "ProfileRun", "one_type_warning", "profile_model"]

logger = logging.getLogger("hybridkv")

MASS = 0.9
OBS_WINDOW = 32
QUERY_CHUNK = 64
SCORE_DECIMALS = 6


class _SparsityCapture:
    """Attention handler for one prompt: dense prefill plus the sparsity statistic of every layer."""

    def __init__(self, acc: SparsityAccumulator, q_pos: torch.Tensor) -> None:
        self.acc = acc
        self.q_pos = q_pos

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q [Hq, P, D], k [H, P, D] (one prefill forward, no cache)
        self.acc.update(layer, q[:, self.q_pos].transpose(0, 1), k.transpose(0, 1), self.q_pos, scale)
        return dense_causal(q, k, v, scale)


@dataclass(frozen=True)
class ProfileRun:
    """A profile plus what the report needs: per-prompt token counts and wall time."""

    profile: HeadProfile
    prompt_tokens: tuple[int, ...]
    query_tokens: tuple[int, ...]
    seconds: float


def profile_model(lm: LoadedModel, theta: float = 0.9, prompts: Sequence[MultimodalPrompt] = CALIBRATION_V1,
                  calibration_name: str = CALIBRATION_NAME, created: str | None = None, model_path: str | None = None,
                  progress: bool = True) -> ProfileRun:
    """Classify every (layer, KV head) of ``lm`` on ``prompts``.

    Parameters
    ----------
    lm : a model loaded with :func:`hybridkv_vllm.hf.inputs.load_model`.
    theta : static iff score >= theta.
    prompts : calibration prompts (images are dropped for a text-only model: its query set is then the last
        ``OBS_WINDOW`` tokens, DESIGN §2).
    created : ISO-8601 date for ``provenance.created`` (default: now, UTC); inject it for reproducible output.
    model_path : recorded as ``provenance.model_path`` (default: ``str(lm.path)``).
    """
    identity = ModelIdentity.from_hf_config(lm.model.config)
    acc = SparsityAccumulator(identity.num_layers, identity.num_kv_heads, mass=MASS, query_chunk=QUERY_CHUNK)
    prompt_tokens, query_tokens = [], []
    t0 = time.perf_counter()
    for prompt in tqdm(prompts, desc="profiling", unit="prompt", disable=not progress):
        images = [load_image(s) for s in prompt.images] if lm.is_multimodal else []
        enc = encode_chat(lm, prompt.instruction, images)
        q_pos = query_positions(enc.visual_mask, OBS_WINDOW)
        with torch.no_grad(), activate(_SparsityCapture(acc, q_pos)):
            lm.model(**enc.inputs, use_cache=False, logits_to_keep=1)
        prompt_tokens.append(enc.prompt_len)
        query_tokens.append(int(q_pos.numel()))
    seconds = time.perf_counter() - t0
    scores = torch.round(acc.scores(), decimals=SCORE_DECIMALS)
    provenance = {
        "calibration": f"{calibration_name} ({len(prompts)} prompts)",
        "num_prompts": len(prompts),
        "created": created or _now(),
        "tool_version": __version__,
        "model_path": model_path if model_path is not None else str(lm.path),
        "prompt_tokens": prompt_tokens,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    params = ClassificationParams(theta=theta, statistic=f"mass_concentration@{MASS}", query_set="post_image_text",
                                  aggregation="gqa_mean")
    profile = HeadProfile.from_scores(identity, scores, theta=theta, classification=params, provenance=provenance)
    warning = one_type_warning(profile)
    if warning:
        logger.warning("hybridkv profile: %s", warning)
    return ProfileRun(profile=profile, prompt_tokens=tuple(prompt_tokens), query_tokens=tuple(query_tokens),
                      seconds=seconds)


def one_type_warning(profile: HeadProfile) -> str | None:
    """A warning when every head got the same type (the profile is then not hybrid: all retrieval or all pruning),
    naming θ and the range of the scores, so that the user can see how far θ is from splitting them."""
    static = profile.is_static
    if bool(static.any()) and not bool(static.all()):
        return None
    kind, other = ("static", "dynamic") if bool(static.all()) else ("dynamic", "static")
    scores = profile.scores
    return (f"every one of the {static.numel()} heads is {kind}, none {other}: theta={profile.classification.theta:g} "
            f"and the scores lie in [{float(scores.min()):.4f}, {float(scores.max()):.4f}] (a head is static iff its "
            "score >= theta); HybridKV then runs as " + ("pruning" if kind == "static" else "retrieval")
            + " on every head. Check the calibration prompts' lengths against the prompts you serve, or choose "
            "theta inside the score range (--theta)")


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
