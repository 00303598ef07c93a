from __future__ import annotations

import math

import numpy as np
import pytest

from flopwise.scaling import ScalingLaw, inference_optimal, training_optimal_for_loss


@pytest.mark.parametrize("law", [ScalingLaw.hoffmann(), ScalingLaw.epoch()], ids=["hoffmann", "epoch"])
def test_training_only_optimum_is_the_chinchilla_frontier(law):
    n_c, d_c = law.optimal(1e23)
    target = law.loss(n_c, d_c)
    n, d = training_optimal_for_loss(law, target)
    assert n == pytest.approx(n_c, rel=1e-9) and d == pytest.approx(d_c, rel=1e-9)
    r = inference_optimal(law, target, 0.0)
    assert r.N == pytest.approx(n_c, rel=1e-9) and r.savings == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("tokens", [1e11, 1e12, 1e13, 1e14])
def test_inference_shrinks_the_model_and_saves_compute(tokens):
    law = ScalingLaw.epoch()
    target = 2.0
    r = inference_optimal(law, target, tokens)
    assert law.loss(r.N, r.D) == pytest.approx(target, rel=1e-10)
    assert r.N < r.chinchilla_N and r.D > r.chinchilla_D
    assert r.total_flops <= r.chinchilla_total_flops
    assert r.inference_flops == pytest.approx(2 * r.N * tokens)

    # It is the minimum along the isoloss curve (brute force).
    def total(n):
        g = target - law.E - law.A * n**-law.alpha
        d = (law.B / g) ** (1 / law.beta)
        return 6 * n * d + 2 * n * tokens

    n_min = (law.A / (target - law.E)) ** (1 / law.alpha)
    ns = np.geomspace(n_min * 1.0001, r.chinchilla_N * 2, 20001)
    best = ns[np.argmin([total(n) for n in ns])]
    assert best == pytest.approx(r.N, rel=2e-3)
    assert r.total_flops == pytest.approx(total(r.N), rel=1e-12)


def test_more_inference_moves_further():
    law = ScalingLaw.hoffmann()
    ratios = [inference_optimal(law, 2.1, t).n_ratio for t in (1e10, 1e12, 1e14)]
    assert ratios[0] > ratios[1] > ratios[2]
    assert all(0 < x < 1 for x in ratios)


def test_bad_arguments():
    law = ScalingLaw.epoch()
    with pytest.raises(ValueError, match="irreducible"):
        inference_optimal(law, 1.5, 1e12)
    with pytest.raises(ValueError, match="inference_tokens"):
        inference_optimal(law, 2.0, -1.0)
    with pytest.raises(ValueError, match="loss"):
        inference_optimal(law, math.nan, 1e12)
    with pytest.raises(TypeError, match="law"):
        inference_optimal("epoch", 2.0, 1e12)


def test_numpy_scalars_are_accepted():
    law = ScalingLaw.epoch()
    ref = inference_optimal(law, 2.0, 1e12)
    r = inference_optimal(law, np.float32(2.0), np.int64(10**12), k=np.int64(6), k_inf=np.float32(2))
    assert r.N == pytest.approx(ref.N, rel=1e-6)
    with pytest.raises(TypeError, match="inference_tokens"):
        inference_optimal(law, 2.0, "1e12")
    with pytest.raises(TypeError, match="loss"):
        inference_optimal(law, True, 1e12)


def test_results_beyond_float64_raise():
    law = ScalingLaw.epoch()
    with pytest.raises(ValueError, match="inference_tokens 1e\\+300.*outside float64's range"):
        inference_optimal(law, 2.0, 1e300)
    with pytest.raises(ValueError, match="too close to E"):
        training_optimal_for_loss(ScalingLaw(E=1.0, A=1.0, B=1.0, alpha=0.02, beta=0.02), 1.0 + 1e-12)
