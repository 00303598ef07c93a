"""``flopwise bench train``: the training-step suite, its model variants, regional compilation."""

from __future__ import annotations

import pytest
import torch

from flopwise.kernels import bench
from flopwise.kernels.bench import Row
from flopwise.models import bench_train
from flopwise.models.data import ByteData, load_corpus
from flopwise.models.train import TrainConfig, Trainer
from flopwise.models.transformer import ModelConfig, Transformer


def _params(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def test_cpu_suite_runs_every_variant_and_summarises():
    lines: list[str] = []
    rows = bench.run(["train"], budget_ms=1, print_fn=lines.append)
    assert {r.shape.split(" (")[0] for r in rows} == {"dense", "MoD every other 12.5%", "MoE 4x top-2"}
    assert all(r.status == "ok" and r.rate > 0 and r.unit == "tok" for r in rows), rows
    assert all(r.mfu is None for r in rows)  # no peak FLOP/s for a CPU
    assert lines[-1].startswith("tokens/s against dense") and "MoE 4x top-2:" in lines[-1]


def test_gpu_variants_have_the_dense_parameter_count():
    variants = dict(bench_train._variants(gpu=True))
    dense = _params(variants["dense"])
    assert 340e6 <= dense <= 355e6  # "~350M", the MFU target's size
    for name, cfg in variants.items():
        assert _params(cfg) == pytest.approx(dense, rel=5e-3), name
    S = bench_train._GPU_S
    assert variants["dense hd128"].head_dim == 128
    wide = variants[bench_train._WIDE_NAME]
    assert (wide.d_model, wide.n_layers, wide.head_dim) == (1536, 12, 128)
    assert variants[bench_train._ACCUM_NAME] == variants["dense"]
    assert variants["MoE 8x top-2"].flops_per_token(S) < 0.7 * variants["dense"].flops_per_token(S)
    assert variants["MoD every other 12.5%"].flops_per_token(S) < 0.6 * variants["dense"].flops_per_token(S)


def test_summary_compares_best_provider_with_dense():
    def row(shape, provider, rate):
        return Row(op="train_step", shape=shape, mode="x", provider=provider, ms=1.0, tbps=None, tflops=None,
                   vs_torch=None, copy_fraction=None, status="ok", rate=rate)

    rows = [row("dense (1M, D)", "reference", 100.0), row("dense (1M, D)", "compiled", 200.0),
            row("MoD every other 12.5% (1M, D)", "reference", 150.0),
            row("MoD every other 12.5% (1M, D)", "compiled", 300.0)]
    assert bench_train.summary(rows).endswith("MoD every other 12.5%: 1.50x")
    assert "no dense row" in bench_train.summary(rows[2:])
    assert "no other variant" in bench_train.summary(rows[:2])


@pytest.mark.parametrize("variant", ["dense", "mod", "moe"])
def test_compiled_blocks_train_like_eager(variant):
    """Regional compilation (``TrainConfig.compile``) changes nothing the model computes and
    compiles one graph per kind of layer, however deep the model."""
    from torch._dynamo.utils import counters

    kw = {"dense": {}, "mod": dict(routing="every_other"), "moe": dict(mlp="moe", moe_n_experts=4)}[variant]
    cfg = ModelConfig.preset("tiny", d_model=32, n_heads=2, n_layers=4, max_seq_len=64, **kw)
    data = ByteData(load_corpus("embedded"), seed=0)
    tc = TrainConfig(seq_len=32, batch_size=2, max_steps=10, warmup_steps=1, device="cpu")
    torch._dynamo.reset()
    counters.clear()
    eager = Trainer(cfg, tc, data, progress=False)
    compiled = Trainer(cfg, TrainConfig(**{**tc.to_dict(), "compile": "aot_eager"}), data, progress=False)
    for _ in range(2):
        a, b = eager.train_step(), compiled.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    graphs = 2 if variant == "mod" else 1
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["graph_break"]
    # evaluation stays eager: no eval-mode graphs, the same numbers
    assert compiled.evaluate(256)["val_bpb"] == pytest.approx(eager.evaluate(256)["val_bpb"], rel=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("bad", [3, "", None])
def test_compile_option_is_validated(bad):
    with pytest.raises(ValueError, match="compile"):
        TrainConfig(compile=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["dense", "MoD every other 12.5%", "MoE 4x top-2"])
def test_trainer_on_cuda(variant):
    """The CUDA trainer (bf16 autocast, fused AdamW, the Triton kernels) on each variant:
    losses fall, evaluation runs, and the trained model generates the same with and without
    its KV cache."""
    cfg = dict(bench_train._variants(gpu=False))[variant]
    data = ByteData(load_corpus("embedded"), seed=0)
    t = Trainer(cfg, TrainConfig(seq_len=64, batch_size=8, max_steps=30, warmup_steps=3, lr=1e-2, device="cuda",
                                 eval_tokens=2048), data, progress=False)
    res = t.fit()
    assert res.steps == 30 and sum(res.losses[-5:]) / 5 < res.losses[0] - 0.5
    assert 0 < res.val_bpb < 8
    prompt = torch.tensor([list(b"The assert statement")], device="cuda")
    cached = t.model.generate(prompt, 16)
    assert torch.equal(cached, t.model.generate(prompt, 16, use_cache=False))


@pytest.mark.parametrize("name, cat", [
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("void flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>, true>(Flash_fwd_params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80", "attention"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "matmul"),
    ("aten::mm", "matmul"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer+clip"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "inductor fused"),
    ("_grouped_mm_fwd_kernel", "flopwise kernels"),
    ("Memcpy HtoD (Pageable -> Device)", "memcpy/memset"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "eager elementwise"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, NormOps<float>>>", "eager reduction"),
    ("void at::native::(anonymous namespace)::embedding_backward_feature_kernel", "other"),
    ("aten::topk", "other"),
    ("aten::add_", "eager elementwise"),
])
def test_kernel_categories(name, cat):
    assert bench_train.kernel_category(name) == cat


def test_breakdown_table_sums_per_step_and_reports_idle_time():
    times = [("nvjet_a", 6000.0), ("sm90_xmma_gemm_b", 3000.0), ("flash_fwd_kernel", 1500.0), ("triton_poi_x", 900.0)]
    text = bench_train.format_breakdown(times, wall_us=15000.0, steps=3, flops={"matmul": 3e9, "attention": 1e9})
    lines = text.splitlines()
    assert lines[0].startswith("step breakdown: 5.00 ms/step wall, 3.80 ms kernels")
    assert lines[1].split() == ["matmul", "3.00", "ms", "60.0%", "1.0", "TFLOP/s"]  # 3e9 FLOPs in 3 ms
    assert lines[2].split() == ["attention", "0.50", "ms", "10.0%", "2.0", "TFLOP/s"]
    assert lines[3].split() == ["inductor", "fused", "0.30", "ms", "6.0%"]
    assert lines[4].split() == ["idle", "1.20", "ms", "24.0%"]


def test_step_breakdown_profiles_a_cpu_trainer():
    cfg = ModelConfig.preset("tiny", d_model=32, n_heads=2, max_seq_len=64)
    t = Trainer(cfg, TrainConfig(seq_len=64, batch_size=2, max_steps=10, warmup_steps=1, device="cpu"),
                ByteData(load_corpus("embedded"), seed=0), progress=False)
    text = bench_train.step_breakdown(t, steps=2)
    assert t.step == 3  # one warm-up step, two profiled
    assert "matmul" in text and "attention" in text and "TFLOP/s" in text and "idle" in text


def test_after_case_report_is_printed_and_its_failure_contained(monkeypatch):
    from flopwise.kernels.bench import Case

    def cases(gpu):
        ok = lambda: torch.ones(1)  # noqa: E731
        yield Case(op="x", shape="a", providers={"reference": ok}, check=lambda o, r: None, after=lambda: "REPORT a")
        yield Case(op="x", shape="b", providers={"reference": ok}, check=lambda o, r: None, after=lambda: 1 / 0)
        yield Case(op="x", shape="c", providers={"reference": ok}, check=lambda o, r: None)

    import types
    mod = types.ModuleType("fake_suite")
    mod.cases = cases
    monkeypatch.setitem(__import__("sys").modules, "fake_suite", mod)
    monkeypatch.setitem(bench.SUITES, "fake", "fake_suite")
    lines: list[str] = []
    rows = bench.run(["fake"], budget_ms=1, print_fn=lines.append)
    assert len(rows) == 3
    assert "REPORT a" in lines
    assert any("x | b: after-case report failed: ZeroDivisionError" in line for line in lines)


def test_first_step_check_refuses_nan_and_disagreement():
    """NaN compares False against any tolerance: a NaN reference or output is refused, not
    let through, and so is a loss or gradient norm off by more than the tolerance."""
    check = bench_train._same_first_step(1e-5)
    ref = torch.tensor([5.5, 2.0], dtype=torch.float64)
    nan = float("nan")
    assert check(ref.clone(), ref) is None
    for bad in ([nan, 2.0], [5.5, nan], [5.5, float("inf")]):
        assert check(ref.clone(), torch.tensor(bad, dtype=torch.float64)) is not None, bad  # reference
        assert check(torch.tensor(bad, dtype=torch.float64), ref) is not None, bad  # output
    assert "loss" in check(torch.tensor([5.5 * 1.001, 2.0], dtype=torch.float64), ref)
    assert "gradient norm" in check(torch.tensor([5.5, 2.0 * 1.001], dtype=torch.float64), ref)
