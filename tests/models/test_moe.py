"""The MoE layer against a per-token loop, its losses against hand-computed values, edge cases."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flopwise.kernels._dispatch import deterministic_algorithms
from flopwise.models.moe import MoE, MoEConfig, load_balancing_loss, router_z_loss, sequence_balancing_loss


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: y_t = route_scale * sum_{e in topk(t)} w_te *
    expert_e(x_t) (+ shared). With a selection bias, topk(t) ranks score + bias; the weights
    stay the scores. Group-limited: topk(t) only among the experts of t's topk_group best
    groups, a group scored by its best (or best two) score (+ bias)."""
    c = moe.config
    x = x.reshape(-1, c.d_model)
    logits = x.float() @ moe.router.weight.float().t()
    probs = torch.softmax(logits, -1) if c.score == "softmax" else torch.sigmoid(logits)
    ys = []
    for t in range(x.shape[0]):
        s = probs[t] if moe.expert_bias is None else probs[t] + moe.expert_bias
        key = logits[t] if moe.expert_bias is None else s
        if c.topk_group is not None and c.topk_group < c.n_group:
            size = c.n_experts // c.n_group
            best = s.view(c.n_group, size).topk(1 if c.group_score == "max" else 2).values.sum(-1)
            kept = torch.sort(best, descending=True, stable=True).indices[: c.topk_group]
            key = torch.where(torch.isin(torch.arange(c.n_experts) // size, kept), key, -math.inf)
        order = torch.sort(key, descending=True, stable=True).indices[: c.top_k]
        w = probs[t, order]
        if c.normalize_topk:
            w = w / w.sum()
        y = torch.zeros(c.d_model)
        for e, we in zip(order.tolist(), w):
            h = x[t] @ moe.w_gate[e]
            y = y + we * ((F.silu(h) * (x[t] @ moe.w_up[e])) @ moe.w_down[e])
        y = c.route_scale * y
        if moe.shared is not None:
            y = y + moe.shared(x[t])
        ys.append(y)
    return torch.stack(ys)


def _params_grads(moe):
    return {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(top_k=2), id="top2-renorm"),
    pytest.param(dict(top_k=2, normalize_topk=False), id="top2-olmoe-style"),
    pytest.param(dict(top_k=4), id="k=E"),
    pytest.param(dict(top_k=1, shared_d_ff=24), id="top1-shared"),
    pytest.param(dict(top_k=2, score="sigmoid"), id="sigmoid"),
])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7)], ids=["T=1", "B2-S7"])
def test_moe_matches_per_token_loop(cfg, shape):
    torch.manual_seed(1)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=4, block_m=16, init_std=0.2, **cfg))
    _assert_layer_matches(moe, torch.randn(*shape, 16), per_token_reference)


def _assert_layer_matches(moe: MoE, x: torch.Tensor, reference) -> None:
    """The layer's output and the gradients of x and of every parameter equal the reference's."""
    x = x.requires_grad_(True)
    y, _ = moe(x)
    assert y.shape == x.shape
    g = torch.randn_like(y)
    (y * g).sum().backward()
    got_dx, got = x.grad.clone(), _params_grads(moe)
    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    ref = reference(moe, x2).reshape(y.shape)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    (ref * g).sum().backward()
    torch.testing.assert_close(got_dx, x2.grad, atol=1e-5, rtol=1e-4)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def per_token_expert_choice_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Expert choice by its definition: each expert takes the C tokens it scores highest
    (ties: lower token), and each token sums w_te * expert_e(x_t) over the experts that took it."""
    c = moe.config
    x = x.reshape(-1, c.d_model)
    T = x.shape[0]
    logits = x.float() @ moe.router.weight.float().t()
    probs = torch.softmax(logits, -1) if c.score == "softmax" else torch.sigmoid(logits)
    C = max(1, min(T, math.ceil(T * c.capacity_factor / c.n_experts)))
    took = [set(torch.sort(probs[:, e], descending=True, stable=True).indices[:C].tolist())
            for e in range(c.n_experts)]
    ys = []
    for t in range(T):
        y = torch.zeros(c.d_model)
        for e in range(c.n_experts):
            if t in took[e]:
                h = x[t] @ moe.w_gate[e]
                y = y + probs[t, e] * ((F.silu(h) * (x[t] @ moe.w_up[e])) @ moe.w_down[e])
        if moe.shared is not None:
            y = y + moe.shared(x[t])
        ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(capacity_factor=1.5, shared_d_ff=8), id="cf1.5-shared"),
    pytest.param(dict(capacity_factor=0.5, score="sigmoid"), id="cf0.5-sigmoid"),
    pytest.param(dict(capacity_factor=4.0), id="C=T"),
])
def test_expert_choice_layer_matches_per_token_definition(cfg):
    torch.manual_seed(2)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=4, router="expert_choice", block_m=16, init_std=0.3, **cfg))
    _assert_layer_matches(moe, torch.randn(2, 9, 16), per_token_expert_choice_reference)


def test_expert_choice_layer_token_with_no_expert_gets_zero():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=16, n_experts=4, router="expert_choice", capacity_factor=0.5,
                        block_m=16, init_std=0.3))
    x = torch.randn(1, 24, 16)
    y, aux = moe(x)
    logits, plan = moe.route(x.reshape(-1, 16))
    chosen = torch.zeros(24, dtype=torch.bool)
    chosen[plan.token_idx.long()] = True
    assert (~chosen).any()
    assert (y[0][~chosen] == 0).all() and (y[0][chosen] != 0).any()
    assert plan.capacity == math.ceil(24 * 0.5 / 4)


def test_all_tokens_to_one_expert_and_load_balance_loss():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, block_m=16, load_balance_coef=1.0, z_loss_coef=0.0))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 50.0  # x[:, 0] > 0 sends every token to expert 2
    x = torch.randn(10, 8)
    x[:, 0] = x[:, 0].abs() + 1
    y, aux, losses = moe(x, return_losses=True)
    _, plan = moe.route(x)
    assert plan.expert_counts.tolist() == [0, 0, 10, 0]
    torch.testing.assert_close(y, per_token_reference(moe, x), atol=1e-5, rtol=1e-4)
    # f = (0, 0, 1, 0); P_2 = mean softmax prob of expert 2 ~ 1  ->  loss = E * P_2 ~ 4
    probs = torch.softmax(x @ moe.router.weight.t(), -1)
    assert losses["load_balance"].item() == pytest.approx(4 * probs[:, 2].mean().item(), rel=1e-5)
    assert aux.item() == pytest.approx(losses["load_balance"].item(), rel=1e-6)


def test_losses_hand_computed():
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    counts = torch.tensor([1, 1])
    # E * sum f_e P_e = 2 * (0.5 * 0.7 + 0.5 * 0.3) = 1.0
    assert load_balancing_loss(probs, counts).item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, torch.tensor([2, 0])).item() == pytest.approx(2 * 0.7)
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    z = (math.log(2) ** 2 + math.log(math.e + math.exp(-1)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(z, rel=1e-6)


def test_aux_loss_uses_coefficients_and_reaches_router():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=2, block_m=16, load_balance_coef=0.5,
                        z_loss_coef=0.25, init_std=0.5))
    x = torch.randn(12, 8)
    y, aux, losses = moe(x, return_losses=True)
    assert aux.item() == pytest.approx(0.5 * losses["load_balance"].item() + 0.25 * losses["z_loss"].item(), rel=1e-6)
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=5), "exceeds n_experts"),
    (dict(router="hash"), "router must be one of"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(score="relu"), "score"),
    (dict(n_experts=0), "n_experts"),
    (dict(block_m=48), "block_m must be a power of two"),
])
def test_config_validation(kw, match):
    base = dict(d_model=8, d_ff=8, n_experts=4)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)


@pytest.mark.parametrize("kw,err,match", [
    (dict(capacity_factor="2"), TypeError, "capacity_factor must be a number"),
    (dict(capacity_factor=None), TypeError, "capacity_factor must be a number"),
    (dict(shared_d_ff=2.5), TypeError, "shared_d_ff must be an int"),
    (dict(shared_d_ff=True), TypeError, "shared_d_ff must be an int"),
    (dict(init_std=-1.0), ValueError, "init_std must be finite and >= 0"),
    (dict(init_std=math.nan), ValueError, "init_std must be finite and >= 0"),
    (dict(load_balance_coef="x"), TypeError, "load_balance_coef must be a number"),
    (dict(z_loss_coef=math.nan), ValueError, "z_loss_coef must be finite and >= 0"),
])
def test_config_numbers_are_checked_by_name(kw, err, match):
    """These failed later with torch's or Python's messages, or never (a NaN coefficient made the aux loss NaN)."""
    with pytest.raises(err, match=match):
        MoEConfig(d_model=8, d_ff=8, n_experts=4, **kw)


def test_config_flags_must_be_bools():
    with pytest.raises(TypeError, match="normalize_topk must be a bool"):
        MoEConfig(d_model=8, d_ff=8, n_experts=4, normalize_topk="no")


def test_wrong_input_width_raises():
    with pytest.raises(ValueError, match=r"x must be a tensor \[\.\.\., 8\]"):
        MoE(MoEConfig(d_model=8, d_ff=8, n_experts=2, top_k=1))(torch.randn(3, 9))


def test_presets():
    assert MoEConfig.preset("mixtral").n_experts == 8
    assert MoEConfig.preset("olmoe").normalize_topk is False
    assert MoEConfig.preset("tiny", top_k=1).top_k == 1
    with pytest.raises(ValueError, match="unknown MoE preset"):
        MoEConfig.preset("gpt5")


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_layer_compiles_without_graph_breaks(monkeypatch, deterministic):
    """Also under ``torch.use_deterministic_algorithms(True)``, which the compiled graph's
    custom ops carry into every launch: none uses an atomic epilogue then."""
    import importlib

    G = importlib.import_module("flopwise.kernels.grouped_mm")
    epilogues, real = [], G._launch_rows
    monkeypatch.setattr(G, "_launch_rows", lambda *a, **kw: epilogues.append(kw["epilogue"]) or real(*a, **kw))
    torch._dynamo.reset()
    moe = MoE(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2, block_m=16))
    x = torch.randn(2, 5, 16)

    def step(x):
        y, aux = moe(x)
        return y.square().mean() + aux

    with deterministic_algorithms(deterministic):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = compiled(x)
        loss.backward()
        grads = _params_grads(moe)
        moe.zero_grad()
        ref = step(x)
        ref.backward()
    torch.testing.assert_close(loss, ref)
    for name, p in moe.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert len(epilogues) == 8  # compiled and eager: two launches forward, two row launches backward
    atomic = {G._SCALE_SCATTER, G._SCATTER}
    assert bool(atomic & set(epilogues)) != deterministic, epilogues


def test_experts_compute_in_the_autocast_dtype():
    """Under autocast the expert matmuls run in autocast's dtype, as nn.Linear's would: the
    output equals the layer fed bf16 inputs and bf16 weights outside autocast, not the fp32
    computation, and gradients still reach the fp32 weights."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=48, n_experts=4, top_k=2))
    x = torch.randn(37, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    assert y.dtype == torch.bfloat16
    logits, plan = moe.route(x)
    from flopwise.kernels import moe_mlp

    bf = torch.bfloat16
    expected = moe_mlp(x.to(bf), plan, moe.w_gate.to(bf), moe.w_up.to(bf), moe.w_down.to(bf))
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    fp32, _ = moe(x)
    assert not torch.equal(y.float(), fp32)  # it did not compute in fp32
    y.float().sum().backward()
    assert moe.w_down.grad.dtype == torch.float32 and moe.w_down.grad.abs().sum() > 0


def test_backward_twice_needs_retain_activations():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, requires_grad=True)
    layer = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=4, top_k=2, block_m=16))
    y, aux = layer(x)
    (y.sum() + aux).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_activations=True"):
        (y.sum() + aux).backward()
    kept = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=4, top_k=2, block_m=16, retain_activations=True))
    kept.load_state_dict(layer.state_dict())
    y, aux = kept(x)
    first = torch.autograd.grad(y.sum() + aux, [x, *kept.parameters()], retain_graph=True)
    second = torch.autograd.grad(y.sum() + aux, [x, *kept.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_initialisation_per_expert_streams_and_seed():
    cfg = MoEConfig(d_model=8, d_ff=12, n_experts=4, top_k=2, shared_d_ff=6, init_std=0.1)
    torch.manual_seed(3)
    a = MoE(cfg)
    torch.manual_seed(3)
    b = MoE(cfg)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{k}: torch.manual_seed does not decide the initialisation"
    # explicit seeds: expert e's weights depend on the seed and e only
    a.reset_parameters(seed=11)
    b.reset_parameters(seed=11)
    c = MoE(dataclasses.replace(cfg, n_experts=8))
    c.reset_parameters(seed=11)
    for name in ("w_gate", "w_up", "w_down"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(getattr(a, name), getattr(c, name)[:4]), f"{name}: expert e depends on n_experts"
        w = getattr(a, name)
        assert not torch.equal(w[0], w[1]), f"{name}: two experts start equal"
        assert abs(w.std().item() - 0.1) < 0.03
    assert torch.equal(a.shared.gate.weight, b.shared.gate.weight)
    bound = 1 / 8 ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert a.shared.gate.weight.abs().max() <= bound and a.shared.gate.weight.abs().max() > 0.5 * bound
    a.reset_parameters(seed=12)
    assert not torch.equal(a.w_gate, b.w_gate) and not torch.equal(a.router.weight, b.router.weight)


@pytest.mark.parametrize("shared", [0, 6])
def test_input_dtype_other_than_the_weights(shared):
    """The experts compute in x's dtype; a shared expert used to raise a dtype mismatch instead."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=12, n_experts=4, top_k=2, shared_d_ff=shared, init_std=0.3))
    x = torch.randn(5, 8)
    ref, _ = moe(x)
    for dt in (torch.bfloat16, torch.float64):
        y, aux = moe(x.to(dt))
        assert y.dtype == dt and torch.isfinite(aux)
        torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    low = copy.deepcopy(moe).to(torch.bfloat16)
    y, _ = low(x)  # bf16 weights, fp32 input
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_no_tokens(router):
    """T = 0: an empty output and a zero aux loss (the routers refuse T = 0; the layer does not)."""
    moe = MoE(MoEConfig(d_model=8, d_ff=12, n_experts=4, top_k=2, router=router, shared_d_ff=4))
    x = torch.randn(0, 3, 8, requires_grad=True)
    y, aux, losses = moe(x, return_losses=True)
    assert y.shape == (0, 3, 8) and aux.item() == 0.0 and losses["z_loss"].item() == 0.0
    (y.sum() + aux).backward()
    assert x.grad.shape == x.shape and moe.router.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_meta_device_gives_shapes(router):
    with torch.device("meta"):
        moe = MoE(MoEConfig(d_model=8, d_ff=12, n_experts=4, top_k=2, router=router, shared_d_ff=4))
    x = torch.randn(2, 3, 8, device="meta", requires_grad=True)
    y, aux = moe(x)
    assert y.shape == (2, 3, 8) and y.is_meta and aux.shape == ()
    (y.sum() + aux).backward()
    assert x.grad.shape == x.shape and moe.w_gate.grad.shape == moe.w_gate.shape


# ------------------------------------------------------------------ auxiliary-loss-free balancing
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_biased_layer_matches_definition_and_gradients(score):
    torch.manual_seed(3)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=4, top_k=2, block_m=16, init_std=0.2, score=score,
                        bias_update_rate=1e-3))
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
    _assert_layer_matches(moe, torch.randn(2, 7, 16), per_token_reference)
    assert moe.expert_bias.grad is None and "expert_bias" in moe.state_dict()
    assert "expert_load" not in moe.state_dict()


@pytest.mark.parametrize("cfg", [
    pytest.param(dict(score="sigmoid", bias_update_rate=1e-3, group_score="top2"), id="deepseek-v3"),
    pytest.param(dict(score="softmax", group_score="max", normalize_topk=False), id="deepseek-v2"),
])
def test_group_limited_layer_matches_definition_and_gradients(cfg):
    """DeepSeek-style layers: 8 experts in 4 groups, 2 kept, k = 3, a shared expert and a
    route scale on the routed part only."""
    torch.manual_seed(4)
    moe = MoE(MoEConfig(d_model=16, d_ff=24, n_experts=8, top_k=3, block_m=16, init_std=0.3, shared_d_ff=16,
                        n_group=4, topk_group=2, route_scale=2.5, **cfg))
    if moe.expert_bias is not None:
        with torch.no_grad():
            moe.expert_bias.copy_(0.05 * torch.randn(8))
    x = torch.randn(3, 9, 16)
    _assert_layer_matches(moe, x, per_token_reference)
    ids = moe.route(x.reshape(-1, 16))[1].topk_ids.long()
    assert all(len(set(groups)) <= 2 for groups in (ids // 2).tolist()), "a token's experts span at most 2 groups"
    free = MoE(dataclasses.replace(moe.config, n_group=1, topk_group=None))
    free.load_state_dict(moe.state_dict())
    assert not torch.equal(free.route(x.reshape(-1, 16))[1].topk_ids, ids.int()), "the limit binds"


@pytest.mark.parametrize("kw,err,match", [
    (dict(n_group=3), ValueError, r"MoEConfig.n_group must divide the number of experts E = 8"),
    (dict(n_group=2, topk_group=3), ValueError, r"MoEConfig.topk_group must be in \[1, 2\]"),
    (dict(n_group=4, topk_group=1, top_k=3), ValueError, r"MoEConfig.top_k = 3 exceeds the experts of the kept"),
    (dict(n_group=8, topk_group=2), ValueError, "MoEConfig.group_score 'top2' sums each group's two best"),
    (dict(n_group=2, topk_group=1, group_score="sum"), ValueError, "MoEConfig.group_score must be one of"),
    (dict(n_group=2, topk_group=1.0), TypeError, "MoEConfig.topk_group must be None or an int"),
    (dict(n_group=2, topk_group=1, router="expert_choice"), ValueError, "limit token-choice routing"),
    (dict(route_scale=0.0), ValueError, "MoEConfig.route_scale must be > 0"),
    (dict(route_scale="2"), TypeError, "MoEConfig.route_scale must be a number"),
    (dict(n_group=2, topk_group=np.int64(1)), TypeError, "MoEConfig.topk_group must be None or an int"),
    (dict(n_group=2, topk_group=1, group_score=["max"]), ValueError, "MoEConfig.group_score must be one of"),
])
def test_group_and_scale_validation(kw, err, match):
    with pytest.raises(err, match=match):
        MoEConfig(**{**dict(d_model=8, d_ff=8, n_experts=8, top_k=2), **kw})


def test_sequence_balancing_loss_hand_computed():
    """Two sequences, each sending every token to one expert: balanced over the batch (the
    Switch loss's 1 at uniform probabilities), not within a sequence."""
    probs = torch.tensor([[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 3)
    ids = torch.tensor([[0]] * 3 + [[1]] * 3)
    counts = torch.tensor([3, 3])
    assert load_balancing_loss(probs, counts).item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))
    assert sequence_balancing_loss(probs, ids, 2).item() == pytest.approx(2 * 0.9)  # each: E * f_0 * P_0
    assert sequence_balancing_loss(probs, ids, 1).item() == pytest.approx(load_balancing_loss(probs, counts).item())
    # k = 2: f_i = (tokens choosing i) / (S k)
    ids2 = torch.tensor([[0, 1], [0, 1], [1, 0]])
    p2 = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    want = 2 * (0.5 * p2[:, 0].mean() + 0.5 * p2[:, 1].mean())
    assert sequence_balancing_loss(p2, ids2, 1).item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="n_seq must be >= 1 and divide the 6 tokens"):
        sequence_balancing_loss(probs, ids, 4)


def test_sequence_scoped_layer_loss_and_gradient():
    torch.manual_seed(5)
    cfg = MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=2, block_m=16, init_std=0.5, score="sigmoid",
                    load_balance_scope="sequence", load_balance_coef=0.5, z_loss_coef=0.0)
    moe = MoE(cfg)
    x = torch.randn(3, 5, 8)
    _, aux, losses = moe(x, return_losses=True)
    logits = x.reshape(-1, 8) @ moe.router.weight.t()
    p = torch.sigmoid(logits)
    p = p / p.sum(-1, keepdim=True)
    ids = moe.route(x.reshape(-1, 8))[1].topk_ids.long()
    want = []
    for b in range(3):  # each sequence's own Switch loss
        counts = torch.bincount(ids[b * 5:(b + 1) * 5].reshape(-1), minlength=4)
        want.append(load_balancing_loss(p[b * 5:(b + 1) * 5], counts))
    torch.testing.assert_close(losses["load_balance"], torch.stack(want).mean())
    batch = MoE(dataclasses.replace(cfg, load_balance_scope="batch"))
    batch.load_state_dict(moe.state_dict())
    assert not torch.allclose(batch(x, return_losses=True)[2]["load_balance"], losses["load_balance"])
    torch.testing.assert_close(batch(x.reshape(1, 15, 8), return_losses=True)[2]["load_balance"],
                               moe(x.reshape(1, 15, 8), return_losses=True)[2]["load_balance"])
    torch.testing.assert_close(batch(x.reshape(15, 8), return_losses=True)[2]["load_balance"],
                               moe(x.reshape(15, 8), return_losses=True)[2]["load_balance"])
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    # DeepSeek-V3's f_i counts the scores' own top k: a selection bias (or a group limit)
    # changes where the tokens go, not this loss
    biased = MoE(dataclasses.replace(cfg, bias_update_rate=1e-3, n_group=2, topk_group=1))
    biased.load_state_dict(moe.state_dict(), strict=False)  # (all but the bias)
    with torch.no_grad():
        biased.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert not torch.equal(biased.route(x.reshape(-1, 8))[1].topk_ids, ids.int())
    torch.testing.assert_close(biased(x, return_losses=True)[2]["load_balance"], losses["load_balance"])
    with pytest.raises(ValueError, match="load_balance_scope must be one of"):
        MoEConfig(d_model=8, d_ff=8, n_experts=4, load_balance_scope="token")


def test_bias_update_moves_towards_balance_and_counts_training_only():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, block_m=16, bias_update_rate=0.01))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 50.0  # every token prefers expert 2
    x = torch.randn(10, 8)
    x[:, 0] = x[:, 0].abs() + 1
    moe.eval()
    moe(x)
    assert moe.expert_load.tolist() == [0, 0, 0, 0], "eval mode counts nothing"
    moe.train()
    moe(x)
    moe(x[:4])
    assert moe.expert_load.tolist() == [0, 0, 14, 0]
    load = moe.update_bias()
    assert load.tolist() == [0, 0, 14, 0] and moe.expert_load.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.01, 0.01, -0.01, 0.01]))
    moe.update_bias()  # nothing counted since: unchanged
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.01, 0.01, -0.01, 0.01]))
    moe.expert_load.copy_(torch.tensor([3, 1, 2, 2]))  # expert at the mean load keeps its bias
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.0, 0.02, -0.01, 0.01]))
    moe.reset_parameters(seed=0)
    assert moe.expert_bias.abs().sum() == 0


