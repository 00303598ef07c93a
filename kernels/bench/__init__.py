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

Checking. The harness runs every provider once (its check call) and compares it with the
reference, and refuses to time (and so to report a speed-up for) a provider whose output
is wrong on that shape. Check calls run with ``kernels._dispatch``'s output poisoning on
(kernel outputs start as NaN / the integer minimum, as under ``FLOPWISE_POISON=1``), and
every output of a case stays alive until all its providers are checked, so a kernel that
skips elements cannot pass by finding the previous provider's correct result in a block
the CUDA caching allocator hands out again. A reference that fails, or whose output holds
a NaN or an infinity (unless the case sets ``Case.nonfinite_ok``), marks its case: nothing
in it is timed and the suite goes on. ``flopwise bench`` refuses to start when the
dispatch would not run the Triton kernels (``FLOPWISE_BACKEND=reference``, or a CPU run
without ``TRITON_INTERPRET=1`` set before flopwise was imported), and a ``triton*`` row
that :func:`run_case` would otherwise time on the reference is reported ``WRONG``.

Timing, per provider, within the run's budget or the case's own (``Case.budget_ms``, for
cases as slow as a training step):

* eager column (``µs``), CUDA: the median of ``triton.testing.do_bench``, which zeroes a
  256 MB buffer (an L2 flush, about 85 µs on an H100) before every timed call and measures
  between CUDA events around the call. Host time below about 85 µs per call is hidden: it
  overlaps the flush. An op whose host path is shorter than that reads as device time,
  however slow its Python; ``scripts/host_overhead.py`` measures host time per op
  separately.
* graph column (``Case.graph``, CUDA): ``triton.testing.do_bench_cudagraph``, many calls
  captured in one CUDA graph and replayed, with no flush between calls: no host time, and a
  working set that fits in L2 (50 MB on an H100) stays L2-warm from one call to the next.
* CPU: the median of a plain wall-clock loop (host and kernel time together).

Peak memory (CUDA) is taken on a second, untimed call after the check call, so one-time
work in a provider's first call (autotuning scratch, building a trainer) is not counted.
Each row reports ms, TB/s and TFLOP/s from the case's byte and FLOP counts, MFU (against
``Case.peak_flops``), a rate (``Case.count`` per second), the ratio to the fastest correct
``torch*`` provider (named in ``Row.baseline`` / ``Row.graph_baseline``), and the fraction
of the measured copy bandwidth. With ``--json`` the rows are written as a JSON list, one
object per row with the device name, versions and date and, under ``"run"``, the run's
header (git commit, ``FLOPWISE_*`` variables, timing budget, ``complete``), rewritten
atomically after every case.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import importlib
import json
import math
import os
import subprocess
import sys
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from flopwise._files import check_writable
from flopwise.kernels import _dispatch

__all__ = ["Case", "Row", "SUITES", "run", "run_case", "format_table", "environment", "run_header",
           "triton_dispatch_problem", "check_then"]

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
    # the reference's output may hold NaN or +-inf by design (e.g. a -inf mask): without it,
    # a non-finite reference output marks the case "reference failed" and nothing is timed
    nonfinite_ok: bool = False


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
    # CUDA: peak memory allocated during one call (the second, untimed one: not the check
    # call, which may autotune or build state), above what was live before it
    peak_mb: float | None = None
    rate: float | None = None  # Case.count per second
    unit: str = ""
    mfu: float | None = None  # achieved FLOP/s / Case.peak_flops
    graph_ms: float | None = None  # Case.graph: median of CUDA-graph replays, per call
    # the best replayed torch provider's time / this provider's: the best torch provider may
    # differ from vs_torch's (one that cannot be captured has no replayed time)
    graph_vs_torch: float | None = None
    # the torch provider each ratio divides by (the fastest correct one; usually "torch")
    baseline: str | None = None
    graph_baseline: str | None = None
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
    """Median ms per call of ``fn``: the eager column.

    CUDA: ``triton.testing.do_bench``, which zeroes a 256 MB buffer (an L2 flush, about
    85 µs on an H100) before every timed call and times the call between CUDA events. The
    host enqueues the call while the device still runs the flush, so host time below about
    85 µs per call is hidden: an op whose Python and launch path takes 60 µs and whose
    kernels take 5 µs reads as about 5 µs here. ``scripts/host_overhead.py`` measures host
    time per op separately. CPU: a plain wall-clock loop (host and kernels together)."""
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
    """Per-call time of ``fn`` captured in a CUDA graph (many calls unrolled) and replayed
    (``triton.testing.do_bench_cudagraph``): no host time, and no L2 flush between calls, so
    a working set that fits in L2 (50 MB on an H100) is L2-warm from one call to the next,
    unlike the eager column's. Ten replays of about a quarter of the eager budget each:
    replays do not vary the way host-bound eager calls do."""
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


