from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from flopwise.cli import main
from flopwise.scaling import ScalingLaw

from .conftest import EPOCH_CSV, EPOCH_FIT, loss_without_d_dependence


def _json(capsys):
    out = capsys.readouterr().out
    return json.loads(out)


def test_fit_epoch_bootstrap_json(capsys, tmp_path, epoch_data):  # epoch_data: skips without the shared file
    argv = ["scaling", "fit", str(EPOCH_CSV), "--epoch", "--bootstrap", "200", "--seed", "1", "--json"]
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    if has_mpl:  # one fit also covers --plot (the fit figure and the bootstrap figure)
        argv += ["--plot", str(tmp_path / "fit.png")]
    assert main(argv) == 0
    if has_mpl:
        assert (tmp_path / "fit.png").stat().st_size > 10_000
        assert (tmp_path / "fit_bootstrap.png").stat().st_size > 5_000
    out = _json(capsys)
    assert set(out["params"]) == {"E", "A", "B", "alpha", "beta"}
    assert out["n_runs"] == 240 and out["objective"] == "huber_likelihood"
    assert out["a"] == pytest.approx(0.513, abs=5e-4)
    for name in ("E", "A", "B", "alpha", "beta"):
        p = out["params"][name]
        if name != "E":
            assert p["estimate"] == pytest.approx(EPOCH_FIT[name], rel=1e-3)
        assert p["se"] > 0
        lo, hi = p["interval"]
        assert lo < p["estimate"] < hi
    assert out["bootstrap"]["n"] == 200 and out["bootstrap"]["objective"] == "huber"
    assert "tokens_per_parameter" in out["bootstrap"]["derived"]


def test_fit_text_and_custom_columns(capsys, tmp_path):
    law = ScalingLaw(E=1.7, A=400.0, B=1000.0, alpha=0.33, beta=0.30)
    rng = np.random.default_rng(0)
    N, D = 10 ** rng.uniform(7, 10, 30), 10 ** rng.uniform(8, 12, 30)
    L = law.loss(N, D)
    p = tmp_path / "runs.csv"
    p.write_text("params,tokens,xent\n" + "\n".join(f"{a},{b},{c}" for a, b, c in zip(N, D, L)) + "\n")
    argv = ["scaling", "fit", str(p), "--n-col", "params", "--d-col", "tokens", "--loss-col", "xent"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "30 runs" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("alpha"))
    assert float(line.split()[1]) == pytest.approx(0.33, rel=1e-3)