def test_bias_balances_a_skewed_router(monkeypatch):
    """Router weights frozen and skewed towards expert 0: the bias alone brings the load's
    max violation from above 1 to near 0 within a few hundred updates. (The balancing logic,
    so the routing runs the reference; the kernel's bias is tested against it elsewhere.)"""
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=8, n_experts=8, top_k=2, block_m=16, score="sigmoid",
                        bias_update_rate=0.002))
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.3)
        moe.router.weight[0] += 0.5
    x = torch.randn(256, 16)
    x[:, :] += 0.5
    with torch.no_grad():
        _, _, before = moe(x, return_losses=True)
        for _ in range(300):
            moe.route(x)
            moe.update_bias()
        _, _, after = moe(x, return_losses=True)
    assert before["max_violation"] > 1.0
    assert after["max_violation"] < 0.2, after["max_violation"]


def test_max_violation_hand_computed():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, block_m=16))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 50.0
    x = torch.randn(10, 8)
    x[:, 0] = x[:, 0].abs() + 1
    _, _, losses = moe(x, return_losses=True)
    assert losses["max_violation"].item() == pytest.approx(10 / 2.5 - 1)
    ec = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, router="expert_choice", block_m=16))
    assert ec(x, return_losses=True)[2]["max_violation"].item() == 0


