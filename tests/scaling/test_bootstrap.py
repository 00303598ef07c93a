from __future__ import annotations

import importlib

import numpy as np
import pytest

from flopwise.scaling import FitWarning, ScalingLaw, bootstrap, fit, from_arrays, grid_check, hoffmann_grid
from flopwise.scaling.bootstrap import PARAM_NAMES, resample_weights
from flopwise.scaling.fit import data_fingerprint

from .conftest import EPOCH_SE, loss_without_d_dependence, synthetic

# The module (flopwise.scaling.bootstrap as an attribute is the function of that name).
bs = importlib.import_module("flopwise.scaling.bootstrap")


@pytest.fixture(scope="module")
def epoch_boot(epoch_data, epoch_likelihood_fit):
    # Epoch's standard errors refit the plain Huber sum on each resample (their notebook).
    return bootstrap(epoch_data, epoch_likelihood_fit, n=4000, seed=0, objective="huber")


def test_reproduces_epoch_bootstrap_standard_errors(epoch_boot):
    """Within 10% of Epoch's published bootstrap SEs (4,000 resamples each side).

    Our resamples differ from theirs (other RNG), so the SEs carry Monte-Carlo error.
    Measured over seeds 0..5: E, A, alpha, beta within 4.1%; B, whose distribution is
    heavy-tailed (B = e^b), between +0.1% and +11.4%, so the 10% bound on B holds for
    most seeds but not all; seed 0 is pinned (B +3.5%).
    """
    for name, se in EPOCH_SE.items():
        assert epoch_boot.se[name] == pytest.approx(se, rel=0.10), name
    assert epoch_boot.n_failed == 0
    assert epoch_boot.seconds < 30.0  # BENCHMARKS: ~1 s


def test_summary_is_consistent(epoch_boot, epoch_likelihood_fit):
    for name in PARAM_NAMES:
        s = epoch_boot.samples[name]
        assert s.shape == (4000,)
        lo, hi = epoch_boot.interval[name]
        assert lo < epoch_boot.estimate[name] < hi
        assert epoch_boot.se[name] == pytest.approx(np.std(s, ddof=1))
    assert epoch_boot.estimate["alpha"] == pytest.approx(epoch_likelihood_fit.law.alpha)
    np.testing.assert_allclose(epoch_boot.samples["a"] + epoch_boot.samples["b"], 1.0)
    # Epoch's 95% interval for beta is (0.331, 0.415); ours should be close.
    lo, hi = epoch_boot.interval["beta"]
    assert lo == pytest.approx(0.331, abs=0.01) and hi == pytest.approx(0.415, abs=0.01)
    # ~20 tokens per parameter at Chinchilla's compute, with a wide interval.
    lo, hi = epoch_boot.interval["tokens_per_parameter"]
    assert lo < 20 < hi


def test_seeded(epoch_data, epoch_huber_fit):
    a = bootstrap(epoch_data, epoch_huber_fit, n=50, seed=7)
    b = bootstrap(epoch_data, epoch_huber_fit, n=50, seed=7)
    c = bootstrap(epoch_data, epoch_huber_fit, n=50, seed=8)
    np.testing.assert_array_equal(a.samples["alpha"], b.samples["alpha"])
    assert not np.array_equal(a.samples["alpha"], c.samples["alpha"])


def test_warm_starts_find_the_full_grid_optimum(epoch_data, epoch_huber_fit):
    # The justification for warm-starting each resample: refitting a resample from all
    # 4,500 grid starts finds no better optimum (one resample here to keep the suite
    # fast; 10 resamples measured for BENCHMARKS agree to 4e-15 in the objective).
    chk = grid_check(epoch_data, epoch_huber_fit, n_check=1, seed=3)
    assert chk["warm_not_worse"]
    assert np.all(np.abs(chk["objective_rel_diff"]) < 1e-9)
    assert np.all(chk["param_max_abs_diff"] < 1e-5)


def test_likelihood_bootstrap_runs_and_agrees_roughly(epoch_data, epoch_likelihood_fit, epoch_boot):
    lik = bootstrap(epoch_data, epoch_likelihood_fit, n=200, seed=1)
    assert lik.objective == "huber_likelihood"
    for name in ("E", "alpha", "beta"):
        assert lik.se[name] == pytest.approx(epoch_boot.se[name], rel=0.3), name


def test_resample_weights():
    w = resample_weights(10, 500, np.random.default_rng(0))
    assert w.shape == (500, 10)
    np.testing.assert_array_equal(w.sum(axis=1), 10)
    assert np.all(w >= 0)
    # Each run appears on average once per resample.
    assert w.mean() == pytest.approx(1.0)
    assert abs(w.mean(axis=0) - 1).max() < 0.2


