"""Mixture-of-Depths block: training output and gradients against a plain-PyTorch reference,
capacity 1.0 against the dense block, causal inference (no dependence on the future, padding,
KV cache), auxiliary losses, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flopwise.models import MoDBlock, MoDConfig, ModelConfig, Transformer
from flopwise.models.transformer import Block, KVCache

D, H, S = 32, 2, 16


def _cfg(**kw) -> ModelConfig:
    base = dict(d_model=D, n_heads=H, d_ff=48, n_layers=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def _mod_block(parallel=False, capacity=0.25, causal="router", impl="kernels") -> MoDBlock:
    cfg = _cfg(parallel_block=parallel)
    blk = Block(cfg, 0)
    # Non-trivial norm gains and router bias, so their gradients are checked for real.
    with torch.no_grad():
        for p in blk.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    mod = MoDBlock(blk, MoDConfig(capacity=capacity, causal=causal, impl=impl))
    with torch.no_grad():
        mod.router.weight.normal_(0, 0.5)
        mod.router.bias.fill_(0.1)
    return mod


# ------------------------------------------------------------------ plain-PyTorch reference
def _rms(t, w, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(t, pos, theta):
    """Rotate-half RoPE written out: t [B, K, H, Dh], pos [B, K]."""
    dh = t.shape[-1]
    freq = theta ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = (pos.double()[..., None] * freq).float()[:, :, None, :]
    t1, t2 = t[..., : dh // 2], t[..., dh // 2:]
    return torch.cat((t1 * ang.cos() - t2 * ang.sin(), t2 * ang.cos() + t1 * ang.sin()), -1)


def _block_ref(blk, h, pos, theta=10000.0):
    """f(h) on the selected rows: attention masked over ORIGINAL positions, explicit softmax."""
    B, K, _ = h.shape
    eps = blk.norm1.eps
    n = _rms(h, blk.norm1.weight, eps)
    q, k, v = (n @ blk.attn.wqkv.weight.T).view(B, K, 3, H, D // H).unbind(2)
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // H)
    att = att.masked_fill(~(pos[:, None, :] <= pos[:, :, None])[:, None], float("-inf"))
    a = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(B, K, D) @ blk.attn.wo.weight.T

    def mlp(t):
        gate, up = (t @ blk.mlp.w_in.weight.T).chunk(2, -1)
        return (F.silu(gate) * up) @ blk.mlp.w_out.weight.T

    return a + (mlp(n) if blk.parallel else mlp(_rms(h + a, blk.norm2.weight, eps)))


def _mod_ref(mod, x, positions):
    """Router, topk, sort, gather by indexing, block, sigmoid weight, scatter by index_put."""
    B, S_, _ = x.shape
    scores = x @ mod.router.weight[0] + mod.router.bias[0]
    k = math.ceil(mod.cfg.capacity * S_)
    idx = scores.topk(k, dim=1).indices.sort(dim=1).values
    rows = torch.arange(B)[:, None]
    h = x[rows, idx]
    f = _block_ref(mod.block, h, positions[rows, idx])
    w = torch.sigmoid(scores[rows, idx])
    return x.index_put((rows, idx), h + w[..., None] * f)


def _grads(fn, mod, x, go):
    mod.zero_grad()
    x = x.detach().requires_grad_(True)
    out = fn(x)
    (out * go).sum().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("impl", ["kernels", "torch"])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_training_matches_plain_reference(parallel, impl):
    mod = _mod_block(parallel=parallel, impl=impl)
    x = torch.randn(2, S, D)
    pos = torch.arange(S).expand(2, S)
    go = torch.randn(2, S, D)
    out, dx, dp = _grads(lambda x_: mod(x_, pos)[0], mod, x, go)
    ref, rdx, rdp = _grads(lambda x_: _mod_ref(mod, x_, pos), mod, x, go)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, rdx, rtol=1e-4, atol=1e-5)
    assert set(rdp) <= set(dp)
    for name in rdp:
        torch.testing.assert_close(dp[name], rdp[name], rtol=1e-4, atol=1e-5, msg=name)
    # the router learns through the weight, the unselected rows pass through untouched
    assert dp["router.weight"].abs().sum() > 0
    k = math.ceil(0.25 * S)
    assert ((out - x).abs().sum(-1) > 0).sum(1).tolist() == [k, k]


def test_capacity_one_is_dense_block_scaled_by_router_weight():
    mod = _mod_block(capacity=1.0)
    x = torch.randn(2, S, D)
    pos = torch.arange(S).expand(2, S)
    out, _ = mod(x, pos)
    f, _ = mod.block.delta(x, pos)
    r = torch.sigmoid(mod.router(x))
    torch.testing.assert_close(out, x + r * f, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ causal inference
@pytest.mark.parametrize("causal", ["router", "predictor"])
def test_eval_padding_equals_row_by_row_and_uses_per_token_decision(causal):
    """Rows select different numbers of tokens; the padded batch must equal each row alone,
    and each row must equal the reference on exactly the tokens whose logit is > 0."""
    mod = _mod_block(causal=causal).eval()
    x = torch.randn(3, S, D)
    pos = torch.arange(S).expand(3, S)
    with torch.no_grad():
        out, aux = mod(x, pos)
        decide = mod.router(x)[..., 0] if causal == "router" else mod.predictor(x)[..., 0]
        chosen = decide > 0
        assert len(set(chosen.sum(1).tolist())) > 1, "test needs rows with different counts"
        for b in range(3):
            alone, _ = mod(x[b:b + 1], pos[b:b + 1])
            torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-5, atol=1e-5)
            idx = chosen[b].nonzero()[:, 0]
            f = _block_ref(mod.block, x[b:b + 1, idx], idx[None])
            w = torch.sigmoid(mod.router(x[b, idx]))
            expect = x[b].clone()
            expect[idx] += w * f[0]
            torch.testing.assert_close(out[b], expect, rtol=1e-5, atol=1e-5)
    assert aux["mod_selected_frac"] == chosen.float().mean()


@pytest.mark.parametrize("impl", ["kernels", "torch"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-topk"])
def test_no_grad_forward_scatters_in_place_and_matches(impl, train, monkeypatch):
    """Without autograd the Transformer lets its MoD layers add into the residual stream in
    place; the logits equal the out-of-place forward's. A direct call keeps the caller's x
    unless it passes inplace=True, and autograd always gets the out-of-place form."""
    import flopwise.models.mod as mod_module

    torch.manual_seed(3)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25, n_layers=4, mod_impl=impl)).train(train)
    tokens = torch.randint(0, 256, (2, S))
    expect = model(tokens).logits.detach()  # autograd on: out of place
    calls = []
    real = mod_module.scatter_tokens
    monkeypatch.setattr(mod_module, "scatter_tokens", lambda *a, **k: calls.append(k.get("inplace")) or real(*a, **k))
    with torch.no_grad():
        got = model(tokens).logits
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    assert calls == ([True, True] if impl == "kernels" else [])
    # a hook that keeps a layer's output must see it as it was: no in-place update then
    kept = []
    handle = model.layers[0].register_forward_hook(lambda m, args, out: kept.append((out[0], out[0].clone())))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    assert torch.equal(kept[0][0], kept[0][1])
    layer = model.layers[1]
    x = torch.randn(2, S, D)
    pos = torch.arange(S).expand(2, S)
    with torch.no_grad():
        keep = x.clone()
        out, _ = layer(x, pos)
        assert torch.equal(x, keep) and out is not x
        out2, _ = layer(x, pos, inplace=True)
        assert out2 is x and torch.allclose(out2, out)
    xg = keep.clone().requires_grad_(True)
    out3, _ = layer(xg, pos, inplace=True)  # recorded by autograd: out of place
    assert out3 is not xg and torch.equal(xg.detach(), keep)


@pytest.mark.parametrize("causal", ["router", "predictor"])
def test_eval_logits_never_depend_on_future_tokens(causal):
    torch.manual_seed(1)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25, mod_causal=causal, n_layers=2)).eval()
    tokens = torch.randint(0, 256, (2, S))
    t = 7
    changed = tokens.clone()
    changed[:, t:] = torch.randint(0, 256, (2, S - t))
    with torch.no_grad():
        a = model(tokens).logits
        b = model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])
    # top-k (training mode) routing does look at the future: the same check must be able to fail
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(tokens).logits[:, :t], model(changed).logits[:, :t])


@pytest.mark.parametrize("causal", ["router", "predictor"])
def test_generation_with_cache_equals_without(causal):
    torch.manual_seed(2)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25, mod_causal=causal, n_layers=2,
                             tie_embeddings=False))
    with torch.no_grad():  # larger head: varied greedy continuations instead of one repeated token
        model.head.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 5))
    greedy = model.generate(prompt, 6)
    assert greedy[:, 5:].unique().numel() > 3
    torch.testing.assert_close(greedy, model.generate(prompt, 6, use_cache=False), rtol=0, atol=0)
    sampled = model.generate(prompt, 6, temperature=1.0, top_k=20, seed=3)
    torch.testing.assert_close(sampled, model.generate(prompt, 6, temperature=1.0, top_k=20, seed=3,
                                                       use_cache=False), rtol=0, atol=0)
    assert model.training  # generate restores the mode


def test_mod_layer_caches_only_routed_tokens():
    torch.manual_seed(3)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25)).eval()
    tokens = torch.randint(0, 256, (2, 12))
    seen = {}
    model.layers[1].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    cache = KVCache(2)
    with torch.no_grad():
        full = model(tokens).logits
        seen.clear()
        model(tokens[:, :9], kv_cache=cache)
        routed = (model.layers[1].router(seen["x"])[..., 0] > 0).sum(1)
        assert cache.layers[0].length.tolist() == [9, 9]
        assert cache.layers[1].length.tolist() == routed.tolist()
        assert (routed < 9).all()
        for i in range(9, 12):  # one token at a time: the MoD cache grows by 0 or 1 per row
            before = cache.layers[1].length.clone()
            seen.clear()
            step = model(tokens[:, i:i + 1], kv_cache=cache).logits
            grew = cache.layers[1].length - before
            assert grew.tolist() == (model.layers[1].router(seen["x"])[:, 0, 0] > 0).long().tolist()
            torch.testing.assert_close(step[:, 0], full[:, i], rtol=1e-5, atol=1e-5)
    assert cache.seq_len == 12


def test_kv_cache_needs_causal_routing():
    model = Transformer(_cfg(routing="every_other", mod_causal="none"))
    with pytest.raises(ValueError, match="causal"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    model.eval()
    with pytest.raises(ValueError, match="causal"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=KVCache(2))
    # "none" keeps top-k in eval: the same function as training
    tokens = torch.randint(0, 256, (1, S))
    with torch.no_grad():
        a = model(tokens).logits
        model.train()
        torch.testing.assert_close(model(tokens).logits, a)


# ------------------------------------------------------------------ auxiliary losses
@pytest.mark.parametrize("causal", ["router", "predictor"])
def test_aux_loss_and_accuracy(causal):
    mod = _mod_block(causal=causal, impl="torch")
    x = torch.randn(4, S, D)
    pos = torch.arange(S).expand(4, S)
    _, aux = mod(x, pos)
    scores = mod.router(x)[..., 0]
    member = torch.zeros(4, S).scatter(1, scores.topk(4, dim=1).indices, 1.0)
    logit = scores if causal == "router" else mod.predictor(x)[..., 0]
    bce = F.binary_cross_entropy_with_logits(logit, member)
    torch.testing.assert_close(aux["mod_aux_loss"], 0.01 * bce)
    torch.testing.assert_close(aux["mod_predictor_acc"], ((logit > 0) == (member > 0)).float().mean())

    # the predictor's loss never reaches the model (stop-gradient inputs)
    if causal == "predictor":
        xg = x.clone().requires_grad_(True)
        mod.zero_grad()
        mod(xg, pos)[1]["mod_aux_loss"].backward()
        assert xg.grad is None or xg.grad.abs().max() == 0
        assert mod.router.weight.grad is None or mod.router.weight.grad.abs().max() == 0
        assert mod.predictor[0].weight.grad.abs().max() > 0

    # training on the aux loss alone makes the causal decision predict top-k membership
    params = [mod.router.bias] if causal == "router" else list(mod.predictor.parameters())
    opt = torch.optim.Adam(params, lr=0.05)
    acc0 = float(aux["mod_predictor_acc"])
    for _ in range(60):
        opt.zero_grad()
        _, aux = mod(x, pos)
        aux["mod_aux_loss"].backward()
        opt.step()
    assert float(aux["mod_predictor_acc"]) >= max(0.85, acc0)


def test_model_aux_dict_totals():
    model = Transformer(_cfg(routing="mod", mod_capacity=0.25, mod_causal="predictor"))
    tokens = torch.randint(0, 256, (2, S))
    out = model(tokens, tokens)
    aux = out.aux
    assert set(aux) >= {"layer0.mod_aux_loss", "layer1.mod_aux_loss", "mod_predictor_acc", "aux_loss", "lm_loss"}
    torch.testing.assert_close(aux["aux_loss"], aux["layer0.mod_aux_loss"] + aux["layer1.mod_aux_loss"])
    torch.testing.assert_close(aux["mod_predictor_acc"],
                               (aux["layer0.mod_predictor_acc"] + aux["layer1.mod_predictor_acc"]) / 2)
    torch.testing.assert_close(out.loss.detach(), aux["lm_loss"] + aux["aux_loss"])
    assert 0 <= float(aux["mod_predictor_acc"]) <= 1
    assert 0 < float(aux["aux_loss"]) < 0.01 * 2 * 5  # two layers of weighted BCE near log 2


# ------------------------------------------------------------------ compile, validation
def test_compile_fullgraph_training_step():
    torch.manual_seed(4)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25))
    tokens = torch.randint(0, 256, (2, S))

    def step(fn):
        model.zero_grad()
        loss = fn(tokens, tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = step(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, ref_loss)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
    assert grads["layers.1.router.weight"].abs().sum() > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mlp", ["dense", "moe"])
def test_autocast_training_step(mlp, device):
    """The trainer's GPU step runs under bf16 autocast with an fp32 residual stream: the MoD
    kernels take the block's bf16 output back into it, routers score in fp32, and the kernel
    path computes what the plain-torch path does."""
    torch.manual_seed(5)
    cfg = _cfg(routing="every_other", mod_capacity=0.25, mlp=mlp, moe_n_experts=4)
    ours = Transformer(cfg).to(device)
    plain = Transformer(cfg.replace(mod_impl="torch")).to(device)
    plain.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, 256, (2, S), device=device)
    results = []
    for model in (ours, plain):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(tokens, tokens)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=2e-2, atol=1e-4, msg=name)
    assert grads["layers.1.router.weight"].dtype == torch.float32
    assert grads["layers.1.router.weight"].abs().sum() > 0
    scores, expected = _selection_scores(ours, tokens, autocast=device)
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)


def _selection_scores(model, tokens, autocast=None):
    """(the scores the first MoD layer's top-k sees, the fp32 router output for its input)."""
    layer = model.layers[1]
    seen, inputs = [], []
    real = layer._select
    layer._select = lambda scores: seen.append(scores) or real(scores)
    handle = layer.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    try:
        with torch.autocast(autocast or "cpu", dtype=torch.bfloat16, enabled=autocast is not None):
            model(tokens)
    finally:
        del layer._select
        handle.remove()
    r = layer.router
    expected = torch.nn.functional.linear(inputs[0].float(), r.weight.float(), r.bias.float()).squeeze(-1)
    return seen[0], expected


def test_bf16_model_routes_on_fp32_scores():
    """A model cast to bf16 still scores its tokens in fp32: bf16 scores (8 mantissa bits)
    tie often over a long sequence, and top-k ties go to the lower position."""
    torch.manual_seed(6)
    model = Transformer(_cfg(routing="every_other", mod_capacity=0.25)).to(torch.bfloat16)
    tokens = torch.randint(0, 256, (2, S))
    scores, expected = _selection_scores(model, tokens)
    assert scores.dtype == torch.float32
    assert not torch.equal(expected.bfloat16().float(), expected)  # bf16 rounding would show
    torch.testing.assert_close(scores, expected, rtol=1e-6, atol=1e-6)


def test_validation():
    with pytest.raises(ValueError, match="capacity"):
        MoDConfig(capacity=0.0)
    with pytest.raises(ValueError, match="causal"):
        MoDConfig(causal="future")
    for kw in (dict(capacity="0.5"), dict(capacity=None), dict(aux_loss_weight="x")):
        with pytest.raises(TypeError, match="must be a number"):
            MoDConfig(**kw)
    with pytest.raises(ValueError, match="aux_loss_weight"):
        MoDConfig(aux_loss_weight=math.nan)
    with pytest.raises(AttributeError):  # frozen: a change would skip the checks above
        MoDConfig().capacity = 5.0
    with pytest.raises(TypeError, match="block"):
        MoDBlock(torch.nn.Linear(2, 2))
    mod = _mod_block()
    with pytest.raises(ValueError, match="positions"):
        mod(torch.randn(2, S, D), torch.arange(S))
    with pytest.raises(ValueError, match="causal"):
        mod(torch.randn(1, S, D), torch.arange(S)[None], kv_cache=KVCache(1).layers[0])


def test_bench_cases_cpu():
    """The benchmark's CPU case: plain-torch MoD and ours compute the same loss; the check
    rejects a different one."""
    from flopwise.models.bench import StepCheck, cases

    mod_case, dense_case = cases(gpu=False)
    ref = mod_case.providers["reference"]()
    assert mod_case.check(mod_case.providers["triton"](), ref) is None
    assert mod_case.check(StepCheck(ref.loss * 1.01, ref.grads), ref) is not None
    assert mod_case.mode == "fwd+bwd" and 0 < mod_case.flops < dense_case.flops
    assert torch.isfinite(dense_case.providers["reference"]().loss)
