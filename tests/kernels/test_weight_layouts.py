"""Expert weights in other layouts than ``[E, in, out]``: transposed views of ``[E, out, in]``
storage (``nn.Linear``'s layout; Hugging Face's fused ``gate_up_proj`` and ``down_proj``) and
the fused gate-up weight (``moe_mlp(..., w_up=None)``). The kernels read them in place and
write each gradient in its weight's own layout; results and every gradient match the
reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from flopwise.kernels import grouped_mm, grouped_mm_reference, moe_mlp, moe_mlp_reference, topk_route
from flopwise.kernels._dispatch import deterministic_algorithms

G = importlib.import_module("flopwise.kernels.grouped_mm")

from ..conftest import rel_err  # noqa: E402


def _hf_weights(E, D, Fh, dtype=torch.float32):
    """Hugging Face's expert storage: gate_up_proj [E, 2F, D] (gate rows, then up rows) and
    down_proj [E, D, F]."""
    return (torch.randn(E, 2 * Fh, D) / 4).to(dtype), (torch.randn(E, D, Fh) / 4).to(dtype)


def _run(fn, x, logits, params, gy, k):
    x = x.clone().requires_grad_(True)
    lg = logits.clone().requires_grad_(True)
    ps = [p.clone().requires_grad_(True) for p in params]
    plan = topk_route(lg, k, renormalize=True, block_m=16)
    y = fn(x, plan, *ps)
    (y.float() * gy).sum().backward()
    return [y, x.grad, lg.grad] + [p.grad for p in ps], ps


def _fused(x, plan, gu, dn):
    return moe_mlp(x, plan, gu.transpose(1, 2), None, dn.transpose(1, 2))


def _split(x, plan, gu, dn):  # the same weights as two transposed views
    F2 = gu.shape[1] // 2
    return moe_mlp(x, plan, gu[:, :F2].transpose(1, 2), gu[:, F2:].transpose(1, 2), dn.transpose(1, 2))


def _reference(x, plan, gu, dn):
    F2 = gu.shape[1] // 2
    return moe_mlp_reference(x, plan, gu[:, :F2].transpose(1, 2), gu[:, F2:].transpose(1, 2), dn.transpose(1, 2))


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("T,E,k,D,Fh,case", [
    (1, 1, 1, 16, 24, "plain"),
    (37, 5, 2, 24, 40, "empty_expert"),
    (20, 3, 3, 16, 300, "plain"),   # k = E; F = 300: several column tiles
    (33, 4, 1, 16, 24, "one_expert"),
], ids=["T1-E1", "T37-empty-expert", "k=E-F300", "all-to-one"])
@pytest.mark.parametrize("call", [_fused, _split], ids=["fused", "two-views"])
def test_hf_layout_matches_reference(deterministic, T, E, k, D, Fh, case, call):
    x, logits, gy = torch.randn(T, D), torch.randn(T, E), torch.randn(T, D)
    if case == "empty_expert":
        logits[:, -1] -= 100.0
    elif case == "one_expert":
        logits[:, 1] += 100.0
    params = _hf_weights(E, D, Fh)
    with deterministic_algorithms(deterministic):
        got, ps = _run(call, x, logits, params, gy, k)
    ref, _ = _run(_reference, x, logits, params, gy, k)
    for name, a, b in zip(["y", "dx", "dlogits", "d gate_up_proj", "d down_proj"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)
    # the parameters' gradients arrive in the parameters' own (contiguous) layout
    for p in ps:
        assert p.grad.stride() == p.stride()
    if case == "empty_expert":
        assert (got[3][-1] == 0).all() and (got[4][-1] == 0).all(), "an expert with no rows gets zero gradient"


def test_hf_layout_bf16():
    T, E, k, D, Fh = 40, 4, 2, 32, 72
    x, logits, gy = torch.randn(T, D).bfloat16(), torch.randn(T, E), torch.randn(T, D)
    params = _hf_weights(E, D, Fh, torch.bfloat16)
    got, _ = _run(_fused, x, logits, params, gy, k)
    ref, _ = _run(_reference, x.float(), logits, [p.float() for p in params], gy, k)
    for name, a, b in zip(["y", "dx", "dlogits", "d gate_up_proj", "d down_proj"], got, ref):
        assert a.dtype == (torch.float32 if name == "dlogits" else torch.bfloat16), name
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


def test_weights_are_read_in_place_and_gradients_written_in_their_layout(monkeypatch):
    """No copy of a transposed or fused weight: every launch reads the parameter's own
    storage, and the weight-gradient kernel writes the fused gradient's two halves."""
    T, E, k, D, Fh = 24, 3, 2, 16, 24
    gu, dn = [p.requires_grad_(True) for p in _hf_weights(E, D, Fh)]
    storages = {gu.untyped_storage().data_ptr(): "gate_up_proj", dn.untyped_storage().data_ptr(): "down_proj"}
    read, written = [], []
    real_rows, real_dw = G._launch_rows, G._launch_dw

    def rows(a, w_t, *args, **kw):
        read.append((storages.get(w_t.untyped_storage().data_ptr()), kw.get("transpose_w", False)))
        return real_rows(a, w_t, *args, **kw)

    def dw(a, plan, g, dw_, **kw):
        written.append((dw_.stride(), None if kw.get("dw2") is None else kw["dw2"].data_ptr() - dw_.data_ptr()))
        return real_dw(a, plan, g, dw_, **kw)

    monkeypatch.setattr(G, "_launch_rows", rows)
    monkeypatch.setattr(G, "_launch_dw", dw)
    x = torch.randn(T, D, requires_grad=True)
    y = _fused(x, topk_route(torch.randn(T, E), k, block_m=16), gu, dn)
    y.sum().backward()
    # forward: gate/up then down read transposed; backward: dY Wd^T and dX read them as stored
    assert read == [("gate_up_proj", True), ("down_proj", True), ("down_proj", False), ("gate_up_proj", False)]
    # dW_down, then dW_gate and dW_up: halves of one [E, 2F, D] buffer, K the unit stride
    el = gu.element_size()
    assert written == [((D * Fh, 1, Fh), None), ((2 * Fh * D, 1, D), Fh * D * el)]
    assert gu.grad.shape == gu.shape and dn.grad.shape == dn.shape


