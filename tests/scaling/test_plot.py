from __future__ import annotations

import pytest

from flopwise.scaling import bootstrap
from flopwise.scaling.plot import plot_bootstrap, plot_fit

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
