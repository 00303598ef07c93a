"""Plots (matplotlib is the optional ``plot`` extra: ``pip install flopwise[plot]``).

matplotlib is imported inside each function, so ``flopwise.scaling`` works without it.
"""

from __future__ import annotations

import numpy as np

from .data import ScalingData
from .laws import ScalingLaw

__all__ = ["plot_fit", "plot_bootstrap"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib, the optional 'plot' extra: pip install 'flopwise[plot]'"
        ) from exc
    return plt


def plot_fit(data: ScalingData, law: ScalingLaw, path=None, ax=None, levels: int = 12):
    """Runs in the (C, N) plane coloured by loss, the law's isoloss contours of
    L(N, D = C / (k N)) and its compute-optimal frontier N_opt(C).

    Returns the matplotlib Figure; writes it to ``path`` when given.
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"law must be a ScalingLaw, got {type(law).__name__}")
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    else:
        fig = ax.figure
    c_lo, c_hi = data.C.min() / 2, data.C.max() * 2
    n_lo, n_hi = data.N.min() / 2, data.N.max() * 2
    cg, ng = np.meshgrid(np.geomspace(c_lo, c_hi, 200), np.geomspace(n_lo, n_hi, 200))
    lg = law.loss(ng, cg / (data.k * ng))
    vmin, vmax = data.loss.min(), data.loss.max()
    norm = LogNorm(vmin=vmin, vmax=vmax)
    ax.contour(cg, ng, lg, levels=np.geomspace(vmin, vmax, levels), cmap="magma", norm=norm, linewidths=0.8)
    sc = ax.scatter(data.C, data.N, c=data.loss, cmap="magma", norm=norm, s=18, edgecolors="k", linewidths=0.3)
    cf = np.geomspace(c_lo, c_hi, 100)
    n_opt, _ = law.optimal(cf, data.k)
    ax.plot(cf, n_opt, "b--", lw=1.5, label=f"N_opt ∝ C^{law.a:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="parameters N", ylim=(n_lo, n_hi))
    fig.colorbar(sc, ax=ax, label="loss")
    ax.legend(loc="upper left")
    ax.set_title(f"E={law.E:.3f} A={law.A:.1f} B={law.B:.1f} α={law.alpha:.3f} β={law.beta:.3f}", fontsize=9)
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_bootstrap(result, path=None, names=("E", "A", "B", "alpha", "beta", "a", "tokens_per_parameter")):
    """Histograms of the bootstrap distribution with the estimate and the interval."""
    from .bootstrap import BootstrapResult

    if not isinstance(result, BootstrapResult):
        raise TypeError(f"result must be a BootstrapResult, got {type(result).__name__}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(2.4 * len(names), 2.4))
    for ax, name in zip(np.atleast_1d(axes), names):
        ax.hist(result.samples[name], bins=50, color="0.6")
        ax.axvline(result.estimate[name], color="b")
        for v in result.interval[name]:
            ax.axvline(v, color="r", ls="--", lw=0.8)
        ax.set_title(f"{name}\n±{result.se[name]:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig
