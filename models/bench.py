"""Mixture-of-Depths training step: one forward + backward of a whole decoder.

Cases (``cases(gpu)``), per model configuration:

* ``mod_step`` with MoD on every other block at 12.5% capacity. Providers:
  ``reference`` and ``torch``: the plain-torch MoD pipeline that BASELINES.md times (router
  linear, ``topk``, ``sort``, ``torch.gather``, the block on the selected rows, ``sigmoid``
  weight, ``scatter_add`` out of place; ``mod_impl="torch"``); ``triton``: flopwise's MoD
  (``mod_select``, ``gather_tokens``, ``scatter_tokens``; ``mod_impl="kernels"``). Both models
  hold the same weights and see the same batch, so their losses and gradients must agree:
  the check (:func:`_step_check`) compares the losses and, per layer (and for the embedding,
  final norm and head together), the relative error of the whole gradient. The loss alone
  cannot judge a step: at initialisation it barely depends on the blocks (a scatter that
  drops every MoD update moves it by about 2%, while the gradients move by 27% and a MoD
  block's own gradients by 100%), and a wrong backward does not move it at all.
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

from dataclasses import dataclass

import torch

from flopwise.kernels.bench import Case, check_then
from flopwise.models.transformer import ModelConfig, Transformer

__all__ = ["cases"]


@dataclass
class StepCheck:
    """What a provider's first call (the harness's check call) returns: the loss and every
    parameter's gradient by name (``p.grad`` itself, not a copy: the next call sets the
    gradients to None before its backward, so these tensors are never written again)."""

    loss: torch.Tensor
    grads: dict[str, torch.Tensor | None]


def _step(model: Transformer, tokens: torch.Tensor):
    """Provider: one training step's forward + backward. The first call returns a
    :class:`StepCheck`; later calls (the timed ones) return the loss (fp32 scalar) only, so
    timing does no extra work. Reference and compared providers need separate providers
    (each one's first call is its check call)."""

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, tokens, check_ids=False).loss  # ids made in range, as the Trainer's
        loss.backward()
        return loss.detach().float()

    return check_then(lambda: StepCheck(run(), {name: p.grad for name, p in model.named_parameters()}), run)


# Tolerances (relative errors) of a step against the reference step: fp32 (CPU) and bf16
# parameters (GPU). Two correct bf16 steps differ by bf16 rounding (the torch scatter rounds
# w * f and then the sum, the kernel rounds once), which moves later routers' fp32 scores
# and can swap a token at the top-k boundary; see _step_check for the measured margins.
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-1}


def _group(name: str) -> str:
    """The gradient group a parameter belongs to: its layer, or the rest (embedding, final
    norm, head)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else "embed/norm/head"


def _step_check(dtype: torch.dtype):
    """A :class:`StepCheck` against the reference's: the loss within ``LOSS_TOL`` and, per
    group of parameters (each layer; the embedding, final norm and head), the gradient's
    relative error ``||g - g_ref|| / ||g_ref||`` (over the group's parameters together, in
    float64) within ``GRAD_TOL``. Non-finite values fail (``not err <= tol`` refuses NaN).

    Margins, measured on CPU in bf16 at the GPU configurations' layer width (D=1024, 4
    layers, B=1, S=512, 2048 and 4096): torch against kernel MoD, losses within 2.1e-4
    (tolerance 5e-3) and gradients within 7e-3 per group, except a late MoD layer at S=4096
    at 3.5e-2 (tokens swapped at the top-k boundary). A scatter that drops every MoD update:
    loss 1.8-2.2e-2 off, gradients 0.24-0.35 off in the dense layers and the embedding/head
    and 1.0 in the MoD layers; a MoD backward that zeroes the block's gradient moves no loss
    and leaves the MoD layers' gradients 1.0 off. The bf16 gradient tolerance, 3e-1, sits
    well above the boundary swaps (a deeper GPU model at S=4096 swaps more) and well below
    the 1.0 that both bugs put on a MoD layer."""
    loss_tol, grad_tol = LOSS_TOL[dtype], GRAD_TOL[dtype]

    def check(out, ref) -> str | None:
        if not isinstance(out, StepCheck) or not isinstance(ref, StepCheck):
            return "no gradients to check (the provider's first call must return a StepCheck)"
        if not torch.isfinite(ref.loss):
            return "non-finite reference loss"
        if not torch.isfinite(out.loss):
            return "non-finite loss"
        err = float((out.loss.double() - ref.loss.double()).abs() / ref.loss.double().abs().clamp_min(1e-30))
        if not err <= loss_tol:
            return f"loss relative error {err:.1e} > {loss_tol:.0e}"
        if out.grads.keys() != ref.grads.keys():
            return "different parameters"
        diff: dict[str, float] = {}
        norm: dict[str, float] = {}
        for name, g_ref in ref.grads.items():
            g = out.grads[name]
            if (g is None) != (g_ref is None):
                return f"{name}: gradient {'missing' if g is None else 'present where the reference has none'}"
            if g is None:
                continue
            if g.shape != g_ref.shape:
                return f"{name}: gradient shape {tuple(g.shape)} vs {tuple(g_ref.shape)}"
            key = _group(name)
            g, g_ref = g.detach().double(), g_ref.detach().double()
            diff[key] = diff.get(key, 0.0) + float((g - g_ref).square().sum())
            norm[key] = norm.get(key, 0.0) + float(g_ref.square().sum())
        errs = {key: (diff[key] / max(norm[key], 1e-300)) ** 0.5 for key in diff}
        bad = [key for key, err in errs.items() if not err <= grad_tol]  # NaN and inf land here too
        if not bad:
            return None
        worst = max(bad, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
        more = f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""
        return f"{worst} gradient relative error {errs[worst]:.1e} > {grad_tol:.0e}{more}"

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
    return [
        Case(op="mod_step", shape=f"{shape} MoD every other 12.5%", mode="fwd+bwd", check=_step_check(dtype),
             graph=True, flops=int(mod_cfg.flops_per_token(S) * B * S),
             providers={"reference": _step(plain, tokens), "torch": _step(plain, tokens), "triton": _step(ours, tokens)}),
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
