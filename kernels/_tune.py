"""Per-shape choice of kernel meta-parameters, timed on the device and remembered.

A launcher offers a few candidate configurations (its heuristic default first) and a
``trial(cfg)`` that runs the kernel with one of them without disturbing the real launch's
inputs or results. The first call for a shape key times every candidate and keeps the
fastest for the rest of the process; later calls are a dictionary lookup. The grouped
matmuls' candidates leave every reduction as the default does it (the row kernel's BLOCK_K,
the weight-gradient kernel's BLOCK_R, the SwiGLU backward's column tile and warps), so the
choice is meant to change speed, not results; the interpreter tests check bit-equality.

``FLOPWISE_AUTOTUNE`` (read when this module is imported):

* ``auto`` (default): tune on CUDA; the CPU interpreter takes the defaults;
* ``1``: tune on every device (the tests use it with a scripted timer);
* ``0``: always the heuristic defaults, no timing.

Tuning synchronises the device, once per shape key. It never runs while a CUDA graph is
being captured (a cached choice is used, else the default, left untuned for a later eager
call), and it is skipped, with the default remembered, when its scratch buffers do not fit
in memory.
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from typing import Callable

import torch

from ._dispatch import HAS_TRITON

if HAS_TRITON:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - a Triton without it
        class OutOfResources(Exception):
            pass
else:  # pragma: no cover
    class OutOfResources(Exception):
        pass

__all__ = ["OutOfResources", "MODE", "clear", "device_capability", "device_fault", "device_name", "device_sm_count",
           "enabled", "forget", "pick", "tuned"]

_MODES = ("auto", "0", "1")


def _parse_mode(value: str | None) -> str:
    mode = (value or "auto").strip().lower() or "auto"
    mode = {"on": "1", "true": "1", "off": "0", "false": "0"}.get(mode, mode)
    if mode not in _MODES:
        raise ValueError(f"FLOPWISE_AUTOTUNE must be one of auto, 0, 1 (or on/off), got {value!r}")
    return mode


MODE = _parse_mode(os.environ.get("FLOPWISE_AUTOTUNE"))
# timed launches per candidate, after one untimed launch (compilation, caches)
REPS = 5

_UNTUNED = object()  # cache entry: tuning was skipped for good (no scratch memory); use the default
_CACHE: dict[tuple, object] = {}
_CARDS: dict[int, tuple[str, tuple[int, int], int]] = {}
# what device_sm_count reports off CUDA (the interpreter): a few, so that a persistent
# launch's programs each loop over several tiles in the tests
CPU_SMS = 4


def _card(device: torch.device) -> tuple[str, tuple[int, int], int]:
    """(name, compute capability, multiprocessors) of a CUDA device, looked up once per device index."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CARDS:
        _CARDS[index] = (torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                         torch.cuda.get_device_properties(index).multi_processor_count)
    return _CARDS[index]


def device_name(device: torch.device) -> str:
    """The card's name (part of every key: a choice made on one card does not carry over)."""
    return _card(device)[0] if device.type == "cuda" else device.type


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability, None for other devices."""
    return _card(device)[1] if device.type == "cuda" else None


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a persistent launch's grid is a multiple
    of it); ``CPU_SMS`` elsewhere."""
    return _card(device)[2] if device.type == "cuda" else CPU_SMS


def enabled(device: torch.device) -> bool:
    if MODE == "0":
        return False
    return MODE == "1" or device.type == "cuda"


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _measure(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds per launch of ``fn``: the better of two runs of REPS back-to-back
    launches, after one untimed launch (compilation, caches).

    On CUDA each run is queued behind a short device-side stall, so the launches' host work
    (argument handling, Triton's launcher, a trial's scratch) overlaps the stall and the
    events time the kernels alone, as in a stream of real work."""
    fn()
    best = float("inf")
    for _ in range(2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(_STALL_CYCLES)
            start.record()
            for _ in range(REPS):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / REPS)
        else:
            t0 = time.perf_counter()
            for _ in range(REPS):
                fn()
            best = min(best, (time.perf_counter() - t0) * 1e3 / REPS)
    return best


# about 0.5 ms at H100 clocks: more than the host needs to queue REPS launches
_STALL_CYCLES = 1_000_000


def device_fault(exc: BaseException) -> bool:
    """An error from the device itself (an illegal address, say), which leaves the context
    unusable: never to be mistaken for a candidate that did not build. Triton's launcher
    reports every driver error as ``Triton Error [CUDA]: ...``, the sticky ones (a fault of an
    earlier kernel surfacing here) and the harmless ones (a tensor map or launch size this
    candidate cannot have); a synchronisation tells them apart."""
    accel = getattr(torch, "AcceleratorError", None)
    if (accel is not None and isinstance(exc, accel)) or "CUDA error" in str(exc):
        return True
    if "Triton Error [CUDA]" in str(exc) and torch.cuda.is_available():
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - the context is broken
            return True
    return False


def pick(key: tuple, candidates, trial: Callable[[dict], None], device: torch.device) -> dict | None:
    """The configuration to launch for ``key``: the remembered choice, or the fastest of
    ``candidates`` (a list, or a function returning one, called only to tune) timed now
    through ``trial(cfg)``; ``None`` means "use the default" (tuning off, a graph being
    captured, or tuning skipped for good: no memory for trials, nothing built, a pick that
    failed later).

    A candidate whose compilation runs out of shared memory or registers is left out, and so
    is any other candidate but the first that fails to build (with a warning). The default
    should be ``candidates[0]``: it wins ties, its errors propagate, and it is what runs
    when every other candidate fails."""
    hit = _CACHE.get(key)
    if hit is not None:
        return None if hit is _UNTUNED else hit
    if not enabled(device) or _capturing(device):
        return None
    best, best_ms = None, float("inf")
    try:
        for i, cfg in enumerate(candidates() if callable(candidates) else candidates):
            try:
                ms = _measure(lambda: trial(cfg), device)
            except OutOfResources:
                continue
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001
                # an alternative that does not build (a compiler error, a descriptor the
                # driver refuses) is left out, as one that does not fit; the default's own
                # errors, and faults of the device, are the caller's
                if i == 0 or device_fault(exc):
                    raise
                warnings.warn(f"flopwise autotuner: candidate {cfg} for {key[0]} launch left out: "
                              f"{type(exc).__name__}: {str(exc)[:300]}", RuntimeWarning, stacklevel=2)
                continue
            if ms < best_ms:
                best, best_ms = cfg, ms
    except torch.OutOfMemoryError:
        _CACHE[key] = _UNTUNED
        return None
    if best is None:  # nothing built: the caller's default path (with its stage fallback) from now on
        _CACHE[key] = _UNTUNED
        return None
    _CACHE[key] = dict(best)
    return _CACHE[key]


def forget(key: tuple) -> None:
    """Drop one remembered choice (its launch failed later: the caller falls back)."""
    _CACHE[key] = _UNTUNED


def tuned() -> dict[tuple, dict | None]:
    """Every choice made so far, ``{key: config}`` (``None``: the default, tuning skipped)."""
    return {k: (None if v is _UNTUNED else dict(v)) for k, v in _CACHE.items()}


def clear() -> None:
    """Forget every choice (the next call per shape tunes again)."""
    _CACHE.clear()
