"""Inference-aware allocation (Sardana & Frankle 2023, "Beyond Chinchilla-Optimal").

Reach a target loss L with the least total compute, training (k N D FLOPs) plus
serving ``inference_tokens`` tokens (k_inf N FLOPs each, k_inf = 2 for a forward pass):

    minimise  k N D + k_inf N T   subject to  E + A / N^alpha + B / D^beta = L.

On the isoloss curve D(N) = (B / (L - E - A N^-alpha))^(1/beta), and

    d total / dN = k D (1 - alpha A N^-alpha / (beta g)) + k_inf T,   g = L - E - A N^-alpha.

The bracket is increasing in N and negative left of the training-only optimum
(where A N^-alpha = beta (L - E) / (alpha + beta)), so the derivative has one root,
between the smallest feasible N (g = 0) and that optimum; bisection in log N finds it.
Serving tokens move the optimum to a smaller model trained on more tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import _checks
from .laws import ScalingLaw

__all__ = ["InferenceOptimal", "inference_optimal", "training_optimal_for_loss"]


@dataclass(frozen=True)
class InferenceOptimal:
    """The allocation that minimises training + inference compute at a target loss.

    ``N``, ``D``: the optimum; ``train_flops``, ``inference_flops``, ``total_flops`` its
    costs. ``chinchilla_*``: the training-only optimum at the same loss and its total
    cost when it serves the same tokens. ``n_ratio`` = N / chinchilla_N, ``d_ratio`` =
    D / chinchilla_D, ``savings`` = 1 - total / chinchilla_total.
    """

    loss: float
    inference_tokens: float
    N: float
    D: float
    train_flops: float
    inference_flops: float
    total_flops: float
    chinchilla_N: float
    chinchilla_D: float
    chinchilla_train_flops: float
    chinchilla_total_flops: float

    @property
    def n_ratio(self) -> float:
        return self.N / self.chinchilla_N

    @property
    def d_ratio(self) -> float:
        return self.D / self.chinchilla_D

    @property
    def tokens_per_parameter(self) -> float:
        return self.D / self.N

    @property
    def savings(self) -> float:
        return 1.0 - self.total_flops / self.chinchilla_total_flops

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out.update(n_ratio=self.n_ratio, d_ratio=self.d_ratio, tokens_per_parameter=self.tokens_per_parameter, savings=self.savings)
        return out


def _check(law, loss) -> float:
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"law must be a ScalingLaw, got {type(law).__name__}")
    loss = _checks.real(loss, "loss")
    if loss <= law.E:
        raise ValueError(f"loss must exceed the irreducible loss E = {law.E:.6g}, got {loss}")
    return loss


def _finite(values: dict, hint: str) -> None:
    bad = [name for name, v in values.items() if not (math.isfinite(v) and v > 0)]
    if bad:
        shown = ", ".join(f"{name} = {values[name]:.3g}" for name in bad)
        raise ValueError(f"{hint}: {shown} (outside float64's range)")


def _tokens_for(law: ScalingLaw, loss: float, n: float) -> float:
    g = loss - law.E - law.A * n**-law.alpha
    return (law.B / g) ** (1.0 / law.beta)


def training_optimal_for_loss(law: ScalingLaw, loss: float) -> tuple[float, float]:
    """(N, D) reaching ``loss`` with the least training compute (closed form).

    At the optimum the finite-model and finite-data terms are in the ratio beta : alpha.
    """
    loss = _check(law, loss)
    s = law.alpha + law.beta
    # In logs: close to E the powers overflow, which must be an error, not inf.
    gap = math.log(loss - law.E)
    ln = (math.log(law.A * s / law.beta) - gap) / law.alpha
    ld = (math.log(law.B * s / law.alpha) - gap) / law.beta
    # math.exp raises beyond ~709.78; inf is reported by _finite with the names.
    n = math.exp(ln) if ln < 709.0 else math.inf
    d = math.exp(ld) if ld < 709.0 else math.inf
    _finite({"N": n, "D": d}, f"loss {loss} is too close to E = {law.E:.6g} for this law")
    return n, d


def inference_optimal(
    law: ScalingLaw, loss: float, inference_tokens: float, k: float = 6.0, k_inf: float = 2.0
) -> InferenceOptimal:
    """The (N, D) reaching ``loss`` that minimises k N D + k_inf N ``inference_tokens``."""
    loss = _check(law, loss)
    T = _checks.real(inference_tokens, "inference_tokens", low=0.0, low_open=False)
    k = _checks.real(k, "k", low=0.0)
    k_inf = _checks.real(k_inf, "k_inf", low=0.0, low_open=False)
    n_chin, d_chin = training_optimal_for_loss(law, loss)

    def slope(n: float) -> float:
        g = loss - law.E - law.A * n**-law.alpha
        d = (law.B / g) ** (1.0 / law.beta)
        return k * d * (1.0 - law.alpha * law.A * n**-law.alpha / (law.beta * g)) + k_inf * T

    try:
        if T == 0.0 or k_inf == 0.0:
            n = n_chin
        else:
            lo = math.log((law.A / (loss - law.E)) ** (1.0 / law.alpha))  # g = 0 here
            hi = math.log(n_chin)
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if mid in (lo, hi):
                    break
                if slope(math.exp(mid)) > 0:
                    hi = mid
                else:
                    lo = mid
            n = math.exp(hi)
        d = _tokens_for(law, loss, n)
        train = k * n * d
        inf = k_inf * n * T
    except (OverflowError, ZeroDivisionError):
        # Python float powers raise instead of returning inf: the optimum is beyond float64.
        raise ValueError(
            f"inference_tokens {T:.3g} at loss {loss}: the optimal model is outside float64's range"
        ) from None
    chin_total = k * n_chin * d_chin + k_inf * n_chin * T
    _finite(
        {"N": n, "D": d, "total FLOPs": train + inf, "training-only total FLOPs": chin_total},
        f"inference_tokens {T:.3g} at loss {loss}",
    )
    return InferenceOptimal(
        loss=loss,
        inference_tokens=T,
        N=n,
        D=d,
        train_flops=train,
        inference_flops=inf,
        total_flops=train + inf,
        chinchilla_N=n_chin,
        chinchilla_D=d_chin,
        chinchilla_train_flops=k * n_chin * d_chin,
        chinchilla_total_flops=chin_total,
    )
