"""Profile a model: run the calibration prompts through HF transformers and classify every KV head (DESIGN §2).

Each prompt is one dense prefill. In every text layer the ``"hybridkv"`` attention function hands the layer's
queries and keys to :class:`_SparsityCapture`, which scores :func:`core.sparsity.selection_recall` with the text
queries around each reference length the prompt reaches (two windows of ``QUERY_WINDOW`` queries: no ``[P, P]``
attention matrix is ever built) and returns ordinary dense attention. Scores are averaged per reference length
over prompts, then over reference lengths, rounded to ``SCORE_DECIMALS`` decimals (so the JSON does not depend on
the last bits of a thread-count-dependent reduction) and classified with :meth:`core.profile.HeadProfile.from_scores`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hybridkv_vllm import __version__
from hybridkv_vllm.core.profile import ClassificationParams, HeadProfile, ModelIdentity
from hybridkv_vllm.core.sparsity import SparsityAccumulator, reference_query_positions, selection_recall
from hybridkv_vllm.hf.attention import activate
from hybridkv_vllm.hf.dense import dense_causal
from hybridkv_vllm.hf.inputs import LoadedModel, encode_chat
from hybridkv_vllm.profiler.calibration import CALIBRATION, CALIBRATION_NAME, MultimodalPrompt, context_text
from hybridkv_vllm.profiler.images import load_image

__all__ = ["KEEP", "REFERENCE_TOKENS", "SCORE_DECIMALS", "LayerScorer", "ProfileRun", "one_type_warning",
           "profile_model", "recall_scorer", "run_calibration"]

logger = logging.getLogger("hybridkv")

KEEP = 0.1                                  # share of the context a static head keeps, for the statistic
REFERENCE_TOKENS = (512, 1024, 2048, 4096)   # context lengths heads are scored at (DESIGN §2)
QUERY_WINDOW = 32                           # text queries per window (before and after each reference length)
SCORE_DECIMALS = 6


# What a statistic sees of one layer in one prompt: (layer, q [Hq, P, D], k [P, H, D], scale, {r: (obs, fut)}).
LayerScorer = Callable[[int, torch.Tensor, torch.Tensor, float, dict[int, tuple[torch.Tensor, torch.Tensor]]], None]


class _Capture:
    """Attention handler for one prompt: dense prefill, and every layer's queries and keys handed to a scorer."""

    def __init__(self, scorer: LayerScorer, queries: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.scorer = scorer
        self.queries = queries

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        # q [Hq, P, D], k [H, P, D] (one prefill forward, no cache)
        self.scorer(layer, q, k.transpose(0, 1), scale, self.queries)
        return dense_causal(q, k, v, scale)


def run_calibration(lm: LoadedModel, scorer: LayerScorer, prompts: Sequence[MultimodalPrompt] = CALIBRATION,
                    reference_tokens: Sequence[int] = REFERENCE_TOKENS,
                    progress: bool = True) -> tuple[list[int], list[int]]:
    """One dense prefill per calibration prompt, ``scorer`` called in every text layer with the queries around
    each reference length the prompt reaches; returns (prompt tokens, query tokens) per prompt."""
    refs = tuple(sorted({int(r) for r in reference_tokens}))
    prompt_tokens, query_tokens = [], []
    for prompt in tqdm(prompts, desc="profiling", unit="prompt", disable=not progress):
        images = [load_image(s) for s in prompt.images] if lm.is_multimodal else []
        enc = encode_chat(lm, context_text(prompt, lm.tokenizer) + prompt.instruction, images)
        queries = reference_query_positions(enc.visual_mask, refs, QUERY_WINDOW)
        with torch.no_grad(), activate(_Capture(scorer, queries)):
            lm.model(**enc.inputs, use_cache=False, logits_to_keep=1)
        prompt_tokens.append(enc.prompt_len)
        query_tokens.append(sum(int(o.numel() + f.numel()) for o, f in queries.values()))
    return prompt_tokens, query_tokens


def recall_scorer(acc: SparsityAccumulator, keep: float = KEEP) -> LayerScorer:
    """The profile's statistic: :func:`selection_recall` at each reference length, into ``acc``'s groups."""
    def score(layer, q, keys, scale, queries):
        for ref, (obs, fut) in queries.items():
            recall = selection_recall(q[:, obs].transpose(0, 1), q[:, fut].transpose(0, 1), keys, obs, fut, ref,
                                      scale, keep=keep)
            acc.add(layer, recall, group=ref)
    return score


@dataclass(frozen=True)
class ProfileRun:
    """A profile plus what the report needs: per-prompt token counts and wall time."""

    profile: HeadProfile
    prompt_tokens: tuple[int, ...]
    query_tokens: tuple[int, ...]
    seconds: float


def profile_model(lm: LoadedModel, theta: float = 0.9, prompts: Sequence[MultimodalPrompt] = CALIBRATION,
                  calibration_name: str = CALIBRATION_NAME, created: str | None = None, model_path: str | None = None,
                  progress: bool = True, reference_tokens: Sequence[int] = REFERENCE_TOKENS) -> ProfileRun:
    """Classify every (layer, KV head) of ``lm`` on ``prompts``.

    Parameters
    ----------
    lm : a model loaded with :func:`hybridkv_vllm.hf.inputs.load_model`.
    theta : static iff score >= theta.
    prompts : calibration prompts (images are dropped for a text-only model).
    created : ISO-8601 date for ``provenance.created`` (default: now, UTC); inject it for reproducible output.
    model_path : recorded as ``provenance.model_path`` (default: ``str(lm.path)``).
    reference_tokens : context lengths the heads are scored at; each must be reached by some prompt.
    """
    refs = tuple(sorted({int(r) for r in reference_tokens}))
    identity = ModelIdentity.from_hf_config(lm.model.config)
    acc = SparsityAccumulator(identity.num_layers, identity.num_kv_heads, groups=refs)
    t0 = time.perf_counter()
    prompt_tokens, query_tokens = run_calibration(lm, recall_scorer(acc), prompts, refs, progress)
    seconds = time.perf_counter() - t0
    scores = torch.round(acc.scores(), decimals=SCORE_DECIMALS)
    provenance = {
        "calibration": f"{calibration_name} ({len(prompts)} prompts)",
        "num_prompts": len(prompts),
        "prompts_per_reference_length": {str(r): n for r, n in acc.prompts_per_group().items()},
        "created": created or _now(),
        "tool_version": __version__,
        "model_path": model_path if model_path is not None else str(lm.path),
        "prompt_tokens": prompt_tokens,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
    }
    params = ClassificationParams(theta=theta, statistic=f"selection_recall@{KEEP}",
                                  query_set=f"text_around_reference_lengths@{QUERY_WINDOW}", aggregation="gqa_mean",
                                  reference_tokens=refs)
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
            + " on every head. Check the reference lengths (--reference-tokens) against the prompts you serve, or "
            "choose theta inside the score range (--theta)")


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
