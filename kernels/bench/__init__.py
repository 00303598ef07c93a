"""Benchmark harness: ``flopwise bench [op ...]``.

A suite (one module per op family, e.g. ``flopwise.kernels.bench.routing``) exposes
``cases(gpu: bool)``, a list or a generator of :class:`Case` (a generator builds each
case's inputs only when the harness reaches it), and optionally ``summary(rows) -> str``,
a line printed under its table. Each :class:`Case` names its shape, the bytes and FLOPs
the op must move/do, a ``check`` that compares a provider's output with the reference
output, and its providers:

* ``reference`` - the op's ``<op>_reference`` (plain PyTorch; the readable definition),
* ``torch``     - the best-effort torch pipeline a user would write (what BASELINES.md times),
* ``triton``    - our kernel (``triton-interp`` when it runs under the interpreter on CPU).

The harness runs every provider once, checks it against the reference, and refuses to
time (and so to report a speed-up for) a provider whose output is wrong on that shape; a
reference that fails marks its case and the suite goes on. Timing is the median of
``triton.testing.do_bench`` on CUDA and of a plain wall-clock loop on CPU, within the run's
budget per provider or the case's own (``Case.budget_ms``, for cases as slow as a training
step). Each row reports ms, TB/s and TFLOP/s from the case's byte and FLOP counts, MFU
(against ``Case.peak_flops``), a rate (``Case.count`` per second), the ratio to the fastest
``torch*`` provider, and the fraction of the measured copy bandwidth; rows are written as
JSON with the device name, versions and date, rewritten after every case.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import json
import os
import sys
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Case", "Row", "SUITES", "run", "run_case", "format_table", "environment"]

# op name -> module holding ``cases(gpu: bool)``
SUITES: dict[str, str] = {
    "routing": "flopwise.kernels.bench.routing",
    "mod": "flopwise.kernels.bench.mod",
    "moe": "flopwise.kernels.bench.moe",
    # model-level suites live with the models (the registry only names them)
    "mod_step": "flopwise.models.bench",
    "coding": "flopwise.coding.bench",
    "train": "flopwise.models.bench_train",
}


@dataclass
class Case:
    op: str
    shape: str
    providers: dict[str, Callable[[], Any]]
    check: Callable[[Any, Any], str | None]  # (out, ref_out) -> None if OK, else why not
    bytes: int = 0  # bytes that must move (read + written)
    flops: int = 0
    mode: str = "fwd"
    # providers that compute a different function on purpose (e.g. a dense GEMM with the
    # same FLOPs): timed as a floor to compare against, never checked, never a "torch" ratio
    floors: tuple[str, ...] = ()
    # items processed per call and their unit (e.g. 4096*32 "sym"): reported as a rate
    count: int = 0
    unit: str = ""
    # the device's peak FLOP/s that the FLOPs are a fraction of (a training step's MFU)
    peak_flops: float | None = None
    # per-provider timing budget for cases much slower than a kernel (a training step):
    # None uses the run's budget
    budget_ms: float | None = None
    # also time every provider as CUDA-graph replays (GPU only): the device time of an op
    # whose eager call costs more host time to enqueue than its kernels take to run
    graph: bool = False
    # providers that cannot be captured (a host sync, e.g. bincount): no capture is tried,
    # since a failed capture can leave the allocator's graph pool behind for later providers
    graph_skip: tuple[str, ...] = ()
    # called after the case's rows are measured; what it returns (if not None) is printed
    # under them (e.g. a profile of the step just timed); a failure is printed, not raised
    after: Callable[[], str | None] | None = None


@dataclass
class Row:
    op: str
    shape: str
    mode: str
    provider: str
    ms: float | None
    tbps: float | None
    tflops: float | None
    vs_torch: float | None  # best torch provider's time / this provider's time
    copy_fraction: float | None  # tbps / measured device copy bandwidth
    status: str  # "ok", "floor", or why it was not timed
    peak_mb: float | None = None  # CUDA: peak memory allocated during one call, above what was live before
    rate: float | None = None  # Case.count per second
    unit: str = ""
    mfu: float | None = None  # achieved FLOP/s / Case.peak_flops
    graph_ms: float | None = None  # Case.graph: median of CUDA-graph replays, per call
    # the best replayed torch provider's time / this provider's: the best torch provider may
    # differ from vs_torch's (one that cannot be captured has no replayed time)
    graph_vs_torch: float | None = None
    device: str = ""
    torch: str = ""
    triton: str = ""
    date: str = ""


def environment() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = "absent"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = "cpu"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.date.today().isoformat(),
    }


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], gpu: bool, budget_ms: float) -> float:
    if gpu:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(50, int(budget_ms)), return_mode="median"))
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < 50 and (time.perf_counter() - start) * 1e3 < budget_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_graph_ms(fn: Callable[[], Any], budget_ms: float) -> float:
    """Per-call time of ``fn`` captured in a CUDA graph (many calls unrolled) and replayed:
    no host time, no L2 flush between calls. Ten replays of about a quarter of the eager
    budget each: replays do not vary the way host-bound eager calls do."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=max(10, int(budget_ms) // 4), return_mode="median"))


