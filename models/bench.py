"""Mixture-of-Depths training step: one forward + backward of a whole decoder.

Cases (``cases(gpu)``), per model configuration:

* ``mod_step`` with MoD on every other block at 12.5% capacity. Providers:
  ``reference`` and ``torch``: the plain-torch MoD pipeline that BASELINES.md times (router
  linear, ``topk``, ``sort``, ``torch.gather``, the block on the selected rows, ``sigmoid``
  weight, ``scatter_add`` out of place; ``mod_impl="torch"``); ``triton``: flopwise's MoD
  (``mod_select``, ``gather_tokens``, ``scatter_tokens``; ``mod_impl="kernels"``). Both models
  hold the same weights and see the same batch, so their losses must agree: the check
  compares them (top-k ties may break differently in bf16, hence a loose bf16 tolerance).
* ``mod_step`` ``... dense``: the same decoder without MoD, the model MoD must beat per FLOP.

Every row is also timed as CUDA-graph replays (``graph µs``): the step's device time, which
the eager wall clock hides where the host enqueues more slowly than the GPU runs (measured
on the lent H100 at these sizes). Each provider returns the loss (LM loss + the MoD router's auxiliary BCE loss, as in
training) after ``backward()``. FLOPs are ``config.flops_per_token(S) * B * S`` (training
FLOPs: attention included, MoD layers counting their capacity fraction), so TFLOP/s is
comparable across dense and MoD rows. Parameters are bf16 on GPU (no autocast), fp32 on CPU.

GPU configurations are BASELINES.md's (D=2048, 16 heads, 8 layers, B=2, S=4096 and D=1024,
8 heads, 12 layers, B=4, S=4096; vocabulary 256); on CPU a tiny model.
"""

from __future__ import annotations

import torch

from flopwise.kernels.bench import Case
from flopwise.models.transformer import ModelConfig, Transformer

__all__ = ["cases"]


def _step(model: Transformer, tokens: torch.Tensor):
    """Provider: one training step's forward + backward; returns the loss (fp32 scalar)."""

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, tokens, check_ids=False).loss  # ids made in range, as the Trainer's
        loss.backward()
        return loss.detach().float()

    return run


def _loss_check(dtype: torch.dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    def check(out, ref) -> str | None:
        if not torch.isfinite(out):
            return "non-finite loss"
        err = float((out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1e-30))
        return None if err <= tol else f"loss relative error {err:.1e} > {tol:.0e}"

    return check


def _always_ok(out, ref) -> str | None:
    # The dense model computes a different function from the MoD models: there is nothing to
    # compare it with, so this check always passes. Its row is a timing reference only.
    return None


def _cases_for(preset: str, overrides: dict, B: int, S: int, dtype: torch.dtype, device: str) -> list[Case]:
    base = ModelConfig.preset(preset, max_seq_len=S, **overrides)
    mod_cfg = base.replace(routing="every_other", mod_capacity=0.125)
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, base.vocab_size, (B, S), generator=g).to(device)

    torch.manual_seed(0)
    ours = Transformer(mod_cfg).to(device=device, dtype=dtype)
    plain = Transformer(mod_cfg.replace(mod_impl="torch")).to(device=device, dtype=dtype)
    plain.load_state_dict(ours.state_dict())
    dense = Transformer(base).to(device=device, dtype=dtype)

    dt = str(dtype).replace("torch.", "")
    shape = f"D{base.d_model} H{base.n_heads} L{base.n_layers} B{B} S{S} {dt}"
    torch_mod = _step(plain, tokens)
    return [
        Case(op="mod_step", shape=f"{shape} MoD every other 12.5%", mode="fwd+bwd", check=_loss_check(dtype), graph=True,
             flops=int(mod_cfg.flops_per_token(S) * B * S),
             providers={"reference": torch_mod, "torch": torch_mod, "triton": _step(ours, tokens)}),
        Case(op="mod_step", shape=f"{shape} dense", mode="fwd+bwd", check=_always_ok, graph=True,
             flops=int(base.flops_per_token(S) * B * S),
             providers={"reference": _step(dense, tokens)}),
    ]


def cases(gpu: bool) -> list[Case]:
    if gpu:
        return [
            *_cases_for("bench-d2048", {}, B=2, S=4096, dtype=torch.bfloat16, device="cuda"),
            *_cases_for("bench-d1024", {}, B=4, S=4096, dtype=torch.bfloat16, device="cuda"),
        ]
    return _cases_for("tiny", dict(d_model=32, n_heads=2), B=2, S=32, dtype=torch.float32, device="cpu")
