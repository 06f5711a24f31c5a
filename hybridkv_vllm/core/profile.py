"""Head profile: which KV heads are static or dynamic, with their budget weights (DESIGN §1).

A :class:`HeadProfile` is a versioned JSON artefact (``configs/schema/head_profile.v2.json``) tied to one model
through a :class:`ModelIdentity`. Loading validates it (JSON Schema Draft 2020-12, then semantic checks) and fails
loudly with a :class:`ProfileError`; nothing is clipped or repaired.

Choices (where DESIGN §1 is silent)
-----------------------------------
- ``schema_version`` is checked *before* the full schema validation: another version cannot be judged by this
  schema, and its own message ("unsupported head-profile schema_version 7 (this build reads 2)") is clearer
  than a schema error. Version 1 gets its own message: its scores were taken at the calibration prompts' own
  lengths (DESIGN §2), so its head types cannot be read as version 2's; it must be re-profiled.
- ``architecture``: ``cfg.architectures[0]`` of the *top-level* config (for VL models the multimodal class, as in
  the DESIGN example), else of the text config, else the config's class name. Every other fingerprint field comes
  from the text config (``cfg.text_config`` when present). ``head_dim`` falls back to
  ``hidden_size // num_attention_heads``; ``rope_theta`` falls back to ``rope_parameters["rope_theta"]``
  (transformers 5 moved it there), then ``None``.
- Accessor tensors: ``is_static`` is ``torch.bool [L, H]``; ``scores`` and ``weights`` are ``torch.float64
  [L, H]`` (float64 keeps the JSON values exactly).
- Loading does not re-derive a head's ``type`` from its ``score`` and ``theta``: hand overrides are allowed.
- Numbers: the JSON literals ``NaN``, ``Infinity`` and ``-Infinity`` (which Python's ``json`` accepts) are refused
  while parsing; a float that overflows to infinity (``1e400``) or a non-finite float handed to :meth:`from_dict`
  is refused before the schema is applied (one walk, :func:`_check_finite`). Ranges (``score`` in [0, 1],
  ``weight`` in (0, 1e6], ...) live in the schema only. A JSON Schema ``integer`` here is an ``int``: ``3.0`` is
  refused (the writer never produces it, and Python would treat it as a float).
- Error messages name the value's JSON path as ``layers[3].heads[1].score``.
- ``slice_for_tp`` keeps the fingerprint (it identifies the model, not the shard) and records the slice in
  ``provenance["tp_slice"]``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from hybridkv_vllm.core.errors import ProfileError

SCHEMA_VERSION = 2
SCHEMA_RESOURCE = ("hybridkv_vllm.configs", "schema/head_profile.v2.json")
FINGERPRINT_FIELDS = ("architecture", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "hidden_size", "intermediate_size", "vocab_size", "rope_theta")
WEIGHT_EPS = 1e-3
HeadType = Literal["static", "dynamic"]


# ----------------------------------------------------------------------------------------------------- identity
def _cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _cfg_int(cfg: Any, name: str) -> int:
    value = _cfg_get(cfg, name)
    if value is None:
        raise ProfileError(f"model config has no {name!r}: cannot build a ModelIdentity")
    return int(value)


def _architecture(cfg: Any, text_cfg: Any) -> str:
    for c in (cfg, text_cfg):
        archs = _cfg_get(c, "architectures")
        if archs:
            return str(archs[0])
    return type(cfg).__name__


def _rope_theta(text_cfg: Any) -> float | None:
    theta = _cfg_get(text_cfg, "rope_theta")
    if theta is None:
        params = _cfg_get(text_cfg, "rope_parameters") or {}
        theta = params.get("rope_theta") if isinstance(params, dict) else None
    return None if theta is None else float(theta)


def fingerprint_of(fields: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON (sorted keys, no spaces) of ``fields``."""
    canon = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canon.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    """The model a profile belongs to: attention geometry plus a fingerprint of its text config."""

    architecture: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    fingerprint: str

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelIdentity:
        """Build the identity from an HF ``PretrainedConfig`` (or a plain dict); VL configs use ``text_config``."""
        text_cfg = _cfg_get(cfg, "text_config") or cfg
        n_q = _cfg_int(text_cfg, "num_attention_heads")
        n_kv = int(_cfg_get(text_cfg, "num_key_value_heads") or n_q)
        hidden = _cfg_int(text_cfg, "hidden_size")
        head_dim = int(_cfg_get(text_cfg, "head_dim") or hidden // n_q)
        fields = {
            "architecture": _architecture(cfg, text_cfg),
            "num_hidden_layers": _cfg_int(text_cfg, "num_hidden_layers"),
            "num_attention_heads": n_q,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "hidden_size": hidden,
            "intermediate_size": _cfg_get(text_cfg, "intermediate_size"),
            "vocab_size": _cfg_get(text_cfg, "vocab_size"),
            "rope_theta": _rope_theta(text_cfg),
        }
        return cls(architecture=fields["architecture"], num_layers=fields["num_hidden_layers"], num_q_heads=n_q,
                   num_kv_heads=n_kv, head_dim=head_dim, fingerprint=fingerprint_of(fields))

    def to_dict(self) -> dict[str, Any]:
        return {"architecture": self.architecture, "num_layers": self.num_layers, "num_q_heads": self.num_q_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim, "fingerprint": self.fingerprint}

    def mismatches(self, model: ModelIdentity) -> list[str]:
        """Human-readable ``field: profile has X, model has Y`` for every differing field."""
        order = ("num_layers", "num_kv_heads", "num_q_heads", "head_dim", "architecture", "fingerprint")
        return [f"{name}: profile has {getattr(self, name)!r}, model has {getattr(model, name)!r}"
                for name in order if getattr(self, name) != getattr(model, name)]


# ------------------------------------------------------------------------------------------------------ entries
@dataclass(frozen=True, slots=True)
class HeadEntry:
    """One KV head: its type, sparsity score ``s`` in [0, 1] and budget weight (> 0)."""

    kv_head: int
    type: HeadType
    score: float
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"kv_head": self.kv_head, "type": self.type, "score": self.score, "weight": self.weight}


