"""argparse value types shared by the command families."""

from __future__ import annotations

import argparse
import math
import re


def byte_value(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v < 256:
        raise argparse.ArgumentTypeError(f"must be a byte value in [0, 256): {text!r}")
    return v


def python_names_as_flags(message: str, names: dict[str, str]) -> str:
    """A library message names Python arguments (``window_bits must ...``, ``(m1=...)``); on
    the command line they are flags or positionals: ``names`` maps each to what the user typed
    (a message that already names the flag keeps its Python name beside it)."""
    for name in sorted(names, key=len, reverse=True):
        if names[name] in message:
            continue
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", names[name], message)
    return message


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be finite and > 0: {text!r}")
    return v


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return v
