"""``flopwise bench mod_step``: the check refuses a MoD step whose forward or backward is
wrong, and passes the real providers (fp32 on CPU; bf16 at a shape where a dropped MoD
update moves the loss by less than 2%)."""

from __future__ import annotations

import pytest
import torch

from flopwise.kernels.bench import run_case
from flopwise.models import bench as mod_bench
from flopwise.models.mod import MoDBlock

_scatter = MoDBlock._scatter


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``k`` (0: a zeroed gradient,
    NaN: a poisoned one)."""

    @staticmethod
    def forward(ctx, f, k):
        ctx.k = k
        return f.view_as(f)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.k, None


def _break_kernels_scatter(monkeypatch, how: str):
    """Break the scatter of the kernel MoD (the ``triton`` provider's model) only."""

    def scatter(self, x, f, idx, w, inplace=False):
        if self.cfg.impl != "kernels":
            return _scatter(self, x, f, idx, w, inplace)
        if how == "drop":  # every MoD block's update lost (the graph kept: zero gradients)
            return x + 0 * f.sum()
        return _scatter(self, x, _ScaleGrad.apply(f, 0.0 if how == "zero grad" else float("nan")), idx, w, inplace)

    monkeypatch.setattr(MoDBlock, "_scatter", scatter)


def _statuses(case) -> dict[str, str]:
    return {r.provider: r.status for r in run_case(case, gpu=False, budget_ms=1)}


def _cpu_case():
    mod_case, _ = mod_bench.cases(gpu=False)
    return mod_case


def test_real_providers_pass():
    assert set(_statuses(_cpu_case()).values()) == {"ok"}


@pytest.mark.parametrize("how", ["zero grad", "nan grad"])
def test_wrong_backward_is_refused(monkeypatch, how):
    """A MoD backward that zeroes (or poisons) the block's gradient leaves the loss exactly
    as it was: only a gradient check sees it."""
    _break_kernels_scatter(monkeypatch, how)
    status = _statuses(_cpu_case())
    assert status["reference"] == status["torch"] == "ok"
    assert status["triton-interp"].startswith("WRONG"), status


def test_nan_reference_refuses_the_others():
    ref = _cpu_case().providers["reference"]()
    bad = mod_bench.StepCheck(torch.tensor(float("nan")), ref.grads)
    check = mod_bench._step_check(torch.float32)
    assert check(ref, ref) is None
    assert "non-finite reference" in check(ref, bad)
    assert "non-finite loss" in check(bad, ref)
    inf_grads = {n: (None if g is None else torch.full_like(g, float("inf"))) for n, g in ref.grads.items()}
    assert "gradient relative error" in check(mod_bench.StepCheck(ref.loss, inf_grads), ref)
    assert "no gradients" in check(ref.loss, ref)  # a bare loss cannot pass


def test_bf16_dropped_update_is_refused_and_real_providers_pass(monkeypatch):
    """bf16 on CPU (4 layers, D=256, S=256): the torch and kernel MoD steps agree within the
    GPU tolerances, and a scatter that drops every MoD update, which moves the loss by
    less than the old 2e-2 loss-only tolerance, is refused."""

    def case():
        return mod_bench._cases_for("tiny", dict(d_model=256, n_layers=4, n_heads=2, d_ff=704), B=1, S=256,
                                    dtype=torch.bfloat16, device="cpu")[0]

    good = case()
    ref = good.providers["reference"]()
    assert good.check(good.providers["triton"](), ref) is None
    _break_kernels_scatter(monkeypatch, "drop")
    dropped = case().providers["triton"]()
    loss, ref_loss = getattr(dropped, "loss", dropped), getattr(ref, "loss", ref)
    assert 5e-3 < float((loss - ref_loss).abs() / ref_loss) < 2e-2  # under the old loss-only tolerance
    assert good.check(dropped, ref) is not None
    # the gradients alone refuse it, whatever the loss tolerance
    assert "gradient relative error" in good.check(mod_bench.StepCheck(ref.loss, dropped.grads), ref)
