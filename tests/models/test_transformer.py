"""Decoder: configuration and presets, FLOP counts against hand-computed values, forward and
loss, RoPE at explicit positions, MoE wiring, generation with and without a KV cache."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.models import ModelConfig, Transformer, mod_pattern
from flopwise.models.transformer import Block, SwiGLU


def _cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_heads=2, d_ff=48, n_layers=2, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


# ------------------------------------------------------------------ configuration
def test_presets_and_mod_patterns():
    cfg = ModelConfig.preset("tiny", mod="every_other")
    assert cfg.routing == ("all", "mod") and cfg.mod_capacity == 0.125 and cfg.mlp == ("dense", "dense")
    assert ModelConfig.preset("tiny").routing == ("all", "all")
    assert ModelConfig.preset("m1").d_model == 256 and ModelConfig.preset("m1").n_layers == 3
    assert mod_pattern(5, "every_other") == ("all", "mod", "all", "mod", "all")
    assert mod_pattern(3, [0, 2]) == ("mod", "all", "mod")
    assert mod_pattern(2, ["mod", "all"]) == ("mod", "all")
    assert _cfg(routing="mod", mlp=["dense", "moe"]).mlp == ("dense", "moe")
    big = ModelConfig.preset("1b")
    n = 12 * big.d_model**2 * big.n_layers  # 4 D^2 attention + 3 D F (F = 2.75 D) MLP per layer
    assert 0.9e9 < n + 2 * big.vocab_size * big.d_model < 1.2e9


@pytest.mark.parametrize("kwargs, exc, word", [
    (dict(d_model=30, n_heads=4), ValueError, "d_model"),
    (dict(routing="sometimes"), ValueError, "routing"),
    (dict(routing=["mod"]), ValueError, "routing"),
    (dict(routing=[5]), ValueError, "routing"),
    (dict(mlp="sparse"), ValueError, "mlp"),
    (dict(mod_capacity=1.5), ValueError, "mod_capacity"),
    (dict(mod_causal="oracle"), ValueError, "mod_causal"),
    (dict(vocab_size=0), ValueError, "vocab_size"),
    (dict(n_layers=2.0), TypeError, "n_layers"),
    # RoPE tables of a theta <= 0 are NaN, which CPU attention turns into silent zeros
    (dict(rope_theta=0.0), ValueError, "rope_theta"),
    (dict(rope_theta=-1.0), ValueError, "rope_theta"),
    (dict(rope_theta=float("nan")), ValueError, "rope_theta"),
    (dict(norm_eps=-1e-6), ValueError, "norm_eps"),
    (dict(norm_eps=float("inf")), ValueError, "norm_eps"),
    # values from config files: named by field, strings never read as true
    (dict(mod_capacity="0.5"), TypeError, "mod_capacity"),
    (dict(moe_capacity_factor="2"), TypeError, "moe_capacity_factor"),
    (dict(tie_embeddings="false"), TypeError, "tie_embeddings"),
    (dict(parallel_block="no"), TypeError, "parallel_block"),
    (dict(mod_aux_loss_weight=float("nan")), ValueError, "mod_aux_loss_weight"),
    (dict(mlp="moe", moe_n_experts=8, moe_top_k=9), ValueError, "moe_top_k"),
])
def test_config_validation(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        _cfg(**kwargs)


def test_preset_validation():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ValueError, match="mod="):
        ModelConfig.preset("tiny", mod="every_other", routing="all")


def test_padding_to_multiple():
    cfg = _cfg(vocab_size=250, d_ff=40, pad_to_multiple_of=64)
    assert (cfg.padded_vocab_size, cfg.ffn_dim) == (256, 64)
    model = Transformer(cfg)
    assert model.head.weight.shape == (256, 32) and model.layers[0].mlp.w_out.weight.shape == (32, 64)
    tokens = torch.randint(0, 250, (1, 8))
    assert model(tokens).logits.shape == (1, 8, 250)


# ------------------------------------------------------------------ FLOPs (hand-computed)
# D=32, V=256, F=48, S=16: head 2*32*256 = 16384; a dense layer: projections 8*32^2 = 8192,
# MLP 6*32*48 = 9216, attention 2*D*(S+1) = 1088 -> 18496.
def test_flops_dense():
    cfg = _cfg()
    assert cfg.forward_flops_per_token(16) == 16384 + 2 * 18496
    assert cfg.flops_per_token(16) == 3 * (16384 + 2 * 18496)


def test_flops_mod():
    # capacity 0.25 of 16 -> k = 4: 4/16 * (8192 + 9216 + 2*32*5) + router 2*32 = 4496
    cfg = _cfg(routing="every_other", mod_capacity=0.25)
    assert cfg.forward_flops_per_token(16) == 16384 + 18496 + 4496
    assert cfg.flops_per_token(16) == 3 * 39376
    # predictor (hidden max(8, 32 // 8) = 8): 2*(32*8 + 8) = 528 forward, twice that in training
    pred = _cfg(routing="every_other", mod_capacity=0.25, mod_causal="predictor")
    assert pred.forward_flops_per_token(16) == 39376 + 528
    assert pred.flops_per_token(16) == 3 * 39376 + 2 * 528
    # k rounds up: capacity 0.125 of 20 tokens -> 3
    assert _cfg(routing="mod", mod_capacity=0.125).forward_flops_per_token(20) == pytest.approx(
        16384 + 2 * (3 / 20 * (8192 + 9216 + 2 * 32 * 4) + 64))


def test_flops_moe():
    # layer 1: top-2 of 4 experts with F_e = 24: 2 * (6*32*24) + router 2*32*4 = 9472
    cfg = _cfg(mlp=["dense", "moe"], moe_n_experts=4, moe_top_k=2, moe_d_ff=24)
    assert cfg.forward_flops_per_token(16) == 16384 + 18496 + (8192 + 9472 + 1088)
    # MoD around the MoE layer (MoDE): 4/16 * (8192 + 9472 + 320) + 64 = 4560
    mode = _cfg(mlp=["dense", "moe"], routing="every_other", mod_capacity=0.25,
                moe_n_experts=4, moe_top_k=2, moe_d_ff=24)
    assert mode.forward_flops_per_token(16) == 16384 + 18496 + 4560
    # expert choice: capacity factor 1.5 experts per token on average: 1.5 * 4608 + 256 = 7168
    ec = _cfg(mlp=["dense", "moe"], moe_n_experts=4, moe_router="expert_choice", moe_capacity_factor=1.5,
              moe_d_ff=24)
    assert ec.forward_flops_per_token(16) == 16384 + 18496 + (8192 + 7168 + 1088)


def test_flops_ratio_matches_baselines_ceiling():
    """BASELINES.md: the FLOP-ratio ceiling of MoD every other block at 12.5% is 1.80x
    (D=2048, 8 layers) and 1.81x (D=1024, 12 layers) at S=4096."""
    for name, ceiling in (("bench-d2048", 1.80), ("bench-d1024", 1.81)):
        dense = ModelConfig.preset(name).flops_per_token(4096)
        mod = ModelConfig.preset(name, mod="every_other").flops_per_token(4096)
        assert dense / mod == pytest.approx(ceiling, abs=0.02)
    with pytest.raises(ValueError, match="seq_len"):
        _cfg().flops_per_token(0)


# ------------------------------------------------------------------ forward
def test_forward_loss_and_causality():
    model = Transformer(_cfg())
    tokens = torch.randint(0, 256, (2, 12))
    targets = torch.randint(0, 256, (2, 12))
    out = model(tokens, targets)
    assert out.logits.shape == (2, 12, 256)
    ce = F.cross_entropy(out.logits.reshape(-1, 256), targets.reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    assert float(out.aux["aux_loss"]) == 0.0
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(changed).logits[:, :6], out.logits[:, :6].detach(), rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="tokens"):
        model(tokens.float())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_large_vocab():
    model = Transformer(_cfg(vocab_size=65536, n_layers=1, tie_embeddings=False))
    tokens = torch.randint(0, 65536, (1, 8))
    out = model(tokens, tokens)
    assert out.logits.shape == (1, 8, 65536) and torch.isfinite(out.loss)


def test_block_delta_uses_explicit_positions():
    """RoPE attention depends on relative positions only: shifting all positions leaves the
    update unchanged; permuting them does not. And forward = h + delta."""
    blk = Block(_cfg(), 0)
    h = torch.randn(2, 10, 32)
    pos = torch.arange(10).expand(2, 10)
    d0, _ = blk.delta(h, pos)
    d5, _ = blk.delta(h, pos + 5)
    torch.testing.assert_close(d0, d5, rtol=1e-4, atol=1e-5)
    spread, _ = blk.delta(h, pos * 3)
    assert not torch.allclose(d0, spread, atol=1e-4)
    torch.testing.assert_close(blk(h, pos)[0], h + d0)


# ------------------------------------------------------------------ MoE wiring
def test_moe_missing_module_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "flopwise.models.moe", None)
    with pytest.raises(ImportError, match="mlp='moe' needs flopwise.models.moe"):
        Transformer(_cfg(mlp=["dense", "moe"]))


def test_moe_layer_wiring(monkeypatch):
    """A stand-in with the agreed API: MoEConfig(d_model, d_ff, n_experts, top_k, router, ...),
    MoE(cfg).config, MoE(cfg)(x, return_losses=True) -> (y, aux_loss, losses)."""

    @dataclasses.dataclass
    class MoEConfig:
        d_model: int
        d_ff: int
        n_experts: int
        top_k: int
        router: str = "token_choice"
        capacity_factor: float = 2.0
        score: str = "softmax"
        normalize_topk: bool = True
        shared_d_ff: int = 0
        load_balance_coef: float = 0.01
        z_loss_coef: float = 0.001
        bias_update_rate: float = 0.0
        n_group: int = 1
        topk_group: int | None = None
        group_score: str = "top2"
        route_scale: float = 1.0
        load_balance_scope: str = "batch"

    class MoE(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.config = cfg
            self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

        def forward(self, x, return_losses=False):
            y, aux = self.mlp(x), x.new_tensor(0.25) + 0 * x.sum()
            losses = {"max_violation": x.new_tensor(0.5), "max_violation_seq": x.new_tensor(0.75)}
            return (y, aux, losses) if return_losses else (y, aux)

    fake = types.ModuleType("flopwise.models.moe")
    fake.MoE, fake.MoEConfig = MoE, MoEConfig
    monkeypatch.setitem(sys.modules, "flopwise.models.moe", fake)
    cfg = _cfg(mlp=["dense", "moe"], routing="every_other", mod_capacity=0.25, moe_n_experts=4, moe_top_k=1,
               moe_router="expert_choice", moe_capacity_factor=1.5, moe_d_ff=24)
    model = Transformer(cfg)
    moe = model.layers[1].block.mlp
    assert moe.config == MoEConfig(d_model=32, d_ff=24, n_experts=4, top_k=1, router="expert_choice",
                                   capacity_factor=1.5)
    tokens = torch.randint(0, 256, (2, 16))
    out = model(tokens, tokens)
    assert float(out.aux["layer1.moe_aux_loss"]) == 0.25
    assert "moe_max_violation" not in out.aux, "expert choice is balanced by construction: no metric"
    tc = Transformer(cfg.replace(moe_router="token_choice"))
    tc_aux = tc(tokens, tokens).aux
    assert float(tc_aux["moe_max_violation"]) == 0.5 and float(tc_aux["moe_max_violation_seq"]) == 0.75
    torch.testing.assert_close(out.aux["aux_loss"], out.aux["layer1.mod_aux_loss"] + 0.25)
    torch.testing.assert_close(out.loss.detach(), out.aux["lm_loss"] + out.aux["aux_loss"])


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_real_moe_layer_inside_mod(router):
    """MoDE: the MoE layer of flopwise.models.moe inside a MoD block, trained end to end."""
    cfg = _cfg(mlp=["dense", "moe"], routing="every_other", mod_capacity=0.5, moe_n_experts=4, moe_top_k=2,
               moe_router=router, moe_d_ff=16)
    model = Transformer(cfg)
    tokens = torch.randint(0, 256, (2, 8))
    out = model(tokens, tokens)
    assert float(out.aux["layer1.moe_aux_loss"]) > 0
    out.loss.backward()
    assert model.layers[1].block.mlp.w_gate.grad.abs().sum() > 0


# ------------------------------------------------------------------ generation
def test_generation_cache_equals_recompute_dense():
    torch.manual_seed(5)
    model = Transformer(_cfg(tie_embeddings=False))
    with torch.no_grad():  # larger weights: a less uniform next-token distribution
        model.head.weight.mul_(20)
    prompt = torch.randint(0, 256, (2, 4))
    greedy = model.generate(prompt, 10)
    assert greedy.shape == (2, 14) and torch.equal(greedy[:, :4], prompt)
    assert greedy[:, 4:].unique().numel() > 4  # not a trivially repeated token
    assert torch.equal(greedy, model.generate(prompt, 10, use_cache=False))
    # greedy is the argmax of the full-sequence logits at every step
    with torch.no_grad():
        logits = model(greedy[:, :-1]).logits
    assert torch.equal(logits[:, 3:].argmax(-1), greedy[:, 4:])
    # top_k=1 sampling is greedy; seeded sampling is reproducible and cache-independent
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1, seed=0), greedy)
    s1 = model.generate(prompt, 10, temperature=1.0, seed=7)
    assert torch.equal(s1, model.generate(prompt, 10, temperature=1.0, seed=7, use_cache=False))
    assert not torch.equal(s1, model.generate(prompt, 10, temperature=1.0, seed=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 61)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 1, temperature=-1.0)
    with pytest.raises(TypeError, match="temperature must be a number"):
        model.generate(prompt, 1, temperature="1")
    with pytest.raises(TypeError, match="seed must be None or an int"):
        model.generate(prompt, 1, temperature=1.0, seed=1.5)
    import numpy as np

    assert torch.equal(model.generate(prompt, 10, temperature=np.float32(1.0), seed=np.int64(7)), s1)
    # top_k only applies to sampling: with greedy decoding it is refused, not ignored
    with pytest.raises(ValueError, match="top_k=5 applies to sampling"):
        model.generate(prompt, 1, top_k=5)
    with pytest.raises(ValueError, match="seed must be in"):
        model.generate(prompt, 1, temperature=1.0, seed=2**64)
    # a tiny temperature is greedy, never inf / inf
    for t in (1e-38, 1e-46, 5e-324):
        assert torch.equal(model.generate(prompt, 10, temperature=t, seed=0), greedy), t


@pytest.mark.parametrize("kw", [{}, {"mod": "every_other"}, {"mlp": "moe"}, {"mod": "every_other", "mlp": "moe"}],
                         ids=["dense", "mod", "moe", "mod+moe"])
def test_meta_device_gives_shapes(kw):
    """A model built on the meta device (for its shapes and parameter count) runs forward there."""
    cfg = ModelConfig.preset("tiny", **kw)
    with torch.device("meta"):
        model = Transformer(cfg)
    tokens = torch.zeros(2, 16, dtype=torch.long, device="meta")
    out = model(tokens, tokens)
    assert out.logits.shape == (2, 16, cfg.padded_vocab_size) and out.logits.is_meta and out.loss.shape == ()


def test_rope_tables_stay_fp32_under_dtype_casts():
    model = Transformer(_cfg()).to(torch.bfloat16)
    attn = model.layers[0].attn
    assert attn.wqkv.weight.dtype == torch.bfloat16
    assert attn.rope_cos.dtype == torch.float32 and attn.rope_sin.dtype == torch.float32
    torch.testing.assert_close(attn.rope_cos, Transformer(_cfg()).layers[0].attn.rope_cos, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(mlp="moe", moe_n_experts=4, moe_top_k=2), id="moe"),
    pytest.param(dict(mlp="moe", moe_n_experts=4, routing="every_other", mod_capacity=0.25), id="mod+moe"),
])
def test_generation_cache_equals_recompute_moe(kw, monkeypatch):
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")  # the cache logic, not the kernels (interpreter: minutes)
    torch.manual_seed(0)
    model = Transformer(_cfg(tie_embeddings=False, n_layers=2, **kw))
    with torch.no_grad():
        model.head.weight.mul_(20)
    prompt = torch.randint(0, 256, (3, 5))
    greedy = model.generate(prompt, 20)
    assert greedy[:, 5:].unique().numel() > 4
    assert torch.equal(greedy, model.generate(prompt, 20, use_cache=False))
    sampled = model.generate(prompt, 20, temperature=1.0, seed=1)
    assert torch.equal(sampled, model.generate(prompt, 20, temperature=1.0, seed=1, use_cache=False))


def test_expert_choice_model_refuses_cached_generation(monkeypatch):
    """Expert choice is not causal (at a one-token step every expert picks that token), so a
    cached generation would silently differ from the recomputed one: it is refused."""
    monkeypatch.setenv("FLOPWISE_BACKEND", "reference")
    model = Transformer(_cfg(mlp="moe", moe_n_experts=4, moe_router="expert_choice"))
    prompt = torch.randint(0, 256, (2, 5))
    with pytest.raises(ValueError, match="expert choice is not causal"):
        model.generate(prompt, 3)
    assert model.generate(prompt, 3, use_cache=False).shape == (2, 8)


def test_token_ids_are_range_checked():
    """An id past vocab_size but inside the padded vocabulary would read an untrained row."""
    model = Transformer(ModelConfig.preset("tiny", vocab_size=250, pad_to_multiple_of=64))
    ok = torch.tensor([[1, 2, 3]])
    for bad in (252, 256, -1):
        with pytest.raises(ValueError, match=r"tokens must be ids in \[0, vocab_size=250\)"):
            model(torch.tensor([[1, bad, 3]]))
        with pytest.raises(ValueError, match=r"targets must be ids in \[0, vocab_size=250\)"):
            model(ok, torch.tensor([[1, bad, 3]]))
        with pytest.raises(ValueError, match="prompt must hold ids"):
            model.generate(torch.tensor([[1, bad]]), 2)
    with pytest.raises(TypeError, match="targets"):
        model(ok, ok.float())
    with pytest.raises(TypeError, match="prompt"):
        model.generate(ok.float(), 2)
    with pytest.raises(ValueError, match="batch size"):
        model(torch.zeros(0, 4, dtype=torch.long))
    assert torch.isfinite(model(ok, torch.tensor([[1, -100, 249]])).loss)  # -100: ignored


def test_check_ids_false_skips_only_the_range_check(monkeypatch):
    """generate checks its prompt on the host and samples ids below vocab_size, so its model
    calls skip the per-call check; a plain call keeps it, check_ids=False drops it."""
    model = Transformer(ModelConfig.preset("tiny", vocab_size=250, pad_to_multiple_of=64))
    calls = []
    real = Transformer._check_ids
    monkeypatch.setattr(Transformer, "_check_ids", lambda self, *a: calls.append(a) or real(self, *a))
    model.generate(torch.tensor([[1, 2]]), 3)
    model.generate(torch.tensor([[1, 2]]), 3, use_cache=False)
    assert calls == []
    bad = torch.tensor([[1, 252, 3]])  # inside the padded vocabulary: only the check can see it
    with pytest.raises(ValueError, match="tokens must be ids"):
        model(bad)
    assert len(calls) == 1
    assert model(bad, check_ids=False).logits.shape == (1, 3, 250)
    assert len(calls) == 1


def test_failed_call_leaves_the_kv_cache_as_it_was(monkeypatch):
    from flopwise.models.transformer import KVCache

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", max_seq_len=32, routing="every_other")).eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(len(model.layers))
        model(x[:, :8], kv_cache=cache)
        lengths = [c.length.clone() for c in cache.layers]
        model.train()  # MoD routes by top-k: the cache is refused before any layer appends
        with pytest.raises(ValueError, match="causal MoD routing"):
            model(x[:, 8:9], kv_cache=cache)
        model.eval()
        # a layer that fails after earlier layers appended: their appends are undone
        with monkeypatch.context() as m:
            m.setattr(model.layers[1], "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
            with pytest.raises(RuntimeError, match="boom"):
                model(x[:, 8:9], kv_cache=cache)
        assert cache.seq_len == 8
        assert all(torch.equal(c.length, n) for c, n in zip(cache.layers, lengths))
        steps = [model(x[:, t:t + 1], kv_cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 8:12], rtol=1e-5, atol=1e-5)


def test_replace_depth_and_flops_limits():
    cfg = ModelConfig.preset("tiny")
    assert cfg.replace(n_layers=3).routing == ("all",) * 3
    assert ModelConfig.preset("tiny", mod="mod", mlp="moe").replace(n_layers=3).mlp == ("moe",) * 3
    with pytest.raises(ValueError, match="routing"):
        ModelConfig.preset("tiny", mod="every_other").replace(n_layers=3)
    with pytest.raises(ValueError, match="max_seq_len=256"):
        cfg.flops_per_token(512)
