"""Kernel launches without Triton's per-call Python dispatch.

``kernel[grid](*args, **kwargs)`` runs Triton's JIT dispatch on every call before the
compiled kernel's launcher: it binds the arguments, specialises each one (dtype and 16-byte
alignment of tensors, the value class of integers), builds the kernel-cache key, reads its
runtime settings and builds the launch metadata for its (empty) hook chains. On this
project's CPU that is about 7 µs for a 9-argument kernel and 20-25 µs for the grouped
matmul's 40 arguments (``scripts/host_overhead.py --triton-dispatch``), as much as an op's
own host path.

``launch(kernel, grid, *args, **kwargs)`` makes the same launch. The first call for a key
goes through ``kernel[grid]`` (which compiles if it must) and keeps the compiled kernel that
Triton picked; later calls with the same key call that kernel's launcher directly, with the
same arguments Triton would pass it. Two caches hold these picks:

* by value: the kernel and the current device (Triton launches on the current device, not
  the tensors'); the settings Triton reads on every call and compiles into the kernel
  (``knobs.runtime.debug``, the instrumentation mode, and from Triton 3.9 the fpsan cast
  mode); per positional argument a tensor's dtype and address modulo 16, an integer's value,
  any other scalar's type and value; every keyword argument (constexprs and launch options)
  by name, type and value. A hit costs one tuple built and hashed.
* by class, looked up when the first misses: the same, except that an integer that is not a
  constexpr counts by the properties Triton specialises integers on (``== 1``, divisible by
  16, and whether it fits int32, int64 or uint64; a value that fits none, which Triton
  refuses, shares its class with no other value), a float by its type (Triton's
  specialisation of a float that is not a constexpr does not depend on its value) and a
  tensor's address by whether it is 16-byte aligned. That is as fine as Triton's own
  specialisation or finer (a ``do_not_specialize`` or annotated integer still counts by
  these properties). So shapes that change on every call (a growing KV cache, a variable
  token count) still skip Triton's dispatch; their new values only add entries to the first
  cache.

So two calls share a key, in either cache, only where Triton's dispatch would also pick the
same compiled kernel; a new dtype, alignment, constexpr or integer class costs one slow
call. Calls take Triton's own path every time when:

* ``FLOPWISE_FAST_LAUNCH=0`` (read when this module is imported);
* the kernel is not a compiled ``JITFunction`` (under ``TRITON_INTERPRET=1``, or a test's spy);
* the grid is not a tuple, a positional argument is something else than a tensor or a
  Python scalar (e.g. a TMA tensor descriptor), or a keyword argument something else than a
  Python scalar or string (e.g. a tensor, a tuple);
* a launch hook is registered (``triton.knobs.runtime.launch_enter_hook`` /
  ``launch_exit_hook``, e.g. by a profiler), a stages-inspection hook is set, or the kernel
  has pre-run hooks (all checked on every call);
* the kernel reads global variables (Triton checks them on every call), or takes
  ``*args`` or ``**kwargs``;
* the active target is not CUDA (e.g. ROCm, whose backend also specialises on a tensor's
  storage size);
* the installed Triton is not one of ``TESTED`` (3.6 to 3.9). The keys and the launcher call
  follow Triton's internals of those versions, checked by the launch tests against each;
  3.5 and older lack settings the key reads, and a later release may specialise or launch
  differently, so any other version keeps Triton's dispatch until it is checked.

Settings Triton reads only when it compiles (the default FP fusion, for one) behave as with
Triton's own dispatch: a kernel already compiled keeps them. Each cache keeps at most
``_MAX_ENTRIES`` keys; past that it starts over. An entry holds its kernel, so the kernel's
``id`` in a key (cheaper to hash than the kernel) stays its own.
"""

from __future__ import annotations

import inspect
import os

import torch

__all__ = ["launch", "clear", "FAST", "SUPPORTED", "TESTED", "stats"]

FAST = os.environ.get("FLOPWISE_FAST_LAUNCH", "1") != "0"
_MAX_ENTRIES = 4096
_CACHE: dict = {}  # key by value -> entry
_BY_CLASS: dict = {}  # key by class -> entry
stats = {"fast": 0, "slow": 0}  # calls per path (read by tests and scripts/host_overhead.py)

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JIT
except Exception:  # pragma: no cover - triton missing: every kernel call is kernel[grid]
    _JIT = None

TESTED = ((3, 6), (3, 7), (3, 8), (3, 9))  # Triton releases the direct path was checked against


def _triton_minor() -> tuple[int, int] | None:
    try:
        import triton

        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except Exception:  # noqa: BLE001 - no triton, or a version string of another form
        return None


SUPPORTED = _JIT is not None and _triton_minor() in TESTED
if not SUPPORTED:
    _JIT = None  # every call takes Triton's dispatch

_Tensor, _Param = torch.Tensor, torch.nn.Parameter
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_I32_MIN, _I32_MAX, _I64_MIN, _U64_FROM, _U64_MAX = -(1 << 31), (1 << 31) - 1, -(1 << 63), 1 << 63, (1 << 64) - 1


def clear() -> None:
    """Forget every cached pick (the next call of each key goes through Triton again)."""
    _CACHE.clear()
    _BY_CLASS.clear()


_FPSAN = _JIT is not None and hasattr(_knobs.compilation, "fpsan_homomorphic_casts")  # Triton >= 3.9


def _settings():
    """What Triton's ``JITFunction.run`` reads from its settings on every call and compiles
    into the kernel it picks."""
    comp = _knobs.compilation
    if _FPSAN:
        return _knobs.runtime.debug, comp.instrumentation_mode, comp.fpsan_homomorphic_casts
    return _knobs.runtime.debug, comp.instrumentation_mode


