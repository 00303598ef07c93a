"""Mixture-of-Experts layer with SwiGLU experts.

Routers: token-choice top-k (dropless; Mixtral/OLMoE style) or expert-choice with a
capacity factor (Zhou et al. 2022). Optional always-on shared expert, optional
renormalisation of the top-k weights. Auxiliary losses: the Switch load-balancing loss
and the router z-loss, weighted by the coefficients in :class:`MoEConfig`.

The layer calls :func:`flopwise.kernels.topk_route` / :func:`expert_choice_route` and
:func:`flopwise.kernels.moe_mlp`; on a CPU without the Triton interpreter those run their
PyTorch references (a per-expert loop), so the layer works everywhere.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.kernels import expert_choice_route, moe_mlp, plan_from_counts, topk_route
from flopwise.kernels.routing import check_group_limit

__all__ = ["MoEConfig", "MoE", "SwiGLU", "load_balancing_loss", "router_z_loss", "sequence_balancing_loss"]

_ROUTERS = ("token_choice", "expert_choice")
_SCOPES = ("batch", "sequence")


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of an MoE layer.

    d_model, d_ff: model and per-expert hidden sizes; n_experts: E; top_k: experts per token
    (token choice); capacity_factor: average experts per token (expert choice, C =
    ceil(T * cf / E)); score: "softmax" or "sigmoid"; normalize_topk: renormalise the k
    weights to sum to 1 (Mixtral: True, OLMoE: False); shared_d_ff: hidden size of an
    always-on shared SwiGLU expert (0: none); load_balance_coef / z_loss_coef weight the
    auxiliary losses; block_m: rows per grouped-matmul block (64 suits experts with few rows
    each, 128 large ones); retain_activations: keep the experts' saved pre-activations intact
    through the backward (see ``moe_mlp``), for backpropagating more than once
    (``retain_graph=True``) at 2 x N x F more memory.

    bias_update_rate: auxiliary-loss-free load balancing (Wang et al. 2024, DeepSeek-V3),
    token choice only; 0 (default) turns it off. The layer then holds a per-expert selection
    bias (buffer ``expert_bias``, saved with the weights): experts are chosen by score + bias,
    weighted by the score alone, and :meth:`MoE.update_bias` (the trainer calls it after
    every optimizer step) moves each bias by this rate towards balance: up for an expert
    that took fewer than the mean number of tokens since the last update, down for one that
    took more. DeepSeek-V3 used 0.001 with sigmoid scores, alongside a tiny or no
    ``load_balance_coef``.

    n_group, topk_group, group_score: group-limited routing (token choice; see
    :func:`flopwise.kernels.topk_route`): the experts form ``n_group`` groups of consecutive
    ids, and each token picks its ``top_k`` among the experts of its ``topk_group`` best
    groups (None: all, no limit), a group scored by its best expert (``"max"``, DeepSeek-V2)
    or its best two (``"top2"``, DeepSeek-V3). With experts sharded by group over devices
    or nodes, a token's rows go to at most ``topk_group`` of them.

    load_balance_scope: what the load-balancing loss balances. ``"batch"`` (default): the
    Switch loss over all the input's tokens and the experts they went to.
    ``"sequence"``: DeepSeek-V3's complementary sequence-wise loss, the same loss per
    sequence (an input ``[..., S, D]`` holds ``prod(...)`` sequences of S tokens; ``[T, D]``
    is one), averaged over sequences, so that no single sequence sends its tokens to a few
    experts. As in DeepSeek-V3's definition, its load counts each token's top k of the
    router's own scores, without the selection bias or the group limit (with neither, those
    are the experts the tokens went to). DeepSeek-V3 weighted it by 0.0001 alongside its
    bias balancing.

    route_scale: multiplies the routed experts' combined output (DeepSeek-V3's
    ``routed_scaling_factor``, 2.5 there; the shared expert is not scaled).

    DeepSeek-V3's layer: ``MoEConfig(d_model, d_ff, 256, 8, score="sigmoid",
    normalize_topk=True, shared_d_ff=d_ff, bias_update_rate=0.001, n_group=8, topk_group=4,
    route_scale=2.5, load_balance_coef=1e-4, load_balance_scope="sequence")``.
    """

    d_model: int
    d_ff: int
    n_experts: int
    top_k: int = 2
    router: str = "token_choice"
    capacity_factor: float = 2.0
    score: str = "softmax"
    normalize_topk: bool = True
    shared_d_ff: int = 0
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.001
    block_m: int = 64
    init_std: float = 0.02
    retain_activations: bool = False
    bias_update_rate: float = 0.0
    n_group: int = 1
    topk_group: int | None = None
    group_score: str = "top2"
    route_scale: float = 1.0
    load_balance_scope: str = "batch"

    def __post_init__(self):
        for name in ("d_model", "d_ff", "n_experts", "top_k", "block_m", "n_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.shared_d_ff, bool) or not isinstance(self.shared_d_ff, int):
            raise TypeError(f"MoEConfig.shared_d_ff must be an int, got {self.shared_d_ff!r}")
        for name in ("capacity_factor", "load_balance_coef", "z_loss_coef", "init_std", "bias_update_rate",
                     "route_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"MoEConfig.{name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"MoEConfig.{name} must be finite and >= 0, got {v}")
        for name in ("normalize_topk", "retain_activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"MoEConfig.{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.block_m & (self.block_m - 1):
            raise ValueError(f"MoEConfig.block_m must be a power of two (the grouped matmul's row tile), "
                             f"got {self.block_m}")
        if self.router not in _ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {_ROUTERS}, got {self.router!r}")
        if self.router == "token_choice" and self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k = {self.top_k} exceeds n_experts = {self.n_experts}")
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"MoEConfig.score must be 'softmax' or 'sigmoid', got {self.score!r}")
        if not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise ValueError(f"MoEConfig.capacity_factor must be > 0, got {self.capacity_factor}")
        if self.shared_d_ff < 0:
            raise ValueError(f"MoEConfig.shared_d_ff must be >= 0, got {self.shared_d_ff}")
        if self.bias_update_rate > 0 and self.router != "token_choice":
            raise ValueError("MoEConfig.bias_update_rate balances token-choice routing; expert choice is balanced "
                             "by construction (every expert takes C tokens), so it must be 0 there, "
                             f"got {self.bias_update_rate}")
        if not self.route_scale > 0:
            raise ValueError(f"MoEConfig.route_scale must be > 0, got {self.route_scale}")
        if self.load_balance_scope not in _SCOPES:
            raise ValueError(f"MoEConfig.load_balance_scope must be one of {_SCOPES}, got {self.load_balance_scope!r}")
        if self.topk_group is not None and (isinstance(self.topk_group, bool) or not isinstance(self.topk_group, int)):
            raise TypeError(f"MoEConfig.topk_group must be None or an int, got {self.topk_group!r}")
        if self.router != "token_choice" and (self.n_group, self.topk_group) != (1, None):
            raise ValueError("MoEConfig.n_group/topk_group limit token-choice routing; with expert choice they "
                             f"must stay 1/None, got {self.n_group}/{self.topk_group}")
        check_group_limit(self.n_experts, min(self.top_k, self.n_experts), self.n_group, self.topk_group,
                          self.group_score, "MoEConfig.", "MoEConfig.top_k")

    @classmethod
    def preset(cls, name: str, **overrides) -> "MoEConfig":
        """Named shapes: ``mixtral`` (D=4096, F=14336, E=8, k=2), ``olmoe`` (D=2048, F=1024,
        E=64, k=8, no renormalisation), ``fine_grained`` (D=1024, F=512, E=128, k=8), ``tiny``."""
        presets = {
            "mixtral": cls(4096, 14336, 8, 2, normalize_topk=True, block_m=128),
            "olmoe": cls(2048, 1024, 64, 8, normalize_topk=False),
            "fine_grained": cls(1024, 512, 128, 8),
            "tiny": cls(32, 48, 4, 2, block_m=16),
        }
        if name not in presets:
            raise ValueError(f"unknown MoE preset {name!r}; choose from {sorted(presets)}")
        return replace(presets[name], **overrides)

    @property
    def active_params_per_token(self) -> int:
        k = self.top_k if self.router == "token_choice" else self.capacity_factor
        return int(round(3 * self.d_model * self.d_ff * k)) + 3 * self.d_model * self.shared_d_ff \
            + self.d_model * self.n_experts


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: the dense MLP, also used as the shared expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's loss ``E * sum_e f_e * P_e``: f_e the fraction of routed slots that
    went to expert e (not differentiable), P_e the mean router probability of e. Equals 1
    when both are uniform."""
    E = probs.shape[-1]
    f = counts.float() / counts.sum().clamp_min(1).float()
    return E * (f * probs.mean(0)).sum()


def sequence_balancing_loss(probs: torch.Tensor, topk_ids: torch.Tensor, n_seq: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss: :func:`load_balancing_loss` of
    each of ``n_seq`` equal, consecutive runs of tokens (``probs [T, E]``, ``topk_ids [T, k]``
    the experts counted for each token: DeepSeek-V3 counts the top k of the router's own
    scores), averaged over them. Per sequence it is DeepSeek-V3's ``sum_i f_i P_i`` with
    ``f_i = E / (k S) * (tokens counted for i)``."""
    T, E = probs.shape
    k = topk_ids.shape[1]
    if n_seq < 1 or T % n_seq:
        raise ValueError(f"n_seq must be >= 1 and divide the {T} tokens, got {n_seq}")
    S = T // n_seq
    ids = topk_ids.long().reshape(n_seq, S * k)
    counts = torch.zeros(n_seq, E, dtype=probs.dtype, device=probs.device).scatter_add_(
        1, ids, torch.ones(ids.shape, dtype=probs.dtype, device=probs.device))
    f = counts / (S * k)
    return E * (f * probs.reshape(n_seq, S, E).mean(1)).sum(-1).mean()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of ``logsumexp(logits)^2`` (keeps logits small)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def autocast_off(device: torch.device):
    """``torch.autocast(device.type, enabled=False)``; nothing on the meta device, which
    autocast does not know (a model built there for its shapes)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The experts' matmul dtype: autocast's when it is on for x's device (as nn.Linear
    would compute under it: a bf16 step must not run its expert GEMMs in fp32), else x's."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoE(nn.Module):
    """SwiGLU Mixture-of-Experts.

    ``forward(x: [..., D]) -> (y: [..., D], aux_loss: scalar)``; with ``return_losses=True``
    also a dict with the unweighted ``load_balance`` and ``z_loss``.

    Parameters: ``router.weight [E, D]``, ``w_gate, w_up [E, D, F]``, ``w_down [E, F, D]``,
    and ``shared`` (a :class:`SwiGLU`) when ``shared_d_ff > 0``. With ``bias_update_rate >
    0``, buffers ``expert_bias [E]`` (float32, in the state dict) and ``expert_load [E]``
    (int64, not saved: the rows each expert took in training mode since the last
    :meth:`update_bias`).

    ``losses`` (``return_losses=True``) also holds ``max_violation``, the load imbalance
    ``max_e load_e / mean_e load_e - 1`` of the batch's token-choice routing (0: perfectly
    balanced; not differentiable), and ``max_violation_seq``, the same per sequence of an
    input ``[..., S, D]`` (the loads of its S tokens alone), averaged over the sequences:
    what the sequence-wise balance loss acts on.

    The experts compute in x's dtype (autocast's under autocast), the shared expert in its
    own weights' dtype; y has x's dtype. An input with no tokens gives an empty y and a zero
    aux loss. On the meta device the layer gives shapes.

    Example::

        moe = MoE(MoEConfig(d_model=512, d_ff=1024, n_experts=8, top_k=2))
        y, aux = moe(x)            # x: [B, S, 512]
        loss = task_loss + aux
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = c = config
        self.router = nn.Linear(c.d_model, c.n_experts, bias=False)
        n = len(self._held_experts())  # all E here; an expert-parallel shard allocates only its own
        self.w_gate = nn.Parameter(torch.empty(n, c.d_model, c.d_ff))
        self.w_up = nn.Parameter(torch.empty(n, c.d_model, c.d_ff))
        self.w_down = nn.Parameter(torch.empty(n, c.d_ff, c.d_model))
        self.shared = SwiGLU(c.d_model, c.shared_d_ff) if c.shared_d_ff else None
        if c.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(c.n_experts))
            self.register_buffer("expert_load", torch.zeros(c.n_experts, dtype=torch.int64), persistent=False)
        else:
            self.expert_bias = self.expert_load = None
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the selection bias, and bias steps of 1e-3
        # vanish in bf16 once |bias| >= 0.5: it follows the device but stays float32.
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != bias.dtype:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) may move expert_bias to another device; the load count,
        # which is not saved, goes with it (and starts again)
        if self.expert_bias is not None and self.expert_load.device != self.expert_bias.device:
            self.expert_load = torch.zeros_like(self.expert_load, device=self.expert_bias.device)

    def _held_experts(self) -> range:
        """The global ids of the experts whose weights this module holds."""
        return range(self.config.n_experts)

    def _init_seed(self) -> int:
        """The seed :meth:`reset_parameters` uses when given none: one draw from torch's
        default CPU generator."""
        return int(torch.randint(0, 2**62, (), device="cpu"))

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None):
        """Router and expert weights ~ N(0, init_std); the shared expert's Linear layers get
        PyTorch's default (Kaiming-uniform). Every tensor comes from its own generator seeded
        from ``seed`` (default: one draw from the default CPU generator, so ``torch.manual_seed``
        still decides): the router and the shared expert from ``seed``, expert ``e``'s three
        weights from a stream of their own. Expert ``e`` is therefore the same whatever other
        experts a module holds: an expert-parallel layer's shards, gathered, equal the
        single-process layer built under the same seed, on any number of ranks (for one device
        type: CUDA and CPU generators draw different numbers)."""
        seed = self._init_seed() if seed is None else int(seed)
        std = self.config.init_std
        if self.expert_bias is not None:
            self.expert_bias.zero_()
            self.expert_load.zero_()

        def gen(stream: int, like: torch.Tensor):
            if like.device.type == "meta":
                return None  # nothing is drawn on the meta device
            g = torch.Generator(device=like.device)
            g.manual_seed((seed * 1_000_003 + stream) % 2**63)
            return g

        g = gen(0, self.router.weight)
        nn.init.normal_(self.router.weight, 0.0, std, generator=g)
        if self.shared is not None:
            for lin in (self.shared.gate, self.shared.up, self.shared.down):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=g)
        for i, e in enumerate(self._held_experts()):
            g = gen(1 + e, self.w_gate)
            for w in (self.w_gate, self.w_up, self.w_down):
                nn.init.normal_(w[i], 0.0, std, generator=g)

    def route(self, x_TD: torch.Tensor):
        """Router logits (float32) and the routing plan for ``x_TD [T, D]``."""
        c = self.config
        # Through the module (not its .weight) so FSDP2 can unshard it. The router stays out
        # of autocast (selective precision, as Switch Transformers): with fp32 weights the
        # logits are fp32; a model cast to bf16 computes them in bf16 (rounded, then widened).
        with autocast_off(x_TD.device):
            logits = self.router(x_TD.to(self.router.weight.dtype)).float()
        if x_TD.shape[0] == 0:  # no tokens: an empty plan (the routers need a token); an expert-parallel
            dev = x_TD.device   # rank in this state still joins the collectives and serves its experts
            plan = plan_from_counts(torch.zeros(0, dtype=torch.int32, device=dev), logits.new_zeros(0),
                                    torch.zeros(c.n_experts, dtype=torch.int32, device=dev), 0, block_m=c.block_m)
        elif c.router == "token_choice":
            plan = topk_route(logits, c.top_k, score=c.score, renormalize=c.normalize_topk, block_m=c.block_m,
                              bias=self.expert_bias, n_group=c.n_group, topk_group=c.topk_group,
                              group_score=c.group_score)
        else:
            plan = expert_choice_route(logits, c.capacity_factor, score=c.score, block_m=c.block_m)
        if self.expert_load is not None and self.training:
            with torch.no_grad():
                self.expert_load.add_(plan.expert_counts)
        return logits, plan

    @torch.no_grad()
    def update_bias(self, group=None) -> torch.Tensor | None:
        """One step of auxiliary-loss-free balancing (``config.bias_update_rate > 0``):
        ``expert_bias += rate * sign(mean load - load)`` over the rows each expert took in
        training mode since the last call, then the count restarts. An expert with exactly the
        mean load keeps its bias; with no rows counted nothing changes.

        ``group``: the process group of every rank that routed different tokens with a copy
        of this layer (data parallel; with expert and data parallelism together, the group
        spanning both): their loads are summed first (``all_reduce``, so every rank of the
        group calls it), which keeps the bias identical across them. Returns the load used
        ([E], int64), or None when balancing is off."""
        if self.expert_bias is None:
            return None
        load = self.expert_load.clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=group)
        self.expert_load.zero_()
        mean = load.double().mean()
        step = torch.sign(mean - load.double()).float() * self.config.bias_update_rate
        self.expert_bias.add_(torch.where(load.sum() > 0, step, torch.zeros_like(step)))
        return load

    def forward(self, x: torch.Tensor, *, return_losses: bool = False):
        c = self.config
        if not isinstance(x, torch.Tensor) or x.shape[-1] != c.d_model:
            raise ValueError(f"x must be a tensor [..., {c.d_model}], got {tuple(getattr(x, 'shape', ()))}")
        shape = x.shape
        x_TD = x.reshape(-1, c.d_model)
        logits, plan = self.route(x_TD)
        y = self._routed_experts(x_TD.to(_compute_dtype(x_TD)), plan)
        if c.route_scale != 1.0:
            y = y * c.route_scale
        if self.shared is not None:  # in its own weights' dtype, as the experts are in x's (else a dtype error)
            y = y + self.shared(x_TD.to(self.shared.gate.weight.dtype)).to(y.dtype)
        aux, losses = self._aux_losses(logits, plan, n_seq=math.prod(shape[:-2]) if x.dim() > 2 else 1)
        y = y.reshape(shape)
        if return_losses:
            return y, aux, losses
        return y, aux

    def _routed_experts(self, x_TD: torch.Tensor, plan) -> torch.Tensor:
        """``[T, D]``: the experts' outputs along the plan, combined per token."""
        dt = x_TD.dtype
        return moe_mlp(x_TD, plan, self.w_gate.to(dt), self.w_up.to(dt), self.w_down.to(dt),
                       retain_activations=self.config.retain_activations)

    def _aux_losses(self, logits: torch.Tensor, plan, n_seq: int = 1):
        """(weighted sum, {"load_balance", "z_loss", "max_violation", "max_violation_seq"}) for the
        router's logits and plan; ``n_seq``: the sequences the tokens form (a sequence-scoped
        balance loss and imbalance)."""
        c = self.config
        if logits.shape[0] == 0:  # no tokens, no loss (a mean over none is NaN); the router stays in the graph
            zero = logits.sum() * 0.0
            return c.z_loss_coef * zero, {"load_balance": zero, "z_loss": zero, "max_violation": zero.detach(),
                                          "max_violation_seq": zero.detach()}
        probs = torch.softmax(logits, -1) if c.score == "softmax" else torch.sigmoid(logits)
        if c.router == "token_choice":
            p = probs if c.score == "softmax" else probs / probs.sum(-1, keepdim=True)
            if c.load_balance_scope == "sequence":  # the scores' own top k (DeepSeek-V3's f_i)
                raw = plan.topk_ids if self.expert_bias is None and c.topk_group in (None, c.n_group) \
                    else torch.topk(logits.detach(), c.top_k, dim=-1).indices
                lb = sequence_balancing_loss(p, raw, n_seq)
            else:
                lb = load_balancing_loss(p, plan.expert_counts)
            load = plan.expert_counts.float()
            max_vio = load.max() / load.mean() - 1
            seq_load = torch.zeros(n_seq, c.n_experts, device=logits.device).scatter_add_(
                1, plan.topk_ids.long().reshape(n_seq, -1), torch.ones((), device=logits.device).expand(
                    n_seq, plan.topk_ids.numel() // n_seq))
            seq_vio = (seq_load.max(-1).values / seq_load.mean(-1) - 1).mean()
        else:  # every expert takes exactly C tokens: balanced by construction
            lb = logits.new_zeros(())
            max_vio = seq_vio = logits.new_zeros(())
        z = router_z_loss(logits)
        return c.load_balance_coef * lb + c.z_loss_coef * z, {"load_balance": lb, "z_loss": z,
                                                              "max_violation": max_vio.detach(),
                                                              "max_violation_seq": seq_vio.detach()}
