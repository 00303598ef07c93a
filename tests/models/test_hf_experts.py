"""flopwise's kernels as a transformers experts implementation: tiny models of each
architecture give the "eager" implementation's logits and every parameter's gradient."""

from __future__ import annotations

import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.integrations.moe", reason="transformers >= 5 has the experts interface")

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from flopwise.models import hf_experts  # noqa: E402

G = importlib.import_module("flopwise.kernels.grouped_mm")

from ..conftest import rel_err  # noqa: E402

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
ARCHS = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2),
    "lfm2_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                     num_dense_layers=1, layer_types=["full_attention"] * 2),  # act_fn is F.silu itself
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                        rope_scaling=None, num_key_value_heads=4),
}


def _model(arch, dtype=torch.float32, **extra):
    cfg = AutoConfig.for_model(arch, **{**COMMON, **ARCHS[arch], **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)


def _step(model, impl, ids):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_and_every_gradient_match_eager(arch):
    model = _model(arch)
    hf_experts.register()
    ids = torch.randint(3, 64, (2, 9))
    logits, grads = _step(model, "flopwise", ids)
    ref_logits, ref_grads = _step(model, "eager", ids)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-4)
    assert grads.keys() == ref_grads.keys()
    expert_params = [n for n in grads if n.endswith(("gate_up_proj", "down_proj"))]
    assert expert_params  # the experts' weights got gradients
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=2e-5, rtol=2e-4, msg=n)


def test_kernel_path_runs_and_gradients_keep_the_parameters_layout(monkeypatch):
    """The experts go through moe_mlp's fused gate-up path with the stored weights (no copy),
    and the experts' gradients arrive in the parameters' own layout."""
    seen = []
    real = hf_experts.moe_mlp

    def spy(x, plan, w_gate, w_up, w_down, **kw):
        seen.append((x.dtype, w_up is None, w_gate._base is not None, w_down._base is not None))
        return real(x, plan, w_gate, w_up, w_down, **kw)

    monkeypatch.setattr(hf_experts, "moe_mlp", spy)
    launches = []
    real_rows = G._launch_rows
    monkeypatch.setattr(G, "_launch_rows", lambda *a, **kw: launches.append(kw["epilogue"]) or real_rows(*a, **kw))
    model = _model("mixtral")
    hf_experts.use_flopwise_experts(model)
    assert model.config._experts_implementation == "flopwise"
    model(torch.randint(3, 64, (1, 5)), labels=torch.randint(3, 64, (1, 5))).loss.backward()
    assert seen == [(torch.float32, True, True, True)] * 2  # two layers: fused, transposed views
    assert len(launches) == 2 * 4  # the Triton kernels ran (interpreted here): 2 launches forward, 2 backward
    for layer in model.model.layers:
        for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
            assert p.grad.stride() == p.stride()


def test_bf16_model_and_autocast():
    ids = torch.randint(3, 64, (2, 9))
    model = _model("mixtral", torch.bfloat16)
    hf_experts.register()
    logits, grads = _step(model, "flopwise", ids)
    ref_logits, ref_grads = _step(_model("mixtral"), "eager", ids)  # fp32 reference
    assert rel_err(logits.float(), ref_logits) < 3e-2
    for n in ref_grads:
        assert rel_err(grads[n].float(), ref_grads[n]) < 6e-2, n
    # an fp32 model under bf16 autocast: the experts compute in bf16, as nn.Linear would
    model = _model("mixtral")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = _step(model, "flopwise", ids)
        ref_logits, _ = _step(model, "eager", ids)
    assert logits.dtype == ref_logits.dtype
    assert rel_err(logits.float(), ref_logits.float()) < 3e-2


def test_generation_and_from_pretrained(tmp_path):
    model = _model("qwen3_moe").eval()
    ids = torch.randint(3, 64, (1, 6))
    hf_experts.register()
    model.set_experts_implementation("eager")
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="flopwise").eval()
    assert loaded.config._experts_implementation == "flopwise"
    got = loaded.generate(ids, max_new_tokens=6, do_sample=False)  # one token per step with the KV cache
    assert torch.equal(got, want)


def test_unsupported_experts_are_refused_with_the_reason():
    cfg = AutoConfig.for_model("gpt_oss", **COMMON, intermediate_size=24, num_local_experts=4,
                               num_experts_per_tok=2, head_dim=8)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="has bias terms"):
        hf_experts.use_flopwise_experts(model)
    assert model.config._experts_implementation != "flopwise"  # nothing switched
    model.set_experts_implementation("flopwise")  # set directly: the first forward refuses
    with pytest.raises(ValueError, match="cannot run this model's experts: GptOssExperts has bias terms"):
        model(torch.randint(3, 64, (1, 4)))
    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **COMMON, intermediate_size=48))
    with pytest.raises(ValueError, match="no transformers experts modules"):
        hf_experts.use_flopwise_experts(dense)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bench_providers_inside_transformers_pass_the_bench_check(mode):
    """The ``bench moe`` providers with transformers' storage (its own grouped_mm
    implementation, and flopwise's) give the reference's output and every gradient under the
    suite's own check, and a wrong one fails it."""
    from flopwise.kernels.bench import moe as suite

    T, D, Fh, E, k = 64, 32, 48, 4, 2
    x, router_w = torch.randn(T, D), torch.randn(E, D) / D**0.5
    wg, wu, wd = torch.randn(E, D, Fh) / 6, torch.randn(E, D, Fh) / 6, torch.randn(E, Fh, D) / 7
    gate_up, down = suite.hf_weights(wg, wu, wd)
    providers = suite.hf_providers()
    assert set(providers) == {"torch-hf-grouped-mm", "triton-hf"}
    check = suite.check_for("moe_layer", torch.float32)
    gy = torch.randn(T, D)
    if mode == "fwd":
        ref = suite.reference(x, router_w, wg, wu, wd, k, 16)
        run = {n: (lambda f=f: f(x, router_w, gate_up, down, k)) for n, f in providers.items()}
    else:
        grad = [t.clone().requires_grad_(True) for t in (x, wg, wu, wd)]
        ref = suite._fwd_bwd(lambda *a: suite.reference(*a, 16), (grad[0], router_w, *grad[1:], k), gy)()
        hf_args = (grad[0], router_w, gate_up.requires_grad_(True), down.requires_grad_(True), k)
        run = {n: suite._fwd_bwd_hf(f, hf_args, gy) for n, f in providers.items()}
    for name, f in run.items():
        assert check(f(), ref) is None, name
    bad = run["triton-hf"]()
    bad = bad * 1.01 if mode == "fwd" else (bad[0], bad[1], bad[2], bad[3] * 1.01, bad[4])
    assert check(bad, ref) is not None


