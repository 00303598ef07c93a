from __future__ import annotations

import os

import pytest

from flopwise.scaling import bootstrap
from flopwise.scaling.plot import output_path, plot_bootstrap, plot_fit

pytest.importorskip("matplotlib", reason="plots need matplotlib, the optional 'plot' extra")


def test_plot_fit_and_bootstrap(tmp_path, epoch_data, epoch_huber_fit):
    out = tmp_path / "fit.png"
    fig = plot_fit(epoch_data, epoch_huber_fit.law, path=out)
    assert out.stat().st_size > 10_000
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.collections) >= 2  # contours + scatter
    b = bootstrap(epoch_data, epoch_huber_fit, n=50, seed=0)
    out2 = tmp_path / "boot.png"
    fig2 = plot_bootstrap(b, path=out2)
    assert out2.stat().st_size > 5_000
    assert len(fig2.axes) == 7
    with pytest.raises(TypeError, match="law"):
        plot_fit(epoch_data, {"E": 1})


def test_saving_keeps_the_backend_and_leaves_no_figures(tmp_path, epoch_data, epoch_huber_fit):
    import matplotlib
    import matplotlib.pyplot as plt

    before_backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        open_before = len(plt.get_fignums())
        for i in range(3):
            plot_fit(epoch_data, epoch_huber_fit.law, path=tmp_path / f"f{i}.png")
        assert matplotlib.get_backend() == "svg"
        assert len(plt.get_fignums()) == open_before
        # Without a path the figure is for display: pyplot's, the caller's to close.
        fig = plot_fit(epoch_data, epoch_huber_fit.law)
        assert len(plt.get_fignums()) == open_before + 1
        plt.close(fig)
    finally:
        matplotlib.use(before_backend)


def test_failed_save_leaves_no_file(tmp_path, epoch_data, epoch_huber_fit, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "fit.png"
    out.write_bytes(b"old figure")

    def broken(self, fh, **kwargs):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot_fit(epoch_data, epoch_huber_fit.law, path=out)
    assert out.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["fit.png"]


def test_path_checked_before_drawing(tmp_path, epoch_data, epoch_huber_fit):
    with pytest.raises(ValueError, match="folder .* does not exist"):
        plot_fit(epoch_data, epoch_huber_fit.law, path=tmp_path / "nope" / "fit.png")
    with pytest.raises(ValueError, match="cannot write 'xyz' images"):
        plot_fit(epoch_data, epoch_huber_fit.law, path=tmp_path / "fit.xyz")
    if os.path.isdir("/proc/self"):  # os.access says yes to root there; no file can be made
        with pytest.raises(ValueError, match="cannot write in /proc"):
            output_path("/proc/fit.png")
    # No suffix: matplotlib's default format, suffix appended (as savefig does).
    plot_fit(epoch_data, epoch_huber_fit.law, path=tmp_path / "fig")
    assert (tmp_path / "fig.png").stat().st_size > 10_000


def test_output_path_refuses_folders(tmp_path):
    # An existing folder passed the check and failed after the fit ("Is a directory").
    (tmp_path / "figs").mkdir()
    (tmp_path / "fit.png").mkdir()
    for path in (tmp_path / "figs", f"{tmp_path / 'figs'}/", tmp_path / "fit.png", tmp_path / "fit", f"{tmp_path}/new/"):
        with pytest.raises(ValueError, match="path: .* names a folder, not an image file"):
            output_path(path)
    assert output_path(tmp_path / "figs" / "fit.png")[1] == "png"
