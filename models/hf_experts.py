"""flopwise's fused MoE kernels inside Hugging Face transformers models.

transformers (5.x) routes every MoE model's experts through one interface: the model's
router picks ``top_k_index`` and ``top_k_weights`` per token, and an *experts
implementation* (``"eager"``, ``"grouped_mm"``, ...) runs the experts on them. This module
registers ``"flopwise"`` there: the expert weights are read in place, in the layout
transformers stores them (``gate_up_proj [E, 2F, D]``, ``down_proj [E, D, F]``, or the
transposed ones), through :func:`flopwise.kernels.moe_mlp`'s grouped matmuls (gate and up
with the SwiGLU in one launch reading the token rows directly, down with the combine weight
and the per-token sum in its epilogue), and the gradients come back in that layout too.

Example::

    from transformers import AutoModelForCausalLM
    from flopwise.models.hf_experts import register, use_flopwise_experts

    register()                                   # once per process
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="flopwise")
    # or, for a model already loaded:
    use_flopwise_experts(model)

Supported: SwiGLU experts (SiLU gate, ``has_gate``) without biases, post-expert norm,
a custom gate function or expert parallelism; gate and up concatenated (``[gate; up]``) or
interleaved; either weight orientation. Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3
and most other transformers MoE models qualify; GPT-OSS (biases, clamped gate) does not.
An unsupported experts module raises ``ValueError`` naming what it has, and
:func:`use_flopwise_experts` checks every experts module before it switches anything.

The experts compute in autocast's dtype under autocast (as ``nn.Linear`` would), otherwise
in the hidden states' dtype (weights of another dtype are cast per call, as a copy).
"""

from __future__ import annotations

import torch

from ..kernels import moe_mlp, plan_from_topk
from .moe import _compute_dtype

__all__ = ["NAME", "check_experts_module", "experts_forward", "register", "use_flopwise_experts"]

NAME = "flopwise"
BLOCK_M = 64  # the grouped matmul's row tile (as MoEConfig's default)

_SILU_NAMES = ("SiLU", "SiLUActivation", "SwishActivation")
# experts class -> why it is unsupported (None: supported), for what the class fixes (its
# decorator's flags, its gate function); the activation comes from each model's config
_CHECKED: dict[type, str | None] = {}


def _interface():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
    except ImportError as exc:  # transformers 4.x, or none
        raise ImportError(
            "flopwise.models.hf_experts needs transformers >= 5 (its experts interface, "
            f"transformers.integrations.moe): {exc}") from exc
    return ALL_EXPERTS_FUNCTIONS, _default_apply_gate


def _unsupported(module: torch.nn.Module) -> str | None:
    """Why flopwise's kernels cannot run this experts module, or None."""
    _, default_gate = _interface()
    name = type(module).__name__
    for attr in ("gate_up_proj", "down_proj", "num_experts"):
        if not hasattr(module, attr):
            return f"{name} has no {attr} (not a transformers experts module with fused expert weights)"
    if not getattr(module, "has_gate", True):
        return f"{name} has no gate projection (has_gate=False); the kernels run SwiGLU experts"
    if getattr(module, "has_bias", False):
        return f"{name} has bias terms (has_bias=True); the kernels run bias-free experts"
    if getattr(module, "has_post_expert_norm", False):
        return f"{name} normalises each expert's output (has_post_expert_norm=True)"
    if getattr(type(module), "_apply_gate", default_gate) is not default_gate:
        return f"{name} has its own gate function ({type(module).__name__}._apply_gate), not silu(gate) * up"
    return None


def _not_silu(module: torch.nn.Module) -> str | None:
    """Why this module's activation is not SiLU, or None (an instance's: it comes from the
    model's config, ``ACT2FN[config.hidden_act]``, or is ``F.silu`` itself)."""
    act = getattr(module, "act_fn", None)
    if act is torch.nn.functional.silu or type(act).__name__ in _SILU_NAMES:
        return None
    what = getattr(act, "__name__", None) or type(act).__name__
    return f"{type(module).__name__}'s activation is {what}, not SiLU"


def check_experts_module(module: torch.nn.Module) -> None:
    """Raise ``ValueError`` if flopwise's kernels cannot run this transformers experts module
    (the reason is in the message). What the class fixes is checked once per class; the
    activation (from the model's config) and expert parallelism (set on the instance) on
    every call."""
    cls = type(module)
    if cls not in _CHECKED:
        _CHECKED[cls] = _unsupported(module)
    why = _CHECKED[cls] or _not_silu(module)
    if why is None and getattr(module, "_is_expert_parallel", False):
        why = f"{cls.__name__} is expert-parallel (sentinel expert ids)"
    if why is not None:
        raise ValueError(f"experts_implementation={NAME!r} cannot run this model's experts: {why}. "
                         "Use experts_implementation='grouped_mm' (or 'eager') for it.")


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts signature: ``hidden_states [T, D]``, ``top_k_index [T, K]``,
    ``top_k_weights [T, K]`` -> ``[T, D]`` in hidden_states' dtype. Differentiable in the
    hidden states, the routing weights and both expert weights."""
    check_experts_module(self)
    if hidden_states.shape[0] == 0:  # (no tokens: nothing to route)
        return torch.zeros_like(hidden_states)
    dt = _compute_dtype(hidden_states)
    x = hidden_states.to(dt)
    gate_up, down = self.gate_up_proj, self.down_proj
    if not getattr(self, "is_transposed", False):  # stored [E, 2F, D] and [E, D, F]: nn.Linear's layout
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    gate_up, down = gate_up.to(dt), down.to(dt)  # (a view unless a cast is needed; a cast keeps the layout)
    plan = plan_from_topk(top_k_index, top_k_weights, self.num_experts, block_m=BLOCK_M)
    if getattr(self, "is_concatenated", True):
        y = moe_mlp(x, plan, gate_up, None, down)
    else:  # interleaved columns: gate 0, up 0, gate 1, ...
        y = moe_mlp(x, plan, gate_up[..., 0::2], gate_up[..., 1::2], down)
    return y.to(hidden_states.dtype)


def register() -> str:
    """Register ``"flopwise"`` in transformers' experts interface (idempotent); returns the
    name to pass as ``experts_implementation``."""
    interface, _ = _interface()
    interface.register(NAME, experts_forward)
    return NAME


def _experts_modules(model: torch.nn.Module):
    _interface()  # (transformers >= 5, else ImportError)
    for name, m in model.named_modules():
        cfg = getattr(m, "config", None)
        # (the modules transformers' @use_experts_implementation wraps dispatch on their config)
        if cfg is not None and hasattr(m, "gate_up_proj") and hasattr(m, "has_gate") and hasattr(m, "is_transposed"):
            yield name, m


def use_flopwise_experts(model: torch.nn.Module) -> torch.nn.Module:
    """Register the implementation and switch ``model`` (a transformers ``PreTrainedModel``)
    to it, after checking that every experts module is supported (``ValueError`` otherwise,
    with nothing switched). Returns the model."""
    register()
    found = list(_experts_modules(model))
    if not found:
        raise ValueError(f"{type(model).__name__} has no transformers experts modules (a model whose experts "
                         "use transformers' experts interface, e.g. Mixtral, Qwen2-MoE, OLMoE)")
    for name, m in found:
        try:
            check_experts_module(m)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    model.set_experts_implementation(NAME)
    return model
