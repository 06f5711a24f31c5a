"""HybridKV's Prometheus metrics: every name, label and bucket in one module, in vLLM's style.

vLLM names its metrics ``vllm:<name>`` (the colon is kept for dashboard compatibility); this plugin uses
``hybridkv:<name>`` with the same label pair ``model_name`` + ``engine`` that vLLM's ``PrometheusStatLogger`` puts
on every series, so the two can be joined ``on(model_name, engine)`` in PromQL.

Families (the names below are what Prometheus stores; counters get ``_total`` from prometheus_client):

==========================================  =========  ===============================  =====================================
name                                        type       extra labels                     meaning
==========================================  =========  ===============================  =====================================
``hybridkv:kv_blocks_held``                 gauge      --                               KV blocks held now by compressed requests
``hybridkv:kv_blocks_uncompressed``         gauge      --                               blocks the same requests would hold
                                                                                        without compression
``hybridkv:kv_block_bytes``                 gauge      --                               bytes of one such block (so
                                                                                        ``(uncompressed - held) * bytes`` =
                                                                                        bytes saved)
``hybridkv:cold_tier_bytes``                gauge      --                               bytes of dynamic heads' prompt KV held
                                                                                        in the cold tier (outside vLLM's pool)
``hybridkv:configured_budget``              gauge      --                               the configured budget (fraction kept)
``hybridkv:profile_info``                   gauge = 1  profile_model, profile_version,  which head profile and budget this
                                                       profile_fingerprint, budget      engine runs (info emulated by a gauge,
                                                                                        as vLLM does: multiprocess mode has no
                                                                                        Info type)
``hybridkv:tokens_kept_total``              counter    head_type                        KV (head x token) entries kept at
                                                                                        compression
``hybridkv:tokens_uncompressed_total``      counter    head_type                        KV (head x token) entries before it
``hybridkv:requests_compressed_total``      counter    --                               requests whose KV was compressed
``hybridkv:requests_bypassed_total``        counter    reason                           requests served uncompressed, by reason
``hybridkv:retrieval_chunk_loads_total``    counter    --                               chunks copied from the cold tier into
                                                                                        dynamic heads' hot buffers
``hybridkv:retrieval_chunks_scored_total``  counter    --                               candidate chunks scored by retrieval
                                                                                        (loads / scored = selectivity)
``hybridkv:retrieval_swap_in_bytes_total``  counter    --                               bytes swapped in for retrieval
``hybridkv:compression_time_seconds``       histogram  --                               time to compress one prompt at prefill
==========================================  =========  ===============================  =====================================

Label cardinality is bounded: ``head_type`` is one of :data:`HEAD_TYPES`, ``reason`` one of :data:`BYPASS_REASONS`
(anything else is counted as ``"other"``), and the profile labels take one value per running engine. No request id,
prompt or tenant ever becomes a label.

Multiprocess: counters and gauges are written in the engine-core process (scheduler / KV manager) or in workers, but
``/metrics`` is served by the API-server process. They reach it through prometheus_client's multiprocess mode: vLLM's
``setup_multiprocess_prometheus()`` sets ``PROMETHEUS_MULTIPROC_DIR`` and ``get_prometheus_registry()`` then reads
every process's files. That variable must be set before ``prometheus_client`` is first imported in the recording
process (engine-core processes are spawned, so they inherit it from process 0). Every gauge here therefore has an
explicit ``multiprocess_mode``. Without the variable the functions still work: values live in the calling process's
default registry, which is harmless (and what the unit tests use). :func:`multiprocess_enabled` tells which mode
is active.

Never serve these through a separate ``start_http_server``/``make_asgi_app`` exporter: from prometheus_client 0.23 on
such an exporter rewrites ``hybridkv:`` to ``hybridkv_`` for an OpenMetrics scraper (client_python #1177), and the
dashboards' queries would come back empty. vLLM's own ``/metrics`` answers in the text format and keeps the colons.

The recording functions (:func:`configure`, :func:`set_profile_info`, :func:`record_compression`,
:func:`record_bypass`, :func:`set_blocks`, :func:`record_retrieval`) are cheap (pre-bound label children) and never
raise into the serving path for out-of-range values: negative or non-finite amounts are ignored (with one warning),
unknown bypass reasons become ``other``. An unknown ``head_type`` is a programming error and raises ``ValueError``.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

PREFIX = "hybridkv:"

# Label names. ``model_name`` and ``engine`` are vLLM's (loggers.py: labelnames = ["model_name", "engine"]).
LABELS: tuple[str, ...] = ("model_name", "engine")

#: ``head_type`` label values (DESIGN §2: a KV head is static or dynamic).
HEAD_TYPES: tuple[str, ...] = ("static", "dynamic")

#: ``reason`` label values of :data:`REQUESTS_BYPASSED`; anything else is recorded as ``"other"``.
#: ``short_prompt`` and ``full_budget`` are expected in normal operation (nothing to prune); the rest are what the
#: ``HybridKVUnexpectedBypass`` alert (deploy/prometheus/hybridkv-rules.yaml) watches.
BYPASS_REASONS: tuple[str, ...] = (
    "short_prompt",   # the prompt fits in the floor of blocks per head: nothing to prune
    "full_budget",    # budget >= 1.0 or the plan keeps every block
    "opt_out",        # the request asked for it (vllm_xargs hybridkv_budget "off", adapter/requests.py)
    "cold_tier_full",  # the cold tier's bound (hybridkv.cold_tier_gib) was reached: served in vLLM's pool
    "prefix_cached",  # the prompt's KV came from the prefix cache / a KV connector, not this prefill
    "unsupported",    # a feature the backend does not compress (e.g. a sampling or parallel mode)
    "error",          # compression failed and the request fell back to full KV
    "other",
)
#: Bypass reasons that are part of normal operation (not alerted on).
EXPECTED_BYPASS_REASONS: tuple[str, ...] = ("short_prompt", "full_budget", "opt_out")

#: Histogram buckets of :data:`COMPRESSION_TIME` (seconds): 0.5 ms .. 10 s, like vLLM's latency buckets.
COMPRESSION_TIME_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# Family names, exactly as passed to prometheus_client (counters without the ``_total`` it appends).
KV_BLOCKS_HELD = PREFIX + "kv_blocks_held"
KV_BLOCKS_UNCOMPRESSED = PREFIX + "kv_blocks_uncompressed"
KV_BLOCK_BYTES = PREFIX + "kv_block_bytes"
COLD_TIER_BYTES = PREFIX + "cold_tier_bytes"
CONFIGURED_BUDGET = PREFIX + "configured_budget"
PROFILE_INFO = PREFIX + "profile_info"
TOKENS_KEPT = PREFIX + "tokens_kept"
TOKENS_UNCOMPRESSED = PREFIX + "tokens_uncompressed"
REQUESTS_COMPRESSED = PREFIX + "requests_compressed"
REQUESTS_BYPASSED = PREFIX + "requests_bypassed"
RETRIEVAL_CHUNK_LOADS = PREFIX + "retrieval_chunk_loads"
RETRIEVAL_CHUNKS_SCORED = PREFIX + "retrieval_chunks_scored"
RETRIEVAL_SWAP_IN_BYTES = PREFIX + "retrieval_swap_in_bytes"
COMPRESSION_TIME = PREFIX + "compression_time_seconds"

PROFILE_INFO_LABELS: tuple[str, ...] = ("profile_model", "profile_version", "profile_fingerprint", "budget")


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name as registered, its type and its label names."""

    name: str
    type: str  # "gauge" | "counter" | "histogram"
    labels: tuple[str, ...]
    documentation: str

    @property
    def exposed_names(self) -> tuple[str, ...]:
        """The sample names Prometheus stores for this family."""
        if self.type == "counter":
            return (self.name + "_total",)
        if self.type == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        return (self.name,)


