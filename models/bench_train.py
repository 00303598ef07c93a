"""Training throughput and MFU: ``flopwise bench train``.

Each case times one optimizer step of :class:`~flopwise.models.train.Trainer`, the exact
step ``flopwise train`` runs: bf16 autocast on CUDA (fp32 master weights), forward,
backward, gradient clipping and fused AdamW, with one host synchronisation per step.
FLOPs are ``ModelConfig.flops_per_token(S)`` per token (attention counted over the causal
context, MoD layers at their capacity, MoE layers at their active experts), so the MFU
column is the achieved training FLOP/s over the card's dense bf16 peak (H100: 989 TFLOP/s,
the spec-sheet convention) and the rate column is tokens per second.

Models (GPU), all with about 346M parameters (preset ``350m``: D=1024, 24 layers,
SwiGLU F=3328, vocabulary 256), S=2048, 8 sequences a step:

* ``dense``: the MFU target's model (head dim 64);
* ``MoD``: MoD on every other block at 12.5% capacity (the same parameters plus routers);
* ``MoE``: every MLP an 8-expert token-choice top-2 MoE with F=416 experts, so the total
  parameters equal the dense model's and a token uses a quarter of its MLP;
* ``dense hd128``: the dense model with 8 heads of 128;
* ``dense wide D1536 L12``: the same parameter count in half the depth (D=1536, 12 layers,
  12 heads of 128, F=4224): fewer, wider matmuls;
* ``dense 4 micro-batches`` (second): the dense model with 4 micro-batches of 8 sequences per
  optimizer step, so the step's fixed costs (AdamW, clipping) are amortised over more tokens.

Providers: ``reference`` is the eager step, ``compiled`` the step with every block
compiled (:func:`~flopwise.models.train.compile_blocks`). Both trainers start from the same
seed and see the same first batch, so their first losses (the forward) and gradient norms
(the backward) must agree (bf16 tolerance): a compiled step that computes something else
is reported, not timed. :func:`summary` prints each variant's tokens/s against the dense
model's. After each GPU case, :func:`step_breakdown` profiles a few more steps of the
compiled trainer it timed and prints where the step's time goes: device time per kernel
category (matmul, attention, optimizer and clipping, inductor's fused kernels, flopwise's
kernels, eager elementwise, ...), each category's achieved TFLOP/s where its FLOPs are
known, and the time the device sat idle.

On CPU the cases are a tiny model in fp32 (no compiled provider: inductor needs a C++
toolchain and minutes there); they check that the suite runs, not speed.
"""

from __future__ import annotations

import re
import time
from typing import Iterable, Iterator

import torch

from flopwise.kernels.bench import Case, Row
from flopwise.models.data import ByteData, load_corpus
from flopwise.models.train import TrainConfig, Trainer, peak_flops
from flopwise.models.transformer import ModelConfig

__all__ = ["cases", "summary", "step_breakdown", "kernel_category", "format_breakdown"]

_GPU_S, _GPU_B = 2048, 8


