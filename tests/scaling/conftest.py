"""Shared fixtures for the scaling tests: Epoch AI's Chinchilla data and fits of it.

The data file lives outside the repository (never copied in): <repo>/../shared/data/chinchilla.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flopwise import scaling

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "chinchilla"
EPOCH_CSV = DATA_DIR / "svg_extracted_data.csv"

# Besiroglu et al. 2024 (arXiv 2404.10102), headline Huber-likelihood fit, and their
# bootstrap standard errors (4,000 resamples); see /work/shared/PAPERS.md.
EPOCH_FIT = {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}
EPOCH_SE = {"E": 0.026, "A": 124.5, "B": 1293.0, "alpha": 0.0154, "beta": 0.0206}
# Epoch's unrounded optimum (their notebook prints a, b, e, alpha, beta and log sigma).
EPOCH_THETA = np.array([6.17795598, 7.64273236, 0.59711196, 0.34781303, 0.36585412])
EPOCH_LOG_SIGMA = -12.26662388


@pytest.fixture(scope="session")
def epoch_data() -> scaling.ScalingData:
    if not EPOCH_CSV.is_file():
        pytest.skip(f"Epoch data not found at {EPOCH_CSV}")
    return scaling.load_csv(EPOCH_CSV, **scaling.EPOCH_COLUMNS, drop_highest=5)


@pytest.fixture(scope="session")
def epoch_likelihood_fit(epoch_data) -> scaling.FitResult:
    return scaling.fit(epoch_data, objective="huber_likelihood")


@pytest.fixture(scope="session")
def epoch_huber_fit(epoch_data) -> scaling.FitResult:
    return scaling.fit(epoch_data, objective="huber")


def synthetic(law: scaling.ScalingLaw, n_runs: int = 120, noise: float = 0.0, seed: int = 0) -> scaling.ScalingData:
    """Runs at random (N, D) in 1e7..1e10 params, 1e8..1e12 tokens; loss times exp(noise * z)."""
    rng = np.random.default_rng(seed)
    N = 10 ** rng.uniform(7, 10, n_runs)
    D = 10 ** rng.uniform(8, 12, n_runs)
    L = law.loss(N, D) * np.exp(noise * rng.standard_normal(n_runs))
    return scaling.from_arrays(N, L, D=D)


def loss_without_d_dependence(seed: int = 5) -> scaling.ScalingData:
    """30 runs on a 6 x 5 (N, D) grid whose loss does not depend on D: the fit's beta -> 0."""
    N = np.geomspace(1e8, 1e10, 6).repeat(5)
    D = np.tile(np.geomspace(1e9, 1e11, 5), 6)
    rng = np.random.default_rng(seed)
    L = 3 + rng.normal(0, 0.1, 30) ** 2 + 50 / N**0.3
    return scaling.from_arrays(N, L, D=D)
