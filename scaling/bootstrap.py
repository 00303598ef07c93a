"""Bootstrap uncertainty for Approach-3 fits, vectorised across resamples.

A resample draws the R runs with replacement; it is represented by integer weights
[R] (how often each run was drawn), so every resample's objective is the same
weighted sum over the same arrays and all resamples are fitted together by the
batched Newton method.

Starts: each resample is fitted from the full-data fit's polished endpoints
(``FitResult.candidates``: the full-data optimum and up to ``n_starts - 1`` other
distinct local optima of the grid), not from the 4,500-point grid. Resampling moves
the optimum by about one standard error, well inside the basin the grid found;
:func:`grid_check` measures this by refitting a few resamples from the whole grid
and comparing optima (tests/scaling/test_bootstrap.py). On the Epoch data, 3 resamples: the warm-started
and full-grid optima agree to 2e-15 relative in the objective and 6e-9 in the
parameters, i.e. to the optimiser's tolerance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from . import _checks
from . import _objective as obj
from .data import ScalingData
from .fit import OBJECTIVES, FitResult, _huber_batch, _likelihood_refine, data_fingerprint, fit, hoffmann_grid

__all__ = [
    "BootstrapResult",
    "bootstrap",
    "resample_weights",
    "grid_check",
    "check_resample_count",
    "CHINCHILLA_COMPUTE",
    "PARAM_NAMES",
]

# Chinchilla's training compute in the C = 6 N D convention: 6 x 70e9 x 1.4e12 FLOPs.
CHINCHILLA_COMPUTE = 6 * 70e9 * 1.4e12
PARAM_NAMES = ("E", "A", "B", "alpha", "beta", "a", "b", "tokens_per_parameter")
# Resamples fitted together (weights [_BATCH, R] and starts [_BATCH * n_starts, R] at a time).
_BATCH = 1000
# Memory the results take per resample (parameters, objective, derived table, valid
# samples, percentile copies), measured with tracemalloc at n = 1e6: 219 bytes.
_BYTES_PER_RESAMPLE = 240


def _physical_memory() -> int | None:
    """Bytes of memory of this machine, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_resample_count(n, name: str = "n") -> int:
    """``n`` as an int >= 2, else TypeError/ValueError naming ``name``; also ValueError
    when the results of ``n`` resamples would take more than half of this machine's
    memory. (The weights are drawn batch by batch, but every resample keeps ~240 bytes
    of results: 1e8 resamples need ~24 GB, and take ~7 hours.)
    """
    n = _checks.integer(n, name, low=2)
    total = _physical_memory()
    if total is not None and n * _BYTES_PER_RESAMPLE > total / 2:
        raise ValueError(
            f"{name} ({n}) resamples would need about {n * _BYTES_PER_RESAMPLE / 1e9:.3g} GB for their results, "
            f"more than half of this machine's {total / 1e9:.3g} GB of memory; 4,000 resamples give standard "
            "errors to about 1%"
        )
    return n


@dataclass(frozen=True)
class BootstrapResult:
    """Bootstrap distribution of the law's parameters.

    ``samples[name]``: [n_ok] values per resample for every name in ``PARAM_NAMES``
    (``a``, ``b`` are the frontier exponents, ``tokens_per_parameter`` is D_opt / N_opt
    at ``compute`` FLOPs). ``estimate``: the full-data fit's values. ``se``: standard
    deviations across resamples (ddof = 1). ``interval``: percentile intervals at
    ``level``. ``n_failed`` resamples are left out: those whose fit gave a non-finite
    objective, a law that is not one (alpha <= 0 or beta <= 0: loss not falling with N
    or D in that resample) or non-finite derived values (frontier, tokens per parameter).
    """

    samples: dict
    estimate: dict
    se: dict
    interval: dict
    level: float
    compute: float
    objective: str
    n_resamples: int
    n_failed: int
    seed: int | None
    seconds: float

    def as_dict(self) -> dict:
        """Summary (no per-resample samples); values may be nan when few resamples are valid."""
        return {
            name: {"estimate": self.estimate[name], "se": self.se[name], "interval": list(self.interval[name])}
            for name in PARAM_NAMES
        }


