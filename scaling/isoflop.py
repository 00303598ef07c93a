"""Approach 2 of Hoffmann et al. (2022): IsoFLOP profiles.

Runs are grouped by training compute (an isoFLOP profile is a set of runs with the
same C and different N). Within each group the loss is fitted by a parabola in log N
and its minimum gives N_opt(C); then log N_opt = log G_N + a log C is fitted by least
squares across groups. With C = k N D, D_opt = C / (k N_opt), so b = 1 - a.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from . import _checks
from .data import ScalingData
from .laws import _positive_array

__all__ = ["IsoFlopResult", "isoflop_fit", "group_by_compute"]


@dataclass(frozen=True)
class IsoFlopResult:
    """Per-profile minima (arrays [K]) and the power laws through them.

    ``compute``: each profile's C (geometric mean of its runs' C); ``span_decades``:
    log10(max C / min C) within each profile (0 for an exact isoFLOP profile; a large
    span means runs of different budgets were pooled); ``n_points``: runs per profile;
    ``label``: each profile's group label. ``n_opt``, ``d_opt``, ``loss_opt``: the
    parabola's minimum. N_opt(C) = ``n_coef`` * C^``a``, D_opt(C) = ``d_coef`` * C^``b``.
    ``skipped``: profiles left out (too few distinct N, or a parabola that opens
    downwards / has its minimum outside the sampled N).
    """

    compute: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    a: float
    b: float
    n_coef: float
    d_coef: float
    k: float
    skipped: int
    span_decades: np.ndarray = field(default_factory=lambda: np.empty(0))
    n_points: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    label: np.ndarray = field(default_factory=lambda: np.empty(0))

    def optimal(self, compute) -> tuple:
        """(N_opt, D_opt) at ``compute`` FLOPs from the fitted power laws."""
        c = _positive_array(compute, "compute")
        n = self.n_coef * c**self.a
        d = c / (self.k * n)
        return (float(n), float(d)) if c.ndim == 0 else (n, d)

    def tokens_per_parameter(self, compute):
        n, d = self.optimal(compute)
        return d / n


def group_by_compute(C: np.ndarray, rtol_decades: float = 0.05) -> np.ndarray:
    """Group label [R] for each run: after sorting by C, a profile takes runs while
    their log10 C is within ``rtol_decades`` of the profile's smallest C, so no profile
    spans more than ``rtol_decades`` decades.

    (Chaining neighbours instead lets budgets a few percent apart pool into one
    "profile" spanning a decade, whose parabola then mixes compute levels.)
    """
    rtol_decades = _checks.real(rtol_decades, "rtol_decades", low=0.0, low_open=False)
    lc = np.log10(np.asarray(C, dtype=np.float64))
    order = np.argsort(lc, kind="stable")
    labels_sorted = np.empty(lc.size, dtype=np.int64)
    group, first = -1, -np.inf
    for i, v in enumerate(lc[order]):
        if v - first > rtol_decades:
            group, first = group + 1, v
        labels_sorted[i] = group
    labels = np.empty_like(labels_sorted)
    labels[order] = labels_sorted
    return labels


def isoflop_fit(data: ScalingData, rtol_decades: float = 0.05, min_points: int = 3, labels=None) -> IsoFlopResult:
    """Approach 2 on ``data``; needs at least two usable isoFLOP profiles.

    ``rtol_decades``: a profile holds runs whose log10 C is within this of its smallest
    (see :func:`group_by_compute`). ``labels``: profile label per run ([R], any values
    ``np.unique`` can sort), when the runs' budgets are known; overrides the grouping.
    ``min_points``: fewest distinct model sizes a profile needs for its parabola.
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    if _checks.integer(min_points, "min_points") < 3:
        raise ValueError(f"min_points must be an int >= 3 (a parabola has 3 coefficients), got {min_points!r}")
    if labels is None:
        labels = group_by_compute(data.C, rtol_decades)
    else:
        labels = np.asarray(labels)
        if labels.shape != (len(data),):
            raise ValueError(f"labels must have one entry per run, shape ({len(data)},), got {labels.shape}")
        # NaN equals nothing, not even itself: its runs would silently form no profile.
        missing = [i for i, v in enumerate(labels.tolist()) if v is None or (isinstance(v, numbers.Number) and v != v)]
        if missing:
            raise ValueError(
                f"labels: {len(missing)} run(s) have no label (NaN or None), first at row {missing[0]}; "
                "give every run its profile's label"
            )
    cs, ns, ls, spans, counts, names = [], [], [], [], [], []
    skipped = 0
    for g in np.unique(labels):
        m = labels == g
        x = np.log(data.N[m])
        if np.unique(x).size < min_points:
            skipped += 1
            continue
        p2, p1, p0 = np.polyfit(x, data.loss[m], 2)
        if not p2 > 0:
            skipped += 1
            continue
        x_star = -p1 / (2 * p2)
        if not (x.min() <= x_star <= x.max()):
            # A minimum outside the sampled sizes is an extrapolation, not a profile's valley.
            skipped += 1
            continue
        cs.append(math.exp(np.log(data.C[m]).mean()))
        ns.append(math.exp(x_star))
        ls.append(p0 + p1 * x_star + p2 * x_star**2)
        spans.append(float(np.log10(data.C[m].max() / data.C[m].min())))
        counts.append(int(m.sum()))
        names.append(g)
    if len(cs) < 2:
        raise ValueError(
            f"data: found {len(cs)} usable isoFLOP profile(s) (need 2; {skipped} skipped); "
            "Approach 2 needs several runs per compute level"
        )
    c, n = np.asarray(cs), np.asarray(ns)
    a, log_g = np.polyfit(np.log(c), np.log(n), 1)
    d = c / (data.k * n)
    return IsoFlopResult(
        compute=c,
        n_opt=n,
        d_opt=d,
        loss_opt=np.asarray(ls),
        a=float(a),
        b=float(1.0 - a),
        n_coef=float(math.exp(log_g)),
        d_coef=float(math.exp(-log_g) / data.k),
        k=data.k,
        skipped=skipped,
        span_decades=np.asarray(spans),
        n_points=np.asarray(counts, dtype=np.int64),
        label=np.asarray(names),
    )
