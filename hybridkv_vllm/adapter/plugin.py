"""``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core, workers).

It registers the backend name ``HYBRIDKV`` (so ``--attention-backend HYBRIDKV`` parses everywhere), the budget
KV-cache spec with its manager (needed in the engine core, where the scheduler lives), and the guarded patches
(patches.py). Idempotent: vLLM may call it more than once per process.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile

logger = logging.getLogger("hybridkv")

BACKEND_PATH = "hybridkv_vllm.adapter.backend.HybridKVBackend"
_done = False


def _is_api_server_main() -> bool:
    argv = [os.path.basename(a) for a in sys.argv[:2]]
    return multiprocessing.parent_process() is None and (argv[1:] == ["serve"] or "api_server.py" in argv[:1])


def _serves_hybridkv(argv: list[str]) -> bool:
    """Whether this command line asks for the HYBRIDKV backend: ``--attention-backend HYBRIDKV`` in any of vLLM's
    spellings (``=``, ``--attention-config`` JSON or dotted), or a ``--config`` file that names it. A stock server
    with the plugin installed is left exactly as it was."""
    if any("HYBRIDKV" in arg.upper() for arg in argv):
        return True
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1] if arg == "--config" and \
            i + 1 < len(argv) else None
        if path:
            try:
                with open(path, encoding="utf-8") as fh:
                    if "HYBRIDKV" in fh.read().upper():
                        return True
            except OSError:
                pass
    return False


def _share_metrics_across_processes() -> None:
    """Turn on Prometheus multiprocess mode in ``vllm serve``'s API-server process, with no setting by the user.

    The plugin's counters and gauges are written in the engine-core process (and workers), but ``/metrics`` is served
    by the API server: they reach it only in prometheus_client's multiprocess mode, which vLLM turns on itself only
    for ``--api-server-count`` > 1 (``run_multi_api_server`` in vllm/entrypoints/cli/serve.py).

    prometheus_client picks its value class once, from ``PROMETHEUS_MULTIPROC_DIR``, when ``prometheus_client.values``
    is first imported, and the ``vllm`` CLI imports it at start-up (vllm/entrypoints/cli/main.py imports the
    subcommand modules, which import vllm/v1/metrics/perf.py), well before general plugins load (while ``serve``
    builds its parser: ``AsyncEngineArgs.add_cli_args`` -> ``load_general_plugins``). Setting the variable here is
    therefore not enough by itself. But prometheus_client's metric classes look ``values.ValueClass`` up each time
    they create a value, and at this point no metric has been registered in this process yet; so set the variable (a
    fresh temporary directory, removed at exit) and pick the value class again. Only for a server that serves
    HYBRIDKV: a stock ``vllm serve`` with the plugin installed stays as it was. The engine core and workers are
    spawned later and inherit the variable, so they start in multiprocess mode; vLLM's ``/metrics`` then reads every
    process's files (``get_prometheus_registry``). If a metric already exists (a future vLLM creating one at import
    time), switching would hide it from ``/metrics``: then nothing is switched and a warning says to set the variable.
    """
    if ("PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ
            or not _is_api_server_main() or not _serves_hybridkv(sys.argv[2:])):
        return
    from prometheus_client import values

    existing = _metrics_already_registered(values)
    if existing:
        logger.warning("hybridkv: set PROMETHEUS_MULTIPROC_DIR to a fresh directory to see the plugin's metrics "
                       "(metrics exist before the plugin could turn multiprocess mode on: %s)",
                       ", ".join(existing[:5]))
        return
    try:
        # A directory of the plugin's own, removed at exit. Not vLLM's setup_multiprocess_prometheus: vLLM 0.32's
        # shutdown then hands its TemporaryDirectory object to prometheus_client (an ERROR line at every shutdown).
        directory = tempfile.mkdtemp(prefix="hybridkv-prometheus-")
    except OSError as err:                          # no writable temp dir (e.g. a read-only root, no /tmp mount)
        logger.warning("hybridkv: no Prometheus multiprocess directory (%s); set PROMETHEUS_MULTIPROC_DIR to a "
                       "fresh directory to see the plugin's metrics", err)
        return
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    values.ValueClass = values.get_value_class()


def _metrics_already_registered(values) -> list[str]:
    """Names of the metrics in prometheus_client's default registry (what ``/metrics`` would stop showing once the
    value class switches); ``["<unknown>"]`` when this prometheus_client does not look like the one checked."""
    from prometheus_client import REGISTRY, metrics

    collectors = getattr(REGISTRY, "_collector_to_names", None)
    if (not isinstance(collectors, dict) or getattr(metrics, "values", None) is not values
            or not callable(getattr(values, "get_value_class", None))):
        return ["<unknown>"]
    return sorted(name for collector, names in list(collectors.items())
                  if isinstance(collector, metrics.MetricWrapperBase) for name in names)


def backend_member():
    """``AttentionBackendEnum.HYBRIDKV`` in this process, registering the plugin first (used by unpickling)."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum["HYBRIDKV"]


def register() -> None:
    global _done
    if _done:
        return
    _share_metrics_across_processes()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "HYBRIDKV" not in AttentionBackendEnum.__members__:
        register_backend("HYBRIDKV", BACKEND_PATH)
    # vLLM pickles its config (holding this member) into the engine-core process before plugins load there;
    # a member created at run time cannot be found by value in that process, so it pickles as a call that
    # registers it first.
    AttentionBackendEnum["HYBRIDKV"].__reduce_ex__ = lambda protocol: (backend_member, ())
    from hybridkv_vllm.adapter import patches
    from hybridkv_vllm.adapter.kv_spec import register_spec
    register_spec()
    patches.apply_all(BACKEND_PATH)
    _done = True