def test_mixed_layouts_of_gate_and_up_are_copied_and_correct():
    """Gate and up in different layouts cannot share one launch's strides: they are copied,
    and the result is still right."""
    T, E, k, D, Fh = 21, 3, 2, 16, 24
    x, logits, gy = torch.randn(T, D), torch.randn(T, E), torch.randn(T, D)
    wg_t = torch.randn(E, Fh, D) / 4           # stored [E, F, D], passed transposed
    wu = torch.randn(E, D, Fh) / 4             # stored [E, D, F]
    wd = torch.randn(E, Fh, D) / 4
    got, _ = _run(lambda x, p, a, b, c: moe_mlp(x, p, a.transpose(1, 2), b, c), x, logits, [wg_t, wu, wd], gy, k)
    ref, _ = _run(lambda x, p, a, b, c: moe_mlp_reference(x, p, a.transpose(1, 2), b, c), x, logits,
                  [wg_t, wu, wd], gy, k)
    for name, a, b in zip(["y", "dx", "dlogits", "dwg", "dwu", "dwd"], got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("gather", [True, False])
def test_grouped_mm_transposed_weight(gather):
    T, E, k, K, N = 29, 4, 2, 24, 40
    plan = topk_route(torch.randn(T, E), k, block_m=16)
    a = torch.randn(T if gather else plan.num_rows, K, requires_grad=True)
    w_store = (torch.randn(E, N, K) / 4).requires_grad_(True)   # [E, out, in]
    gy = torch.randn(plan.num_rows, N)
    out = grouped_mm(a, w_store.transpose(1, 2), plan, gather=gather)
    (out * gy).sum().backward()
    got = [out, a.grad, w_store.grad]
    a.grad, w_store.grad = None, None
    ref = grouped_mm_reference(a, w_store.transpose(1, 2), plan, gather=gather)
    (ref * gy).sum().backward()
    for name, x, y in zip(["out", "da", "dw"], got, [ref, a.grad, w_store.grad]):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=2e-4, msg=name)
    assert got[2].stride() == w_store.stride()


def test_fused_gate_up_with_odd_width_is_refused():
    T, E, D = 4, 2, 16
    plan = topk_route(torch.randn(T, E), 1, block_m=16)
    with pytest.raises(ValueError, match="fused .* last dim must be even"):
        moe_mlp(torch.randn(T, D), plan, torch.randn(E, D, 7), None, torch.randn(E, 3, D))
    with pytest.raises(ValueError, match="w_down"):
        moe_mlp(torch.randn(T, D), plan, torch.randn(E, D, 8), None, torch.randn(E, 8, D))


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_fused_custom_op_passes_opcheck(deterministic):
    T, E, D, Fh = 6, 3, 16, 16
    plan = topk_route(torch.randn(T, E), 2, block_m=16)
    gu = torch.randn(E, 2 * Fh, D, requires_grad=True)
    dn = torch.randn(E, D, Fh, requires_grad=True)
    args = (torch.randn(T, D, requires_grad=True), plan.weights.detach().clone().requires_grad_(True),
            gu.transpose(1, 2), None, dn.transpose(1, 2), plan.token_idx, plan.expert_offsets, plan.block_expert,
            plan.block_row, plan.block_m, G._SAVE, deterministic)
    torch.library.opcheck(G._moe_mlp_op, args)