def test_fit_errors_are_reported(capsys, tmp_path):
    p = tmp_path / "runs.csv"
    p.write_text("N,D,loss\n1e8,1e9,3\n")
    assert main(["scaling", "fit", str(p), "--c-col", "C"]) == 2
    assert "missing column" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path / "nope.csv")]) == 2
    assert "error: FILE: no such file" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path)]) == 2
    assert "is a folder, not a CSV file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # one of them used to be ignored
        main(["scaling", "fit", str(p), "--c-col", "C", "--d-col", "D"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1e23", "-1E+23", "-2.5e-3", "-5"])
def test_negative_numbers_reach_the_option_check(capsys, value):
    # argparse before Python 3.13 took "-1e23" for an option ("expected one argument")
    with pytest.raises(SystemExit) as exc:
        main(["scaling", "optimal", "--compute", value])
    assert exc.value.code == 2
    assert f"must be finite and > 0: {value!r}" in capsys.readouterr().err


def test_optimal_prints_no_negative_zero(capsys):
    assert main(["scaling", "optimal", "--compute", "1e23", "--law", "hoffmann", "--inference-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "(0.0% less)" in out and "-0.0" not in out


def test_optimal_json(capsys):
    assert main(["scaling", "optimal", "--compute", "5.88e23", "--law", "epoch", "--json"]) == 0
    out = _json(capsys)
    n, d = ScalingLaw.epoch().optimal(5.88e23)
    assert out["N_opt"] == pytest.approx(n) and out["D_opt"] == pytest.approx(d)
    assert out["tokens_per_parameter"] == pytest.approx(d / n)
    assert main(["scaling", "optimal", "--compute", "1e23", "--law", "hoffmann", "--inference-tokens", "1e13"]) == 0
    text = capsys.readouterr().out
    assert "law hoffmann" in text and "less" in text
    assert main(["scaling", "optimal", "--compute", "1e23", "--law", "nope"]) == 2
    assert "unknown law" in capsys.readouterr().err


def test_decompose(capsys):
    assert main(["scaling", "decompose", "--law", "hoffmann", "--models", "gpt3,gopher,chinchilla", "--json"]) == 0
    out = _json(capsys)
    assert [r["model"] for r in out["rows"]] == ["gpt3", "gopher", "chinchilla"]
    chin = out["rows"][2]
    assert chin["loss"] == pytest.approx(ScalingLaw.hoffmann().loss(70e9, 1.4e12))
    assert main(["scaling", "decompose", "--law", "epoch"]) == 0
    assert "chinchilla" in capsys.readouterr().out
    assert main(["scaling", "decompose", "--models", "gpt9"]) == 2


def test_scaling_without_subcommand_prints_help(capsys):
    assert main(["scaling"]) == 2
    assert "fit" in capsys.readouterr().out


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_unreliable_fit_is_flagged_with_valid_json(capsys, tmp_path):
    data = loss_without_d_dependence()
    p = tmp_path / "flat.csv"
    p.write_text("N,D,loss\n" + "\n".join(f"{float(a)!r},{float(b)!r},{float(c)!r}" for a, b, c in zip(data.N, data.D, data.loss)) + "\n")
    assert main(["scaling", "fit", str(p), "--bootstrap", "50", "--json"]) == 1
    captured = capsys.readouterr()
    out = _strict_json(captured.out)
    assert out["converged"] is False
    assert any("beta" in w for w in out["warnings"])
    assert out["bootstrap"]["n_failed"] > 0
    assert "flopwise: warning: " in captured.err and "did not converge" in captured.err
    assert main(["scaling", "fit", str(p)]) == 1
    assert "NOT converged" in capsys.readouterr().out


def test_json_maps_non_finite_to_null(capsys):
    from flopwise._cli_scaling import _print_json

    _print_json({"se": float("nan"), "interval": [float("-inf"), 1.0]})
    assert _strict_json(capsys.readouterr().out) == {"se": None, "interval": [None, 1.0]}


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--bootstrap", "1"], "--bootstrap must be 0 (off) or >= 2"),
        (["--drop-highest", "-1"], "--drop-highest must be >= 0"),
        (["--seed", "-1", "--bootstrap", "5"], "--seed must be an integer >= 0"),
        (["--level", "95"], "--level must be in (0, 1)"),
        (["--drop-highest", "30"], "--drop-highest (30) must be smaller"),
        (["--loss-col", "xent"], "'xent' (--loss-col)"),
        # Options of the bootstrap used to be ignored without it.
        (["--seed", "3"], "--seed only applies to the bootstrap: add --bootstrap N"),
        (["--level", "0.9", "--bootstrap-objective", "huber"],
         "--level, --bootstrap-objective only apply to the bootstrap: add --bootstrap N"),
        (["--d-col", "N"], "--n-col and --d-col both name column 'N'"),
    ],
)
def test_fit_errors_name_flags(capsys, tmp_path, monkeypatch, extra, match):
    from flopwise import scaling

    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("bad flags must fail before fitting"))
    p = tmp_path / "runs.csv"
    N = np.geomspace(1e8, 1e10, 6).repeat(5)
    p.write_text("N,D,loss\n" + "\n".join(f"{n},{20 * n},3" for n in N) + "\n")
    assert main(["scaling", "fit", str(p), *extra]) == 2
    assert match in capsys.readouterr().err


def test_missing_token_column_names_flags(capsys, tmp_path):
    p = tmp_path / "runs.csv"
    p.write_text("N,tokens,loss\n1e8,1e9,3\n")
    assert main(["scaling", "fit", str(p)]) == 2
    assert "--d-col or --c-col" in capsys.readouterr().err


def test_plot_without_matplotlib_fails_before_fitting(capsys, tmp_path, monkeypatch):
    import sys

    from flopwise import scaling

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("must not fit when it cannot plot"))
    p = tmp_path / "runs.csv"
    p.write_text("N,D,loss\n" + "\n".join(f"{n},{20 * n},3" for n in np.geomspace(1e8, 1e10, 6).repeat(5)) + "\n")
    assert main(["scaling", "fit", str(p), "--plot", str(tmp_path / "fig.png")]) == 2
    assert "--plot: plotting needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("plot, expected", [("a.b/fig", ("a.b/fig.png", "a.b/fig_bootstrap.png")),
                                            ("fig", ("fig.png", "fig_bootstrap.png")),
                                            ("out/fig.svg", ("out/fig.svg", "out/fig_bootstrap.svg"))])
def test_plot_file_names(capsys, tmp_path, monkeypatch, plot, expected):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    for folder in ("a.b", "out"):
        (tmp_path / folder).mkdir()
    law = ScalingLaw(E=1.7, A=400.0, B=1000.0, alpha=0.33, beta=0.30)
    N = np.geomspace(1e8, 1e10, 6).repeat(5)
    D = np.tile(np.geomspace(1e9, 1e11, 5), 6)
    rng = np.random.default_rng(0)
    L = law.loss(N, D) * np.exp(rng.normal(0, 0.005, 30))
    (tmp_path / "runs.csv").write_text("N,D,loss\n" + "\n".join(f"{a},{b},{c}" for a, b, c in zip(N, D, L)) + "\n")
    assert main(["scaling", "fit", "runs.csv", "--bootstrap", "5", "--plot", plot]) == 0
    assert "bootstrap: 5 resamples" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p.name != "runs.csv")
    assert written == sorted(expected)