#: Every family this module defines (the dashboard and rule tests check their queries against this list).
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(KV_BLOCKS_HELD, "gauge", LABELS,
               "KV-cache blocks held by requests whose KV HybridKV compressed."),
    MetricSpec(KV_BLOCKS_UNCOMPRESSED, "gauge", LABELS,
               "KV-cache blocks the same requests would hold without compression."),
    MetricSpec(KV_BLOCK_BYTES, "gauge", LABELS,
               "Bytes of one KV-cache block as counted by hybridkv:kv_blocks_held."),
    MetricSpec(COLD_TIER_BYTES, "gauge", LABELS,
               "Bytes of dynamic heads' prompt KV held in the cold tier, outside vLLM's KV-cache pool."),
    MetricSpec(CONFIGURED_BUDGET, "gauge", LABELS,
               "Configured HybridKV budget: the fraction of the prompt's KV entries kept."),
    MetricSpec(PROFILE_INFO, "gauge", LABELS + PROFILE_INFO_LABELS,
               "HybridKV head profile and budget in use (value is always 1)."),
    MetricSpec(TOKENS_KEPT, "counter", LABELS + ("head_type",),
               "KV entries (KV head x token) kept when prompts were compressed, by head type."),
    MetricSpec(TOKENS_UNCOMPRESSED, "counter", LABELS + ("head_type",),
               "KV entries (KV head x token) the compressed prompts had before compression, by head type."),
    MetricSpec(REQUESTS_COMPRESSED, "counter", LABELS,
               "Requests whose KV cache HybridKV compressed."),
    MetricSpec(REQUESTS_BYPASSED, "counter", LABELS + ("reason",),
               "Requests served with an uncompressed KV cache, by reason."),
    MetricSpec(RETRIEVAL_CHUNK_LOADS, "counter", LABELS,
               "KV chunks copied from the cold tier into dynamic heads' hot buffers by retrieval."),
    MetricSpec(RETRIEVAL_CHUNKS_SCORED, "counter", LABELS,
               "Candidate KV chunks scored by dynamic-head retrieval (chunk loads / this = selectivity)."),
    MetricSpec(RETRIEVAL_SWAP_IN_BYTES, "counter", LABELS,
               "Bytes of KV swapped in for dynamic-head retrieval."),
    MetricSpec(COMPRESSION_TIME, "histogram", LABELS,
               "Time to compress one prompt's KV cache at prefill, in seconds."),
)

