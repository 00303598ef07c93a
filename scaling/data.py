"""Training-run data for scaling-law fits: validation and a CSV loader.

A run is (N parameters, D training tokens, C training FLOPs, final loss). Files give
either D or C; the other follows from C = k * N * D (k = 6 by default).
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import _checks

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
    # Set by the validating constructors so that their result is not checked twice.
    _validated: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Built directly (not through from_arrays), the arrays get the same checks:
        # the fits assume float64 [R] columns, positive and finite, and C = k N D.
        if self._validated:
            return
        k = _checks.real(self.k, "k", low=0.0)
        cols = {name: _column(getattr(self, name), name) for name in ("N", "D", "C", "loss")}
        if len({a.shape for a in cols.values()}) != 1:
            raise ValueError(f"N, D, C and loss must have the same length, got {[a.shape[0] for a in cols.values()]}")
        _check_runs(cols["N"], cols["loss"], cols["D"], "D", lambda i: f"row {i}")
        _check_runs(cols["N"], cols["loss"], cols["C"], "C", lambda i: f"row {i}")
        _check_units(cols["N"], cols["D"], False, lambda i: f"row {i}")
        if not np.allclose(cols["C"], k * cols["N"] * cols["D"], rtol=1e-9, atol=0):
            raise ValueError("C must equal k * N * D for every run (build with from_arrays to derive one from the other)")
        for name, arr in cols.items():
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "k", k)
        object.__setattr__(self, "_validated", True)

    def __len__(self) -> int:
        return int(self.N.shape[0])

    def subset(self, index) -> "ScalingData":
        """Rows selected by a boolean mask or integer index array."""
        idx = np.asarray(index)
        return ScalingData(self.N[idx], self.D[idx], self.C[idx], self.loss[idx], self.k, _validated=True)


def _column(values, name: str) -> np.ndarray:
    # Strings would be parsed by np.asarray(..., dtype=float) and bools become 0/1;
    # Python ints beyond int64 and torch tensors are converted (see _checks.float_array).
    arr = _checks.float_array(values, name, "numeric")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


# Tokens per parameter outside this range are a unit mistake, not a training run:
# Chinchilla-style runs sit at 1..1e3, and the most over-trained published models at
# ~1e4. C in log10 FLOPs or in PF-days (1 PF-day = 8.64e19 FLOPs) gives D/N ~ 1e-10.
TOKENS_PER_PARAMETER_RANGE = (1e-3, 1e6)


def _check_runs(n, y, other, other_name: str, where) -> None:
    """Values finite and > 0, D >= 1 and D / N plausible; ``where(i)`` names row i."""
    for arr, name in ((n, "N"), (other, other_name), (y, "loss")):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"{name} must be finite and > 0 ({where(i)}: {arr[i]})")


def _check_units(n, d, c_given: bool, where) -> None:
    unit_hint = (
        "C must be training FLOPs (not log10 FLOPs or PF-days; C = k N D)"
        if c_given
        else "D must be training tokens (not billions of tokens, not log10)"
    )
    bad = d < 1
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{'C' if c_given else 'D'}: {where(i)} gives D = {d[i]:.3g} tokens (< 1); {unit_hint}")
    tpp = d / n
    lo, hi = TOKENS_PER_PARAMETER_RANGE
    bad = (tpp < lo) | (tpp > hi)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{'C' if c_given else 'D'}: {where(i)} has D / N = {tpp[i]:.3g} tokens per parameter, "
            f"outside [{lo:g}, {hi:g}]; {unit_hint}, and N parameters"
        )


def _build(n, y, other, d_given: bool, k: float, where) -> ScalingData:
    """Validated ScalingData from float64 columns of one length; ``where(i)`` names row i in errors."""
    _check_runs(n, y, other, "D" if d_given else "C", where)
    if d_given:
        d = other
        with np.errstate(over="ignore"):
            c = k * n * d
        bad = ~np.isfinite(c)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"C = k N D overflows float64 ({where(i)}: k {k:g}, N {n[i]:.3g}, D {d[i]:.3g}); "
                "N must be parameters and D training tokens"
            )
    else:
        c = other
        d = c / (k * n)
    _check_units(n, d, not d_given, where)
    return ScalingData(N=n, D=d, C=c, loss=y, k=float(k), _validated=True)


def from_arrays(N, loss, D=None, C=None, k: float = 6.0, min_rows: int = 6) -> ScalingData:
    """Validated :class:`ScalingData` from arrays of shape [R].

    Give exactly one of ``D`` (tokens) or ``C`` (FLOPs). ``N``, ``D``, ``C`` must be finite
    and > 0 and ``loss`` finite and > 0 (the fit works on log loss). D (given or derived)
    must be at least 1 token and D / N within ``TOKENS_PER_PARAMETER_RANGE`` (outside it
    the units are wrong, e.g. C in log10 FLOPs). ``min_rows``: fewer rows than this raise
    (the parametric law has 5 parameters, so 6 is the least that leaves a residual
    degree of freedom).
    """
    k = _checks.real(k, "k", low=0.0)
    min_rows = _checks.integer(min_rows, "min_rows", low=1)
    if (D is None) == (C is None):
        raise ValueError("give exactly one of D (tokens) or C (training FLOPs)")
    n = _column(N, "N")
    y = _column(loss, "loss")
    other = _column(D if D is not None else C, "D" if D is not None else "C")
    if not (n.shape == y.shape == other.shape):
        raise ValueError(f"N, loss and {'D' if D is not None else 'C'} must have the same length")
    if n.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} runs to fit 5 parameters, got {n.shape[0]}")
    return _build(n, y, other, D is not None, k, lambda i: f"row {i}")


def drop_highest_loss(data: ScalingData, count: int) -> ScalingData:
    """Drop the ``count`` highest-loss runs, as Epoch AI do: keep rows with
    ``loss < sorted(loss)[-count]``; on their file (no ties there) 245 runs become 240.

    Runs tied with the cut (the ``count``-th highest loss) all go, so with ties more
    than ``count`` runs are dropped; a ``UserWarning`` then says how many and why.
    Raises ValueError when no run would be left.
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    count = _checks.integer(count, "count", low=0)
    return _drop_highest(data, count, "count")


