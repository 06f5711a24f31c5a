#!/usr/bin/env python3
"""One-shot check of HybridKV's CUDA path on a lent GPU machine (torch + triton + pytest + numpy, no vLLM).

    python benchmarks/gpu_check.py --out DIR                                  # GPU: about 8 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --dry-run --out DIR     # CPU: tiny shapes, every code path
    (options: --budget-s S for the whole run, default 480; --dynamic-heads N of 4, default 4; --iters N)

Sections (each records its own failure with the traceback; the others still run):

1. environment: device, driver / CUDA versions, torch / triton / python, date, command line;
2. the project's tests: ``tests/kernels`` natively (``TRITON_INTERPRET=0``) and ``tests/core`` +
   ``tests/adapter/test_executor.py`` (CPU tensors, so Triton's interpreter) + ``test_device_sync.py`` (its CUDA
   test: the metrics counter read through pinned memory without a sync), vLLM-only tests deselected;
3. the decode layer step at Qwen2.5-VL-7B attention shapes through the product's own path
   (``adapter.executor.run_layer`` with ``TritonKVOps``), against dense paged decode and the PyTorch reference;
4. cold-tier swap-in from pinned host memory: host gather + copy, a Triton kernel reading pinned memory
   through unified addressing, contiguous host-to-device bandwidth, and the layer step with its cold pages pinned;
5. end-to-end ``vllm serve`` on CUDA: not run here (vLLM cannot reach that machine; see the section's text).

Writes ``DIR/gpu_check.md`` and ``DIR/gpu_check.json`` after every section (a run cut short keeps what it measured)
and prints the markdown. Exit code 1 if any section failed. Sections run in the order 1, 3, 4, 2, 5: the
benchmark first, then the tests, which run in subprocesses and so survive a fault that kills this process's CUDA
context; each has a time cap and the whole run a budget (``--budget-s``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if "--dry-run" in sys.argv[1:]:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported: kernels run on CPU tensors
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
CUDA = DEVICE == "cuda"
MB, GIB = 1e6, 2**30


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Config:
    name: str                    # "full" (the GPU run) or "dry"
    hq: int                      # query heads
    h: int                       # KV heads
    d: int                       # head dim
    bs: int                      # block size = chunk size
    dtype: torch.dtype
    dynamic_heads: int           # KV heads 0 .. n-1 retrieve (dynamic), the rest are static (pruned)
    budget: float                # kept share of each head's prompt blocks
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    q_scale: float               # query std: attention logits have std q_scale (peaked, so a wrong chunk shows)
    iters: int
    warmup: int
    d2d_bytes: int               # device copy used as the bandwidth yardstick
    h2d_bytes: int               # contiguous pinned host -> device copy
    sdpa_max_bytes: int          # SDPA baseline only when the gathered K+V fit this
    swap_sizes: tuple[tuple[int, int], ...]     # section 4: (batch, context) of the selections copied in
    cold_store_bytes: int        # section 4: pinned cold store the selections are drawn from
    pinned_step_shapes: tuple[tuple[int, int], ...]  # section 4: layer steps with pinned cold pages


FULL = Config(name="full", hq=28, h=4, d=128, bs=16, dtype=torch.bfloat16, dynamic_heads=4, budget=0.10,
              contexts=(4096, 8192, 16384, 32768), batches=(1, 8, 32, 64), q_scale=2.0, iters=20, warmup=3,
              d2d_bytes=GIB, h2d_bytes=GIB, sdpa_max_bytes=4 * GIB,
              swap_sizes=((1, 32768), (8, 32768), (32, 32768), (64, 32768)), cold_store_bytes=2 * GIB,
              pinned_step_shapes=((1, 32768), (8, 32768), (32, 16384)))
DRY = Config(name="dry", hq=4, h=2, d=16, bs=16, dtype=torch.bfloat16, dynamic_heads=1, budget=0.3,
             contexts=(192, 256), batches=(1, 2), q_scale=2.0, iters=2, warmup=1,
             d2d_bytes=4 * 2**20, h2d_bytes=4 * 2**20, sdpa_max_bytes=GIB,
             swap_sizes=((1, 256), (2, 256)), cold_store_bytes=2**20, pinned_step_shapes=((1, 256),))


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Section:
    key: str
    number: int
    title: str
    status: str = "not run"      # "ok" | "error" | "not run"
    seconds: float = 0.0
    error: str | None = None     # the traceback, or what went wrong
    data: dict = field(default_factory=dict)
    md: list[str] = field(default_factory=list)


class Report:
    def __init__(self, out: Path, argv: list[str], dry: bool):
        self.out, self.argv, self.dry = out, argv, dry
        self.sections: dict[str, Section] = {}

    def add(self, key: str, number: int, title: str) -> Section:
        self.sections[key] = Section(key, number, title)
        return self.sections[key]

    @property
    def ok(self) -> bool:
        return all(s.status == "ok" for s in self.sections.values())

    def markdown(self) -> str:
        lines = [f"# HybridKV GPU check{' (DRY RUN: CPU, Triton interpreter, tiny shapes)' if self.dry else ''}", "",
                 f"- command: `{' '.join(self.argv)}`",
                 f"- result: **{'all sections ok' if self.ok else 'SOME SECTIONS FAILED'}**", ""]
        for s in sorted(self.sections.values(), key=lambda s: s.number):
            lines += [f"## {s.number}. {s.title} ({s.status}, {s.seconds:.1f} s)", ""] + s.md
            if s.error:
                lines += ["", "**error:**", "", "```", s.error.rstrip(), "```"]
            lines.append("")
        return "\n".join(lines)

    def write(self) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {"script": "benchmarks/gpu_check.py", "command": self.argv, "dry_run": self.dry, "ok": self.ok,
               "sections": {k: {"number": s.number, "title": s.title, "status": s.status, "seconds": s.seconds,
                                "error": s.error, "data": s.data} for k, s in self.sections.items()}}
        (self.out / "gpu_check.json").write_text(json.dumps(_finite(doc), indent=1) + "\n")
        text = self.markdown()
        (self.out / "gpu_check.md").write_text(text + "\n")
        return text


def _finite(x):
    """JSON without NaN / Infinity literals (they become null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def run_section(report: Report, sec: Section, fn, *args) -> None:
    """Run one section; an exception is recorded (with whatever the section had recorded before it)."""
    t0 = time.monotonic()
    try:
        fn(sec, *args)
        sec.status = "error" if sec.error else "ok"
    except Exception:  # noqa: BLE001 - a failed section must not lose the others' figures
        sec.status = "error"
        sec.error = (sec.error + "\n" if sec.error else "") + traceback.format_exc()
    finally:
        sec.seconds = time.monotonic() - t0
        if CUDA:
            torch.cuda.empty_cache()
        report.write()


def md_table(headers: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return "n/a" if not math.isfinite(v) else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + \
        ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """Median time of ``fn`` in µs. On CUDA: CUDA events, L2 evicted (a 256 MiB read) before every call; ``pre``
    runs before each call outside the timed span; ``sync=True`` also waits for the device before each call, so an
    eager (Python-launched) step is charged its launch time. On the CPU: ``time.perf_counter``."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda") if CUDA else None

    def run(self, fn, pre=None, iters: int | None = None, sync: bool = False) -> float:
        iters = iters or self.iters
        for _ in range(self.warmup):
            if pre:
                pre()
            fn()
        if not CUDA:
            ts = []
            for _ in range(iters):
                if pre:
                    pre()
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e6)
            return statistics.median(ts)
        torch.cuda.synchronize()
        events = []
        for _ in range(iters):
            if pre:
                pre()
            self.flush.sum(dtype=torch.int32)
            if sync:
                torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events)

    def graph(self, fn, pre=None, iters: int | None = None) -> tuple[float, str | None]:
        """``fn`` captured once in a CUDA graph and replayed: ``(µs, None)``, or ``(nan, why)`` if the capture
        failed (on the CPU: eager time and a note)."""
        if not CUDA:
            return self.run(fn, pre, iters), None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    if pre:
                        pre()
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
        except Exception as exc:  # noqa: BLE001 - reported next to the eager time
            torch.cuda.synchronize()
            return float("nan"), f"{type(exc).__name__}: {exc}"[:400]
        us = self.run(g.replay, pre, iters)
        del g
        return us, None


def d2d_copy_gbs(timer: Timer, nbytes: int) -> float:
    """Device copy bandwidth, (bytes read + bytes written) / time, GB/s (the yardstick of ``% copy``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = timer.run(lambda: dst.copy_(src), iters=max(timer.iters, 10))
    return 2 * nbytes / us / 1e3


def pinned_empty(shape, dtype) -> torch.Tensor:
    """Page-locked host memory on a GPU machine; plain host memory in the dry run."""
    return torch.empty(shape, dtype=dtype, pin_memory=CUDA)


# ---------------------------------------------------------------------------------------------------- imports
def kernels_shim() -> str | None:
    """``hybridkv_kernels`` is ``kernels/`` installed under that name; in a bare checkout (the GPU machine), a
    temporary directory holding a ``hybridkv_kernels`` link to it, for this process and the test subprocesses."""
    if importlib.util.find_spec("hybridkv_kernels") is not None:
        return None
    shim = tempfile.mkdtemp(prefix="hybridkv_shim_")
    os.symlink(ROOT / "kernels", Path(shim) / "hybridkv_kernels", target_is_directory=True)
    sys.path.insert(0, shim)
    return shim


def product():
    """The product modules the benchmark drives (imported here so that an import error fails its section)."""
    import hybridkv_kernels as hk
    from hybridkv_vllm.adapter import dynamic_heads
    from hybridkv_vllm.adapter.cold_tier import ColdTier
    from hybridkv_vllm.adapter.executor import run_layer
    from hybridkv_vllm.adapter.kv_ops import LayerHeads, TritonKVOps, plan_layers
    from hybridkv_vllm.core.reference import sparse_decode_attention
    from hybridkv_vllm.core.selection import SelectionConfig, chunk_summaries, score_chunks, select_chunks
    from hybridkv_vllm.core.step_plan import StepPlan, plan_rows, rewrite_group
    from hybridkv_vllm.core.budgets import kept_blocks
    return SimpleNamespace(hk=hk, dynamic_heads=dynamic_heads, ColdTier=ColdTier, run_layer=run_layer,
                           LayerHeads=LayerHeads, TritonKVOps=TritonKVOps, plan_layers=plan_layers,
                           sparse_decode_attention=sparse_decode_attention, SelectionConfig=SelectionConfig,
                           chunk_summaries=chunk_summaries, score_chunks=score_chunks, select_chunks=select_chunks,
                           StepPlan=StepPlan, plan_rows=plan_rows, rewrite_group=rewrite_group, kept_blocks=kept_blocks)


# ---------------------------------------------------------------------------------------------------- 1. env
def _cmd(args: list[str], timeout: float = 20) -> str | None:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT).stdout.strip()
    except Exception:  # noqa: BLE001 - absent tool
        return None


def section_env(sec: Section, argv: list[str], dry: bool) -> None:
    d = sec.data
    d["date_utc"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    d["command"] = " ".join(argv)
    d["dry_run"] = dry
    d["device"] = DEVICE
    d["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET")
    d["python"] = sys.version.split()[0]
    d["platform"] = platform.platform()
    d["cpu_count"] = os.cpu_count()
    d["torch"] = torch.__version__
    d["torch_cuda"] = torch.version.cuda
    try:
        import triton
        d["triton"] = triton.__version__
    except ImportError as exc:
        d["triton"] = f"not importable: {exc}"
    d["git_commit"] = _cmd(["git", "rev-parse", "HEAD"])
    d["device_name"] = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.machine()})"
    if CUDA:
        p = torch.cuda.get_device_properties(0)
        d["sms"], d["device_memory_gib"] = p.multi_processor_count, round(p.total_memory / GIB, 1)
        d["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    smi = shutil.which("nvidia-smi")
    if smi:
        d["nvidia_smi"] = _cmd([smi, "--query-gpu=name,driver_version,memory.total,pcie.link.gen.current,"
                                     "pcie.link.width.current", "--format=csv,noheader"])
        head = _cmd([smi]) or ""
        m = re.search(r"Driver Version:\s*([\d.]+).*?CUDA Version:\s*([\d.]+)", head)
        d["driver"], d["cuda_driver_api"] = (m.group(1), m.group(2)) if m else (None, None)
    else:
        d["nvidia_smi"] = "not found"
    rows = [[k, f"`{v}`" if k == "command" else v] for k, v in d.items()]
    sec.md += md_table(["what", "value"], rows)


# ---------------------------------------------------------------------------------------------------- 2. tests
OPTIONAL = ("vllm", "jsonschema", "hypothesis", "transformers")


def _pytest(args: list[str], env: dict, timeout: float) -> tuple[int | None, str, float]:
    """``python -m pytest ARGS`` in its own process group (killed whole on timeout): (rc or None, output, s)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - t0


def _summary(out: str) -> str:
    for line in reversed(out.splitlines()):
        if re.search(r"\d+ (passed|failed|error|errors|skipped|deselected)|no tests ran", line):
            return line.strip(" =")
    return "(no pytest summary line)"


def test_selection(paths: list[str], missing: set[str], env: dict, timeout: float) -> tuple[list[str], list[str]]:
    """``--ignore`` files and ``--deselect`` ids for the optional modules this machine lacks:
    a test file importing jsonschema / hypothesis / transformers (anywhere) or vllm (at module level) is ignored;
    without vLLM, the tests marked ``vllm`` (``pytest.ini``: vLLM's code inside an engine-free test, such as the
    executor's CPU implementation and vLLM's Triton prefill kernel) are deselected, listed by ``--collect-only``."""
    ignore = []
    for p in paths:
        files = [ROOT / p] if p.endswith(".py") else sorted((ROOT / p).rglob("test_*.py"))
        for f in files:
            text = f.read_text()
            for mod in missing:
                pattern = rf"^(import|from) {mod}\b" if mod == "vllm" else rf"^\s*(import|from) {mod}\b"
                if re.search(pattern, text, re.M):
                    ignore.append(str(f.relative_to(ROOT)))
                    break
    deselect = []
    if "vllm" in missing:
        rc, out, _ = _pytest(["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "vllm", *paths,
                              *[f"--ignore={f}" for f in ignore]], env, timeout)
        if rc not in (0, 5):
            raise RuntimeError(f"test collection failed (rc {rc}):\n{out[-3000:]}")
        deselect = [line.strip() for line in out.splitlines() if "::" in line]
    return ignore, deselect


def section_tests(sec: Section, dry: bool, shim: str | None, deadline: float, caps: tuple[float, float]) -> None:
    missing = {m for m in OPTIONAL if importlib.util.find_spec(m) is None}
    if dry:
        missing.add("vllm")        # exercise the deselection the GPU machine needs
    sec.data["missing_optional_modules"] = sorted(missing)
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), shim, os.environ.get("PYTHONPATH")) if p)
    # tests/kernels runs its kernels natively when TRITON_INTERPRET=0 (its conftest defaults to 1: the interpreter);
    # the executor's tests build CPU tensors, so their Triton path needs the interpreter even on a GPU machine
    groups = [("kernels", "0" if CUDA else "1",
               ["tests/kernels/test_text_prior.py"] if dry else ["tests/kernels"], caps[0]),
              ("core + executor", "1",
               ["tests/adapter/test_executor.py"] if dry else
               ["tests/core", "tests/adapter/test_executor.py", "tests/adapter/test_device_sync.py"],
               caps[1])]
    rows, failed = [], []
    for name, interpret, paths, cap in groups:
        left = deadline - time.monotonic()
        g = sec.data.setdefault("groups", {}).setdefault(name, {"paths": paths, "TRITON_INTERPRET": interpret})
        if left < 15:
            g["status"] = "not run: out of time"
            failed.append(name)
            rows.append([name, " ".join(paths), interpret, "not run (out of time)", "", ""])
            continue
        env = dict(base, TRITON_INTERPRET=interpret)
        ignore, deselect = test_selection(paths, missing, env, min(60.0, left))
        args = ["-q", "-p", "no:cacheprovider", "--maxfail=10", "-rfE", *paths,
                *[f"--ignore={f}" for f in ignore], *[f"--deselect={i}" for i in deselect]]
        rc, out, secs = _pytest(args, env, min(cap, deadline - time.monotonic()))
        summary = _summary(out) if rc is not None else f"TIMED OUT after {secs:.0f} s; last: {_summary(out)}"
        g.update(command="python -m pytest " + " ".join(args), ignored=ignore, deselected=deselect, rc=rc,
                 seconds=round(secs, 1), summary=summary,
                 failures=[ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))][:50],
                 output_tail=out[-4000:])
        if rc != 0:
            failed.append(name)
        rows.append([name, " ".join(paths), interpret, summary, f"{secs:.0f}",
                     f"{len(ignore)} files ignored, {len(deselect)} tests deselected"])
    sec.md += md_table(["group", "paths", "TRITON_INTERPRET", "summary", "s", "selection"], rows)
    sec.md += ["", "Options: `-q -p no:cacheprovider --maxfail=10 -rfE` (not `-x`: one failure should not hide the "
               "rest in a one-shot run); commands, ignored files, deselected ids and output tails are in the JSON."]
    for name in failed:
        sec.md += ["", f"**{name}:** " + "; ".join(sec.data["groups"][name].get("failures", [])[:10])]
    if failed:
        sec.error = f"test groups failed: {', '.join(failed)}"


# ---------------------------------------------------------------------------------------------------- layer
def build_layer(lib, cfg: Config, batch: int, ctx: int, gen: torch.Generator) -> SimpleNamespace:
    """One attention layer after prefill, as the product leaves it, and the plan of one decode step.

    Every request has a prompt of ``ctx - 1`` tokens and decodes token ``ctx``. The pool holds each request's whole
    prompt in scattered blocks (KV head ``h``'s block ``b`` is global page ``h * NB + b``; one budget tier, so one
    block table for all heads). Dynamic heads' complete chunks go to the cold tier through the product's own
    offload (``dynamic_heads.offload``: page copy + Quest summaries kernel), their hot buffers ``[0, kept)`` hold
    chunks ``0 .. kept - 1``; static heads keep their first ``kept`` blocks (which tokens a static head keeps does
    not change the decode step). The step's token is written, so the dense baseline sees it too."""
    H, D, bs, dtype = cfg.h, cfg.d, cfg.bs, cfg.dtype
    hd = cfg.dynamic_heads
    P, seq = ctx - 1, ctx
    C, M = P // bs, -(-seq // bs)
    kept = lib.kept_blocks(P, cfg.budget, bs, 2, 0)
    sel = lib.SelectionConfig(chunk_size=bs)                # the product's default retrieval units (8 tokens)
    ops = lib.TritonKVOps(bs, D, dtype, sel)
    nb = batch * M + 1                                                     # blocks per head; block 0: null block
    pool = torch.randn(H * nb, 2 * bs, D, dtype=dtype, device=DEVICE, generator=gen)
    tables = (torch.randperm(nb - 1, device=DEVICE, generator=gen)[:batch * M] + 1).view(batch, M).to(torch.int32)
    cold = lib.ColdTier(bs, D, dtype, hd, device=DEVICE, pages_on_host=False,    # cold_tier_memory "device"
                        units=sel.sub_chunks)
    cold._grow_pages(batch * hd * C)          # one allocation up front (admit grows by doubling: slower, 3x peak)
    for r in range(batch):
        cold.admit(f"r{r}", C, torch.full((hd,), kept))
    # The plan is made as the runtime makes it: host lists and vLLM's block tables (on the device); the product
    # puts what layers read where the tables are (step_plan.py, kv_ops.plan_layers), as backend.py puts a layer's
    # index tensors beside its KV cache.
    def on(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long).to(DEVICE)

    heads = lib.LayerHeads(index=0, tiers=on([0] * H), base=on(range(0, H * nb, nb)), stride=on([1] * H),
                           dynamic=on(range(hd)), cold_start=0, static=on(range(hd, H)), signature=(0,) * H)
    qsl = list(range(batch + 1))
    rows = lib.plan_rows([f"r{r}" for r in range(batch)], [P] * batch, qsl, [seq] * batch, bs, 2, 0)
    plan = lib.StepPlan(rows, batch, torch.tensor(qsl, dtype=torch.int32), bs)          # query_start_loc_cpu
    slots = tables[:, (seq - 1) // bs].long() * bs + (seq - 1) % bs
    plan.add_group(0, lib.rewrite_group(rows, tables, torch.full((batch,), seq, dtype=torch.int32, device=DEVICE),
                                        slots, lambda *_: kept, bs))
    plan.finalize(1, cold.slot_of)
    step = lib.plan_layers(plan, [heads], cold, sel)[0]
    for r in range(batch):
        lib.dynamic_heads.offload(ops, plan, heads, step, pool, cold, r)
    q = (torch.randn(batch, cfg.hq, D, device=DEVICE, generator=gen) * cfg.q_scale).to(dtype)
    new_kv = tuple(torch.randn(batch, H, D, device=DEVICE, generator=gen).to(dtype) for _ in range(2))
    ops.write(pool, new_kv[0], new_kv[1], step.slots, None)
    out = torch.zeros_like(q)
    loads = torch.zeros((), dtype=torch.long, device=DEVICE)
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    scale = D ** -0.5
    s = SimpleNamespace(lib=lib, cfg=cfg, batch=batch, ctx=ctx, P=P, seq=seq, C=C, M=M, kept=kept, sel=sel, ops=ops,
                        pool=pool, cold=cold, heads=heads, plan=plan, step=step, q=q, new_kv=new_kv, out=out,
                        loads=loads, layer=layer, scale=scale, resident0=cold.resident.clone())
    s.run = lambda: lib.run_layer(ops, plan, heads, step, pool, cold, q, new_kv, out, scale, layer, loads)
    s.restore = lambda: cold.resident.copy_(s.resident0)          # hot buffers back to chunks 0 .. kept - 1
    return s


def truth_of(s, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``r``'s K and V ``[seq, H, D]`` fp32, read through its prompt table before any hot slot is refilled."""
    H, D, bs = s.cfg.h, s.cfg.d, s.cfg.bs
    tiles = s.pool[s.step.prompt_pages[:, r, :s.M]]                             # [H, M, 2 bs, D]
    k = tiles[:, :, :bs].reshape(H, s.M * bs, D)[:, :s.seq].transpose(0, 1).float()
    v = tiles[:, :, bs:].reshape(H, s.M * bs, D)[:, :s.seq].transpose(0, 1).float()
    return k, v


def check_row(s, r: int, k: torch.Tensor, v: torch.Tensor, dense_out: torch.Tensor) -> dict:
    """Row ``r`` of the step's output against ``core.reference.sparse_decode_attention`` over the chunks the core's
    own selection picks (``core.selection``) plus the hot tail (dynamic heads), or the kept blocks plus the tail
    (static heads); the dense output against the reference over every token.

    Tolerance (bf16, 8 significant bits, unit roundoff u = 2^-9): the kernel rounds the softmax weights to bf16
    before the P.V product (error <= u * max|v| per output) and rounds its output once (<= u * |out|); the check
    allows twice that: ``tol = 2^-8 * (max|v| + max|ref|)``. ``control`` is the same comparison against the
    reference over the *lowest*-scoring chunks (a wrong selection): it must exceed ``tol``, showing the check can
    fail."""
    lib, bs, G, dev = s.lib, s.cfg.bs, s.cfg.hq // s.cfg.h, k.device
    slot = s.cold.slot_of(f"r{r}")
    tail = torch.arange(s.C * bs, s.seq, device=dev)
    units, sub = s.sel.retrieval_units(), s.sel.sub_chunks                # scored and retrieved units
    u = units.chunk_size
    span = torch.arange(u, device=dev)
    right, wrong, agree = [], [], 0
    for h in range(s.cfg.h):
        if h < s.cfg.dynamic_heads:
            kmin, kmax = lib.chunk_summaries(k[:s.C * bs, h][None], u)
            scores = lib.score_chunks(s.q[r, h * G:(h + 1) * G], kmin, kmax)
            want = lib.select_chunks(scores, s.C * sub, s.kept * sub, units)[0].to(dev)
            low = lib.select_chunks(-scores, s.C * sub, s.kept * sub, units)[0].to(dev)
            agree += int(torch.equal(s.cold.resident[slot, h, :s.kept * sub].sort().values, want))
            right.append(torch.cat([(want[:, None] * u + span).flatten(), tail]))
            wrong.append(torch.cat([(low[:, None] * u + span).flatten(), tail]))
        else:
            right.append(torch.cat([torch.arange(s.kept * bs, device=dev), tail]))
            wrong.append(right[-1])
    q = s.q[r].float()
    ref = lib.sparse_decode_attention(q, k, v, right, s.scale)
    control = lib.sparse_decode_attention(q, k, v, wrong, s.scale)
    dense_ref = lib.sparse_decode_attention(q, k, v, [torch.arange(s.seq, device=dev)] * s.cfg.h, s.scale)
    vmax = v.abs().max().item()
    tol = 2**-8 * (vmax + ref.abs().max().item())
    dense_tol = 2**-8 * (vmax + dense_ref.abs().max().item())
    err = (s.out[r].float() - ref).abs().max().item()
    dense_err = (dense_out[r].float() - dense_ref).abs().max().item()
    control_err = (s.out[r].float() - control).abs().max().item()
    return dict(batch=s.batch, ctx=s.ctx, row=r, max_abs_err=err, tol=tol, within_tol=err <= tol,
                ref_max_abs=ref.abs().max().item(), selection_agree=agree, dynamic_heads=s.cfg.dynamic_heads,
                control_err=control_err, control_exceeds_tol=control_err > tol,
                dense_max_abs_err=dense_err, dense_tol=dense_tol, dense_within_tol=dense_err <= dense_tol)


def step_bytes(s, moved: int) -> dict:
    """Bytes one layer step must read: K+V of every attended token, the dynamic heads' fp32 summaries of every
    cold retrieval unit, and the cold K+V of the units swapped in; dense: K+V of the whole context."""
    cfg, elt, sub = s.cfg, s.pool.element_size(), s.sel.sub_chunks
    attended = s.kept * cfg.bs + s.seq - s.C * cfg.bs                           # per (row, head)
    attn = s.batch * cfg.h * attended * cfg.d * 2 * elt
    score = s.batch * cfg.dynamic_heads * s.C * sub * cfg.d * 2 * 4
    swap = moved * 2 * (cfg.bs // sub) * cfg.d * elt
    dense = s.batch * cfg.h * s.seq * cfg.d * 2 * elt
    return dict(attended_tokens=attended, attn_bytes=attn, score_bytes=score, swap_bytes=swap,
                step_bytes=attn + score, swap_step_bytes=attn + score + swap, dense_bytes=dense)


def bench_shape(lib, cfg: Config, batch: int, ctx: int, timer: Timer, copy_gbs: float, gen) -> tuple[dict, list]:
    s = build_layer(lib, cfg, batch, ctx, gen)
    hk = lib.hk
    check_rows = sorted({0, batch - 1})
    truth = {r: truth_of(s, r) for r in check_rows}

    # dense paged decode: the product's sparse_decode kernel given every block of the full prompt table
    kc, vc = s.ops._kv(s.pool, cfg.h)
    full_ids = s.step.prompt_pages.transpose(0, 1).to(torch.int32).contiguous()            # [B, H, M]
    full_ntok = torch.full((batch, cfg.h), s.seq, dtype=torch.int32, device=DEVICE)
    dense_out = torch.empty_like(s.q)

    def dense():
        hk.sparse_decode.run(s.q, kc, vc, full_ids, full_ntok, s.scale, dense_out, backend="triton")
    dense()

    # the product's layer step (write, retrieval, attention), first call: chosen chunks are swapped in
    s.run()
    first_moved = int(s.loads)
    checks = [check_row(s, r, *truth[r], dense_out) for r in check_rows]
    del truth

    t_dense, dense_graph_err = timer.graph(dense)
    t_sdpa, sdpa_note = float("nan"), "skipped: gathered K+V over the SDPA cap"
    if 2 * batch * cfg.h * s.seq * cfg.d * s.pool.element_size() <= cfg.sdpa_max_bytes:
        kd = hk.sparse_decode.gather_kv(kc, full_ids)[:, :, :s.seq].contiguous()             # [B, H, S, D]
        vd = hk.sparse_decode.gather_kv(vc, full_ids)[:, :, :s.seq].contiguous()
        qd = s.q[:, :, None, :]
        t_sdpa, sdpa_note = timer.graph(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=s.scale,
                                                                               enable_gqa=True))
        del kd, vd
    # steady state: the chosen chunks are resident, nothing moves (consecutive steps usually overlap heavily)
    t_eager = timer.run(s.run, sync=True)
    t_graph, graph_err = timer.graph(s.run)
    # swap-in: hot buffers reset to chunks 0 .. kept - 1 before each step (outside the timed span)
    s.restore()
    before = int(s.loads)
    s.run()
    moved = int(s.loads) - before
    t_swap_eager = timer.run(s.run, pre=s.restore, sync=True)
    t_swap_graph, _ = timer.graph(s.run, pre=s.restore)
    t_attend, _ = timer.graph(lambda: s.ops.attend(s.plan, s.heads, s.pool, s.q, s.step.pages, s.step.seq_lens,
                                                   s.scale, s.out, s.layer))
    b = step_bytes(s, moved)
    best = t_graph if math.isfinite(t_graph) else t_eager
    best_swap = t_swap_graph if math.isfinite(t_swap_graph) else t_swap_eager
    splits_planned = hk.sparse_decode.plan_splits(batch, cfg.h, s.M * cfg.bs, DEVICE)
    splits_for_kept = hk.sparse_decode.plan_splits(batch, cfg.h, b["attended_tokens"], DEVICE)
    row = dict(batch=batch, ctx=ctx, prompt=s.P, kept_blocks=s.kept, cold_chunks=s.C,
               chunks_moved_first_step=first_moved, chunks_moved_swap_step=moved,
               step_graph_us=t_graph, step_graph_error=graph_err, step_eager_us=t_eager,
               swap_step_graph_us=t_swap_graph, swap_step_eager_us=t_swap_eager, attend_graph_us=t_attend,
               dense_graph_us=t_dense, dense_graph_error=dense_graph_err, sdpa_graph_us=t_sdpa, sdpa_note=sdpa_note,
               step_pct_copy=b["step_bytes"] / best / 1e3 / copy_gbs,
               swap_step_pct_copy=b["swap_step_bytes"] / best_swap / 1e3 / copy_gbs,
               dense_pct_copy=b["dense_bytes"] / t_dense / 1e3 / copy_gbs if math.isfinite(t_dense) else None,
               speedup=t_dense / best, speedup_swap=t_dense / best_swap, speedup_eager=t_dense / t_eager,
               attend_splits_planned=splits_planned, attend_splits_for_kept_tokens=splits_for_kept, **b)
    return row, checks


def section_decode(sec: Section, cfg: Config, deadline: float, timer: Timer, shared: dict) -> None:
    lib = product()
    d = sec.data
    copy_gbs = d2d_copy_gbs(timer, cfg.d2d_bytes)
    shared["copy_gbs"] = d["copy_gbs"] = copy_gbs
    d["shapes"] = dict(hq=cfg.hq, h=cfg.h, d=cfg.d, block=cfg.bs, dtype=str(cfg.dtype), budget=cfg.budget,
                       dynamic_heads=cfg.dynamic_heads, q_scale=cfg.q_scale, iters=cfg.iters, warmup=cfg.warmup)
    d["rows"], d["checks"], d["skipped"], d["errors"] = [], [], [], []
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    elt = torch.empty(0, dtype=cfg.dtype).element_size()
    for ctx in cfg.contexts:
        for batch in cfg.batches:
            shape = dict(batch=batch, ctx=ctx)
            kv = cfg.h * (batch * -(-ctx // cfg.bs) + 1) * 2 * cfg.bs * cfg.d * elt
            need = kv * (1 + cfg.dynamic_heads / cfg.h) + min(kv, cfg.sdpa_max_bytes)
            if time.monotonic() > deadline:
                d["skipped"].append(dict(shape, why="section time cap"))
                continue
            if CUDA and need > 0.7 * torch.cuda.mem_get_info()[0]:
                d["skipped"].append(dict(shape, why=f"needs ~{need / GIB:.1f} GiB"))
                continue
            try:
                row, checks = bench_shape(lib, cfg, batch, ctx, timer, copy_gbs, gen)
                d["rows"].append(row)
                d["checks"] += checks
                print(f"[decode] B={batch} ctx={ctx}: step {row['step_graph_us']:.1f} µs (graph), dense "
                      f"{row['dense_graph_us']:.1f} µs, max err {max(c['max_abs_err'] for c in checks):.2e}",
                      flush=True)
            except Exception:  # noqa: BLE001 - one shape failing must not lose the others
                d["errors"].append(dict(shape, traceback=traceback.format_exc()))
            if CUDA:
                torch.cuda.empty_cache()
    shapes_of = "Dry-run shapes (tiny, not Qwen's)" if cfg.name == "dry" else "Qwen2.5-VL-7B attention"
    unit = cfg.bs // lib.SelectionConfig(chunk_size=cfg.bs).sub_chunks
    sec.md += [f"{shapes_of}: {cfg.hq} query heads, {cfg.h} KV heads (GQA {cfg.hq // cfg.h}), head dim "
               f"{cfg.d}, {str(cfg.dtype).replace('torch.', '')}, block = chunk = {cfg.bs} tokens, retrieved in "
               f"the product's default units of {unit} tokens (`SelectionConfig.sub_chunks`; 'chunks swapped' "
               "counts units); budget "
               f"{cfg.budget:.0%} (kept blocks per head = `core.tiers.kept_blocks`), KV heads 0-{cfg.dynamic_heads - 1}"
               f" of {cfg.h} dynamic (every one retrieves: the step's upper bound; static heads attend the same "
               "way without retrieval). Prompt = context - 1 tokens; one decode token per request.",
               "",
               "The step is the product's `adapter.executor.run_layer` with `TritonKVOps` (write K/V, chunk scoring + "
               "top-k, hot-buffer refill via `core.hot_buffer.assign_slots` + `swap_in`, `sparse_decode`), on a plan "
               "made by `core.step_plan` + `kv_ops.plan_layers`, the cold tier in device memory (section 4 puts its "
               "pages in pinned host memory). Dense = the same `sparse_decode` kernel given every block of the full "
               "table (same paged layout, same launch); SDPA = `torch.nn.functional.scaled_dot_product_attention` "
               "(enable_gqa) over a pre-gathered contiguous K/V (gather not timed).",
               "",
               f"Measured device copy bandwidth: **{copy_gbs:.0f} GB/s** (read + write bytes of a "
               f"{_size(cfg.d2d_bytes)} `copy_`). Times: µs per layer step, median of {cfg.iters}, "
               + ("CUDA events, L2 evicted before each call; graph = replay of the step captured in a CUDA graph, "
                  "eager = launched from Python (waits for the device first, so launch time counts)."
                  if CUDA else "wall clock on the CPU under the Triton interpreter (meaningless as performance)."),
               "`steady` = the chosen chunks are already resident (nothing swapped); `swap` = hot buffers reset to "
               "chunks 0..k-1 before every step, so most chosen chunks are copied in. MB = bytes the step reads "
               "(K+V of the attended tokens, fp32 summaries of every cold chunk of the dynamic heads, swapped pages); "
               "% copy = (MB / time) / copy bandwidth. speed-up = dense / step (graph if captured, else eager).", ""]
    sec.md += md_table(
        ["B", "ctx", "k blocks", "step µs graph", "step µs eager", "attend µs", "swap step µs", "chunks swapped",
         "MB steady", "% copy", "MB swap", "% copy swap", "dense µs", "dense MB", "dense % copy", "SDPA µs",
         "speed-up", "speed-up swap", "speed-up eager"],
        [[r["batch"], r["ctx"], r["kept_blocks"], r["step_graph_us"], r["step_eager_us"], r["attend_graph_us"],
          r["swap_step_graph_us"] if math.isfinite(r["swap_step_graph_us"]) else r["swap_step_eager_us"],
          r["chunks_moved_swap_step"], r["step_bytes"] / MB, f"{r['step_pct_copy']:.0%}", r["swap_step_bytes"] / MB,
          f"{r['swap_step_pct_copy']:.0%}", r["dense_graph_us"], r["dense_bytes"] / MB,
          f"{r['dense_pct_copy']:.0%}" if r["dense_pct_copy"] is not None else "n/a", r["sdpa_graph_us"],
          f"{r['speedup']:.2f}x", f"{r['speedup_swap']:.2f}x", f"{r['speedup_eager']:.2f}x"] for r in d["rows"]])
    graph_errors = {r["step_graph_error"] for r in d["rows"] if r["step_graph_error"]}
    if graph_errors:
        sec.md += ["", "CUDA-graph capture of the step failed (eager times used): " + "; ".join(graph_errors)]
    sec.md += ["", "`sparse_decode` split planning inside `TritonKVOps.attend` (it sizes splits for the table width, "
               "not the kept tokens): " + ", ".join(f"B={r['batch']} ctx={r['ctx']}: S={r['attend_splits_planned']} "
                                                    f"(for the kept tokens: {r['attend_splits_for_kept_tokens']})"
                                                    for r in d["rows"])]
    sec.md += ["", "### Correctness against the PyTorch reference (rows 0 and B-1 of every shape)", "",
               "ref = `core.reference.sparse_decode_attention` (fp32) over the chunks `core.selection` picks from the "
               "row's true keys + the hot tail; tol = 2^-8 * (max|v| + max|ref|) (two bf16 roundings: softmax weights "
               "before P.V, and the output); control = the same output against the reference over the lowest-scoring "
               "chunks (must exceed tol); selection = dynamic heads whose hot buffer holds exactly the core's chunks.",
               ""]
    sec.md += md_table(["B", "ctx", "row", "max abs err", "tol", "ok", "selection", "control err", "dense err",
                        "dense tol", "dense ok"],
                       [[c["batch"], c["ctx"], c["row"], f"{c['max_abs_err']:.2e}", f"{c['tol']:.2e}",
                         "yes" if c["within_tol"] else "**NO**", f"{c['selection_agree']}/{c['dynamic_heads']}",
                         f"{c['control_err']:.2e}", f"{c['dense_max_abs_err']:.2e}", f"{c['dense_tol']:.2e}",
                         "yes" if c["dense_within_tol"] else "**NO**"] for c in d["checks"]])
    if d["skipped"]:
        sec.md += ["", "Skipped: " + "; ".join(f"B={x['batch']} ctx={x['ctx']} ({x['why']})" for x in d["skipped"])]
    bad = [c for c in d["checks"] if not (c["within_tol"] and c["dense_within_tol"]
                                          and c["selection_agree"] == c["dynamic_heads"])]
    problems = []
    if d["errors"]:
        problems.append("shapes failed:\n" + "\n".join(f"B={e['batch']} ctx={e['ctx']}:\n{e['traceback']}"
                                                      for e in d["errors"]))
    if bad:
        problems.append(f"{len(bad)} correctness checks outside tolerance or with a different selection")
    if not d["rows"]:
        problems.append("no shape was measured")
    if problems:
        sec.error = "\n".join(problems)


# ---------------------------------------------------------------------------------------------------- 4. swap-in
def h2d_contiguous_gbs(timer: Timer, nbytes: int) -> float:
    """One big pinned host -> device ``copy_(non_blocking=True)``: payload bytes / time, GB/s (the PCIe yardstick)."""
    host = pinned_empty((nbytes,), torch.uint8)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    us = timer.run(lambda: dev.copy_(host, non_blocking=True), iters=max(5, timer.iters // 4))
    return nbytes / us / 1e3


def swap_selections(lib, cfg: Config, timer: Timer, deadline: float, gen, d: dict) -> str | None:
    """Copy realistic selections (k chunks per request and dynamic head) from a pinned cold store into scattered
    device pages: (a) host gather + one copy + device scatter, (b) the product's ``swap_in`` kernel given the
    pinned host tensor (unified virtual addressing). Fills ``d["rows"]``; returns why (b) failed, if it did."""
    bs, D, dtype, hd = cfg.bs, cfg.d, cfg.dtype, cfg.dynamic_heads
    page = 2 * bs * D * torch.empty(0, dtype=dtype).element_size()
    sizes = []
    for batch, ctx in cfg.swap_sizes:
        k = lib.kept_blocks(ctx - 1, cfg.budget, bs, 2, 0)
        sizes.append((batch, ctx, k, batch * hd * k, batch * hd * ((ctx - 1) // bs)))
    n_cold = min(max(x[4] for x in sizes), cfg.cold_store_bytes // page)
    n_max = max(x[3] for x in sizes)
    cold = pinned_empty((n_cold, 2 * bs, D), dtype)
    cold.copy_(torch.randn(n_cold, 2 * bs, D, device=DEVICE, generator=gen).to(dtype))
    pool = torch.zeros(n_max, 2 * bs, D, dtype=dtype, device=DEVICE)
    staging = pinned_empty((n_max, 2 * bs, D), dtype)
    dev_buf = torch.empty(n_max, 2 * bs, D, dtype=dtype, device=DEVICE)
    d["cold_store_mb"], d["page_bytes"], d["rows"] = n_cold * page / MB, page, []
    uva_error = None
    for batch, ctx, k, n, _ in sizes:
        if time.monotonic() > deadline:
            d.setdefault("skipped", []).append(dict(batch=batch, ctx=ctx, why="section time cap"))
            continue
        src_h = torch.randperm(n_cold, generator=torch.Generator().manual_seed(n))[:n]
        src_h = src_h.repeat(-(-n // src_h.numel()))[:n]                  # only if the store is smaller than n
        dst = torch.randperm(n, device=DEVICE, generator=gen)
        src = src_h.to(DEVICE)
        stage, buf = staging[:n], dev_buf[:n]

        def host_path():
            torch.index_select(cold, 0, src_h, out=stage)
            buf.copy_(stage, non_blocking=True)
            pool.index_copy_(0, dst, buf)
            if CUDA:
                torch.cuda.synchronize()
        pool.zero_()
        host_path()
        ok_a = torch.equal(pool[dst[:256]].cpu(), cold[src_h[:256]])
        t_a = statistics.median(_wall(host_path) for _ in range(max(3, cfg.iters // 4)))
        t_gather = statistics.median(_wall(lambda: torch.index_select(cold, 0, src_h, out=stage)) for _ in range(3))
        t_copy = timer.run(lambda: buf.copy_(stage, non_blocking=True), iters=5)
        t_scatter = timer.run(lambda: pool.index_copy_(0, dst, buf), iters=5)

        moved = torch.ones(n, dtype=torch.bool, device=DEVICE)
        t_b, ok_b = float("nan"), None
        if uva_error is None:
            try:
                pool.zero_()
                lib.hk.swap_in.launch(pool, cold, dst, src, moved)
                if CUDA:
                    torch.cuda.synchronize()
                ok_b = torch.equal(pool[dst[:256]].cpu(), cold[src_h[:256]])
                t_b = timer.run(lambda: lib.hk.swap_in.launch(pool, cold, dst, src, moved),
                                iters=max(5, cfg.iters // 4))
            except Exception as exc:  # noqa: BLE001 - an expected possible outcome, recorded
                uva_error = f"{type(exc).__name__}: {exc}"[:600]
        nbytes = n * page
        d["rows"].append(dict(batch=batch, ctx=ctx, k=k, dynamic_heads=hd, pages=n, mb=nbytes / MB,
                              host_path_us=t_a, host_path_gbs=nbytes / t_a / 1e3, host_path_correct=ok_a,
                              host_gather_us=t_gather, h2d_copy_us=t_copy, h2d_copy_gbs=nbytes / t_copy / 1e3,
                              device_scatter_us=t_scatter, uva_kernel_us=t_b,
                              uva_kernel_gbs=nbytes / t_b / 1e3 if math.isfinite(t_b) else None,
                              uva_kernel_correct=ok_b))
    return uva_error


def pinned_step(lib, cfg: Config, timer: Timer, batch: int, ctx: int, gen) -> dict:
    """Section 3's layer step (swap variant) with the cold pages in device memory (``cold_tier_memory="device"``),
    then with ``ColdTier.pages`` replaced by a pinned host copy (summaries, tables, hot buffers stay on the device):
    what ``cold_tier_memory="host"``, the product's default, allocates (``ColdTier(pages_on_host=True)``)."""
    s = build_layer(lib, cfg, batch, ctx, gen)
    s.run()
    s.restore()
    before = int(s.loads)
    s.run()
    moved = int(s.loads) - before
    t_dev, err_dev = timer.graph(s.run, pre=s.restore)
    if not math.isfinite(t_dev):
        t_dev = timer.run(s.run, pre=s.restore, sync=True)
    dev_pages = s.cold.pages
    host_pages = pinned_empty(dev_pages.shape, cfg.dtype)
    host_pages.copy_(dev_pages)
    s.cold.pages = host_pages
    t_pin, err_pin = float("nan"), None
    try:
        t_pin, err_pin = timer.graph(s.run, pre=s.restore)
        if not math.isfinite(t_pin):
            t_pin = timer.run(s.run, pre=s.restore, sync=True)
    except Exception as exc:  # noqa: BLE001 - recorded: the design question this answers
        err_pin = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        s.cold.pages = dev_pages
    swap_bytes = moved * 2 * (cfg.bs // s.sel.sub_chunks) * cfg.d * dev_pages.element_size()
    return dict(batch=batch, ctx=ctx, chunks_swapped=moved, swapped_mb=swap_bytes / MB,
                step_cold_in_device_us=t_dev, step_cold_pinned_us=t_pin, pinned_error=err_pin,
                device_graph_error=err_dev, extra_us=t_pin - t_dev,
                extra_gbs=swap_bytes / (t_pin - t_dev) / 1e3 if t_pin > t_dev else None)


def section_swap(sec: Section, cfg: Config, deadline: float, timer: Timer, shared: dict) -> None:
    lib = product()
    d = sec.data
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    d["h2d_contiguous_gbs"] = h2d_gbs = h2d_contiguous_gbs(timer, cfg.h2d_bytes)
    uva_error = d["uva_kernel_error"] = swap_selections(lib, cfg, timer, deadline, gen, d)
    copy_gbs = shared.get("copy_gbs") or d2d_copy_gbs(timer, cfg.d2d_bytes)
    d["pinned_step"] = []
    for batch, ctx in cfg.pinned_step_shapes:
        if time.monotonic() > deadline:
            d.setdefault("skipped", []).append(dict(batch=batch, ctx=ctx, why="section time cap (layer step)"))
            continue
        d["pinned_step"].append(pinned_step(lib, cfg, timer, batch, ctx, gen))
        if CUDA:
            torch.cuda.empty_cache()

    dtype = str(cfg.dtype).replace("torch.", "")
    sec.md += [f"Pages are one chunk of one KV head: {cfg.bs} tokens x {cfg.d} dims x K and V x {dtype} = "
               f"{d['page_bytes']} B. A selection = k chunks ({cfg.budget:.0%} budget) per request and dynamic head "
               f"({cfg.dynamic_heads}), drawn from a {'pinned' if CUDA else '(dry run: plain CPU)'} cold store of "
               f"{d['cold_store_mb']:.1f} MB. GB/s = payload bytes / time.",
               "",
               f"- contiguous host-to-device copy of {_size(cfg.h2d_bytes)} (pinned, `copy_(non_blocking=True)`): "
               f"**{h2d_gbs:.1f} GB/s**",
               f"- device copy bandwidth (section 3, read + write): {copy_gbs:.0f} GB/s",
               "- (a) host path = `index_select` on the host into pinned staging + one `non_blocking` copy + "
               "`index_copy_` into the hot slots (wall clock to completion, then its parts); (b) = the product's "
               "`swap_in` Triton kernel given the pinned host tensor itself (unified virtual addressing), CUDA events",
               f"- (b) {'FAILED: `' + uva_error + '`' if uva_error else 'ran'}", ""]
    sec.md += md_table(["B", "ctx", "k", "pages", "MB", "(a) µs", "(a) GB/s", "gather µs", "H2D µs", "H2D GB/s",
                        "scatter µs", "(a) correct", "(b) µs", "(b) GB/s", "(b) correct"],
                       [[r["batch"], r["ctx"], r["k"], r["pages"], r["mb"], r["host_path_us"], r["host_path_gbs"],
                         r["host_gather_us"], r["h2d_copy_us"], r["h2d_copy_gbs"], r["device_scatter_us"],
                         r["host_path_correct"], r["uva_kernel_us"],
                         r["uva_kernel_gbs"] if r["uva_kernel_gbs"] is not None else "n/a", r["uva_kernel_correct"]]
                        for r in d["rows"]])
    sec.md += ["", "### The layer step with the cold pages in pinned host memory", "",
               "Section 3's step (swap variant: hot buffers reset before each step), once with the cold pages in "
               "device memory and once with `ColdTier.pages` replaced by a pinned host copy (summaries, tables and "
               "the hot buffers stay on the device); extra GB/s = swapped bytes / extra time.", ""]
    sec.md += md_table(["B", "ctx", "chunks swapped", "MB swapped", "step µs, cold in device", "step µs, cold pinned",
                        "extra µs", "extra GB/s", "error"],
                       [[r["batch"], r["ctx"], r["chunks_swapped"], r["swapped_mb"], r["step_cold_in_device_us"],
                         r["step_cold_pinned_us"], r["extra_us"],
                         r["extra_gbs"] if r["extra_gbs"] is not None else "n/a", r["pinned_error"] or ""]
                        for r in d["pinned_step"]])
    if d.get("skipped"):
        sec.md += ["", "Skipped: " + "; ".join(f"B={x['batch']} ctx={x['ctx']} ({x['why']})" for x in d["skipped"])]
    wrong = [r for r in d["rows"] if not r["host_path_correct"] or r["uva_kernel_correct"] is False]
    if wrong:
        sec.error = f"{len(wrong)} swap-in copies did not reproduce the cold pages"


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e6


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:g} GiB" if nbytes >= GIB else f"{nbytes / 2**20:g} MiB"


# ---------------------------------------------------------------------------------------------------- 5. e2e
def section_e2e(sec: Section) -> None:
    sec.data["run"] = False
    sec.data["why"] = "vLLM cannot reach this machine yet (no vLLM wheel, no network); see shared research notes"
    sec.md += ["Not run by this script: `vllm serve` with HybridKV on CUDA needs vLLM on the machine, which it "
               "does not have (no wheel, no network; the CUDA wheel is 311 MiB against a 64 MiB payload). The "
               "backend's Triton KV ops and vLLM's Triton prefill kernel run in CI inside vLLM's CPU engine under "
               "`TRITON_INTERPRET=1` (`tests/engine/test_triton_path.py`); the CUDA platform hook and piecewise "
               "graphs have never run. The sections above check the kernels, the decode executor's Triton path and "
               "the cold-tier transfers natively, without vLLM."]


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for gpu_check.md and gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run budget (default 480; dry run 150)")
    ap.add_argument("--dynamic-heads", type=int, default=None, help="KV heads that retrieve (default: all 4)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per measurement")
    args = ap.parse_args()
    argv = [sys.executable, *sys.argv]                      # the exact command line
    t0 = time.monotonic()
    if not args.dry_run and not CUDA:
        print("gpu_check: no CUDA device (or TRITON_INTERPRET=1): use --dry-run on a CPU", file=sys.stderr)
        return 2
    cfg = DRY if args.dry_run else FULL
    overrides = {k: v for k, v in (("dynamic_heads", args.dynamic_heads), ("iters", args.iters)) if v}
    if overrides:
        cfg = Config(**{**cfg.__dict__, **overrides})
    budget = args.budget_s or (150.0 if args.dry_run else 480.0)
    deadline = t0 + budget
    # section caps (s): decode benchmark, swap-in, tests (kernels, core + executor); the tests get what is left
    caps = (40, 20, 60, 60) if args.dry_run else (150, 45, 150, 120)
    report = Report(args.out, argv, args.dry_run)
    env = report.add("environment", 1, "Environment")
    tests = report.add("kernel_tests", 2, "The project's tests on this machine")
    decode = report.add("decode_step", 3, "Decode layer step at Qwen2.5-VL-7B attention shapes")
    swap = report.add("cold_tier_swap_in", 4, "Cold-tier swap-in from pinned host memory")
    e2e = report.add("end_to_end", 5, "End-to-end vllm serve on CUDA")
    shim = kernels_shim()
    timer = Timer(cfg.iters, cfg.warmup)
    shared: dict = {}
    run_section(report, env, section_env, argv, args.dry_run)
    run_section(report, decode, section_decode, cfg, min(deadline, time.monotonic() + caps[0]), timer, shared)
    run_section(report, swap, section_swap, cfg, min(deadline, time.monotonic() + caps[1]), timer, shared)
    run_section(report, tests, section_tests, args.dry_run, shim, deadline, (caps[2], caps[3]))
    run_section(report, e2e, section_e2e)
    text = report.write()
    print(text)
    print(f"\n[gpu_check] wrote {args.out / 'gpu_check.md'} and gpu_check.json in {time.monotonic() - t0:.0f} s; "
          f"{'all sections ok' if report.ok else 'SOME SECTIONS FAILED'}", flush=True)
    if shim:
        shutil.rmtree(shim, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