def check_then(full: Callable[[], Any], timed: Callable[[], Any]) -> Callable[[], Any]:
    """A provider whose first call (the harness's check call) returns ``full()``, what its
    case's check needs (e.g. gradients, encoded bytes), and every later call, the timed ones,
    ``timed()``, which does only the work being measured."""
    first = [True]

    def provider():
        if first:
            first.clear()
            return full()
        return timed()

    return provider


def triton_dispatch_problem(gpu: bool) -> str | None:
    """Why ``kernels._dispatch`` would not run the Triton kernels on the suites' tensors
    (CUDA tensors when ``gpu``, else CPU ones), or None when it would. A ``triton*`` row
    timed in that state would be the reference under another name."""
    try:
        if _dispatch._requested() == "reference":
            return "FLOPWISE_BACKEND=reference"
    except ValueError as exc:  # an invalid FLOPWISE_BACKEND: every op call would raise it too
        return str(exc)
    if gpu and _dispatch.INTERPRET:
        return "TRITON_INTERPRET=1 on a CUDA machine: the kernels would run under the interpreter"
    ok, why = _dispatch._triton_can_run(torch.device("cuda" if gpu else "cpu"))
    return None if ok else why


@contextlib.contextmanager
def _poisoned():
    """``kernels._dispatch.new_output`` fills kernel outputs with NaN (integers: their
    minimum) inside the block, as under ``FLOPWISE_POISON=1``; the previous setting after
    it. Only check calls run poisoned: the fill would add a write per output to timed calls."""
    was = _dispatch.POISON
    _dispatch.POISON = True
    try:
        yield
    finally:
        _dispatch.POISON = was


def _nonfinite(out: Any, where: str = "output", depth: int = 0) -> str | None:
    """Where ``out`` (a tensor, array or float, or tuples/lists/dicts/dataclasses of them)
    holds a NaN or an infinity, or None if nowhere."""
    if depth > 32:  # a structure this deep is not a provider's output; do not recurse forever
        return None
    if isinstance(out, torch.Tensor):
        if out.layout != torch.strided or not (out.is_floating_point() or out.is_complex()):
            return None
        return None if bool(torch.isfinite(out.detach()).all()) else where
    if isinstance(out, float):
        return None if math.isfinite(out) else where
    if type(out).__module__ == "numpy":  # arrays and numpy scalars, without importing numpy
        kind = getattr(getattr(out, "dtype", None), "kind", "")
        if kind in ("f", "c"):
            import numpy as np

            return None if bool(np.isfinite(out).all()) else where
        return None
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            bad = _nonfinite(getattr(out, f.name, None), f"{where}.{f.name}", depth + 1)
            if bad:
                return bad
        return None
    if isinstance(out, dict):
        for k, v in out.items():
            bad = _nonfinite(v, f"{where}[{k!r}]", depth + 1)
            if bad:
                return bad
        return None
    if isinstance(out, (list, tuple)):
        for i, v in enumerate(out):
            bad = _nonfinite(v, f"{where}[{i}]", depth + 1)
            if bad:
                return bad
    return None


