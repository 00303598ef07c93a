"""The parametric loss law L(N, D) = E + A / N^alpha + B / D^beta and what follows from it.

Units: N in parameters, D in training tokens, C in training FLOPs, loss in nats per
token. Training compute is modelled as C = k * N * D with k = 6 (forward + backward
pass of a dense transformer) unless ``k`` says otherwise.

Compute-optimal frontier (Hoffmann et al. 2022, Appendix D.2): minimising L(N, D)
subject to k * N * D = C gives

    N_opt(C) = G * (C / k)^a,   D_opt(C) = G^-1 * (C / k)^b,
    G = (alpha * A / (beta * B))^(1 / (alpha + beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from . import _checks

__all__ = [
    "ScalingLaw",
    "LossTerms",
    "PRESETS",
    "KNOWN_MODELS",
    "get_law",
    "decompose",
    "parse_models",
]


def _positive_array(value, name: str) -> np.ndarray:
    """float64 array of ``value``; every entry finite and > 0, else ValueError naming ``name``."""
    # Kind check first: np.asarray("1e23", dtype=float) would parse the string, and
    # True would become 1.0; neither is a number the caller meant. Python ints beyond
    # int64 (6 * 70 * 10**9 * 14 * 10**11) and torch tensors are numbers.
    arr = _checks.float_array(value, name, "a number or an array of numbers")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be finite and > 0")
    return arr


def _scalar_or_array(arr: np.ndarray):
    return float(arr) if arr.ndim == 0 else arr


def _check_broadcast(n: np.ndarray, d: np.ndarray) -> None:
    try:
        np.broadcast_shapes(n.shape, d.shape)
    except ValueError:
        raise ValueError(
            f"N and D must have the same shape or shapes that broadcast together, got {n.shape} and {d.shape}"
        ) from None


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta.

    ``E`` is the irreducible loss (nats/token); ``A``, ``B`` > 0; ``alpha``, ``beta`` > 0.
    ``name`` only labels the law in output.

    >>> law = ScalingLaw.epoch()
    >>> round(law.a, 3)
    0.513
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    name: str = ""

    def __post_init__(self) -> None:
        for field in ("E", "A", "B", "alpha", "beta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise TypeError(f"{field} must be a real number, got {type(value).__name__}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{field} must be finite, got {value}")
            object.__setattr__(self, field, float(value))
        for field in ("A", "B", "alpha", "beta"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
        if self.E < 0:
            raise ValueError(f"E must be >= 0, got {self.E}")

    # ---- presets ---------------------------------------------------------------------
    @classmethod
    def hoffmann(cls) -> "ScalingLaw":
        """Hoffmann et al. 2022, Eq. 10 (the rounded published values)."""
        return cls(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, name="hoffmann")

    @classmethod
    def epoch(cls) -> "ScalingLaw":
        """Besiroglu et al. 2024 (Epoch AI), headline Huber-likelihood fit on the 240 runs."""
        return cls(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, name="epoch")

    # ---- derived quantities ------------------------------------------------------------
    @property
    def a(self) -> float:
        """Exponent of N_opt(C): beta / (alpha + beta)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt(C): alpha / (alpha + beta)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def log_G(self) -> float:
        """log G, computed from logs: G itself under- or overflows when alpha + beta is tiny."""
        s = self.alpha + self.beta
        return (math.log(self.alpha) + math.log(self.A) - math.log(self.beta) - math.log(self.B)) / s

    @property
    def G(self) -> float:
        """(alpha A / (beta B))^(1 / (alpha + beta)), the frontier's prefactor (may be 0 or inf)."""
        try:
            return math.exp(self.log_G)
        except OverflowError:
            return math.inf

    def loss(self, N, D):
        """Predicted loss for ``N`` parameters trained on ``D`` tokens (broadcasting arrays)."""
        n = _positive_array(N, "N")
        d = _positive_array(D, "D")
        _check_broadcast(n, d)
        return _scalar_or_array(self.E + self.A / n**self.alpha + self.B / d**self.beta)

    def terms(self, N, D) -> "LossTerms":
        """The loss split into irreducible, finite-model and finite-data terms."""
        n = _positive_array(N, "N")
        d = _positive_array(D, "D")
        _check_broadcast(n, d)
        model = self.A / n**self.alpha
        data = self.B / d**self.beta
        n_b, d_b = np.broadcast_arrays(n, d)
        return LossTerms(
            N=_scalar_or_array(n_b * 1.0),
            D=_scalar_or_array(d_b * 1.0),
            irreducible=self.E,
            model=_scalar_or_array(model * np.ones_like(d_b)),
            data=_scalar_or_array(data * np.ones_like(n_b)),
        )

    def optimal(self, compute, k: float = 6.0) -> tuple:
        """(N_opt, D_opt) minimising the loss at ``compute`` FLOPs with C = k N D.

        ``compute``: scalar or array of FLOPs (> 0). Returns floats or arrays of the same shape.
        """
        c = _positive_array(compute, "compute")
        k = _check_k(k)
        # In logs: with small exponents G alone under- or overflows although the
        # products are representable.
        lc, lg = np.log(c / k), self.log_G
        with np.errstate(over="ignore", under="ignore"):
            n_opt = np.exp(lg + self.a * lc)
            d_opt = np.exp(self.b * lc - lg)
        self._check_representable(c, (n_opt, d_opt), "N_opt, D_opt")
        return _scalar_or_array(n_opt), _scalar_or_array(d_opt)

    def _check_representable(self, c, values, what: str) -> None:
        bad = np.zeros(np.shape(c), dtype=bool)
        for v in values:
            bad |= ~np.isfinite(v) | (v <= 0)
        if bad.any():
            c0 = float(np.broadcast_to(c, bad.shape)[bad][0])
            raise ValueError(
                f"compute: {what} at {c0:.3g} FLOPs under- or overflow float64 for this law "
                f"(alpha {self.alpha:.3g}, beta {self.beta:.3g}, log G {self.log_G:.4g})"
            )

    def tokens_per_parameter(self, compute, k: float = 6.0):
        """D_opt / N_opt at ``compute`` FLOPs: G^-2 (C / k)^(b - a)."""
        c = _positive_array(compute, "compute")
        k = _check_k(k)
        with np.errstate(over="ignore", under="ignore"):
            tpp = np.exp((self.b - self.a) * np.log(c / k) - 2.0 * self.log_G)
        self._check_representable(c, (tpp,), "tokens per parameter")
        return _scalar_or_array(tpp)

    def optimal_loss(self, compute, k: float = 6.0):
        """Loss on the compute-optimal frontier at ``compute`` FLOPs."""
        n_opt, d_opt = self.optimal(compute, k)
        return self.loss(n_opt, d_opt)

    def as_dict(self) -> dict:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta}


