"""The benchmark harness: refuses to time wrong providers, ratios, JSON rows, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from flopwise.cli import main
from flopwise.kernels import _dispatch, bench
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
    assert {r["op"] for r in rows} == {"topk_route", "topk_route+bias", "topk_route+group", "expert_choice",
                                         "mod_select"}
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert {"device", "torch", "triton", "date"} <= set(rows[0])


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc: a folder where no file can be made")
def test_cli_bench_refuses_an_unwritable_json_path_before_timing(tmp_path, capsys):
    # os.access says yes to root in /proc; the path failed only when the first case was written
    assert main(["bench", "routing", "--budget-ms", "1", "--json", "/proc/rows.json"]) == 2
    captured = capsys.readouterr()
    assert "json_path (--json) /proc/rows.json: cannot write in /proc" in captured.err
    assert "topk_route" not in captured.out
    assert main(["bench", "routing", "--json", str(tmp_path)]) == 2
    assert "is a folder; expected a file path" in capsys.readouterr().err
    assert main(["bench", "routing", "--json", str(tmp_path / "no" / "rows.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reports_bad_arguments(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown benchmark op" in capsys.readouterr().err
    for budget in ("-5", "0", "nan"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "routing", "--budget-ms", budget])
        assert exc.value.code == 2
        assert "--budget-ms: must be finite and > 0" in capsys.readouterr().err


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
    monkeypatch.setattr(_dispatch, "INTERPRET", False)  # as on a CUDA machine (else the guard refuses triton rows)
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


# ---------------------------------------------------------------- checks that cannot pass by luck
class _Pool:
    """The CUDA caching allocator in miniature: a block freed by one provider's output is
    handed, still holding its values, to the next allocation."""

    def __init__(self):
        self.free = []

    def empty(self, n):
        block = self.free.pop() if self.free else torch.full((n,), -1.0)
        out = block.view(n)
        weakref.finalize(out, self.free.append, block)
        return out


def test_a_provider_cannot_match_on_a_stale_output():
    x, pool = torch.arange(10.0), _Pool()

    def torch_op():
        out = pool.empty(10)
        out.copy_(x * 2)
        return out

    skips_every_row = lambda: pool.empty(10)  # noqa: E731 - a kernel that writes nothing
    case = Case(op="double", shape="n=10", providers={"reference": lambda: x * 2, "torch": torch_op,
                                                      "triton": skips_every_row},
                check=lambda out, ref: None if torch.equal(out, ref) else "values differ")
    rows = {r.provider: r for r in run_case(case, gpu=False, budget_ms=1)}
    assert rows["torch"].status == "ok"
    # were torch's output freed before triton ran, triton would get its block, correct values included
    assert rows["triton-interp"].status == "WRONG (values differ)" and rows["triton-interp"].ms is None


def test_check_calls_are_poisoned_and_timed_calls_are_not(monkeypatch):
    monkeypatch.setattr(_dispatch, "POISON", False)  # as in a user's run (the tests set FLOPWISE_POISON=1)
    x = torch.arange(10.0)
    # per call: whether outputs were being poisoned (the flag, not the memory: an unpoisoned
    # torch.empty may reuse the block of a NaN-filled output just freed) and whether this one was
    poisoned = {"torch": [], "triton": []}
    nan = {"torch": [], "triton": []}

    def op(name, rows):
        def fn():
            out = _dispatch.new_output((10,), dtype=torch.float32, device="cpu")
            poisoned[name].append(_dispatch.POISON)
            nan[name].append(bool(torch.isnan(out).all()))
            out[:rows] = x[:rows] * 2
            return out
        return fn

    def boom():
        raise RuntimeError("kaput")

    case = Case(op="double", shape="n=10", check=lambda out, ref: None if torch.equal(out, ref) else "values differ",
                providers={"reference": lambda: x * 2, "torch": op("torch", 10), "boom": boom,
                           "triton": op("triton", 5)})  # triton skips the last five rows
    rows = {r.provider: r for r in run_case(case, gpu=False, budget_ms=1)}
    assert rows["triton-interp"].status == "WRONG (values differ)"
    assert poisoned["triton"] == [True] and nan["triton"] == [True]
    assert rows["torch"].status == "ok" and poisoned["torch"][0] and nan["torch"][0] and len(poisoned["torch"]) >= 4
    assert not any(poisoned["torch"][1:])  # timed calls: no NaN fill
    assert _dispatch.POISON is False  # restored, after a crashing provider too


# ---------------------------------------------------------------- the rows really are Triton's
def test_cli_sets_triton_interpret_before_the_kernels_are_imported():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("from flopwise.cli import main\nrc = main(['bench', 'nope'])\n"
            "from flopwise.kernels import _dispatch\nprint('INTERPRET', _dispatch.INTERPRET, rc)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert f"INTERPRET {not torch.cuda.is_available()} 2" in out.stdout, out.stdout + out.stderr


def test_cli_sets_triton_interpret_only_for_bench_without_cuda(monkeypatch):
    from flopwise import cli

    for argv, cuda, expected in ((["bench", "routing"], False, "1"), (["--version"], False, None),
                                 (["train", "bench"], False, None), (["bench"], True, None)):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        cli._prepare_bench(argv)
        assert os.environ.get("TRITON_INTERPRET") == expected, (argv, cuda)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the user's own setting is kept (and bench refuses to run)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cli._prepare_bench(["bench"])
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.parametrize("setting", ["backend", "no-interpreter"])
def test_triton_rows_are_refused_when_the_dispatch_runs_the_reference(monkeypatch, capsys, setting):
    if setting == "backend":
        monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
        why = "FLOPWISE_BACKEND=reference"
    else:
        monkeypatch.setattr(_dispatch, "INTERPRET", False)  # TRITON_INTERPRET was set too late
        why = "TRITON_INTERPRET=1 was not set"
    rows = {r.provider: r for r in run_case(_case(lambda x: x * 2), gpu=False, budget_ms=1)}
    assert rows["triton-interp"].status.startswith("WRONG (backend is reference: ") and why in rows["triton-interp"].status
    assert rows["triton-interp"].ms is None and rows["torch"].status == "ok" and rows["torch"].ms > 0
    with pytest.raises(ValueError, match=why):
        bench.run(["routing"], print_fn=lambda s: None)
    assert main(["bench", "routing", "--budget-ms", "1"]) == 2
    assert why in capsys.readouterr().err


# ---------------------------------------------------------------- a non-finite reference
@dataclasses.dataclass
class _Plan:
    ids: torch.Tensor
    weights: torch.Tensor


def test_non_finite_reference_output_times_nothing():
    x = torch.arange(10.0)
    bad = lambda: (x, {"plan": _Plan(x.long(), x / 0)})  # noqa: E731 - 0/0 = NaN, deep inside
    case = Case(op="plan", shape="n=10", providers={"reference": bad, "torch": bad, "triton": bad},
                check=lambda out, ref: None)  # a check a NaN slips through
    rows = run_case(case, gpu=False, budget_ms=1)
    assert len(rows) == 3
    assert all(r.ms is None and r.status == "reference failed: non-finite output (output[1]['plan'].weights)"
               for r in rows), [r.status for r in rows]
    case.nonfinite_ok = True  # e.g. a -inf mask: declared, then checked and timed as usual
    assert all(r.status == "ok" and r.ms > 0 for r in run_case(case, gpu=False, budget_ms=1))


def test_non_finite_walker():
    import numpy as np

    nf = bench._nonfinite
    assert nf((torch.ones(2), [1.5, torch.arange(3)], {"a": np.zeros(2)}, np.arange(3), "text", None)) is None
    assert nf([torch.ones(2), float("inf")]) == "output[1]"
    assert nf({"a": np.array([1.0, np.nan])}) == "output['a']"
    assert nf(torch.topk(torch.tensor([1.0, float("-inf")]), 2)) == "output[0]"
    assert nf(torch.tensor([float("nan")], dtype=torch.bfloat16)) == "output"


# ---------------------------------------------------------------- the ratio's baseline, peak memory
def test_ratio_names_its_baseline(monkeypatch):
    plain = {r.provider: r for r in run_case(_case(lambda x: x * 2), gpu=False, budget_ms=1)}
    assert plain["triton-interp"].baseline == "torch" and "x vs " not in bench.format_table(list(plain.values()))
    _fake_gpu(monkeypatch, eager={"reference": 1.0, "torch": 0.4, "torch-index": 0.2, "triton": 0.1},
              graphed={"reference": 1.0, "torch": 0.1, "torch-index": RuntimeError("sync"), "triton": 0.05})
    x = torch.arange(10.0)
    case = Case(op="double", shape="n=10", graph=True,
                providers={"reference": lambda: x * 2, "torch": lambda: x * 2, "torch-index": lambda: x + x,
                           "triton": lambda: x + x},
                check=lambda out, ref: None if torch.equal(out, ref) else "values differ")
    rows = {r.provider: r for r in run_case(case, gpu=True, budget_ms=1)}
    k = rows["triton"]
    assert k.vs_torch == pytest.approx(2.0) and k.baseline == "torch-index"
    assert k.graph_vs_torch == pytest.approx(2.0) and k.graph_baseline == "torch"
    assert rows["reference"].baseline == "torch-index" and rows["reference"].graph_baseline is None
    table = bench.format_table(list(rows.values()))
    assert "2.00x vs torch-index" in table  # eager: the unusual baseline is named; graph: the usual one
    assert bench._row_line(k).endswith("0.100 ms, 2.00x torch-index, graph 0.050 ms, graph 2.00x torch [ok]")


def test_peak_memory_is_taken_on_a_second_call(monkeypatch):
    _fake_gpu(monkeypatch, eager={"reference": 1.0, "torch": 0.2, "triton": 0.4}, graphed={})
    peak = [0]
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: peak.__setitem__(0, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: peak[0] * 2**20)
    x = torch.arange(10.0)
    calls = {"torch": 0, "triton": 0}

    def provider(name, first_mib, later_mib):
        def fn():
            calls[name] += 1  # the first call autotunes: scratch it never needs again
            peak[0] = max(peak[0], first_mib if calls[name] == 1 else later_mib)
            return x * 2
        return fn

    case = Case(op="double", shape="n=10", check=lambda out, ref: None,
                providers={"reference": lambda: x * 2, "torch": provider("torch", 5, 5),
                           "triton": provider("triton", 300, 8)})
    rows = {r.provider: r for r in run_case(case, gpu=True, budget_ms=1)}
    assert rows["triton"].peak_mb == 8 and rows["torch"].peak_mb == 5
    assert calls == {"torch": 2, "triton": 2}  # the check call, the memory call (the fake timer calls nothing)


# ---------------------------------------------------------------- the JSON file's run header
def _fake_suite(monkeypatch, fail_after_first: bool):
    def cases(gpu):
        yield _case(lambda x: x * 2)
        if fail_after_first:
            raise RuntimeError("time limit")
        yield _case(lambda x: x + x)

    mod = types.ModuleType("fake_bench_suite")
    mod.cases = cases
    monkeypatch.setitem(sys.modules, "fake_bench_suite", mod)
    monkeypatch.setitem(bench.SUITES, "fake", "fake_bench_suite")


def test_json_rows_carry_the_run_header(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOPWISE_AUTOTUNE", "0")
    path = tmp_path / "rows.json"
    _fake_suite(monkeypatch, fail_after_first=False)
    assert main(["bench", "fake", "--budget-ms", "2", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())
    assert isinstance(rows, list) and len(rows) == 6 and {r["op"] for r in rows} == {"double"}  # the old layout
    head = rows[0]["run"]
    assert all(r["run"] == head for r in rows)
    assert head["complete"] is True and head["budget_ms"] == 2.0 and head["suites"] == ["fake"]
    assert head["env"]["FLOPWISE_AUTOTUNE"] == "0" and head["env"]["FLOPWISE_POISON"] == "1"
    assert all(k.startswith("FLOPWISE_") or k == "TRITON_INTERPRET" for k in head["env"])
    root = Path(bench.__file__).resolve().parents[2]
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    is_checkout = git.returncode == 0 and (root / ".git").exists()
    assert head["commit"] == (git.stdout.strip() if is_checkout else None)
    assert isinstance(head["dirty"], bool) if is_checkout else head["dirty"] is None
    assert rows[0]["baseline"] == "torch"


def test_json_of_an_unfinished_run_says_so(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    _fake_suite(monkeypatch, fail_after_first=True)
    with pytest.raises(RuntimeError, match="time limit"):
        bench.run(["fake"], json_path=str(path), budget_ms=1, print_fn=lambda s: None)
    rows = json.loads(path.read_text())
    assert len(rows) == 3 and all(r["run"]["complete"] is False for r in rows)


def test_git_commit_outside_a_checkout(tmp_path):
    assert bench._git_commit(tmp_path) == (None, None)