def test_activation_is_checked_per_model_not_per_class():
    """The activation comes from each model's config: a GELU Mixtral is refused even after a
    SiLU one of the same class ran, and a SiLU one runs after a GELU one was refused."""
    hf_experts.register()
    ids = torch.randint(3, 64, (1, 5))
    silu, gelu = _model("mixtral"), _model("mixtral", hidden_act="gelu")
    silu.set_experts_implementation("flopwise")
    silu(ids)
    with pytest.raises(ValueError, match="MixtralExperts's activation is GELUActivation, not SiLU"):
        hf_experts.use_flopwise_experts(gelu)
    gelu.set_experts_implementation("flopwise")
    with pytest.raises(ValueError, match="activation is GELUActivation"):
        gelu(ids)
    again = hf_experts.use_flopwise_experts(_model("mixtral"))
    torch.testing.assert_close(again(ids).logits, silu(ids).logits)


def test_compiled_model_has_no_graph_break_and_matches_eager():
    """torch.compile of a model on the "flopwise" experts: one graph per forward (the plan and
    the experts are custom ops; nothing syncs with the host), the eager model's logits and
    gradients."""
    from torch._dynamo.utils import counters

    model = hf_experts.use_flopwise_experts(_model("mixtral"))
    ids = torch.randint(3, 64, (2, 9))
    logits, grads = _step(model, "flopwise", ids)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(ids, labels=ids)
    out.loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out.logits.detach(), logits, atol=1e-6, rtol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("arch, fmt, layers", [("llama", "mixtral", "all"), ("qwen3", "qwen3_moe", "every_other")])
def test_upcycled_checkpoint_reproduces_the_dense_model_on_the_kernels(tmp_path, arch, fmt, layers):
    """A dense Llama upcycled to Mixtral, and a dense Qwen3 to Qwen3-MoE on every other layer
    (copy init, renormalised top-k), loaded with experts_implementation="flopwise": the dense
    logits, and eager's gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from flopwise.models.upcycle import UpcycleOptions, upcycle

    torch.manual_seed(0)
    cfg, cls = (LlamaConfig, LlamaForCausalLM) if arch == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    dense = cls(cfg(**{**COMMON, "intermediate_size": 48})).eval()
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"),
            UpcycleOptions(n_experts=4, top_k=2, format=fmt, layers=layers))
    hf_experts.register()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", experts_implementation="flopwise",
                                               dtype=torch.float32)
    ids = torch.randint(3, 64, (2, 10))
    with torch.no_grad():
        assert float((moe(ids).logits - dense(ids).logits).abs().max()) <= 1e-4
    logits, grads = _step(moe, "flopwise", ids)
    ref_logits, ref_grads = _step(moe, "eager", ids)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=2e-4)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=2e-5, rtol=2e-4, msg=n)


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_gpu_bf16_model_matches_fp32_eager(arch):
    """On the card: a bf16 model through the compiled kernels against the same bf16 model
    through transformers' eager experts (same router code, so the same choices in the first
    layer; logits and every gradient)."""
    hf_experts.register()
    extra = dict(hidden_size=256, num_attention_heads=4, head_dim=64)
    extra.update(dict(intermediate_size=512, num_local_experts=8) if arch == "mixtral"
                 else dict(moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4))
    ids = torch.randint(3, 64, (4, 128), device="cuda")
    model = _model(arch, torch.bfloat16, **extra).cuda()
    got = _step(model, "flopwise", ids)
    ref = _step(model, "eager", ids)
    assert rel_err(got[0].float(), ref[0].float()) < 3e-2
    for n in ref[1]:
        assert rel_err(got[1][n].float(), ref[1][n].float()) < 6e-2, n


def test_peak_memory_below_transformers_grouped_mm():
    """``scripts/peak_memory.py --hf`` (the CPU allocator's events replayed at a scaled-down
    benchmark shape): inside a transformers model, the layer's forward+backward peak is below
    transformers' own grouped_mm implementation's, which keeps the gathered rows, the 2F-wide
    gate-up output and the unpermuted copies for its backward."""
    from ..conftest import load_script

    res = load_script("peak_memory").main(["--scale", "128", "--shapes", "olmoe", "--hf"])
    ours_fwd, ours = res[("olmoe", "hf-ours")]
    torch_fwd, pipeline = res[("olmoe", "hf-torch")]
    assert ours_fwd < torch_fwd and ours < 0.6 * pipeline, (ours_fwd, torch_fwd, ours, pipeline)