def _check_same_data(data: ScalingData, result: FitResult) -> None:
    # Resampling one dataset around another dataset's optimum gives numbers that
    # describe neither.
    if result.n_runs != len(data):
        raise ValueError(
            f"result was fitted to {result.n_runs} runs but data has {len(data)}; pass the FitResult of fit(data)"
        )
    if result.data_fingerprint and result.data_fingerprint != data_fingerprint(data):
        raise ValueError("result was fitted to other runs than data (same count, other values); pass the FitResult of fit(data)")


def resample_weights(n_runs: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[n_resamples, n_runs] float64 counts of each run in each resample (rows sum to n_runs)."""
    idx = rng.integers(0, n_runs, size=(n_resamples, n_runs))
    flat = idx + n_runs * np.arange(n_resamples)[:, None]
    return np.bincount(flat.ravel(), minlength=n_resamples * n_runs).reshape(n_resamples, n_runs).astype(np.float64)


def _derived(theta: np.ndarray, compute: float, k: float) -> dict:
    """Parameter table from raw theta [S, 5]."""
    a_, b_, e_, alpha, beta = theta.T
    A, B = np.exp(a_), np.exp(b_)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s = alpha + beta
        exp_a, exp_b = beta / s, alpha / s
        G = (alpha * A / (beta * B)) ** (1.0 / s)
        tpp = G**-2 * (compute / k) ** (exp_b - exp_a)
    return {"E": np.exp(e_), "A": A, "B": B, "alpha": alpha, "beta": beta, "a": exp_a, "b": exp_b, "tokens_per_parameter": tpp}


def _fit_weighted(design, starts_int: np.ndarray, w: np.ndarray, objective: str, delta: float):
    """Fit every resample (rows of w [n, R]) from every start (rows of starts_int [K, 5]).

    Returns (theta_internal [n, 5], value [n]) keeping each resample's best start.
    """
    n, K = w.shape[0], starts_int.shape[0]
    x0 = np.repeat(starts_int[None], n, axis=0).reshape(n * K, 5)
    wk = np.repeat(w, K, axis=0)
    res = _huber_batch(design, x0, wk, np.full(n * K, delta), max_iter=200, ftol=1e-12)
    x, val = res.x.reshape(n, K, 5), res.fun.reshape(n, K)
    if objective == "huber_likelihood":
        # Only each resample's best Huber endpoint goes through the sigma/theta alternation.
        j = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=1)
        xb = x[np.arange(n), j]
        xl, _, nll, _ = _likelihood_refine(design, xb, w, delta)
        return xl, nll
    j = np.argmin(np.where(np.isfinite(val), val, np.inf), axis=1)
    return x[np.arange(n), j], val[np.arange(n), j]


def bootstrap(
    data: ScalingData,
    result: FitResult | None = None,
    n: int = 4000,
    seed: int | None = 0,
    objective: str | None = None,
    level: float = 0.95,
    compute: float = CHINCHILLA_COMPUTE,
    n_starts: int = 2,
) -> BootstrapResult:
    """Refit ``n`` resamples of ``data`` and summarise the parameters' spread.

    ``result``: the full-data fit (fitted here with ``objective`` when None).
    ``objective``: defaults to ``result.objective``. Epoch AI's published standard
    errors come from refitting the Huber sum (``"huber"``) even for their likelihood
    estimate; pass ``objective="huber"`` to reproduce them. ``n_starts``: how many of
    the full-data fit's distinct endpoints each resample starts from (best first).
    ``n``: an int >= 2; ValueError when the results would take more than half of this
    machine's memory (:func:`check_resample_count`). The resamples are drawn batch by
    batch from one generator, so a seed's first m resamples are the same for any n >= m.
    ``seed``: numpy Generator seed, an int >= 0 (None: fresh entropy). ``result`` must
    come from ``data`` (checked by run count and fingerprint). Raises ValueError when
    fewer than 2 resamples give a valid law (no spread to report).
    """
    t0 = time.perf_counter()
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    n = check_resample_count(n)
    level = _checks.real(level, "level", low=0.0, high=1.0)
    compute = _checks.real(compute, "compute", low=0.0)
    n_starts = _checks.integer(n_starts, "n_starts", low=1)
    if seed is not None:
        seed = _checks.integer(seed, "seed", low=0)
    if result is None:
        result = fit(data, objective=objective or "huber")
    if not isinstance(result, FitResult):
        raise TypeError(f"result must be a FitResult, got {type(result).__name__}")
    _check_same_data(data, result)
    objective = objective or result.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")

    rng = np.random.default_rng(seed)
    R = len(data)
    design = obj._Design.build(data.N, data.D, data.loss)
    cands = result.candidates if result.candidates.size else result.theta[None]
    starts = design.to_internal(cands[:n_starts])
    # Batches of resamples keep the weight and start arrays small: each batch's weights
    # are drawn when it is fitted. Drawing batch after batch from one generator gives
    # the resamples that drawing all at once would (the generator's state carries over),
    # so a seed's first m resamples are the same for every n >= m.
    thetas, values = [], []
    for i in range(0, n, _BATCH):
        w = resample_weights(R, min(_BATCH, n - i), rng)
        x, v = _fit_weighted(design, starts, w, objective, result.delta)
        thetas.append(x)
        values.append(v)
    theta = design.to_raw(np.concatenate(thetas))
    value = np.concatenate(values)
    derived = _derived(theta, float(compute), data.k)
    # Only real laws count: a resample whose loss does not fall with N or D gets alpha
    # or beta <= 0, for which the frontier (a, b, tokens per parameter) means nothing;
    # keeping it would put such laws into the intervals and standard errors.
    ok = np.isfinite(value) & (theta[:, 3] > 0) & (theta[:, 4] > 0)
    for v in derived.values():
        ok &= np.isfinite(v)
    n_ok = int(ok.sum())
    if n_ok < 2:
        raise ValueError(
            f"bootstrap: only {n_ok} of {n} resamples gave a valid law (alpha, beta > 0, finite values); "
            "the data do not determine the law well enough to bootstrap it"
        )
    samples = {k: v[ok] for k, v in derived.items()}
    estimate = {k: float(v[0]) for k, v in _derived(result.theta[None], float(compute), data.k).items()}
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    se = {k: float(np.std(v, ddof=1)) for k, v in samples.items()}
    interval = {k: (float(np.percentile(v, lo)), float(np.percentile(v, hi))) for k, v in samples.items()}
    return BootstrapResult(
        samples=samples,
        estimate=estimate,
        se=se,
        interval=interval,
        level=level,
        compute=float(compute),
        objective=objective,
        n_resamples=n,
        n_failed=n - n_ok,
        seed=seed,
        seconds=time.perf_counter() - t0,
    )


def grid_check(data: ScalingData, result: FitResult, n_check: int = 3, seed: int = 1, n_starts: int = 2) -> dict:
    """Refit ``n_check`` resamples both ways (warm starts, as :func:`bootstrap` does, and
    the full 4,500-point grid) and report how far apart the optima are.

    Returns ``{"objective_rel_diff": [n_check], "param_max_abs_diff": [n_check],
    "warm_not_worse": bool}`` for the Huber sum. Used to justify warm starts.
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    if not isinstance(result, FitResult):
        raise TypeError(f"result must be a FitResult, got {type(result).__name__}")
    _check_same_data(data, result)
    n_check = _checks.integer(n_check, "n_check", low=1)
    n_starts = _checks.integer(n_starts, "n_starts", low=1)
    rng = np.random.default_rng(_checks.integer(seed, "seed", low=0))
    R = len(data)
    w = resample_weights(R, n_check, rng)
    design = obj._Design.build(data.N, data.D, data.loss)
    starts = design.to_internal(result.candidates[:n_starts])
    xw, vw = _fit_weighted(design, starts, w, "huber", result.delta)
    grid = design.to_internal(hoffmann_grid())
    G = grid.shape[0]
    wg = np.repeat(w, G, axis=0)
    first = _huber_batch(design, np.tile(grid, (n_check, 1)), wg, np.full(n_check * G, result.delta), 100, 1e-3)
    fx, fv = first.x.reshape(n_check, G, 5), first.fun.reshape(n_check, G)
    j = np.argmin(np.where(np.isfinite(fv), fv, np.inf), axis=1)
    pol = _huber_batch(design, fx[np.arange(n_check), j], w, np.full(n_check, result.delta), 500, 1e-13)
    rel = (vw - pol.fun) / pol.fun
    dparam = np.abs(design.to_raw(xw) - design.to_raw(pol.x)).max(axis=1)
    return {"objective_rel_diff": rel, "param_max_abs_diff": dparam, "warm_not_worse": bool(np.all(rel <= 1e-9))}