def _peak_mb(fn: Callable[[], Any]) -> float:
    """CUDA memory allocated at the peak of one call of ``fn``, above what was live before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return peak


def run_case(case: Case, gpu: bool, budget_ms: float = 100.0) -> list[Row]:
    env = environment()
    if "reference" not in case.providers:
        raise ValueError(f"case {case.op}/{case.shape} has no 'reference' provider")

    def label(name: str) -> str:  # on CPU the Triton provider runs under the interpreter: say so
        return name if gpu or name != "triton" else "triton-interp"

    def failed(why: str) -> list[Row]:  # nothing can be checked, so nothing is timed; the suite goes on
        return [Row(op=case.op, shape=case.shape, mode=case.mode, provider=label(name), ms=None, tbps=None,
                    tflops=None, vs_torch=None, copy_fraction=None, status=why, **env) for name in case.providers]

    try:
        with _poisoned():
            ref_out = case.providers["reference"]()
            _sync()
    except Exception as exc:
        return failed(f"reference failed: {type(exc).__name__}: {exc}")
    if not case.nonfinite_ok:
        try:
            bad = _nonfinite(ref_out)
        except Exception as exc:  # e.g. a device fault surfacing at the first sync
            return failed(f"reference failed: {type(exc).__name__}: {exc}")
        if bad:  # a NaN reference makes comparisons (NaN < tol is False) pass or fail by accident
            return failed(f"reference failed: non-finite output ({bad})")
    not_triton = triton_dispatch_problem(gpu)
    copy = copy_bandwidth_tbps() if gpu else None
    timed: dict[str, float] = {}
    graphed: dict[str, float] = {}
    status: dict[str, str] = {}
    peak: dict[str, float] = {}

    # 1. check calls: every provider once, poisoned, each output kept until all are checked
    outputs: dict[str, Any] = {"reference": ref_out}
    for name, fn in case.providers.items():
        if name == "reference":
            status[name] = "ok"
            continue
        if name.startswith("triton") and not_triton:
            status[name] = f"WRONG (backend is reference: {not_triton})"
            continue
        try:
            with _poisoned():
                outputs[name] = fn()  # kept alive: its block cannot hold a later provider's output
                _sync()
            why = None if name in case.floors else case.check(outputs[name], ref_out)
        except Exception as exc:  # a provider that crashes is reported, not timed
            why = f"error: {type(exc).__name__}: {exc}"
        status[name] = f"WRONG ({why})" if why is not None else ("floor" if name in case.floors else "ok")
    del outputs, ref_out  # the case's checks are done

    # 2. timing: the providers that passed, in order, with only the case's inputs alive
    for name, fn in case.providers.items():
        if status[name] not in ("ok", "floor"):
            continue
        if gpu:
            # a second, untimed call: the check call's one-time work (autotuning and its
            # scratch, compilation, a trainer's set-up) is not this provider's memory
            try:
                peak[name] = _peak_mb(fn)
            except Exception as exc:  # passed its check, then failed: not timed
                status[name] = f"WRONG (error on a second call: {type(exc).__name__}: {exc})"
                continue
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

    def best_torch_of(times: dict[str, float]) -> tuple[str | None, float | None]:
        t = [(ms, name) for name, ms in times.items() if name.startswith("torch") and name not in case.floors]
        if not t:
            return None, None
        ms, name = min(t)
        return name, ms

    (base_name, best_torch), (graph_base_name, best_torch_graph) = best_torch_of(timed), best_torch_of(graphed)
    rows = []
    for name in case.providers:
        ms = timed.get(name)
        tbps = case.bytes / (ms * 1e-3) / 1e12 if ms and case.bytes else None
        tflops = case.flops / (ms * 1e-3) / 1e12 if ms and case.flops else None
        vs_torch = (best_torch / ms) if (ms and best_torch) else None
        graph_vs_torch = (best_torch_graph / graphed[name]) if (name in graphed and best_torch_graph) else None
        rows.append(
            Row(
                op=case.op,
                shape=case.shape,
                mode=case.mode,
                provider=label(name),
                ms=ms,
                tbps=tbps,
                tflops=tflops,
                vs_torch=vs_torch,
                copy_fraction=(tbps / copy) if (tbps and copy) else None,
                status=status[name],
                peak_mb=peak.get(name),
                rate=case.count / (ms * 1e-3) if (ms and case.count) else None,
                unit=case.unit,
                mfu=tflops * 1e12 / case.peak_flops if (tflops and case.peak_flops) else None,
                graph_ms=graphed.get(name),
                graph_vs_torch=graph_vs_torch,
                baseline=base_name if vs_torch is not None else None,
                graph_baseline=graph_base_name if graph_vs_torch is not None else None,
                **env,
            )
        )
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(x: float | None, baseline: str | None) -> str:
    """``1.23x``, naming the torch provider divided by when it is not the usual ``torch``."""
    if x is None:
        return "-"
    return f"{x:.2f}x" if baseline in (None, "torch") else f"{x:.2f}x vs {baseline}"


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
            _ratio(r.vs_torch, r.baseline),
            "-" if r.copy_fraction is None else f"{100 * r.copy_fraction:.0f}%",
            _fmt(r.peak_mb, ".0f"),
            *([] if not graph else [
                "-" if r.graph_ms is None else f"{1e3 * r.graph_ms:.1f}",
                "-" if not (r.graph_ms and r.tbps) else f"{r.tbps * r.ms / r.graph_ms:.2f}",
                _ratio(r.graph_vs_torch, r.graph_baseline)]),
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
        None if r.rate is None else f"{r.rate / 1e6:.3g} M{r.unit}/s", None if r.vs_torch is None else f"{r.vs_torch:.2f}x {r.baseline or 'torch'}",
        None if r.graph_ms is None else f"graph {r.graph_ms:.3f} ms",
        None if r.graph_vs_torch is None else f"graph {r.graph_vs_torch:.2f}x {r.graph_baseline or 'torch'}")
        if v)
    return f"  {r.op} | {r.shape} | {r.mode} | {r.provider}: {ms}{extra} [{r.status}]"


def _git_commit(root: Path) -> tuple[str | None, bool | None]:
    """(HEAD, whether tracked files differ from it) when ``root`` is the top of a git
    checkout, else (None, None): an installed copy inside some other repository (a venv in
    a project) must not report that repository's commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20,
                              check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root.resolve():
            return None, None
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None, None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return commit or None, dirty


