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
* ``dense hd128``: the dense model with 8 heads of 128.

Providers: ``reference`` is the eager step, ``compiled`` the step with every block
compiled (:func:`~flopwise.models.train.compile_blocks`). Both trainers start from the same
seed and see the same first batch, so their first losses (the forward) and gradient norms
(the backward) must agree (bf16 tolerance): a compiled step that computes something else
is reported, not timed. :func:`summary` prints each variant's tokens/s against the dense
model's.

On CPU the cases are a tiny model in fp32 (no compiled provider: inductor needs a C++
toolchain and minutes there); they check that the suite runs, not speed.
"""

from __future__ import annotations

from typing import Iterator

import torch

from flopwise.kernels.bench import Case, Row
from flopwise.models.data import ByteData, load_corpus
from flopwise.models.train import TrainConfig, Trainer, peak_flops
from flopwise.models.transformer import ModelConfig

__all__ = ["cases", "summary"]

_GPU_S, _GPU_B = 2048, 8


def _variants(gpu: bool) -> list[tuple[str, ModelConfig]]:
    if gpu:
        base = ModelConfig.preset("350m", max_seq_len=_GPU_S)
    else:
        base = ModelConfig.preset("tiny", d_model=32, n_heads=2, max_seq_len=64)
    E = 8 if gpu else 4
    mod = base.replace(routing="every_other", mod_capacity=0.125)
    moe = base.replace(mlp="moe", moe_n_experts=E, moe_top_k=2, moe_d_ff=base.ffn_dim // E)
    variants = [("dense", base), ("MoD every other 12.5%", mod), (f"MoE {E}x top-2", moe)]
    # last, so a time limit cuts the least needed row
    return variants + ([("dense hd128", base.replace(n_heads=8))] if gpu else [])


def _provider(model_cfg: ModelConfig, train_cfg: TrainConfig, data: ByteData):
    """A provider that builds its trainer on first call (so a case's models exist only while
    it runs) and then runs one optimizer step per call, returning that step's LM loss."""
    state: dict = {}

    def step():
        if "trainer" not in state:
            state["trainer"] = Trainer(model_cfg, train_cfg, data, progress=False)
        m = state["trainer"].train_step()
        return torch.tensor([m["loss"], m["grad_norm"]], dtype=torch.float64)

    return step


def _same_first_step(tol: float):
    """The first step's loss (the forward) and gradient norm (the backward) must agree."""

    def check(out, ref) -> str | None:
        if not torch.isfinite(out).all():
            return "non-finite loss or gradient norm"
        for i, what in enumerate(("loss", "gradient norm")):
            err = float((out[i] - ref[i]).abs() / ref[i].abs().clamp_min(1e-30))
            if err > tol:
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
        providers = {"reference": _provider(cfg, train_cfg, data)}
        if gpu:
            providers["compiled"] = _provider(cfg, TrainConfig(**{**train_cfg.to_dict(), "compile": True}), data)
        params = _param_count(cfg)
        shape = (f"{name} ({params / 1e6:.3g}M, D{cfg.d_model} L{cfg.n_layers} hd{cfg.head_dim} "
                 f"B{B} S{S} {'bf16 autocast' if gpu else 'fp32'})")
        yield Case(op="train_step", shape=shape, mode="fwd+bwd+adamw", providers=providers,
                   check=_same_first_step(3e-2 if gpu else 1e-5), flops=int(cfg.flops_per_token(S) * B * S),
                   count=B * S, unit="tok", peak_flops=peak, budget_ms=1500.0 if gpu else 50.0)


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