def _check_k(k) -> float:
    return _checks.real(k, "k", low=0.0)


@dataclass(frozen=True)
class LossTerms:
    """L = irreducible + model + data, for one or more (N, D) pairs (arrays broadcast)."""

    N: object
    D: object
    irreducible: float
    model: object
    data: object

    @property
    def total(self):
        return self.irreducible + np.asarray(self.model) + np.asarray(self.data)


PRESETS = {"hoffmann": ScalingLaw.hoffmann, "epoch": ScalingLaw.epoch}

# (parameters, training tokens) as reported by the papers that introduced them.
KNOWN_MODELS: dict[str, tuple[float, float]] = {
    "gpt3": (175e9, 300e9),  # Brown et al. 2020
    "gopher": (280e9, 300e9),  # Rae et al. 2021
    "chinchilla": (70e9, 1.4e12),  # Hoffmann et al. 2022
}


def get_law(name: str) -> ScalingLaw:
    """The preset called ``name`` (``hoffmann`` or ``epoch``)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown law {name!r}; choose from {sorted(PRESETS)}") from None


def parse_models(spec) -> list[tuple[str, float, float]]:
    """``"gpt3,chinchilla"`` or an iterable of names / ``(name, N, D)`` -> [(name, N, D)].

    A string entry may also be ``label:N:D`` (e.g. ``mine:1e9:2e10``) for a model not in
    ``KNOWN_MODELS``.
    """
    if isinstance(spec, str):
        items: Iterable = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = spec
    out = []
    for item in items:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 3:
                try:
                    n, d = float(parts[1]), float(parts[2])
                except ValueError:
                    raise ValueError(f"models: cannot read N and D in {item!r} (expected label:N:D)") from None
                out.append((parts[0], n, d))
            elif item.lower() in KNOWN_MODELS:
                n, d = KNOWN_MODELS[item.lower()]
                out.append((item.lower(), n, d))
            else:
                raise ValueError(f"models: unknown model {item!r}; known: {sorted(KNOWN_MODELS)} or label:N:D")
        else:
            try:
                name, n, d = item
            except (TypeError, ValueError):
                raise TypeError(f"models: each entry must be a name or (name, N, D), got {item!r}") from None
            if _checks._is_bool(n) or _checks._is_bool(d):  # float(True) is 1.0: never a model size
                raise TypeError(f"models: N and D of {name!r} must be numbers, not bools, got {n!r} and {d!r}")
            try:
                out.append((str(name), float(n), float(d)))
            except (TypeError, ValueError):
                raise TypeError(f"models: N and D of {name!r} must be numbers, got {n!r} and {d!r}") from None
            except OverflowError:  # a Python int beyond float64's range
                raise ValueError(f"models: N and D of {name!r} must be finite, got values beyond float64's range") from None
    if not out:
        raise ValueError("models is empty")
    for name, n, d in out:
        _positive_array(n, f"N of {name}")
        _positive_array(d, f"D of {name}")
    return out


def decompose(law: ScalingLaw, models="gpt3,gopher,chinchilla", k: float = 6.0) -> list[dict]:
    """One row per model: N, D, C = k N D, the three loss terms, the total, and the loss
    the compute-optimal model at the same C would reach.

    >>> rows = decompose(ScalingLaw.hoffmann(), "chinchilla")
    >>> round(rows[0]["loss"], 3)
    1.937
    """
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"law must be a ScalingLaw, got {type(law).__name__}")
    k = _check_k(k)
    rows = []
    for name, n, d in parse_models(models):
        t = law.terms(n, d)
        c = k * n * d
        n_opt, d_opt = law.optimal(c, k)
        rows.append(
            {
                "model": name,
                "N": n,
                "D": d,
                "C": c,
                "irreducible": t.irreducible,
                "model_term": float(t.model),
                "data_term": float(t.data),
                "loss": float(t.total),
                "N_opt": n_opt,
                "D_opt": d_opt,
                "optimal_loss": law.loss(n_opt, d_opt),
            }
        )
    return rows
