"""Training-run data for scaling-law fits: validation and a CSV loader.

A run is (N parameters, D training tokens, C training FLOPs, final loss). Files give
either D or C; the other follows from C = k * N * D (k = 6 by default).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["ScalingData", "from_arrays", "load_csv", "drop_highest_loss", "EPOCH_COLUMNS"]

# Column names of Epoch AI's transcription of Hoffmann et al.'s Figure 4
# (svg_extracted_data.csv): N and C are stored, D is derived as C / (6 N).
EPOCH_COLUMNS = {"n_col": "Model Size", "c_col": "Training FLOP", "loss_col": "loss"}


@dataclass(frozen=True)
class ScalingData:
    """Runs as float64 arrays of shape [R]: ``N`` parameters, ``D`` tokens, ``C`` FLOPs, ``loss``.

    ``C`` is always k * N * D for the ``k`` the data was built with (given C, D is derived;
    given D, C is derived). Build with :func:`from_arrays` or :func:`load_csv`, which validate.
    """

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    loss: np.ndarray
    k: float = 6.0

    def __len__(self) -> int:
        return int(self.N.shape[0])

    def subset(self, index) -> "ScalingData":
        """Rows selected by a boolean mask or integer index array."""
        idx = np.asarray(index)
        return ScalingData(self.N[idx], self.D[idx], self.C[idx], self.loss[idx], self.k)


def _column(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be numeric") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def from_arrays(N, loss, D=None, C=None, k: float = 6.0, min_rows: int = 6) -> ScalingData:
    """Validated :class:`ScalingData` from arrays of shape [R].

    Give exactly one of ``D`` (tokens) or ``C`` (FLOPs). ``N``, ``D``, ``C`` must be finite
    and > 0 and ``loss`` finite and > 0 (the fit works on log loss). ``min_rows``: fewer
    rows than this raise (the parametric law has 5 parameters, so 6 is the least that
    leaves a residual degree of freedom).
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or k <= 0:
        raise ValueError(f"k must be a finite number > 0, got {k!r}")
    if (D is None) == (C is None):
        raise ValueError("give exactly one of D (tokens) or C (training FLOPs)")
    n = _column(N, "N")
    y = _column(loss, "loss")
    other = _column(D if D is not None else C, "D" if D is not None else "C")
    if not (n.shape == y.shape == other.shape):
        raise ValueError(f"N, loss and {'D' if D is not None else 'C'} must have the same length")
    for arr, name in ((n, "N"), (other, "D" if D is not None else "C")):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise ValueError(f"{name} must be finite and > 0 (row {int(np.argmax(bad))}: {arr[bad][0]})")
    bad = ~np.isfinite(y) | (y <= 0)
    if bad.any():
        raise ValueError(f"loss must be finite and > 0 (row {int(np.argmax(bad))}: {y[bad][0]})")
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive int, got {min_rows!r}")
    if n.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} runs to fit 5 parameters, got {n.shape[0]}")
    if D is not None:
        d = other
        c = k * n * d
    else:
        c = other
        d = c / (k * n)
    return ScalingData(N=n, D=d, C=c, loss=y, k=float(k))


def drop_highest_loss(data: ScalingData, count: int) -> ScalingData:
    """Drop the ``count`` highest-loss runs, as Epoch AI do: keep rows with
    ``loss < sorted(loss)[-count]``. With ties at the cut more than ``count`` rows go;
    on their file (no ties there) 245 runs become 240.
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if count == 0:
        return data
    if count >= len(data):
        raise ValueError(f"count ({count}) must be smaller than the number of runs ({len(data)})")
    cut = np.sort(data.loss)[-count]
    return data.subset(data.loss < cut)


def load_csv(
    path,
    n_col: str = "N",
    loss_col: str = "loss",
    d_col: str | None = None,
    c_col: str | None = None,
    k: float = 6.0,
    drop_highest: int = 0,
    min_rows: int = 6,
) -> ScalingData:
    """Read runs from a CSV file with a header row.

    ``n_col``, ``loss_col`` name the parameter-count and loss columns; name one of
    ``d_col`` (tokens) or ``c_col`` (FLOPs). With neither, ``D`` is used if the header has
    it, else ``C``. ``drop_highest``: drop that many highest-loss runs after reading
    (see :func:`drop_highest_loss`). Epoch's file: ``load_csv(path, **EPOCH_COLUMNS,
    drop_highest=5)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    if d_col is None and c_col is None:
        if "D" in header:
            d_col = "D"
        elif "C" in header:
            c_col = "C"
        else:
            raise ValueError(f"no token or FLOP column: pass d_col or c_col (columns: {header})")
    if d_col is not None and c_col is not None:
        raise ValueError("pass only one of d_col or c_col")
    wanted = {"n_col": n_col, "loss_col": loss_col, "d_col" if d_col else "c_col": d_col or c_col}
    missing = {arg: col for arg, col in wanted.items() if col not in header}
    if missing:
        desc = ", ".join(f"{col!r} ({arg})" for arg, col in missing.items())
        raise ValueError(f"{path.name}: missing column(s) {desc}; columns are {header}")

    def read(col: str) -> np.ndarray:
        out = np.empty(len(rows))
        for i, row in enumerate(rows):
            text = (row.get(col) or "").strip()
            try:
                out[i] = float(text)
            except ValueError:
                # An empty cell or text becomes NaN, which validation reports with its row.
                out[i] = np.nan
        return out

    n = read(n_col)
    loss = read(loss_col)
    other = read(d_col or c_col)
    try:
        data = from_arrays(
            n, loss, D=other if d_col else None, C=other if c_col else None, k=k, min_rows=1
        )
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    data = drop_highest_loss(data, drop_highest)
    if len(data) < min_rows:
        raise ValueError(f"{path.name}: need at least {min_rows} runs to fit 5 parameters, got {len(data)}")
    return data