def _drop_highest(data: ScalingData, count: int, what: str) -> ScalingData:
    """:func:`drop_highest_loss` with ``what`` naming ``count`` in errors and warnings."""
    if count == 0:
        return data
    if count >= len(data):
        raise ValueError(f"{what} ({count}) must be smaller than the number of runs ({len(data)})")
    cut = float(np.sort(data.loss)[-count])
    keep = data.loss < cut
    n_dropped = len(data) - int(keep.sum())
    n_tied = int((data.loss == cut).sum())
    rule = f"Epoch AI's rule keeps only runs with a loss below the cut, sorted(loss)[-{count}]"
    if n_dropped == len(data):
        raise ValueError(
            f"{what} ({count}): all {len(data)} runs would be dropped: the cut (loss {cut!r}) is also "
            f"the lowest loss, {n_tied} runs tie at it, and {rule}"
        )
    if n_dropped > count:
        warnings.warn(
            f"{what} ({count}): dropped {n_dropped} runs, not {count}: {n_tied} runs tie at the cut "
            f"(loss {cut!r}) and {rule}",
            UserWarning,
            stacklevel=3,
        )
    return data.subset(keep)


# Files with both a D and a C column: C must agree with k N D to this relative
# tolerance, which admits rounded values and compute as papers report it (Chinchilla's
# 5.76e23 FLOPs is 2% below 6 x 70e9 x 1.4e12; counts with attention FLOPs run higher)
# but not a C computed with another k (8 / 6 is 33% off) or in other units.
CSV_C_RTOL = 0.25


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
    it, else ``C``; when it has both, D is used and C is checked: it must be within
    ``CSV_C_RTOL`` (25%) of k * N * D on every line where it is given (an empty C cell is
    not checked), else ValueError (name the column to
    use with ``d_col`` or ``c_col``, or pass the ``k`` that C was computed with). The
    three roles need three different columns, and a column used must appear once in
    the header. ``drop_highest``: drop that many highest-loss runs after reading (see
    :func:`drop_highest_loss`; with ties at the cut more go, with a warning). Epoch's
    file: ``load_csv(path, **EPOCH_COLUMNS, drop_highest=5)``.

    Format: UTF-8 (a byte-order mark is skipped), comma-separated, header names stripped.
    Lines starting with ``#`` before the header are skipped as comments (so the header
    itself must not start with ``#``, as ``numpy.savetxt`` writes it unless given
    ``comments=""``); blank lines are skipped. Cells are plain numbers (``1.4e12``,
    ``70000000000``): digit separators (``1_000``, ``1,000``) are refused, and so is a
    line with more cells than the header has columns (a decimal comma, ``3,705``, would
    otherwise be read as 3). Errors name the file line and the raw cell.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    for arg, col in (("n_col", n_col), ("loss_col", loss_col), ("d_col", d_col), ("c_col", c_col)):
        if not (isinstance(col, str) or (col is None and arg in ("d_col", "c_col"))):
            extra = " or None" if arg in ("d_col", "c_col") else ""
            raise TypeError(f"{arg} must be a column name (str){extra}, got {type(col).__name__} {col!r}")
    path = Path(path)
    k = _checks.real(k, "k", low=0.0)
    drop_highest = _checks.integer(drop_highest, "drop_highest", low=0)
    min_rows = _checks.integer(min_rows, "min_rows", low=1)
    if path.is_dir():
        raise ValueError(f"path: {str(path)!r} is a folder, not a CSV file")
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    comments: list[str] = []
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which
        # would otherwise become part of the first column's name.
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(_skip_leading_comments(fh, comments))
            for cells in reader:
                if len(cells) <= 1 and not "".join(cells).strip():  # a blank line
                    continue
                if header is None:
                    # Header names are stripped so that "N, D, loss" names the columns N, D, loss.
                    header = [h.strip() for h in cells]
                    continue
                # Comment lines are all before the header: add them back to count file lines.
                line = reader.line_num + len(comments)
                if len(cells) > len(header):
                    # Even empty extra cells: with an empty last column, "3,705," reads as 3.
                    hint = (
                        "a trailing comma? the header needs as many" if not any(c.strip() for c in cells[len(header):])
                        else "a decimal comma, as in 3,705? write 3.705; a comma inside a cell: quote the cell"
                    )
                    raise ValueError(
                        f"{path.name}, line {line}: {len(cells)} cells, but the header names {len(header)} columns ({hint})"
                    )
                rows.append(cells)
                lines.append(line)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path.name}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the file as UTF-8") from None
    except csv.Error as exc:
        raise ValueError(f"{path.name}: not a readable CSV file ({exc})") from None
    skipped = (
        f" ({len(comments)} line(s) starting with '#' before it were skipped as comments; "
        "a header must not start with '#')" if comments else ""
    )
    if header is None:
        raise ValueError(f"{path.name}: empty file; expected a header row naming the columns{skipped}")
    detected = d_col is None and c_col is None
    if detected:
        if "D" in header:
            d_col = "D"
        elif "C" in header:
            c_col = "C"
        else:
            raise ValueError(
                f"{path.name}: no token or FLOP column (looked for 'D' and 'C'); name one with d_col or c_col "
                f"(columns: {header}){skipped}"
            )
    if d_col is not None and c_col is not None:
        raise ValueError("pass only one of d_col or c_col")
    other_col = d_col if d_col is not None else c_col
    wanted = {"n_col": n_col, "loss_col": loss_col, "d_col" if d_col is not None else "c_col": other_col}
    role_of: dict[str, str] = {}
    for arg, col in wanted.items():
        if col in role_of:
            raise ValueError(
                f"{role_of[col]} and {arg} both name column {col!r}; parameters, loss and tokens (or FLOPs) "
                "need a column each"
            )
        role_of[col] = arg
    missing = {arg: col for arg, col in wanted.items() if col not in header}
    if missing:
        desc = ", ".join(f"{col!r} ({arg})" for arg, col in missing.items())
        raise ValueError(f"{path.name}: missing column(s) {desc}; columns are {header}{skipped}")
    # D and C both in the file, and neither named by the caller: C is checked against k N D.
    check_c = detected and d_col == "D" and "C" in header
    for col in list(wanted.values()) + (["C"] if check_c else []):
        at = [j + 1 for j, h in enumerate(header) if h == col]
        if len(at) > 1:
            raise ValueError(
                f"{path.name}: column {col!r} appears {len(at)} times in the header (columns {at}); "
                "rename all but one"
            )
    if not rows:
        raise ValueError(f"{path.name}: no data rows after the header")

    def read(col: str, optional: bool = False) -> np.ndarray:
        """The column as floats; ``optional``: an empty cell reads as NaN."""
        j = header.index(col)
        out = np.empty(len(rows))
        for i, cells in enumerate(rows):
            where = f"{path.name}, line {lines[i]}: {col} must be finite and > 0"
            if j >= len(cells):
                raise ValueError(f"{where}, got no cell (the line has {len(cells)} cells, the header {len(header)} columns)")
            text = cells[j].strip()
            if optional and not text:
                out[i] = np.nan
                continue
            try:
                if "_" in text:  # float() reads "1_0" as 10: Python's digit grouping, not a CSV number
                    raise ValueError(text)
                out[i] = float(text)
            except ValueError:
                what = "an empty cell" if not text else f"{text!r}, not a number"
                if text.startswith("#"):
                    what += " (comment lines are skipped only before the header)"
                raise ValueError(f"{where}, got {what}") from None
            if not (math.isfinite(out[i]) and out[i] > 0):
                raise ValueError(f"{where}, got {text!r}")
        return out

    n = read(n_col)
    loss = read(loss_col)
    other = read(other_col)
    try:
        data = _build(n, loss, other, d_col is not None, k, lambda i: f"line {lines[i]}")
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None
    if check_c:
        c = read("C", optional=True)
        ratio = c / data.C
        bad = np.abs(ratio - 1) > CSV_C_RTOL  # False where C is empty (NaN)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{path.name}, line {lines[i]}: columns D and C disagree: C / (N D) = {c[i] / (n[i] * other[i]):.4g}, "
                f"but C = k N D with k = {k:g} (within {CSV_C_RTOL:.0%}); D is what the fit uses: pass "
                "d_col='D' to use it without this check, c_col='C' to use C instead, or the k that C was "
                "computed with"
            )
    data = _drop_highest(data, drop_highest, f"{path.name}: drop_highest")
    if len(data) < min_rows:
        raise ValueError(f"{path.name}: need at least {min_rows} runs to fit 5 parameters, got {len(data)}")
    return data


def _skip_leading_comments(fh, comments: list):
    """The lines of ``fh`` less the ``#`` comment lines before the header (appended to
    ``comments``); from the header on, every line."""
    lines = iter(fh)
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            comments.append(line)
            continue
        yield line
        if text:
            break
    yield from lines