# Gauges: who writes them decides the multiprocess mode. Each engine's scheduler is the single writer of its own
# (model_name, engine) series, so "mostrecent" (what vLLM uses for its own scheduler gauges) is exact; "livesum"
# would double-count when several processes (TP workers) report the same value.
_GAUGE_MODES = {
    KV_BLOCKS_HELD: "mostrecent",
    KV_BLOCKS_UNCOMPRESSED: "mostrecent",
    KV_BLOCK_BYTES: "mostrecent",
    COLD_TIER_BYTES: "mostrecent",
    CONFIGURED_BUDGET: "mostrecent",
    PROFILE_INFO: "mostrecent",
}


def multiprocess_enabled() -> bool:
    """Whether prometheus_client in this process writes values to ``PROMETHEUS_MULTIPROC_DIR`` files.

    prometheus_client chooses this once, when it is first imported; only then do values recorded in an engine-core
    or worker process reach vLLM's ``/metrics``.
    """
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue and bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class HybridKVMetrics:
    """The metric families registered in one registry, with label children bound to one (model_name, engine).

    Parameters
    ----------
    registry
        Where the families are registered (``None``: not registered, useful in multiprocess mode where the
        collector reads the files anyway).
    model_name, engine
        vLLM's label values: the served model name and the engine index.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY, model_name: str = "unknown",
                 engine: str | int = 0) -> None:
        self.registry = registry
        self.families: dict[str, Gauge | Counter | Histogram] = {}
        for spec in METRICS:
            kwargs = dict(name=spec.name, documentation=spec.documentation, labelnames=list(spec.labels),
                          registry=registry)
            if spec.type == "gauge":
                fam = Gauge(multiprocess_mode=_GAUGE_MODES[spec.name], **kwargs)
            elif spec.type == "counter":
                fam = Counter(**kwargs)
            else:
                fam = Histogram(buckets=COMPRESSION_TIME_BUCKETS, **kwargs)
            self.families[spec.name] = fam
        self._lock = threading.Lock()
        self._info_labels: tuple[str, ...] | None = None
        self.bind(model_name, engine)

    def bind(self, model_name: str, engine: str | int) -> None:
        """(Re)bind every label child to ``(model_name, engine)`` and create the bounded series at 0."""
        base = (str(model_name), str(engine))
        f = self.families
        with self._lock:
            old = getattr(self, "base", None)
            self.base = base
            self.blocks_held = f[KV_BLOCKS_HELD].labels(*base)
            self.blocks_uncompressed = f[KV_BLOCKS_UNCOMPRESSED].labels(*base)
            self.block_bytes = f[KV_BLOCK_BYTES].labels(*base)
            self.cold_tier_bytes = f[COLD_TIER_BYTES].labels(*base)
            self.budget = f[CONFIGURED_BUDGET].labels(*base)
            self.tokens_kept = {h: f[TOKENS_KEPT].labels(*base, h) for h in HEAD_TYPES}
            self.tokens_uncompressed = {h: f[TOKENS_UNCOMPRESSED].labels(*base, h) for h in HEAD_TYPES}
            self.requests_compressed = f[REQUESTS_COMPRESSED].labels(*base)
            self.requests_bypassed = {r: f[REQUESTS_BYPASSED].labels(*base, r) for r in BYPASS_REASONS}
            self.chunk_loads = f[RETRIEVAL_CHUNK_LOADS].labels(*base)
            self.chunks_scored = f[RETRIEVAL_CHUNKS_SCORED].labels(*base)
            self.swap_in_bytes = f[RETRIEVAL_SWAP_IN_BYTES].labels(*base)
            self.compression_time = f[COMPRESSION_TIME].labels(*base)
            if old is not None and old != base and self._info_labels is not None:
                # The info series of the old binding would otherwise stay at 1 beside the new one.
                self._remove_info(old)
                self._info_labels = None

    def _remove_info(self, base: tuple[str, str]) -> None:
        if self._info_labels is None:
            return
        try:
            self.families[PROFILE_INFO].remove(*base, *self._info_labels)
        except KeyError:
            pass

    def set_profile_info(self, profile_model: str, profile_version: str | int, budget: float,
                         profile_fingerprint: str = "") -> None:
        labels = (str(profile_model), str(profile_version), str(profile_fingerprint), _fmt_budget(budget))
        with self._lock:
            if self._info_labels is not None and self._info_labels != labels:
                self._remove_info(self.base)
            self._info_labels = labels
            self.families[PROFILE_INFO].labels(*self.base, *labels).set(1)
            self.budget.set(float(budget))


def _fmt_budget(budget: float) -> str:
    return repr(float(budget))


# --------------------------------------------------------------------------------------------------------------
# Module-level API used by the backend (one HybridKVMetrics per process, created on first use).
# --------------------------------------------------------------------------------------------------------------
_default: HybridKVMetrics | None = None
_default_lock = threading.Lock()
_warned: set[str] = set()


def configure(model_name: str = "unknown", engine: str | int = 0,
              registry: CollectorRegistry | None = None) -> HybridKVMetrics:
    """Create (first call) or rebind this process's metrics; returns them.

    ``registry`` is only used by the first call in a process (default: prometheus_client's ``REGISTRY``, which is
    what vLLM's ``/metrics`` serves in single-process mode). Tests pass a fresh ``CollectorRegistry``.
    """
    global _default
    with _default_lock:
        if _default is None or (registry is not None and _default.registry is not registry):
            _default = HybridKVMetrics(REGISTRY if registry is None else registry, model_name, engine)
        else:
            _default.bind(model_name, engine)
        return _default


def get_metrics() -> HybridKVMetrics:
    """This process's metrics (created with default labels if :func:`configure` was not called)."""
    m = _default
    return m if m is not None else configure()


def reset_for_tests() -> None:
    """Forget this process's metrics object (its families stay in whatever registry they were put in)."""
    global _default
    with _default_lock:
        _default = None


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def _nonneg(x: float, what: str) -> float:
    x = float(x)
    if not math.isfinite(x) or x < 0:
        _warn_once(what, "hybridkv metrics: ignoring a negative or non-finite %s (%r)", what, x)
        return 0.0
    return x


def set_profile_info(profile_model: str, profile_version: str | int, budget: float,
                     profile_fingerprint: str = "") -> None:
    """Publish ``hybridkv:profile_info`` (= 1) and ``hybridkv:configured_budget`` for this engine.

    ``profile_model`` is the profile's architecture name, ``profile_version`` its ``schema_version`` (or a
    release tag), ``profile_fingerprint`` the model fingerprint it was computed for.
    """
    get_metrics().set_profile_info(profile_model, profile_version, budget, profile_fingerprint)


def record_compression(tokens_kept: Mapping[str, int], tokens_uncompressed: Mapping[str, int],
                       seconds: float | None = None, requests: int = 1) -> None:
    """Count ``requests`` compressed prompts.

    Parameters
    ----------
    tokens_kept, tokens_uncompressed
        ``{"static": n, "dynamic": m}``: KV entries (summed over KV heads and layers) kept, and the prompt had,
        per head type. A head type may be missing (counted as 0).
    seconds
        Wall time the compression took at prefill (observed once in the histogram), or None.
    """
    m = get_metrics()
    for h, n in tokens_kept.items():
        child = m.tokens_kept.get(h)
        if child is None:
            raise ValueError(f"unknown head_type {h!r} (expected one of {HEAD_TYPES})")
        child.inc(_nonneg(n, "tokens_kept"))
    for h, n in tokens_uncompressed.items():
        child = m.tokens_uncompressed.get(h)
        if child is None:
            raise ValueError(f"unknown head_type {h!r} (expected one of {HEAD_TYPES})")
        child.inc(_nonneg(n, "tokens_uncompressed"))
    m.requests_compressed.inc(_nonneg(requests, "requests"))
    if seconds is not None:
        m.compression_time.observe(_nonneg(seconds, "seconds"))


def record_bypass(reason: str, requests: int = 1) -> None:
    """Count ``requests`` served uncompressed; ``reason`` outside :data:`BYPASS_REASONS` counts as ``other``."""
    m = get_metrics()
    child = m.requests_bypassed.get(reason)
    if child is None:
        _warn_once("reason:" + str(reason)[:64], "hybridkv metrics: unknown bypass reason %r counted as 'other'",
                   reason)
        child = m.requests_bypassed["other"]
    child.inc(_nonneg(requests, "requests"))


def set_blocks(held: int, uncompressed: int, block_bytes: int | None = None, cold_tier_bytes: int = 0) -> None:
    """Set the KV blocks held now by compressed requests and what they would hold uncompressed, and the bytes
    their dynamic heads keep in the cold tier.

    ``block_bytes`` (bytes of one such block) only needs passing once; it lets dashboards show bytes saved.
    """
    m = get_metrics()
    m.cold_tier_bytes.set(_nonneg(cold_tier_bytes, "cold_tier_bytes"))
    m.blocks_held.set(_nonneg(held, "blocks_held"))
    m.blocks_uncompressed.set(_nonneg(uncompressed, "blocks_uncompressed"))
    if block_bytes is not None:
        m.block_bytes.set(_nonneg(block_bytes, "block_bytes"))


def record_retrieval(chunk_loads: int, chunks_scored: int = 0, *, swap_in_bytes: int = 0) -> None:
    """Count dynamic-head retrieval: chunks loaded (selected), candidate chunks scored, bytes swapped in.

    Cheap, but still a lock and (in multiprocess mode) an mmap write per counter: call it once per step with
    the step's sums rather than once per head and layer.
    """
    m = get_metrics()
    if chunk_loads:
        m.chunk_loads.inc(_nonneg(chunk_loads, "chunk_loads"))
    if chunks_scored:
        m.chunks_scored.inc(_nonneg(chunks_scored, "chunks_scored"))
    if swap_in_bytes:
        m.swap_in_bytes.inc(_nonneg(swap_in_bytes, "swap_in_bytes"))


def exposed_metric_names() -> set[str]:
    """Every sample name this module can expose (``_total``/``_bucket``/... included)."""
    return {n for spec in METRICS for n in spec.exposed_names}