def test_bias_update_rate_validation():
    with pytest.raises(ValueError, match="bias_update_rate balances token-choice routing"):
        MoEConfig(d_model=8, d_ff=8, n_experts=4, router="expert_choice", bias_update_rate=1e-3)
    with pytest.raises(ValueError, match="bias_update_rate must be finite and >= 0"):
        MoEConfig(d_model=8, d_ff=8, n_experts=4, bias_update_rate=-1e-3)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4))
    assert moe.expert_bias is None and moe.update_bias() is None and "expert_bias" not in moe.state_dict()


def test_biased_layer_compiles_and_counts_under_compile():
    torch._dynamo.reset()
    moe = MoE(MoEConfig(d_model=16, d_ff=16, n_experts=4, top_k=2, block_m=16, bias_update_rate=0.1))
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0]))
    x = torch.randn(2, 5, 16)

    def step(x):
        y, aux = moe(x)
        return y.square().mean() + aux

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    loss.backward()
    counted = moe.expert_load.clone()
    assert counted.sum() == 20
    moe.expert_load.zero_()
    torch.testing.assert_close(loss, step(x))
    assert torch.equal(moe.expert_load, counted)


def test_selection_bias_stays_float32_and_its_count_follows_assign_loads():
    """model.to(bf16) keeps the bias float32 (a 1e-3 step must not round away); a state
    dict loaded with assign=True onto another device takes the load count along."""
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, block_m=16, bias_update_rate=1e-3))
    with torch.no_grad():
        moe.expert_bias.fill_(0.6)
    moe.to(torch.bfloat16)
    assert moe.router.weight.dtype == torch.bfloat16 and moe.expert_bias.dtype == torch.float32
    moe.expert_load.copy_(torch.tensor([10, 0, 0, 0]))
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.599, 0.601, 0.601, 0.601]))
    with torch.device("meta"):
        other = MoE(moe.config)
    other.load_state_dict({k: v.to("meta") for k, v in moe.state_dict().items()}, assign=True)
    assert other.expert_bias.device.type == other.expert_load.device.type == "meta"
    cpu = MoE(moe.config).to("meta")
    cpu.load_state_dict(moe.state_dict(), assign=True)
    assert cpu.expert_load.device.type == "cpu" and cpu.expert_load.sum() == 0