def _variants(gpu: bool) -> list[tuple[str, ModelConfig]]:
    if gpu:
        base = ModelConfig.preset("350m", max_seq_len=_GPU_S)
    else:
        base = ModelConfig.preset("tiny", d_model=32, n_heads=2, max_seq_len=64)
    E = 8 if gpu else 4
    mod = base.replace(routing="every_other", mod_capacity=0.125)
    moe = base.replace(mlp="moe", moe_n_experts=E, moe_top_k=2, moe_d_ff=base.ffn_dim // E)
    if not gpu:
        return [("dense", base), ("MoD every other 12.5%", mod), (f"MoE {E}x top-2", moe)]
    # in order of need, so a time limit cuts the least needed rows
    return [("dense", base), (_WIDE_NAME, ModelConfig.preset("350m", max_seq_len=_GPU_S, **_WIDE)), (_ACCUM_NAME, base),
            ("MoD every other 12.5%", mod), (f"MoE {E}x top-2", moe), ("dense hd128", base.replace(n_heads=8))]


# The same parameter count in half the depth: D=1536, 12 layers of 12 heads of 128, SwiGLU
# F=4224 (~347M, 0.3% above the 350m preset). Each step's matmuls are 1.5x wider and there
# are half as many of them, so fewer, larger kernels fill the card; attention runs at head
# dim 128.
_WIDE_NAME = "dense wide D1536 L12"
_WIDE = dict(d_model=1536, n_layers=12, n_heads=12, d_ff=4224)


# The dense model with 4 micro-batches per optimizer step (65,536 tokens a step, still far
# below a real run's): the optimizer and clipping, a fixed cost per step, amortised as in
# training at a realistic batch.
_ACCUM_NAME, _ACCUM = "dense 4 micro-batches", 4


def _provider(model_cfg: ModelConfig, train_cfg: TrainConfig, data: ByteData, state: dict | None = None):
    """A provider that builds its trainer on first call (so a case's models exist only while
    it runs; ``state["trainer"]``) and then runs one optimizer step per call, returning that
    step's LM loss and gradient norm."""
    state = {} if state is None else state

    def step():
        if "trainer" not in state:
            state["trainer"] = Trainer(model_cfg, train_cfg, data, progress=False)
        m = state["trainer"].train_step()
        return torch.tensor([m["loss"], m["grad_norm"]], dtype=torch.float64)

    return step


def _same_first_step(tol: float):
    """The first step's loss (the forward) and gradient norm (the backward) must agree."""

    def check(out, ref) -> str | None:
        if not torch.isfinite(ref).all():
            return "non-finite reference loss or gradient norm"
        if not torch.isfinite(out).all():
            return "non-finite loss or gradient norm"
        for i, what in enumerate(("loss", "gradient norm")):
            err = float((out[i] - ref[i]).abs() / ref[i].abs().clamp_min(1e-30))
            if not err <= tol:  # NaN compares False: refused, not let through
                return f"first-step {what} relative error {err:.1e} > {tol:.0e}"
        return None

    return check


def cases(gpu: bool) -> Iterator[Case]:
    """One case per model variant, built as the harness reaches it (a generator: each case's
    trainers are freed before the next case allocates its own)."""
    S, B = (_GPU_S, _GPU_B) if gpu else (64, 2)
    data = ByteData(load_corpus(), seed=0)
    train_cfg = TrainConfig(seq_len=S, batch_size=B, max_steps=10**6, warmup_steps=10, lr=3e-4,
                            device="cuda" if gpu else "cpu", dtype="auto", log_every=10**6)
    peak = peak_flops("cuda") if gpu else None
    for name, cfg in _variants(gpu):
        accum = _ACCUM if name == _ACCUM_NAME else 1
        tc = TrainConfig(**{**train_cfg.to_dict(), "grad_accum": accum})
        providers = {"reference": _provider(cfg, tc, data)}
        compiled: dict = {}
        if gpu:
            providers["compiled"] = _provider(cfg, TrainConfig(**{**tc.to_dict(), "compile": True}), data, compiled)
        params = _param_count(cfg)
        shape = (f"{name} ({params / 1e6:.3g}M, D{cfg.d_model} L{cfg.n_layers} hd{cfg.head_dim} "
                 f"B{B}{f'x{accum}' if accum > 1 else ''} S{S} {'bf16 autocast' if gpu else 'fp32'})")
        yield Case(op="train_step", shape=shape, mode="fwd+bwd+adamw", providers=providers,
                   check=_same_first_step(3e-2 if gpu else 1e-5), flops=int(cfg.flops_per_token(S) * B * S * accum),
                   count=B * S * accum, unit="tok", peak_flops=peak, budget_ms=1500.0 if gpu else 50.0,
                   after=(lambda c=compiled: step_breakdown(c["trainer"]) if "trainer" in c else None))


def _param_count(cfg: ModelConfig) -> int:
    from flopwise.models.transformer import Transformer

    with torch.device("meta"):
        return Transformer(cfg).num_parameters()


def summary(rows: list[Row]) -> str:
    """Each variant's best tokens/s (over providers) against the dense model's."""
    best: dict[str, float] = {}
    for r in rows:
        if r.rate:
            variant = r.shape.split(" (", 1)[0]
            best[variant] = max(best.get(variant, 0.0), r.rate)
    dense = best.get("dense")
    if not dense:
        return "tokens/s against dense: no dense row was timed"
    if len(best) == 1:
        return "tokens/s against dense: no other variant was timed"
    parts = [f"{k}: {v / dense:.2f}x" for k, v in best.items() if k != "dense"]
    return "tokens/s against dense (best provider each): " + ", ".join(parts)


# Kernel (CUDA) or operator (CPU profile) name patterns, lower case, first match wins.
_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"fmha|flash|attention|sdpa"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|^aten::(mm|addmm|bmm|matmul|linear)$"),
    ("optimizer+clip", r"adam|multi_tensor|foreach|lpnorm"),
    ("inductor fused", r"^triton_"),
    ("flopwise kernels", r"^_\w+_kernel$"),
    ("memcpy/memset", r"memcpy|memset"),
    ("eager elementwise", r"elementwise|^aten::(add|mul|sub|div|copy_|to|_to_copy|silu|neg|cat|fill_|zero_)_?$"),
    ("eager reduction", r"reduce_kernel|^aten::(sum|mean|max|min|amax)$"),
)


