"""Argument checks shared by the scaling modules.

Python and NumPy scalars are both accepted (``np.float32(1e-3)``, ``np.int64(6)``):
values often come out of arrays. Booleans are refused although ``bool`` is an ``int``
subclass, since ``True`` as a count or a compute budget is always a mistake. A value
of the wrong kind raises TypeError; a number out of range raises ValueError; both
name the argument.
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def real(value, name: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = True, high_open: bool = True) -> float:
    """``value`` as a finite float within the given bounds (open by default)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
    try:
        v = float(value)
    except OverflowError:  # a Python int beyond float64's range
        raise ValueError(f"{name} must be {want}, got {_magnitude(value)} (beyond float64's range)") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {want}, got {value!r}")
    return v


def integer(value, name: str, *, low: int | None = None) -> int:
    """``value`` as an int >= ``low`` (Python or NumPy integers; no bools, no floats)."""
    if _is_bool(value) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return v


def float_array(value, name: str, expected: str) -> np.ndarray:
    """``value`` as a float64 array of its own shape, or TypeError naming ``name``
    (``expected`` says what it must be, e.g. "numeric").

    Accepted: integer and float arrays, (nested) sequences of Python or NumPy numbers,
    Python ints beyond int64 (NumPy keeps those as objects), and torch tensors of a real
    dtype on any device (detached and copied; torch is not imported here, a tensor can
    only exist if its caller imported it). Refused: strings (``np.asarray`` would parse
    them), bools, complex numbers, None. A number beyond float64's range raises
    ValueError.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be {expected}, got a tensor of {value.dtype}")
        value = value.detach().cpu().to(torch.float64).numpy()
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:  # ragged lists; tensors inside lists
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({exc})") from None
    if raw.dtype == object:
        odd = next((v for v in raw.flat if _is_bool(v) or not isinstance(v, numbers.Real)), _ALL_REAL)
        if odd is not _ALL_REAL:
            raise TypeError(f"{name} must be {expected}, got {_describe(value, raw, odd)}")
        try:
            return raw.astype(np.float64)
        except OverflowError:
            big = next(v for v in raw.flat if abs(v) > sys.float_info.max)
            raise ValueError(f"{name} must be finite, got {_magnitude(big)} (beyond float64's range)") from None
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be {expected}, got {_describe(value, raw, _ALL_REAL)}")
    return raw.astype(np.float64)


_ALL_REAL = object()  # float_array's marker for "no element that is not a number"


def _describe(value, raw: np.ndarray, odd) -> str:
    if raw.ndim == 0:
        return f"{type(value).__name__} {value!r}"
    if odd is not _ALL_REAL:
        return f"an array holding {type(odd).__name__} {odd!r}"
    return f"an array of {raw.dtype}"


def _magnitude(value) -> str:
    """A number too large for float (a Python int, a Fraction) as "~1eNNN"."""
    # math.log10 takes ints of any size; str() of one past 4,300 digits raises (Python's limit)
    return f"~{'-' if value < 0 else ''}1e{int(math.log10(abs(int(value))))}"