def test_max_violation_per_sequence_hand_computed():
    """Two sequences of 4 tokens, top-1 of 4 experts. First: one sequence routes all its tokens
    to expert 2 (max 4 / mean 1 - 1 = 3), the other one token per expert (0), so 1.5 per
    sequence on average; the batch's loads (5, 1, 1, 1; mean 2) happen to give 1.5 too. Second:
    each sequence on an expert of its own, which the batch metric sees as half as skewed."""
    moe = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1, block_m=16))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4, 8) * 50)
    x = torch.zeros(2, 4, 8)
    x[0, :, 2] = 1.0
    x[1, torch.arange(4), torch.arange(4)] = 1.0
    _, _, losses = moe(x, return_losses=True)
    assert losses["max_violation_seq"].item() == pytest.approx((3 + 0) / 2)
    assert losses["max_violation"].item() == pytest.approx(5 / 2 - 1)
    # sequence 0 on expert 0 and sequence 1 on expert 1: each sequence maximally skewed (3), the
    # batch half as much (4 / 2 - 1 = 1)
    x = torch.zeros(2, 4, 8)
    x[0, :, 0] = 1.0
    x[1, :, 1] = 1.0
    _, _, losses = moe(x, return_losses=True)
    assert losses["max_violation_seq"].item() == pytest.approx(3.0)
    assert losses["max_violation"].item() == pytest.approx(1.0)
    # [T, D] is one sequence: the two metrics agree; no tokens: zero
    _, _, losses = moe(x.reshape(8, 8), return_losses=True)
    assert losses["max_violation_seq"].item() == pytest.approx(losses["max_violation"].item())
    assert moe(torch.zeros(0, 8), return_losses=True)[2]["max_violation_seq"].item() == 0
    ec = MoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, router="expert_choice", block_m=16))
    assert ec(x, return_losses=True)[2]["max_violation_seq"].item() == 0