def test_compiled_fused_layer_matches_eager():
    """Under torch.compile (the custom op and its fake) the fused, transposed weights give
    the eager results and gradients."""
    T, E, k, D, Fh = 16, 3, 2, 16, 16
    x, logits, gy = torch.randn(T, D), torch.randn(T, E), torch.randn(T, D)
    params = _hf_weights(E, D, Fh)
    eager, _ = _run(_fused, x, logits, params, gy, k)
    torch._dynamo.reset()
    compiled, _ = _run(torch.compile(_fused, backend="aot_eager", fullgraph=True), x, logits, params, gy, k)
    for name, a, b in zip(["y", "dx", "dlogits", "d gate_up_proj", "d down_proj"], compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("T,D,Fh,E,k", [(2048, 2048, 1024, 64, 8), (333, 200, 120, 7, 3)])
def test_gpu_hf_layout_bf16(T, D, Fh, E, k):
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev).to(dt)
    logits, gy = torch.randn(T, E, device=dev), torch.randn(T, D, device=dev)
    params = [p.to(dev) for p in _hf_weights(E, D, Fh, dt)]
    got, _ = _run(_fused, x, logits, params, gy, k)
    ref, _ = _run(_reference, x.float(), logits, [p.float() for p in params], gy, k)
    for name, a, b in zip(["y", "dx", "dlogits", "d gate_up_proj", "d down_proj"], got, ref):
        assert rel_err(a, b) < 2e-2, (name, rel_err(a, b))


@pytest.mark.parametrize("frozen", ["all", "gate_up", "down"])
def test_frozen_expert_weights_skip_their_weight_gradient_launches(monkeypatch, frozen):
    """Experts that are not trained (LoRA, router-only training) cost no weight-gradient
    launch; the gradients still needed match the reference."""
    T, E, k, D, Fh = 24, 3, 2, 16, 24
    x, logits, gy = torch.randn(T, D), torch.randn(T, E), torch.randn(T, D)
    gu, dn = _hf_weights(E, D, Fh)
    dw_launches = []
    real = G._launch_dw
    monkeypatch.setattr(G, "_launch_dw", lambda *a, **kw: dw_launches.append(kw.get("g2") is not None)
                        or real(*a, **kw))

    def run(fn):
        xx, lg = x.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        g_, d_ = gu.clone().requires_grad_(frozen == "down"), dn.clone().requires_grad_(frozen == "gate_up")
        y = fn(xx, topk_route(lg, k, renormalize=True, block_m=16), g_, d_)
        (y * gy).sum().backward()
        return [y, xx.grad, lg.grad, g_.grad, d_.grad]

    got = run(_fused)
    assert dw_launches == {"all": [], "gate_up": [False], "down": [True]}[frozen]
    ref = run(_reference)
    for name, a, b in zip(["y", "dx", "dlogits", "d gate_up_proj", "d down_proj"], got, ref):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-4, msg=name)


@pytest.mark.parametrize("frozen", ["w", "a"])
def test_grouped_mm_skips_the_gradient_nobody_needs(monkeypatch, frozen):
    T, E, k, K, N = 29, 4, 2, 24, 40
    plan = topk_route(torch.randn(T, E), k, block_m=16)
    a = torch.randn(T, K, requires_grad=frozen != "a")
    w = (torch.randn(E, N, K) / 4).requires_grad_(frozen != "w")
    launches = []
    real_rows, real_dw = G._launch_rows, G._launch_dw
    monkeypatch.setattr(G, "_launch_rows", lambda *x, **kw: launches.append("rows") or real_rows(*x, **kw))
    monkeypatch.setattr(G, "_launch_dw", lambda *x, **kw: launches.append("dw") or real_dw(*x, **kw))
    gy = torch.randn(plan.num_rows, N)
    (grouped_mm(a, w.transpose(1, 2), plan) * gy).sum().backward()
    assert launches == ["rows", "rows"] if frozen == "w" else ["rows", "dw"]
    ref_a, ref_w = a.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    (grouped_mm_reference(ref_a, ref_w.transpose(1, 2), plan) * gy).sum().backward()
    got, ref = (a.grad, ref_a.grad) if frozen == "w" else (w.grad, ref_w.grad)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-4)
    assert (w.grad if frozen == "w" else a.grad) is None