def kernel_category(name: str) -> str:
    """The category a profiled kernel (or CPU operator) name belongs to, ``"other"`` if none."""
    low = name.lower()
    for cat, pattern in _CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def format_breakdown(times_us: Iterable[tuple[str, float]], wall_us: float, steps: int,
                     flops: dict[str, float] | None = None, title: str = "") -> str:
    """A table of device time per category, per step: ms, share of the step's wall time and,
    for categories in ``flops`` (FLOPs per step), the achieved TFLOP/s; then the idle time
    (wall minus all kernel time: host gaps and synchronisation). ``times_us``: (kernel name,
    total µs over the ``steps`` profiled steps)."""
    per: dict[str, float] = {}
    for name, us in times_us:
        cat = kernel_category(name)
        per[cat] = per.get(cat, 0.0) + us / steps
    wall = wall_us / steps
    busy = sum(per.values())
    lines = [f"step breakdown{' ' + title if title else ''}: {wall / 1e3:.2f} ms/step wall, "
             f"{busy / 1e3:.2f} ms kernels"]
    for cat, us in sorted(per.items(), key=lambda kv: -kv[1]):
        rate = ""
        if flops and flops.get(cat) and us > 0:
            rate = f"  {flops[cat] / (us * 1e-6) / 1e12:7.1f} TFLOP/s"
        lines.append(f"  {cat:<18} {us / 1e3:8.2f} ms  {100 * us / wall:5.1f}%{rate}")
    lines.append(f"  {'idle':<18} {max(wall - busy, 0.0) / 1e3:8.2f} ms  {100 * max(wall - busy, 0.0) / wall:5.1f}%")
    return "\n".join(lines)


def _attention_flops_per_token(cfg: ModelConfig, S: int) -> float:
    """Training FLOPs per token of the attention scores and values alone (3x the forward's
    ``2 D (context + 1)`` per layer, MoD layers over their k selected tokens)."""
    from flopwise.kernels import mod_capacity

    total = 0.0
    for routing in cfg.routing:
        if routing == "mod":
            k = mod_capacity(S, cfg.mod_capacity)
            total += k / S * 2 * cfg.d_model * (k + 1)
        else:
            total += 2 * cfg.d_model * (S + 1)
    return 3 * total


def step_breakdown(trainer: Trainer, steps: int = 3) -> str:
    """Profile ``steps`` optimizer steps of ``trainer`` (after one untimed step) and return
    :func:`format_breakdown`'s table. On CUDA it counts kernel time; on CPU, operator self
    time (a rough picture: CPU operators are not kernels)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    trainer.train_step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    if cuda:
        times = [(e.key, e.self_device_time_total) for e in prof.key_averages()
                 if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]
    else:
        times = [(e.key, e.self_cpu_time_total) for e in prof.key_averages() if e.key.startswith("aten::")]
    cfg, tc = trainer.model_cfg, trainer.cfg
    tokens = tc.tokens_per_step
    attn = _attention_flops_per_token(cfg, tc.seq_len) * tokens
    flops = {"attention": attn}
    if all(m == "dense" for m in cfg.mlp):  # MoE layers' GEMMs run in flopwise's kernels
        flops["matmul"] = cfg.flops_per_token(tc.seq_len) * tokens - attn
    return format_breakdown(times, wall_us, steps, flops, title=f"({trainer.device.type}, {steps} steps)")
