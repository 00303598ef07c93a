"""The benchmark harness: refuses to time wrong providers, ratios, JSON rows, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from flopwise.cli import main
from flopwise.kernels import bench
from flopwise.kernels.bench import Case, run_case


def _case(torch_out):
    x = torch.arange(10.0)
    return Case(
        op="double", shape="n=10",
        providers={"reference": lambda: x * 2, "torch": lambda: torch_out(x), "triton": lambda: x + x},
        check=lambda out, ref: None if torch.equal(out, ref) else "values differ",
        bytes=80, flops=10,
    )


def test_wrong_provider_is_not_timed():
    rows = {r.provider: r for r in run_case(_case(lambda x: x * 3), gpu=False, budget_ms=1)}
    assert rows["torch"].status.startswith("WRONG") and rows["torch"].ms is None
    assert rows["torch"].vs_torch is None
    assert rows["triton-interp"].status == "ok" and rows["triton-interp"].ms > 0
    assert rows["triton-interp"].vs_torch is None  # no correct torch provider to compare with


def test_crashing_provider_is_reported():
    def boom(x):
        raise RuntimeError("kaput")

    rows = {r.provider: r for r in run_case(_case(boom), gpu=False, budget_ms=1)}
    assert "kaput" in rows["torch"].status and rows["torch"].ms is None


def test_ratio_rates_and_environment():
    rows = {r.provider: r for r in run_case(_case(lambda x: x * 2), gpu=False, budget_ms=1)}
    t, k = rows["torch"], rows["triton-interp"]
    assert t.vs_torch == pytest.approx(1.0)
    assert k.vs_torch == pytest.approx(t.ms / k.ms)
    assert k.tbps == pytest.approx(80 / (k.ms * 1e-3) / 1e12)
    assert k.tflops == pytest.approx(10 / (k.ms * 1e-3) / 1e12)
    assert k.device == "cpu" and k.torch == torch.__version__ and k.date


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="unknown benchmark op"):
        bench.run(["nope"], print_fn=lambda s: None)


def test_cli_bench_routing_writes_json(tmp_path, capsys):
    path = tmp_path / "rows.json"
    assert main(["bench", "routing", "--budget-ms", "1", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "GPU numbers need a GPU" in text and "topk_route" in text and "mod_select" in text
    rows = json.loads(path.read_text())
    assert {r["op"] for r in rows} == {"topk_route", "expert_choice", "mod_select"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert {"device", "torch", "triton", "date"} <= set(rows[0])


def test_cli_reports_bad_arguments(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark op" in capsys.readouterr().err


def test_mfu_and_case_budget(monkeypatch):
    budgets = []
    real = bench._time_ms
    monkeypatch.setattr(bench, "_time_ms", lambda fn, gpu, budget_ms: budgets.append(budget_ms) or real(fn, gpu, 0))
    case = _case(lambda x: x * 2)
    case.peak_flops, case.budget_ms = 1e6, 30.0
    rows = {r.provider: r for r in run_case(case, gpu=False, budget_ms=0)}
    k = rows["triton-interp"]
    assert k.mfu == pytest.approx(k.tflops * 1e12 / 1e6)
    assert budgets == [30.0, 30.0, 30.0]  # the case's budget, not the run's


def test_failing_reference_times_nothing_and_the_run_goes_on():
    case = _case(lambda x: x * 2)

    def boom():
        raise MemoryError("out of memory")

    case.providers["reference"] = boom
    rows = run_case(case, gpu=False, budget_ms=1)
    assert len(rows) == 3
    assert all(r.ms is None and r.status.startswith("reference failed: MemoryError") for r in rows)