_COPY_TBPS: float | None = None


def copy_bandwidth_tbps() -> float | None:
    """Device-to-device copy bandwidth (bytes read + written), measured once per process."""
    global _COPY_TBPS
    if _COPY_TBPS is None and torch.cuda.is_available():
        src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        ms = _time_ms(lambda: dst.copy_(src), True, 100)
        _COPY_TBPS = 2 * src.numel() / (ms * 1e-3) / 1e12
    return _COPY_TBPS


def run_case(case: Case, gpu: bool, budget_ms: float = 100.0) -> list[Row]:
    env = environment()
    if "reference" not in case.providers:
        raise ValueError(f"case {case.op}/{case.shape} has no 'reference' provider")
    try:
        ref_out = case.providers["reference"]()
        _sync()
    except Exception as exc:  # nothing can be checked, so nothing is timed; the suite goes on
        why = f"reference failed: {type(exc).__name__}: {exc}"
        return [Row(op=case.op, shape=case.shape, mode=case.mode,
                    provider=name if gpu or name != "triton" else "triton-interp", ms=None, tbps=None, tflops=None,
                    vs_torch=None, copy_fraction=None, status=why, **env) for name in case.providers]
    copy = copy_bandwidth_tbps() if gpu else None
    timed: dict[str, float] = {}
    graphed: dict[str, float] = {}
    status: dict[str, str] = {}
    peak: dict[str, float] = {}
    for name, fn in case.providers.items():
        try:
            if gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            out = ref_out if name == "reference" else fn()
            _sync()
            if gpu and name != "reference":
                peak[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
            why = None if name in ("reference", *case.floors) else case.check(out, ref_out)
            del out
        except Exception as exc:  # a provider that crashes is reported, not timed
            why = f"error: {type(exc).__name__}: {exc}"
        if why is not None:
            status[name] = f"WRONG ({why})"
            continue
        status[name] = "floor" if name in case.floors else "ok"
        timed[name] = _time_ms(fn, gpu, case.budget_ms or budget_ms)
        # graph replays for every compared provider (the reference only where it is all there is)
        if (case.graph and gpu and name not in case.graph_skip
                and (name != "reference" or len(case.providers) == 1)):
            try:
                graphed[name] = _time_graph_ms(fn, case.budget_ms or budget_ms)
            except Exception as exc:  # e.g. a host sync, which capture forbids: eager numbers stand
                status[name] += f" (no graph: {type(exc).__name__})"
                try:
                    torch.cuda.synchronize()
                except Exception:  # pragma: no cover - a broken context shows in the next provider
                    pass

    def best_torch_of(times: dict[str, float]) -> float | None:
        t = [ms for name, ms in times.items() if name.startswith("torch") and name not in case.floors]
        return min(t) if t else None

    best_torch, best_torch_graph = best_torch_of(timed), best_torch_of(graphed)
    rows = []
    for name in case.providers:
        ms = timed.get(name)
        tbps = case.bytes / (ms * 1e-3) / 1e12 if ms and case.bytes else None
        tflops = case.flops / (ms * 1e-3) / 1e12 if ms and case.flops else None
        rows.append(
            Row(
                op=case.op,
                shape=case.shape,
                mode=case.mode,
                # on CPU the Triton provider runs under the interpreter: say so
                provider=name if gpu or name != "triton" else "triton-interp",
                ms=ms,
                tbps=tbps,
                tflops=tflops,
                vs_torch=(best_torch / ms) if (ms and best_torch) else None,
                copy_fraction=(tbps / copy) if (tbps and copy) else None,
                status=status[name],
                peak_mb=peak.get(name),
                rate=case.count / (ms * 1e-3) if (ms and case.count) else None,
                unit=case.unit,
                mfu=tflops * 1e12 / case.peak_flops if (tflops and case.peak_flops) else None,
                graph_ms=graphed.get(name),
                graph_vs_torch=(best_torch_graph / graphed[name]) if (name in graphed and best_torch_graph) else None,
                **env,
            )
        )
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[Row]) -> str:
    head = ["op", "shape", "mode", "provider", "µs", "TB/s", "TFLOP/s", "MFU", "rate", "vs torch", "of copy BW",
            "peak MiB", "status"]
    graph = any(r.graph_ms is not None for r in rows)
    if graph:  # CUDA-graph replays beside the eager wall clock
        head[-1:-1] = ["graph µs", "graph TB/s", "graph vs torch"]
    body = [
        [
            r.op,
            r.shape,
            r.mode,
            r.provider,
            "-" if r.ms is None else f"{1e3 * r.ms:.1f}",
            _fmt(r.tbps, ".2f"),
            _fmt(r.tflops, ".1f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            "-" if r.rate is None else f"{r.rate / 1e6:.2f} M{r.unit}/s",
            "-" if r.vs_torch is None else f"{r.vs_torch:.2f}x",
            "-" if r.copy_fraction is None else f"{100 * r.copy_fraction:.0f}%",
            _fmt(r.peak_mb, ".0f"),
            *([] if not graph else [
                "-" if r.graph_ms is None else f"{1e3 * r.graph_ms:.1f}",
                "-" if not (r.graph_ms and r.tbps) else f"{r.tbps * r.ms / r.graph_ms:.2f}",
                "-" if r.graph_vs_torch is None else f"{r.graph_vs_torch:.2f}x"]),
            r.status,
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _row_line(r: Row) -> str:
    ms = "-" if r.ms is None else f"{r.ms:.3f} ms"
    extra = "".join(f", {v}" for v in (
        None if r.tflops is None else f"{r.tflops:.1f} TFLOP/s", None if r.tbps is None else f"{r.tbps:.2f} TB/s",
        None if r.mfu is None else f"MFU {100 * r.mfu:.1f}%",
        None if r.rate is None else f"{r.rate / 1e6:.3g} M{r.unit}/s", None if r.vs_torch is None else f"{r.vs_torch:.2f}x torch",
        None if r.graph_ms is None else f"graph {r.graph_ms:.3f} ms",
        None if r.graph_vs_torch is None else f"graph {r.graph_vs_torch:.2f}x torch")
        if v)
    return f"  {r.op} | {r.shape} | {r.mode} | {r.provider}: {ms}{extra} [{r.status}]"


def run(ops: list[str] | None = None, *, json_path: str | None = None, budget_ms: float = 100.0,
        print_fn: Callable[[str], None] = print, progress: bool = False) -> list[Row]:
    """Run the named suites (all when ``ops`` is empty) and print one table per suite.

    ``json_path`` is rewritten after every case, and ``progress`` prints each case's rows as
    soon as they are measured, so a run stopped part-way (a time limit) keeps what it did.
    """
    ops = list(ops or SUITES)
    unknown = [op for op in ops if op not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark op(s) {unknown}; choose from {sorted(SUITES)}")
    gpu = torch.cuda.is_available()
    env = environment()
    print_fn(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    if not gpu:
        print_fn("No CUDA device: running the reference and the Triton interpreter on small CPU shapes. "
                 "These CPU timings say nothing about GPU speed; GPU numbers need a GPU.")
    else:
        print_fn(f"measured copy bandwidth: {copy_bandwidth_tbps():.2f} TB/s")
    all_rows: list[Row] = []
    for op in ops:
        module = importlib.import_module(SUITES[op])
        rows: list[Row] = []
        for case in module.cases(gpu):
            case_rows = run_case(case, gpu, budget_ms)
            rows.extend(case_rows)
            all_rows.extend(case_rows)
            if progress:
                for r in case_rows:
                    print_fn(_row_line(r))
                sys.stdout.flush()  # a run stopped by a time limit keeps what it printed
            if case.after is not None:
                try:
                    report = case.after()
                except Exception as exc:
                    report = f"{case.op} | {case.shape}: after-case report failed: {type(exc).__name__}: {exc}"
                if report:
                    print_fn(report)
                    sys.stdout.flush()
            if json_path:
                _write_json(json_path, all_rows)
        print_fn(format_table(rows))
        if hasattr(module, "summary"):  # a suite may add a line comparing its rows
            print_fn(module.summary(rows))
    if json_path:
        _write_json(json_path, all_rows)
        print_fn(f"wrote {len(all_rows)} rows to {json_path}")
    return all_rows


def _write_json(path: str, rows: list[Row]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
    os.replace(tmp, path)
