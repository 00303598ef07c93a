"""The one place that decides which implementation of an op runs.

Rule (DESIGN.md):

* CUDA tensor and Triton importable            -> the Triton kernel;
* CPU tensor and ``TRITON_INTERPRET=1``         -> the same Triton kernel under Triton's interpreter;
* otherwise                                      -> the op's ``<op>_reference`` (plain PyTorch).

``FLOPWISE_BACKEND=reference|triton`` forces one. A forced backend that cannot run
raises ``RuntimeError``; it never falls back silently. ``FLOPWISE_BACKEND=auto`` (or
unset) applies the rule above.

``TRITON_INTERPRET`` is read once, when this module is imported, because Triton decides
at decoration time whether ``@triton.jit`` builds a compiled or an interpreted kernel:
changing it afterwards would not change the kernels.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.autograd.forward_ad as _fwad

__all__ = ["HAS_TRITON", "deterministic_algorithms", "INTERPRET", "KERNEL_DTYPES", "acc_dtype", "backend", "use_triton", "new_output", "new_output_like", "traced", "autograd_twin", "cdiv", "records",
           "next_pow2"]

try:  # Triton has wheels for Linux only.
    import triton  # noqa: F401
    import triton.language  # noqa: F401  (the kernels need it; fail here, not at decoration)

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Read once, like TRITON_INTERPRET: new_output runs for every kernel output of every call,
# where an environment lookup per allocation is host time a small op can notice.
POISON = os.environ.get("FLOPWISE_POISON", "0") == "1"

_VALID = ("auto", "reference", "triton")
# floating dtypes the kernels take; others (float64) run the reference, which keeps their precision
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype references compute in: float32 for half inputs and float32, float64 for
    float64 (which the references keep exact to its precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids. (``triton.cdiv`` is a constexpr function whose host
    call path costs several microseconds; launchers call these on every op.)"""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


# FLOPWISE_BACKEND is read on every op call, so that a change at run time takes effect.
# ``os.environ.get`` encodes the name and decodes the value each time (about 1 µs on this
# project's CPU, per op); the mapping behind it is read directly where CPython has one, and
# the parsed value is kept for as long as the raw value is the same object.
try:
    _ENV_DATA = os.environ._data  # what os.environ reads and writes (CPython)
    _ENV_KEY = os.environ.encodekey("FLOPWISE_BACKEND")
    _ENV_DECODE = os.environ.decodevalue
except AttributeError:  # pragma: no cover - another Python
    _ENV_DATA = None
_LAST = (None, "auto")  # the raw value last parsed, and its parse (one tuple: one store)


def _requested() -> str:
    global _LAST
    if _ENV_DATA is None or _ENV_DATA is not getattr(os.environ, "_data", None):  # os.environ replaced
        return _parse(os.environ.get("FLOPWISE_BACKEND"))
    raw = _ENV_DATA.get(_ENV_KEY)
    if raw is None:
        return "auto"
    last = _LAST
    if raw is last[0]:
        return last[1]
    value = _parse(_ENV_DECODE(raw))
    _LAST = (raw, value)
    return value


