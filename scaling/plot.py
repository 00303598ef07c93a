"""Plots (matplotlib is the optional ``plot`` extra: ``pip install flopwise[plot]``).

matplotlib is imported inside each function, so ``flopwise.scaling`` works without it.
The backend is never changed. A figure that is only written to ``path`` is built with
the object API (``matplotlib.figure.Figure``): pyplot never sees it, so nothing is
left open and no GUI backend is needed. Without ``path`` (and without ``ax``) the
figure comes from pyplot, for display, and is the caller's to close. Files are written
to a temporary file in the same folder and renamed over ``path``, so a failed save
never leaves a partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from flopwise._files import check_writable

from .data import ScalingData
from .laws import ScalingLaw

__all__ = ["plot_fit", "plot_bootstrap", "require_matplotlib", "output_path"]


def require_matplotlib():
    """Import matplotlib or raise ImportError saying how to install it (the CLI calls
    this before fitting, so a missing extra is reported before minutes of work)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "plotting needs matplotlib, the optional 'plot' extra: pip install 'flopwise[plot]'"
        ) from exc
    return matplotlib


def output_path(path) -> tuple[Path, str]:
    """(file to write, image format) for ``path``: the format follows the suffix; without
    one, matplotlib's default format is used and its suffix appended (as savefig does).
    Raises ValueError for a format matplotlib cannot write, a folder that does not exist,
    or a path that names a folder (ending in a separator, or an existing folder) rather
    than a file.
    """
    mpl = require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or path, got {type(path).__name__}")
    p = Path(path)
    text = os.fspath(path)
    folder = not p.name or p.is_dir() or text.endswith(("/", os.sep))
    fmt = p.suffix[1:].lower() if p.suffix else str(mpl.rcParams["savefig.format"])
    if not folder and not p.suffix:
        p = p.with_name(f"{p.name}.{fmt}")
        folder = p.is_dir()
    if folder:
        raise ValueError(f"path: {str(p)!r} names a folder, not an image file (e.g. {str(p / 'fit.png')!r})")
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt not in supported:
        raise ValueError(f"path: cannot write {fmt!r} images ({p.name}); use one of {sorted(supported)}")
    if not p.parent.is_dir():
        raise ValueError(f"path: folder {str(p.parent)!r} does not exist")
    check_writable(p.parent, f"path {str(path)!r}")
    return p, fmt


def _save(fig, path) -> Path:
    p, fmt = output_path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=120, bbox_inches="tight")
        # mkstemp makes the file 0600; a saved figure gets the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return p


def _new_figure(path, **kwargs):
    """A Figure for a new plot: object API when it is only saved, pyplot when it is shown."""
    require_matplotlib()
    if path is not None:
        from matplotlib.figure import Figure

        return Figure(**kwargs)
    import matplotlib.pyplot as plt

    return plt.figure(**kwargs)


def plot_fit(data: ScalingData, law: ScalingLaw, path=None, ax=None, levels: int = 12):
    """Runs in the (C, N) plane coloured by loss, the law's isoloss contours of
    L(N, D = C / (k N)) and its compute-optimal frontier N_opt(C).

    Returns the matplotlib Figure; writes it to ``path`` when given (see the module
    docstring for which figures pyplot tracks).
    """
    if not isinstance(data, ScalingData):
        raise TypeError(f"data must be ScalingData, got {type(data).__name__}")
    if not isinstance(law, ScalingLaw):
        raise TypeError(f"law must be a ScalingLaw, got {type(law).__name__}")
    require_matplotlib()
    from matplotlib.colors import LogNorm

    if path is not None:
        output_path(path)  # a bad path fails before drawing
    if ax is None:
        fig = _new_figure(path, figsize=(7, 4.5))
        ax = fig.add_subplot()
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
        _save(fig, path)
    return fig


def plot_bootstrap(result, path=None, names=("E", "A", "B", "alpha", "beta", "a", "tokens_per_parameter")):
    """Histograms of the bootstrap distribution with the estimate and the interval."""
    from .bootstrap import BootstrapResult

    if not isinstance(result, BootstrapResult):
        raise TypeError(f"result must be a BootstrapResult, got {type(result).__name__}")
    if path is not None:
        output_path(path)
    fig = _new_figure(path, figsize=(2.4 * len(names), 2.4))
    axes = fig.subplots(1, len(names))
    for ax, name in zip(np.atleast_1d(axes), names):
        v = np.asarray(result.samples[name])
        # Resamples of an exact fit all agree to rounding; 50 bins over a range of a few
        # ulps is an error in matplotlib, one bin shows the point mass.
        spread = np.ptp(v) > 1e-9 * max(float(np.abs(v).max()), 1e-300) if v.size else False
        ax.hist(v, bins=50 if spread else 1, color="0.6")
        ax.axvline(result.estimate[name], color="b")
        for v in result.interval[name]:
            ax.axvline(v, color="r", ls="--", lw=0.8)
        ax.set_title(f"{name}\n±{result.se[name]:.3g}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    if path is not None:
        _save(fig, path)
    return fig
