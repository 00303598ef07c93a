"""scripts/tune_grouped_mm.py drives the grouped-matmul launchers directly (each launch of the
MoE layer on its own): it must keep up with their signatures. Run here under the interpreter
with the timer replaced; each stage's output is checked against moe_mlp's own backward."""

from __future__ import annotations

import pytest
import torch

from flopwise.kernels import moe_mlp, topk_route
from flopwise.kernels._dispatch import INTERPRET
from ..conftest import load_script


@pytest.mark.skipif(not INTERPRET, reason="needs the Triton interpreter (tests/conftest.py sets it)")
def test_stage_times_runs_every_launch(capsys):
    mod = load_script("tune_grouped_mm")
    calls = []

    def fake_bench(fn, **kwargs):
        calls.append(fn())
        return 1.0

    mod.do_bench = fake_bench
    torch.manual_seed(0)
    T, D, Fh, E, k = 40, 32, 48, 4, 2
    x = torch.randn(T, D)
    wg, wu = torch.randn(E, D, Fh) / D**0.5, torch.randn(E, D, Fh) / D**0.5
    wd = torch.randn(E, Fh, D) / Fh**0.5
    gy = torch.randn(T, D)
    plan = topk_route(torch.randn(T, E), k, renormalize=True, block_m=16)
    out = mod.stage_times("tiny", x, plan, wg, wu, wd, gy)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiny")]
    assert len(lines) == 6 and len(calls) == 6
    # each launch ran once: the stages' outputs are moe_mlp's forward and gradients
    leaves = [t.clone().requires_grad_(True) for t in (x, wg, wu, wd)]
    y = moe_mlp(leaves[0], plan, *leaves[1:])
    dx, dwg, dwu, dwd = torch.autograd.grad(y, leaves, gy)
    for name, ref in (("y", y), ("dx", dx), ("dw_gate", dwg), ("dw_up", dwu), ("dw_down", dwd)):
        torch.testing.assert_close(out[name], ref.detach(), rtol=1e-4, atol=1e-5, msg=name)
