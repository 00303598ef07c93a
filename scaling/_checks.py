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

import numpy as np


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def real(value, name: str, *, low: float | None = None, high: float | None = None,
         low_open: bool = True, high_open: bool = True) -> float:
    """``value`` as a finite float within the given bounds (open by default)."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = "a finite number" + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else "")
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