_BACKEND = []  # the active target's backend, read once


def _on_cuda() -> bool:
    """The keys describe what Triton's CUDA backend specialises on. Other backends specialise
    on more (AMD's on whether a tensor's storage fits 32-bit offsets): they keep Triton's
    dispatch."""
    if not _BACKEND:
        try:
            _BACKEND.append(_driver.active.get_current_target().backend)
        except Exception:  # noqa: BLE001 - no active driver: Triton's dispatch says why
            return False
    return _BACKEND[0] == "cuda"


def _no_hooks() -> bool:
    """True when Triton's launch hook chains are empty (the C launcher then has nothing to call)."""
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _stages_hook():
    """Triton 3.9's pipeline-inspection hook, which changes the kernel Triton picks (None before 3.9)."""
    return getattr(_knobs.runtime, "add_stages_inspection_hook", None)


def _key(kernel, device, args, kwargs, settings=()):
    # A tensor adds two items (its dtype, then its address modulo 16), an int one (itself),
    # another scalar one (its type and value): no item of one kind equals one of another, so
    # two argument lists give equal keys only if they agree argument by argument.
    key = [id(kernel), device, settings]
    append = key.append
    for a in args:
        c = a.__class__
        if c is _Tensor or c is _Param:
            append(a.dtype)
            append(a.data_ptr() & 15)
        elif c is int:
            append(a)
        elif c is float or c is bool or a is None:
            append((c, a))
        else:
            return None
    named = []
    for name, v in kwargs.items():  # constexprs and launch options; by type too (1 == 1.0 == True)
        c = v.__class__
        if c is not int and c is not bool and c is not float and c is not str and v is not None:
            return None
        named.append((name, c, v))
    append(tuple(named))
    return tuple(key)


def _int_class(v: int) -> int:
    """What Triton specialises a non-constexpr integer on: -1 for the value 1 (a constant);
    else divisibility by 16 (bit 0) and the type: int32 (0), int64 (2) or uint64 (4). A value
    outside int64 and uint64 is its own class."""
    if v == 1:
        return -1
    if _I32_MIN <= v <= _I32_MAX:
        kind = 0
    elif _I64_MIN <= v < _U64_FROM:
        kind = 2
    elif _U64_FROM <= v <= _U64_MAX:
        kind = 4
    else:  # Triton refuses it: a class of its own, so its first call goes through Triton
        return ("out of range", v)
    return kind + ((v & 15) == 0)


def _class_key(kernel, device, args, kwargs, settings=()):
    """The key by class of a call whose key by value is not None (same layout, coarser items;
    a constexpr positional argument keeps its type and value)."""
    const = kernel.constexprs  # indices of the constexpr parameters
    key = [id(kernel), device, settings]
    append = key.append
    for i, a in enumerate(args):
        c = a.__class__
        if i in const:
            append((c, a))
        elif c is int:
            append(_int_class(a))
        elif c is _Tensor or c is _Param:
            append(a.dtype)
            append((a.data_ptr() & 15) == 0)
        else:  # float, bool or None: Triton's specialisation does not depend on the value
            append((c,))
    append(tuple((name, v.__class__, v) for name, v in kwargs.items()))
    return tuple(key)


def _entry(kernel, compiled, args, kwargs):
    """What a fast call needs: the launcher, the kernel handle and metadata, and the bound
    values of the parameters after the positional ones (keywords and defaults, constant for
    the key). None when the call cannot be repeated this way."""
    if kernel.used_global_vals or kernel.pre_run_hooks or compiled is None:
        return None
    if any(p.kind in _VARIADIC for p in kernel.signature.parameters.values()):
        return None  # Triton packs *args into one tuple argument
    if hasattr(compiled, "result"):  # an asynchronous compile's future
        return None
    params = kernel.params
    if len(args) > len(params):
        return None
    tail = []
    for p in params[len(args):]:
        if p.name in kwargs:
            tail.append(kwargs[p.name])
        elif p.has_default:
            tail.append(p.default)
        else:
            return None
    # the compiled kernel stays referenced (Triton unloads its module when it is freed), and
    # so does the kernel (whose id is in the keys)
    return compiled.run, compiled.function, compiled.packed_metadata, tuple(tail), compiled, kernel


def _store(cache: dict, key, entry) -> None:
    if len(cache) >= _MAX_ENTRIES:
        cache.clear()
    cache[key] = entry


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, with Triton's per-call dispatch skipped after a key's
    first call (see the module's docstring for the keys and when it is not skipped)."""
    if FAST and _JIT is not None and type(kernel) is _JIT and grid.__class__ is tuple and _on_cuda():
        drv = _driver.active
        device = drv.get_current_device()
        settings = _settings()
        key = _key(kernel, device, args, kwargs, settings)
        if key is not None and _no_hooks() and not kernel.pre_run_hooks and not _stages_hook():
            hit = _CACHE.get(key)
            if hit is None:
                ckey = _class_key(kernel, device, args, kwargs, settings)
                hit = _BY_CLASS.get(ckey)
                if hit is not None:
                    _store(_CACHE, key, hit)
            if hit is not None:
                run, function, metadata, tail = hit[:4]
                n = len(grid)
                stats["fast"] += 1
                run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, drv.get_current_stream(device),
                    function, metadata, None, None, None, *args, *tail)
                return
            stats["slow"] += 1
            compiled = kernel[grid](*args, **kwargs)
            entry = _entry(kernel, compiled, args, kwargs)
            if entry is not None:
                _store(_CACHE, key, entry)
                _store(_BY_CLASS, ckey, entry)
            return
    stats["slow"] += 1
    kernel[grid](*args, **kwargs)
