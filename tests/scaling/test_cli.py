from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from flopwise.cli import main
from flopwise.scaling import ScalingLaw

from .conftest import EPOCH_CSV, EPOCH_FIT


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
    assert "no such file" in capsys.readouterr().err


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