def test_bad_arguments(epoch_data, epoch_huber_fit):
    with pytest.raises(ValueError, match="n must"):
        bootstrap(epoch_data, epoch_huber_fit, n=1)
    with pytest.raises(ValueError, match="level"):
        bootstrap(epoch_data, epoch_huber_fit, n=10, level=1.5)
    with pytest.raises(ValueError, match="objective"):
        bootstrap(epoch_data, epoch_huber_fit, n=10, objective="l2")
    with pytest.raises(TypeError, match="result"):
        bootstrap(epoch_data, {"E": 1}, n=10)
    with pytest.raises(ValueError, match="compute"):
        bootstrap(epoch_data, epoch_huber_fit, n=10, compute=0)


@pytest.fixture(scope="module")
def flat_in_d():
    data = loss_without_d_dependence()
    with pytest.warns(FitWarning):
        return data, fit(data)


def test_resamples_without_a_valid_law_count_as_failed(flat_in_d):
    # Loss independent of D: many resamples fit beta < 0, which is no scaling law.
    data, result = flat_in_d
    b = bootstrap(data, result, n=200, seed=0)
    assert b.n_failed > 20
    assert b.samples["beta"].shape == (200 - b.n_failed,)
    assert np.all(b.samples["alpha"] > 0) and np.all(b.samples["beta"] > 0)
    for name in PARAM_NAMES:
        assert np.all(np.isfinite(b.samples[name])), name
        assert np.isfinite(b.se[name]), name
    assert b.interval["beta"][0] > 0


def test_result_must_come_from_the_same_data(epoch_data, epoch_huber_fit, flat_in_d):
    data, result = flat_in_d
    with pytest.raises(ValueError, match="fitted to 240 runs but data has 30"):
        bootstrap(data, epoch_huber_fit, n=10)
    other = from_arrays(data.N, data.loss * 1.01, D=data.D)
    with pytest.raises(ValueError, match="other runs than data"):
        bootstrap(other, result, n=10)
    with pytest.raises(ValueError, match="fitted to 30 runs"):
        grid_check(epoch_data, result)


def test_numpy_scalars_and_seed(flat_in_d):
    data, result = flat_in_d
    b = bootstrap(data, result, n=np.int64(5), compute=np.float32(1e23), level=np.float64(0.9), seed=np.int64(1))
    assert b.n_resamples == 5 and b.compute == pytest.approx(1e23, rel=1e-6) and b.level == 0.9
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        bootstrap(data, result, n=5, seed=-1)
    with pytest.raises(TypeError, match="seed"):
        bootstrap(data, result, n=5, seed=1.5)
    with pytest.raises(TypeError, match="n must be an int"):
        bootstrap(data, result, n=True)


@pytest.fixture(scope="module")
def clean_fit():
    law = ScalingLaw(E=1.7, A=400.0, B=1000.0, alpha=0.33, beta=0.30)
    data = synthetic(law, 30, noise=0.01, seed=4)
    return data, fit(data, starts=hoffmann_grid()[::10])


def test_weights_are_drawn_per_batch_with_the_same_resamples(clean_fit, monkeypatch):
    # All n x R weights at once took ~4x their size at peak: --bootstrap 1e8 was OOM-killed.
    data, result = clean_fit
    full = bootstrap(data, result, n=2100, seed=5)
    drawn = []
    original = bs.resample_weights

    def recording(n_runs, n_resamples, rng):
        drawn.append(n_resamples)
        return original(n_runs, n_resamples, rng)

    monkeypatch.setattr(bs, "resample_weights", recording)
    short = bootstrap(data, result, n=1100, seed=5)
    assert max(drawn) <= 1000 and sum(drawn) == 1100
    # Batch by batch, a seed's first resamples are those of any longer run.
    assert full.n_failed == 0 and short.n_failed == 0
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(short.samples[name], full.samples[name][:1100])


def test_resample_count_whose_results_cannot_fit_is_refused(clean_fit, monkeypatch):
    data, result = clean_fit
    monkeypatch.setattr(bs, "_physical_memory", lambda: 10**9, raising=False)
    monkeypatch.setattr(bs, "_fit_weighted", lambda *a, **k: pytest.fail("must refuse before fitting"))
    with pytest.raises(ValueError, match="n \\(5000000\\) resamples would need about 1.2 GB for their results, "
                                         "more than half of this machine's 1 GB"):
        bootstrap(data, result, n=5_000_000)


def test_same_runs_in_another_order_are_the_same_data(clean_fit):
    # The objective is a sum over runs: the fit of one order is the fit of any other.
    data, result = clean_fit
    shuffled = data.subset(np.random.default_rng(0).permutation(len(data)))
    assert data_fingerprint(shuffled) == data_fingerprint(data)
    b = bootstrap(shuffled, result, n=20, seed=0)
    assert b.n_resamples == 20 and b.estimate["alpha"] == result.law.alpha