def test_optimal_at_huge_compute(capsys):
    assert main(["scaling", "optimal", "--compute", "1e300", "--inference-tokens", "1e13"]) == 2
    err = capsys.readouterr().err
    assert "--compute 1e+300: the predicted loss there" in err and "within rounding" in err
    assert main(["scaling", "optimal", "--compute", "1e300"]) == 0
    assert "D/N = 1.98e-06" in capsys.readouterr().out


def _law_csv(path):
    law = ScalingLaw(E=1.7, A=400.0, B=1000.0, alpha=0.33, beta=0.30)
    N = np.geomspace(1e8, 1e10, 6).repeat(5)
    D = np.tile(np.geomspace(1e9, 1e11, 5), 6)
    L = law.loss(N, D) * np.exp(np.random.default_rng(0).normal(0, 0.005, 30))
    path.write_text("N,D,loss\n" + "\n".join(f"{a},{b},{c}" for a, b, c in zip(N, D, L)) + "\n")
    return path


def test_bootstrap_too_large_for_memory_fails_before_fitting(capsys, tmp_path, monkeypatch):
    import importlib

    from flopwise import scaling

    monkeypatch.setattr(importlib.import_module("flopwise.scaling.bootstrap"), "_physical_memory", lambda: 10**9,
                        raising=False)
    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("must refuse before fitting"))
    assert main(["scaling", "fit", str(_law_csv(tmp_path / "runs.csv")), "--bootstrap", "100000000"]) == 2
    assert "--bootstrap (100000000) resamples would need about 24 GB" in capsys.readouterr().err


def test_plot_into_an_existing_folder_fails_before_fitting(capsys, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from flopwise import scaling

    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("must refuse before fitting"))
    (tmp_path / "figs").mkdir()
    (tmp_path / "fig.png").mkdir()
    csv = str(_law_csv(tmp_path / "runs.csv"))
    for plot in ("figs", "figs/", "fig.png", "fig"):
        assert main(["scaling", "fit", csv, "--plot", str(tmp_path / plot)]) == 2
        assert "names a folder, not an image file" in capsys.readouterr().err


def test_plot_failing_after_the_fit_is_not_an_unreliable_fit(capsys, tmp_path, monkeypatch):
    # Exit 1 says "results not to be relied on"; a figure that cannot be written is not that.
    pytest.importorskip("matplotlib")
    from flopwise.scaling import plot as splot

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(splot, "plot_fit", disk_full)
    argv = ["scaling", "fit", str(_law_csv(tmp_path / "runs.csv")), "--plot", str(tmp_path / "fig.png")]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert "30 runs" in captured.out
    assert "--plot: the results above were printed, but a figure could not be written" in captured.err
    assert "No space left on device" in captured.err


def test_bootstrap_figure_follows_the_default_format(capsys, tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    monkeypatch.setitem(matplotlib.rcParams, "savefig.format", "svg")
    monkeypatch.chdir(tmp_path)
    _law_csv(tmp_path / "runs.csv")
    assert main(["scaling", "fit", "runs.csv", "--bootstrap", "5", "--plot", "fig"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "runs.csv") == ["fig.svg", "fig_bootstrap.svg"]


def test_unreadable_csv_is_bad_input(capsys, tmp_path, monkeypatch):
    from flopwise import scaling

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(scaling, "load_csv", denied)
    assert main(["scaling", "fit", str(tmp_path / "runs.csv")]) == 2
    assert "runs.csv: cannot read the file (Permission denied)" in capsys.readouterr().err


def test_drop_highest_ties_warning_names_the_flag(capsys, tmp_path, monkeypatch):
    from flopwise import scaling

    monkeypatch.setattr(scaling, "fit", lambda *a, **k: pytest.fail("stop after reading"))
    p = tmp_path / "runs.csv"
    losses = [3.0] * 3 + list(np.linspace(2.9, 2.0, 27))
    p.write_text("N,D,loss\n" + "\n".join(f"{n},{20 * n},{l}" for n, l in zip(np.geomspace(1e8, 1e10, 30), losses)) + "\n")
    with pytest.raises(pytest.fail.Exception):
        main(["scaling", "fit", str(p), "--drop-highest", "2"])
    assert "flopwise: warning: runs.csv: --drop-highest (2): dropped 3 runs, not 2" in capsys.readouterr().err


def test_optimal_prints_huge_and_tiny_numbers_in_general_format(capsys):
    assert main(["scaling", "optimal", "--compute", "1e23", "--inference-tokens", "1e40"]) == 0
    out = capsys.readouterr().out
    assert "(1.318e+20x)" in out and "(0.15x)" in out
    assert main(["scaling", "optimal", "--compute", "1e-300"]) == 0
    assert "loss 8.292e+56 " in capsys.readouterr().out
    assert main(["scaling", "optimal", "--compute", "5.88e23"]) == 0
    assert "loss 1.9739 " in capsys.readouterr().out