@dataclass(frozen=True, slots=True)
class ClassificationParams:
    """How the profile was classified (DESIGN §2); recorded, not re-applied on load."""

    theta: float = 0.9
    statistic: str = "selection_recall@0.1"
    query_set: str = "text_around_reference_lengths@32"
    aggregation: str = "gqa_mean"
    reference_tokens: tuple[int, ...] = ()   # context lengths the scores were taken at; () = not measured

    def __post_init__(self) -> None:
        object.__setattr__(self, "reference_tokens", tuple(self.reference_tokens))

    def to_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "statistic": self.statistic, "query_set": self.query_set,
                "aggregation": self.aggregation, "reference_tokens": list(self.reference_tokens)}


def classify(score: float, theta: float) -> tuple[HeadType, float]:
    """DESIGN §2 rule: static iff ``score >= theta``; weight ``1 - s + 1e-3`` (static) or ``1.0`` (dynamic)."""
    if score >= theta:
        return "static", 1.0 - score + WEIGHT_EPS
    return "dynamic", 1.0


def default_provenance(**extra: Any) -> dict[str, Any]:
    from hybridkv_vllm import __version__

    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"created": created, "tool_version": __version__, **extra}


# ------------------------------------------------------------------------------------------------------ profile
@dataclass(frozen=True)
class HeadProfile:
    """Static/dynamic head classification of one model.

    Attributes
    ----------
    model : ModelIdentity
    classification : ClassificationParams
    layers : tuple[tuple[HeadEntry, ...], ...]
        ``layers[l][h]`` is KV head ``h`` of layer ``l`` (``L`` x ``H`` entries).
    provenance : dict
        Free-form record of how the profile was made (``created`` and ``tool_version`` required).
    """

    model: ModelIdentity
    classification: ClassificationParams
    layers: tuple[tuple[HeadEntry, ...], ...]
    provenance: dict[str, Any] = field(default_factory=default_provenance)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        _check_shape(self.model, [[e.kv_head for e in layer] for layer in self.layers], list(range(len(self.layers))))

    # ---- construction
    @classmethod
    def from_scores(cls, identity: ModelIdentity, scores: torch.Tensor, theta: float = 0.9,
                    classification: ClassificationParams | None = None,
                    provenance: dict[str, Any] | None = None) -> HeadProfile:
        """Classify sparsity scores ``[L, H]`` with :func:`classify` and build the profile."""
        if tuple(scores.shape) != (identity.num_layers, identity.num_kv_heads):
            raise ProfileError(f"scores: shape {tuple(scores.shape)}, model has "
                               f"({identity.num_layers}, {identity.num_kv_heads}) (num_layers, num_kv_heads)")
        params = classification or ClassificationParams(theta=theta)
        if classification is not None and classification.theta != theta:
            params = replace(classification, theta=theta)
        layers = []
        for row in scores.detach().to(torch.float64).cpu().tolist():
            entries = []
            for h, s in enumerate(row):
                if not 0.0 <= s <= 1.0:
                    raise ProfileError(f"scores: value {s!r} outside [0, 1]")
                kind, weight = classify(s, theta)
                entries.append(HeadEntry(kv_head=h, type=kind, score=float(s), weight=float(weight)))
            layers.append(tuple(entries))
        return cls(model=identity, classification=params, layers=tuple(layers),
                   provenance=dict(provenance) if provenance is not None else default_provenance())

    # ---- accessors
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_kv_heads(self) -> int:
        return self.model.num_kv_heads

    @property
    def is_static(self) -> torch.Tensor:
        """``torch.bool [L, H]``: True for static heads."""
        return torch.tensor([[e.type == "static" for e in layer] for layer in self.layers], dtype=torch.bool)

    @property
    def scores(self) -> torch.Tensor:
        """``torch.float64 [L, H]`` sparsity scores."""
        return torch.tensor([[e.score for e in layer] for layer in self.layers], dtype=torch.float64)

    @property
    def weights(self) -> torch.Tensor:
        """``torch.float64 [L, H]`` budget weights."""
        return torch.tensor([[e.weight for e in layer] for layer in self.layers], dtype=torch.float64)

    # ---- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "classification": self.classification.to_dict(),
            "layers": [{"layer": i, "heads": [e.to_dict() for e in layer]} for i, layer in enumerate(self.layers)],
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, doc: Any, expect: ModelIdentity | None = None, source: str = "head profile") -> HeadProfile:
        """Validate ``doc`` (finite numbers, version, schema, semantics, then ``expect``) and build the profile."""
        _check_finite(doc, source)
        _check_version(doc, source)
        _validate_schema(doc, source)
        model = ModelIdentity(**doc["model"])
        layer_idx = [layer["layer"] for layer in doc["layers"]]
        _check_shape(model, [[h["kv_head"] for h in layer["heads"]] for layer in doc["layers"]], layer_idx, source)
        if model.num_q_heads % model.num_kv_heads:
            raise ProfileError(f"{source}: model.num_q_heads {model.num_q_heads} is not a multiple of "
                               f"model.num_kv_heads {model.num_kv_heads}")
        if expect is not None:
            bad = model.mismatches(expect)
            if bad:
                raise ProfileError(f"{source} was made for another model: " + "; ".join(bad))
        layers = tuple(tuple(HeadEntry(**h) for h in layer["heads"]) for layer in doc["layers"])
        return cls(model=model, classification=ClassificationParams(**doc["classification"]), layers=layers,
                   provenance=dict(doc["provenance"]), schema_version=doc["schema_version"])

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON (floats with ``repr`` precision, so :meth:`load` round-trips exactly).

        A non-finite float (which :meth:`load` would refuse) raises :class:`ProfileError` instead of being written.
        """
        try:
            text = json.dumps(self.to_dict(), indent=2, allow_nan=False)
        except ValueError as exc:
            raise ProfileError(f"cannot save head profile to {str(path)!r}: {exc}") from exc
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, expect: ModelIdentity | None = None) -> HeadProfile:
        """Read and validate a profile; ``expect`` is the model it must belong to."""
        source = f"head profile {str(path)!r}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{source}: cannot read: {exc}") from exc
        return cls.from_dict(parse_json(text, source), expect=expect, source=source)

    # ---- tensor parallelism
    def slice_for_tp(self, rank: int, world: int) -> HeadProfile:
        """The profile of the KV heads TP rank ``rank`` of ``world`` owns (vLLM's head partitioning).

        ``H % world == 0``: rank owns the contiguous heads ``[rank*H/world, (rank+1)*H/world)``.
        ``world % H == 0``: rank owns the replicated head ``rank * H // world``.
        ``num_kv_heads`` and ``num_q_heads`` become the per-rank counts.
        """
        from hybridkv_vllm.core.budgets import tp_owned_heads
        from hybridkv_vllm.core.errors import BudgetError

        h, hq = self.model.num_kv_heads, self.model.num_q_heads
        if world < 1 or not 0 <= rank < world:
            raise ProfileError(f"slice_for_tp: rank {rank} / world {world} is not a valid TP position")
        if hq % world:
            raise ProfileError(f"slice_for_tp: num_q_heads {hq} is not divisible by TP world {world}")
        try:
            owned = tp_owned_heads(h, world)[rank]
        except BudgetError as err:
            raise ProfileError(f"slice_for_tp: {err}") from err
        layers = tuple(tuple(replace(layer[o], kv_head=j) for j, o in enumerate(owned)) for layer in self.layers)
        model = replace(self.model, num_kv_heads=len(owned), num_q_heads=hq // world)
        prov = {**self.provenance, "tp_slice": {"rank": rank, "world": world, "kv_heads": owned}}
        return HeadProfile(model=model, classification=self.classification, layers=layers, provenance=prov,
                           schema_version=self.schema_version)


# --------------------------------------------------------------------------------------------------- validation
class _NonFiniteLiteral:
    """What a ``NaN`` / ``Infinity`` / ``-Infinity`` literal parses to: not a number, so nothing can use it."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def parse_json(text: str, source: str = "head profile") -> Any:
    """``json.loads`` that refuses the non-standard literals ``NaN``, ``Infinity``, ``-Infinity``.

    Each such literal parses to a marker, never to a float; the error (naming the literal and its JSON path) is
    raised here, before anything else looks at the document. Malformed or too deeply nested text is a
    :class:`ProfileError` too.
    """
    try:
        doc = json.loads(text, parse_constant=_NonFiniteLiteral)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source}: malformed JSON: {exc}") from exc
    except RecursionError as exc:
        raise ProfileError(f"{source}: malformed JSON: nested too deeply") from exc
    _check_finite(doc, source)
    return doc


