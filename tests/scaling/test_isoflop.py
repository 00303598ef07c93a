from __future__ import annotations

import numpy as np
import pytest

from flopwise.scaling import ScalingLaw, from_arrays, isoflop_fit
from flopwise.scaling.isoflop import group_by_compute


def _isoflop_data(law, computes, per_level=11, span=8.0, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    N, C = [], []
    for c in computes:
        n_opt, _ = law.optimal(c)
        ns = n_opt * np.geomspace(1 / span, span, per_level)
        N.extend(ns)
        C.extend([c] * per_level)
    N, C = np.array(N), np.array(C)
    L = law.loss(N, C / (6 * N)) * np.exp(noise * rng.standard_normal(N.size))
    return from_arrays(N, L, C=C)


def test_recovers_frontier_exponent():
    law = ScalingLaw.epoch()
    computes = np.geomspace(1e18, 1e22, 7)
    r = isoflop_fit(_isoflop_data(law, computes))
    assert r.compute.shape == (7,) and r.skipped == 0
    # The isoFLOP valley of this law is not exactly a parabola in log N: a within 0.01.
    assert r.a == pytest.approx(law.a, abs=0.01)
    assert r.a + r.b == pytest.approx(1.0)
    n_true, _ = law.optimal(r.compute)
    np.testing.assert_allclose(r.n_opt, n_true, rtol=0.1)
    n, d = r.optimal(1e21)
    assert 6 * n * d == pytest.approx(1e21)


def test_noisy_profiles():
    law = ScalingLaw.hoffmann()
    r = isoflop_fit(_isoflop_data(law, np.geomspace(1e18, 1e21, 5), per_level=15, noise=0.002, seed=2))
    assert r.a == pytest.approx(law.a, abs=0.05)


def test_grouping_and_errors():
    labels = group_by_compute(np.array([1e18, 1.05e18, 1e19, 1e20, 1.02e20]))
    assert list(labels) == [0, 0, 1, 2, 2]
    rng = np.random.default_rng(0)
    N = 10 ** rng.uniform(7, 9, 20)
    data = from_arrays(N, 3 + rng.random(20), C=10 ** rng.uniform(17, 22, 20))
    with pytest.raises(ValueError, match="isoFLOP profile"):
        isoflop_fit(data)
    with pytest.raises(ValueError, match="min_points"):
        isoflop_fit(data, min_points=2)


def test_profiles_do_not_chain_across_budgets():
    # Budgets 0.04 decades apart: chaining neighbours made one "profile" of four decades.
    C = 10 ** np.arange(18, 22, 0.04)
    labels = group_by_compute(C, 0.05)
    for g in np.unique(labels):
        lc = np.log10(C[labels == g])
        assert lc.max() - lc.min() <= 0.05 + 1e-12
    assert np.unique(labels).size == 50


def test_spans_reported_and_user_labels():
    law = ScalingLaw.epoch()
    computes = np.geomspace(1e18, 1e22, 5)
    data = _isoflop_data(law, computes)
    r = isoflop_fit(data)
    np.testing.assert_allclose(r.span_decades, 0.0, atol=1e-12)
    np.testing.assert_array_equal(r.n_points, 11)
    # Budgets jittered by +-10%: the grouping would split them; labels keep them together.
    rng = np.random.default_rng(0)
    jittered = from_arrays(data.N, data.loss, D=data.D * rng.uniform(0.9, 1.1, len(data)))
    names = np.repeat([f"c{i}" for i in range(5)], 11)
    rl = isoflop_fit(jittered, labels=names)
    assert list(rl.label) == [f"c{i}" for i in range(5)]
    assert np.all(rl.span_decades > 0.02) and np.all(rl.span_decades < 2 * np.log10(1.1 / 0.9))
    assert rl.a == pytest.approx(law.a, abs=0.03)
    with pytest.raises(ValueError, match="labels must have one entry per run"):
        isoflop_fit(data, labels=names[:3])
    with pytest.raises(TypeError, match="compute must be a number"):
        r.optimal("x")


def test_epoch_data_profiles_span_at_most_the_tolerance(epoch_data):
    r = isoflop_fit(epoch_data)
    assert r.span_decades.max() <= 0.05
    assert r.compute.size == 27 and r.skipped == 24
    assert r.a == pytest.approx(0.5166, abs=1e-4)


@pytest.mark.parametrize("missing", [np.nan, None], ids=["nan", "None"])
def test_labels_must_not_be_missing(missing):
    # NaN labels equal nothing: their runs silently formed no profile.
    law = ScalingLaw.epoch()
    data = _isoflop_data(law, np.geomspace(1e18, 1e22, 5))
    labels = np.repeat(np.arange(5.0), 11).astype(object if missing is None else float)
    labels[11:22] = missing
    with pytest.raises(ValueError, match="labels: 11 run\\(s\\) have no label \\(NaN or None\\), first at row 11"):
        isoflop_fit(data, labels=labels)
