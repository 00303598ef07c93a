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


def _fake_gpu(monkeypatch, eager: dict, graphed: dict):
    """run_case(gpu=True) on a CPU: the CUDA calls and both timers replaced; providers are
    told apart by the order the harness times them (the order of Case.providers)."""
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(bench, "copy_bandwidth_tbps", lambda: 3.0)
    order = iter(eager)
    current = []

    def time_eager(fn, gpu, budget_ms):
        current.append(next(order))
        return eager[current[-1]]

    def time_graph(fn, budget_ms):
        t = graphed[current[-1]]
        if isinstance(t, Exception):
            raise t
        return t

    monkeypatch.setattr(bench, "_time_ms", time_eager)
    monkeypatch.setattr(bench, "_time_graph_ms", time_graph)


def test_graph_replay_timing_and_ratio(monkeypatch):
    _fake_gpu(monkeypatch, eager={"reference": 1.0, "torch": 0.2, "triton": 0.4},
              graphed={"reference": 1.0, "torch": 0.1, "triton": 0.02})
    case = _case(lambda x: x * 2)
    case.graph = True
    rows = {r.provider: r for r in run_case(case, gpu=True, budget_ms=1)}
    k = rows["triton"]
    # host-bound eager call: slower than torch; replayed from a graph: 5x faster
    assert k.vs_torch == pytest.approx(0.5) and k.graph_ms == 0.02 and k.graph_vs_torch == pytest.approx(5.0)
    table = bench.format_table(list(rows.values()))
    assert "graph vs torch" in table and "5.00x" in table and "20.0" in table


def test_graph_capture_failure_keeps_eager_numbers(monkeypatch):
    _fake_gpu(monkeypatch, eager={"reference": 1.0, "torch": 0.2, "triton": 0.4},
              graphed={"reference": 1.0, "torch": RuntimeError("operation not permitted when stream is capturing"), "triton": 0.02})
    case = _case(lambda x: x * 2)
    case.graph = True
    rows = {r.provider: r for r in run_case(case, gpu=True, budget_ms=1)}
    assert rows["torch"].ms == 0.2 and rows["torch"].graph_ms is None
    assert "no graph: RuntimeError" in rows["torch"].status
    assert rows["triton"].graph_ms == 0.02 and rows["triton"].graph_vs_torch is None  # nothing to compare with
    assert rows["triton"].vs_torch == pytest.approx(0.5)


def test_graph_columns_only_when_a_case_asks():
    rows = run_case(_case(lambda x: x * 2), gpu=False, budget_ms=1)
    assert "graph" not in bench.format_table(rows)


def test_graph_skip_tries_no_capture(monkeypatch):
    _fake_gpu(monkeypatch, eager={"reference": 1.0, "torch": 0.2, "triton": 0.4},
              graphed={"reference": 1.0, "torch": AssertionError("capture attempted"), "triton": 0.02})
    case = _case(lambda x: x * 2)
    case.graph, case.graph_skip = True, ("torch",)
    rows = {r.provider: r for r in run_case(case, gpu=True, budget_ms=1)}
    assert rows["torch"].graph_ms is None and rows["torch"].status == "ok"
    assert rows["triton"].graph_ms == 0.02
