"""Named exceptions of the engine-agnostic core (DESIGN §7: validation raises, never ``assert``)."""
from __future__ import annotations


class HybridKVError(ValueError):
    """Base class of every validation error raised by :mod:`hybridkv_vllm.core`."""


class ProfileError(HybridKVError):
    """A head profile is malformed, of an unsupported version, or made for another model."""


class BudgetError(HybridKVError):
    """A budget configuration or allocation input is invalid."""


class ConfigError(HybridKVError):
    """A selection / policy configuration or a tensor argument is invalid."""