def _parse(raw: str | None) -> str:
    value = (raw or "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"FLOPWISE_BACKEND must be one of {_VALID}, got {value!r}")
    return value


def _triton_can_run(device: torch.device) -> tuple[bool, str]:
    if not HAS_TRITON:
        return False, "triton is not importable"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and INTERPRET:
        return True, ""
    if device.type == "cpu":
        return False, "tensors are on the CPU and TRITON_INTERPRET=1 was not set before flopwise was imported"
    return False, f"device type {device.type!r} has no Triton backend here"


def backend(*tensors: torch.Tensor, op: str = "op") -> str:
    """Return ``"triton"`` or ``"reference"`` for an op whose inputs are ``tensors``.

    The first tensor's device decides, and its dtype: a floating tensor outside
    ``KERNEL_DTYPES`` (float64) takes the reference. Raises ``RuntimeError`` if ``FLOPWISE_BACKEND``
    forces a backend that cannot run on these inputs.
    """
    requested = _requested()
    if requested == "reference":
        return "reference"
    if tensors:  # the common case first, in tensor attributes (a device object costs more)
        t = tensors[0]
        if HAS_TRITON and (t.is_cuda or (INTERPRET and t.is_cpu)) and (
                not t.is_floating_point() or t.dtype in KERNEL_DTYPES):
            return "triton"
    device = tensors[0].device if tensors else torch.device("cpu")
    ok, why = _triton_can_run(device)
    if ok and tensors and tensors[0].is_floating_point() and tensors[0].dtype not in KERNEL_DTYPES:
        # e.g. float64 for gradcheck: the kernels compute in float32, the reference keeps it
        ok, why = False, f"there is no Triton kernel for {tensors[0].dtype} (float32, bfloat16, float16)"
    if requested == "triton":
        if not ok:
            raise RuntimeError(f"FLOPWISE_BACKEND=triton but {op} cannot run its Triton kernel: {why}")
        return "triton"
    return "triton" if ok else "reference"


def use_triton(*tensors: torch.Tensor, op: str = "op") -> bool:
    """Shorthand for ``backend(...) == "triton"``."""
    return backend(*tensors, op=op) == "triton"


def new_output(shape, *, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate a kernel output. With ``FLOPWISE_POISON=1`` (the test suite sets it; read
    when this module is imported) floats are filled with NaN and integers with their minimum,
    so an element a kernel forgets to write makes the comparison against the reference fail
    instead of passing by luck."""
    return _poisoned(torch.empty(shape, dtype=dtype, device=device))


def new_output_like(t: torch.Tensor) -> torch.Tensor:
    """:func:`new_output` shaped and laid out like ``t`` (its strides where ``t`` is dense,
    ``torch.empty_like``'s rule): a weight's gradient in the weight's own layout."""
    return _poisoned(torch.empty_like(t, memory_format=torch.preserve_format))


def _poisoned(out: torch.Tensor) -> torch.Tensor:
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else torch.iinfo(out.dtype).min)
    return out


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def traced(*tensors: torch.Tensor) -> bool:
    """True while torch.compile or torch.export traces, or when an input is not a plain tensor
    (a fake or meta tensor, or a subclass such as a functional collective's pending result).

    Ops then go through their ``torch.library`` custom op: the opaque node the compiler needs,
    and the dispatcher unwraps subclasses before the kernel sees a data pointer. Otherwise
    they call a plain ``torch.autograd.Function`` running the same kernels without the
    dispatcher's Python path: host time that, at small shapes, exceeds what a memory-bound
    kernel takes on the GPU (``scripts/host_overhead.py`` measures it)."""
    if torch.compiler.is_compiling():
        return True
    for t in tensors:
        if type(t) not in _PLAIN or t.is_meta:
            return True
    return False


def _eager_backward(backward, backward_op, name: str):
    """A backward formula that runs the implementations (``backward``) on plain gradients and
    the backward custom ops (``backward_op``) on anything else, e.g. a gradient still held by
    a functional collective's wrapper, which only the dispatcher unwraps.

    The kernels' gradients carry no autograd graph, so a second derivative through them
    (``create_graph=True`` with gradients or saved inputs that require grad) raises instead of silently
    leaving their part out. (``torch.autograd.function.once_differentiable`` does not
    protect this case: its error node is pruned whenever the inputs are also reachable
    by another path.)"""

    def run(ctx, *grads):
        # grad mode is on in a backward only under create_graph=True; the result then needs a
        # graph if the incoming gradients or the saved inputs require grad
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (*grads, *ctx.saved_tensors)):
            raise RuntimeError(
                f"{name}: its backward runs Triton kernels and is differentiable once; a second "
                "derivative (create_graph=True) through it is not supported. FLOPWISE_BACKEND=reference "
                "runs the plain-PyTorch path, which is differentiable to any order.")
        if traced(*[g for g in grads if isinstance(g, torch.Tensor)]):
            return backward_op(ctx, *grads)
        return backward(ctx, *grads)

    return run


def autograd_twin(op, name: str, forward, setup_context, backward, *, bwd_impl=None, bwd_op=None,
                  doc: str | None = None) -> type:
    """Give the custom op ``op`` its autograd formula and return its eager twin: a
    ``torch.autograd.Function`` running the op's implementation ``forward(*inputs)`` with the
    same ``setup_context`` and backward formula. ``Twin.run(*inputs)`` is ``Twin.apply``
    when autograd would record the call (:func:`records`), else the implementation alone:
    under ``no_grad`` or with no input requiring grad (inference, generation) the Function's
    machinery (context, saved tensors) is about 10 µs of host time per call for nothing.

    ``backward`` is the formula ``backward(ctx, *grads)``; or, when the backward runs its own
    kernels, a factory ``backward(bwd)`` bound to the backward custom op ``bwd_op`` for ``op``
    and to its implementation ``bwd_impl`` for the twin (which still takes ``bwd_op`` for
    gradients that are not plain tensors).

    A backward that runs kernels (``bwd_impl``) is once differentiable: asking for a second
    derivative through it (``create_graph=True``) raises. The twin is written in the
    ``forward(ctx, *inputs)`` style: a Function with a separate
    ``setup_context`` binds its arguments through ``inspect`` on every call, tens of
    microseconds of host time."""
    if bwd_impl is None:
        op_backward = eager_backward = backward
    else:
        op_backward = backward(bwd_op)
        eager_backward = _eager_backward(backward(bwd_impl), op_backward, name)
    op.register_autograd(op_backward, setup_context=setup_context)

    def fwd(ctx, *inputs):
        out = forward(*inputs)
        setup_context(ctx, inputs, out)
        return out

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"{name.removesuffix('Function')}: the Triton kernels have no forward-mode AD (jvp); "
            "FLOPWISE_BACKEND=reference runs the PyTorch reference, which has it")

    def run(cls, *inputs):
        return cls.apply(*inputs) if records(*inputs) else forward(*inputs)

    return type(name, (torch.autograd.Function,), dict(
        __doc__=doc, forward=staticmethod(fwd), backward=staticmethod(eager_backward), jvp=staticmethod(jvp),
        run=classmethod(run)))


def records(*inputs) -> bool:
    """Whether autograd would record a call on ``inputs`` (tensors among other arguments): a
    tensor requires grad under grad mode, or forward-mode AD is active (an autograd Function
    then raises for want of a jvp, where a bare launch would silently drop the tangent)."""
    if _fwad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True, *, warn_only: bool = False):
    """``torch.use_deterministic_algorithms(enabled, warn_only=...)`` inside the block, the
    previous setting after it. Under the flag the grouped matmuls run without floating-point
    atomics (``flopwise.kernels.grouped_mm``); ``warn_only`` lets torch ops without a
    deterministic implementation (a cuBLAS matmul without CUBLAS_WORKSPACE_CONFIG) warn
    instead of raising."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