def json_path(parts: Any) -> str:
    """``["layers", 3, "heads", 1, "score"]`` -> ``"layers[3].heads[1].score"`` (``"<root>"`` when empty)."""
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _check_finite(doc: Any, source: str) -> None:
    """Refuse non-finite numbers (a non-standard literal, an overflowed ``1e400``, a NaN float) anywhere in ``doc``."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(doc, ())]
    while stack:                                    # iterative: a deeply nested provenance cannot overflow the stack
        value, where = stack.pop()
        if isinstance(value, dict):
            stack.extend((v, (*where, k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, (*where, i)) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, _NonFiniteLiteral) or (isinstance(value, float) and not math.isfinite(value)):
            raise ProfileError(f"{source}: {json_path(where)} is {value!r}: a head profile's numbers must be "
                               "finite (NaN, Infinity and -Infinity are refused)")


def _check_version(doc: Any, source: str) -> None:
    if not isinstance(doc, dict):
        raise ProfileError(f"{source}: top level must be a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version == 1 and not isinstance(version, bool):
        raise ProfileError(f"{source}: head-profile schema_version 1 is no longer read (this build reads "
                           f"{SCHEMA_VERSION}): version 1 scored heads at the calibration prompts' own lengths, "
                           "version 2 at fixed reference lengths, so its head types mean something else; "
                           "re-run `hybridkv profile` for this model")
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        raise ProfileError(f"{source}: unsupported head-profile schema_version {version} "
                           f"(this build reads {SCHEMA_VERSION})")


_VALIDATOR = None


def schema() -> dict[str, Any]:
    """The head-profile JSON Schema, loaded from the ``hybridkv_vllm.configs`` package."""
    package, name = SCHEMA_RESOURCE
    return json.loads(resources.files(package).joinpath(name).read_text(encoding="utf-8"))


def _validator() -> Any:
    """Draft 2020-12 validator of the schema whose ``integer`` is a Python ``int`` (not ``3.0``, not a bool)."""
    global _VALIDATOR
    import jsonschema

    if _VALIDATOR is None:
        base = jsonschema.Draft202012Validator
        checker = base.TYPE_CHECKER.redefine(
            "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool))
        _VALIDATOR = jsonschema.validators.extend(base, type_checker=checker)(schema())
    return _VALIDATOR


def _validate_schema(doc: Any, source: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
    if error is not None:
        raise ProfileError(f"{source}: schema error at {json_path(error.absolute_path)}: {error.message}")


def _check_shape(model: ModelIdentity, heads: list[list[int]], layer_idx: list[int],
                 source: str = "head profile") -> None:
    if len(heads) != model.num_layers:
        raise ProfileError(f"{source}: layers has {len(heads)} entries, model.num_layers is {model.num_layers}")
    for i, (li, kv) in enumerate(zip(layer_idx, heads)):
        if li != i:
            raise ProfileError(f"{source}: layers[{i}].layer is {li}, expected {i} (layers in order)")
        if len(kv) != model.num_kv_heads:
            raise ProfileError(f"{source}: layers[{i}].heads has {len(kv)} entries, "
                               f"model.num_kv_heads is {model.num_kv_heads}")
        if kv != list(range(model.num_kv_heads)):
            raise ProfileError(f"{source}: layers[{i}].heads kv_head indices are {kv}, expected 0..{len(kv) - 1}")