def run_header(ops: list[str], budget_ms: float, complete: bool = False) -> dict[str, Any]:
    """The run's settings, written with every row of the JSON file (under ``"run"``): the
    source tree's git commit (None outside a checkout) and whether it had uncommitted
    changes, the FLOPWISE_* variables (and TRITON_INTERPRET) set, the timing budget per
    provider, the suites asked for, when it started, and ``complete``: False until the last
    suite has finished (a run stopped by a time limit or an error keeps False)."""
    # kernels/bench/__init__.py -> the source tree holding kernels/, models/, flopwise/
    commit, dirty = _git_commit(Path(__file__).resolve().parents[2])
    return {
        "commit": commit,
        "dirty": dirty,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FLOPWISE_") or k == "TRITON_INTERPRET"},
        "budget_ms": budget_ms,
        "suites": list(ops),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "complete": complete,
    }


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
    problem = triton_dispatch_problem(gpu)
    if problem:  # every triton row would time the reference (or the interpreter) under the kernel's name
        raise ValueError(
            f"flopwise bench measures the Triton kernels, but the dispatch would not run them here: {problem}. "
            + ("Unset FLOPWISE_BACKEND (or set it to auto or triton)." if "FLOPWISE_BACKEND" in problem else
               "On a CPU, run `flopwise bench` (it sets TRITON_INTERPRET=1 itself) or set TRITON_INTERPRET=1 "
               "before flopwise is imported; on a CUDA machine, leave TRITON_INTERPRET unset."))
    if json_path is not None:  # before the first case, not after it
        if os.path.isdir(json_path):
            raise ValueError(f"json_path (--json) {json_path} is a folder; expected a file path")
        parent = os.path.dirname(os.path.abspath(json_path))
        if not os.path.isdir(parent):
            raise ValueError(f"json_path (--json) {json_path}: its folder {parent} does not exist")
        check_writable(parent, f"json_path (--json) {json_path}", "pass another path")
    env = environment()
    header = run_header(ops, budget_ms)
    commit = "no git checkout" if header["commit"] is None else \
        f"commit {header['commit'][:12]}{' (uncommitted changes)' if header['dirty'] else ''}"
    print_fn(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  {commit}")
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
                _write_json(json_path, all_rows, header)
        print_fn(format_table(rows))
        if hasattr(module, "summary"):  # a suite may add a line comparing its rows
            print_fn(module.summary(rows))
    if json_path:
        header["complete"] = True  # the last suite has finished
        _write_json(json_path, all_rows, header)
        print_fn(f"wrote {len(all_rows)} rows to {json_path}")
    return all_rows


def _write_json(path: str, rows: list[Row], header: dict[str, Any] | None = None) -> None:
    """Write ``rows`` as a JSON list of row objects (the format readers already take), each
    with the run's ``header`` under ``"run"``; through a temporary file and a rename, so a
    run stopped mid-write leaves the previous complete file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([{**dataclasses.asdict(r), **({"run": header} if header is not None else {})} for r in rows],
                  f, indent=1)
    os.replace(tmp, path)
