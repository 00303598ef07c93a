"""A decoder-only transformer whose layers are dense, Mixture-of-Depths or Mixture-of-Experts.

Pieces, in reading order: :class:`ModelConfig` (dataclass with named presets and the FLOP
count), :class:`RMSNorm`, rotary embeddings (:func:`apply_rope`, applied at *explicit*
positions so a MoD layer can rotate its selected tokens at their original positions),
:class:`LayerKVCache` / :class:`KVCache`, :class:`Attention`, :class:`SwiGLU`,
:class:`Block` and :class:`Transformer` (forward, loss, auxiliary losses and metrics,
generation with a KV cache). The MoD wrapper lives in :mod:`flopwise.models.mod`.

Shape legend: B batch, S / T sequence (T: the rows a call processes), D model dim,
H heads, Dh head dim, L keys in a KV cache, V vocabulary, F MLP hidden dim.

Example::

    cfg = ModelConfig.preset("tiny", mod="every_other")   # MoD on blocks 1, 3, ... at 12.5%
    model = Transformer(cfg)
    out = model(tokens, targets)                           # tokens, targets: [B, S] int64
    out.loss.backward()                                    # LM loss + auxiliary losses
    out.aux["mod_predictor_acc"]                           # routing-prediction accuracy
    model.generate(tokens[:, :8], max_new_tokens=16)       # greedy, with a KV cache
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.kernels import mod_capacity
from flopwise.kernels.routing import check_group_limit

__all__ = [
    "ModelConfig",
    "ModelOutput",
    "RMSNorm",
    "apply_rope",
    "rope_cos_sin",
    "LayerKVCache",
    "KVCache",
    "Attention",
    "SwiGLU",
    "Block",
    "Transformer",
    "mod_pattern",
]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

_ROUTINGS = ("all", "mod")
_MLPS = ("dense", "moe")
_MOD_CAUSAL = ("router", "predictor", "none")
_MOD_IMPLS = ("kernels", "torch")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def mod_pattern(n_layers: int, pattern: str | Sequence[int] | Sequence[str]) -> tuple[str, ...]:
    """Per-layer routing, ``"all"`` (every token) or ``"mod"`` (Mixture-of-Depths).

    ``pattern`` is one of

    * ``"every_other"``: MoD on blocks 1, 3, 5, ... (every other block starting from the
      second; the paper's best setting together with capacity 0.125),
    * ``"all"`` / ``"none"`` / ``"dense"``: no MoD layer; ``"mod"``: every layer MoD,
    * a sequence of ``"all"`` / ``"mod"`` strings, one per layer,
    * a sequence of layer indices that become MoD.
    """
    if isinstance(pattern, str):
        if pattern == "every_other":
            return tuple("mod" if i % 2 == 1 else "all" for i in range(n_layers))
        if pattern in ("all", "none", "dense"):
            return ("all",) * n_layers
        if pattern == "mod":
            return ("mod",) * n_layers
        raise ValueError(f"routing pattern must be 'every_other', 'all', 'none', 'mod' or a list, got {pattern!r}")
    items = list(pattern)
    if all(isinstance(p, str) for p in items):
        if len(items) != n_layers:
            raise ValueError(f"routing must list one entry per layer ({n_layers}), got {len(items)}")
        bad = [p for p in items if p not in _ROUTINGS]
        if bad:
            raise ValueError(f"routing entries must be in {_ROUTINGS}, got {bad}")
        return tuple(items)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in items):
        bad = [p for p in items if not 0 <= p < n_layers]
        if bad:
            raise ValueError(f"routing layer indices must be in [0, {n_layers}), got {bad}")
        return tuple("mod" if i in set(items) else "all" for i in range(n_layers))
    raise TypeError("routing must be a pattern name, a list of 'all'/'mod' strings or a list of layer indices")


def _per_layer(value, n_layers: int, choices: tuple[str, ...], name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices} or a per-layer list, got {value!r}")
        return (value,) * n_layers
    items = tuple(value)
    if len(items) != n_layers or any(v not in choices for v in items):
        raise ValueError(f"{name} must list one of {choices} per layer ({n_layers} layers), got {items}")
    return items


# Named sizes. Parameter counts are for the dense model with vocab 256 (embeddings add
# V*D, twice when untied). "m1" is the byte-level model of Lester et al. 2024; "bench-*"
# are the BASELINES.md MoD training-step shapes.
_PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, d_ff=176, max_seq_len=256),          # ~0.1M, CPU tests
    "m1": dict(d_model=256, n_layers=3, n_heads=4, d_ff=1024, max_seq_len=1024),        # ~3M
    "small": dict(d_model=512, n_layers=8, n_heads=8, d_ff=1408, max_seq_len=2048),     # ~26M
    "medium": dict(d_model=768, n_layers=12, n_heads=12, d_ff=2048, max_seq_len=2048),  # ~85M
    "large": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=2816, max_seq_len=2048),  # ~310M
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, d_ff=3328, max_seq_len=2048),   # ~346M, the MFU target
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, d_ff=5632, max_seq_len=4096,
               vocab_size=65536, tie_embeddings=False),                                 # ~1.0B
    "bench-d2048": dict(d_model=2048, n_layers=8, n_heads=16, d_ff=5632, max_seq_len=4096),
    "bench-d1024": dict(d_model=1024, n_layers=12, n_heads=8, d_ff=2816, max_seq_len=4096),
}


@dataclass
class ModelConfig:
    """Decoder configuration. Per-layer fields (``routing``, ``mlp``) are normalised to
    tuples of length ``n_layers`` in ``__post_init__``.

    Attributes:
        vocab_size: tokens (256: byte level; any size, e.g. 65536).
        d_model, n_layers, n_heads: width, depth, attention heads (``d_model % n_heads == 0``).
        d_ff: SwiGLU hidden size; ``None`` -> ``8/3 * d_model`` rounded up to 8.
        max_seq_len: longest sequence (RoPE table, generation limit).
        rope_theta, norm_eps, tie_embeddings: as usual.
        dropout: residual and attention dropout in training (0 in every preset).
        pad_to_multiple_of: round the vocabulary (the head's output rows) and ``d_ff`` up to
            this multiple; 64 gives tensor-core friendly GEMMs on GPUs. Logits are sliced
            back to ``vocab_size``.
        routing: per layer ``"all"`` or ``"mod"``, or a pattern for :func:`mod_pattern`.
        mod_capacity: fraction of each sequence a MoD layer processes (paper: 0.125).
        mod_causal: how a MoD layer routes causally in ``eval()`` mode: ``"router"`` (an
            auxiliary BCE loss centres the router's sigmoid on top-k membership; route iff
            sigmoid(router) > 0.5), ``"predictor"`` (a small MLP on stop-gradient inputs is
            trained with BCE on top-k membership; route iff sigmoid(predictor) > 0.5) or
            ``"none"`` (eval keeps the non-causal top-k; no KV-cache generation).
        mod_aux_loss_weight: weight of that BCE loss in the training objective.
        mod_predictor_hidden: predictor hidden size (``None`` -> ``max(8, d_model // 8)``).
        mod_impl: ``"kernels"`` (flopwise's gather/scatter/selection ops) or ``"torch"``
            (the plain-torch pipeline: topk, sort, gather, scatter_add), the same function.
        mlp: per layer ``"dense"`` (SwiGLU) or ``"moe"`` (:class:`flopwise.models.moe.MoE`).
        moe_n_experts, moe_top_k, moe_router, moe_capacity_factor, moe_d_ff: passed to
            ``MoEConfig`` (``moe_d_ff=None`` -> ``d_ff``). Active experts per token:
            ``moe_top_k`` (token choice) or ``moe_capacity_factor`` on average (expert choice).
        moe_score, moe_normalize_topk, moe_shared_d_ff, moe_load_balance_coef,
            moe_z_loss_coef, moe_bias_update_rate: ``MoEConfig``'s ``score``,
            ``normalize_topk``, ``shared_d_ff`` (an always-on shared expert; 0: none),
            ``load_balance_coef``, ``z_loss_coef`` and ``bias_update_rate``
            (auxiliary-loss-free balancing; the trainer updates the biases after every
            optimizer step).
        moe_n_group, moe_topk_group, moe_group_score, moe_route_scale,
            moe_load_balance_scope: ``MoEConfig``'s ``n_group``, ``topk_group``,
            ``group_score`` (group-limited routing, as DeepSeek-V2/V3), ``route_scale`` (a
            factor on the routed experts' output) and ``load_balance_scope`` (``"batch"``,
            or ``"sequence"``: DeepSeek-V3's sequence-wise balance loss, per row of the batch).
    """

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dropout: float = 0.0
    pad_to_multiple_of: int = 1
    parallel_block: bool = False
    routing: str | Sequence = "all"
    mod_capacity: float = 0.125
    mod_causal: str = "router"
    mod_aux_loss_weight: float = 0.01
    mod_predictor_hidden: int | None = None
    mod_impl: str = "kernels"
    mlp: str | Sequence[str] = "dense"
    moe_n_experts: int = 8
    moe_top_k: int = 2
    moe_router: str = "token_choice"
    moe_capacity_factor: float = 2.0
    moe_d_ff: int | None = None
    moe_score: str = "softmax"
    moe_normalize_topk: bool = True
    moe_shared_d_ff: int = 0
    moe_load_balance_coef: float = 0.01
    moe_z_loss_coef: float = 0.001
    moe_bias_update_rate: float = 0.0
    moe_n_group: int = 1
    moe_topk_group: int | None = None
    moe_group_score: str = "top2"
    moe_route_scale: float = 1.0
    moe_load_balance_scope: str = "batch"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "pad_to_multiple_of",
                     "moe_n_experts", "moe_top_k", "moe_n_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model / n_heads = {self.d_model // self.n_heads} must be even (RoPE)")
        for name in ("d_ff", "moe_d_ff", "mod_predictor_hidden"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if isinstance(self.moe_shared_d_ff, bool) or not isinstance(self.moe_shared_d_ff, int) \
                or self.moe_shared_d_ff < 0:
            raise ValueError(f"moe_shared_d_ff must be an int >= 0 (0: no shared expert), got {self.moe_shared_d_ff!r}")
        # bool("false") is True: a string from a config file must not turn a switch on.
        for name in ("tie_embeddings", "parallel_block", "moe_normalize_topk"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (true/false), got {getattr(self, name)!r}")
        # Numbers first, so the range checks below compare numbers, not a "0.5" from a file.
        for name in ("rope_theta", "norm_eps", "dropout", "mod_capacity", "mod_aux_loss_weight",
                     "moe_capacity_factor", "moe_load_balance_coef", "moe_z_loss_coef", "moe_bias_update_rate",
                     "moe_route_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v}")
        # theta <= 0 makes the RoPE tables NaN, and SDPA on CPU turns NaN rows into zeros:
        # attention would silently add nothing.
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not self.norm_eps >= 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps}")
        if not 0 < self.mod_capacity <= 1:
            raise ValueError(f"mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mod_causal not in _MOD_CAUSAL:
            raise ValueError(f"mod_causal must be one of {_MOD_CAUSAL}, got {self.mod_causal!r}")
        if self.mod_impl not in _MOD_IMPLS:
            raise ValueError(f"mod_impl must be one of {_MOD_IMPLS}, got {self.mod_impl!r}")
        if self.moe_router not in ("token_choice", "expert_choice"):
            raise ValueError(f"moe_router must be 'token_choice' or 'expert_choice', got {self.moe_router!r}")
        if not self.moe_capacity_factor > 0:
            raise ValueError(f"moe_capacity_factor must be a finite number > 0, got {self.moe_capacity_factor}")
        for name in ("mod_aux_loss_weight", "moe_load_balance_coef", "moe_z_loss_coef", "moe_bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.moe_score not in ("softmax", "sigmoid"):
            raise ValueError(f"moe_score must be 'softmax' or 'sigmoid', got {self.moe_score!r}")
        if self.moe_bias_update_rate > 0 and self.moe_router != "token_choice":
            raise ValueError("moe_bias_update_rate balances token-choice routing; with moe_router='expert_choice' "
                             f"(balanced by construction) it must be 0, got {self.moe_bias_update_rate}")
        if not self.moe_route_scale > 0:
            raise ValueError(f"moe_route_scale must be > 0, got {self.moe_route_scale}")
        if self.moe_load_balance_scope not in ("batch", "sequence"):
            raise ValueError(f"moe_load_balance_scope must be 'batch' or 'sequence', got {self.moe_load_balance_scope!r}")
        self.routing = mod_pattern(self.n_layers, self.routing)
        self.mlp = _per_layer(self.mlp, self.n_layers, _MLPS, "mlp")
        # Checked here, by this config's name, rather than later by MoEConfig's.
        if "moe" in self.mlp and self.moe_router == "token_choice" and self.moe_top_k > self.moe_n_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be <= moe_n_experts ({self.moe_n_experts})")
        if self.moe_topk_group is not None and (isinstance(self.moe_topk_group, bool)
                                                or not isinstance(self.moe_topk_group, int)):
            raise TypeError(f"moe_topk_group must be None or an int, got {self.moe_topk_group!r}")
        if self.moe_router != "token_choice" and (self.moe_n_group, self.moe_topk_group) != (1, None):
            raise ValueError("moe_n_group/moe_topk_group limit token-choice routing; with moe_router='expert_choice' "
                             f"they must stay 1/None, got {self.moe_n_group}/{self.moe_topk_group}")
        check_group_limit(self.moe_n_experts, min(self.moe_top_k, self.moe_n_experts), self.moe_n_group,
                          self.moe_topk_group, self.moe_group_score, "moe_", "moe_top_k")

    @classmethod
    def preset(cls, name: str, *, mod: str | Sequence | None = None, **overrides) -> "ModelConfig":
        """A named size (``tiny``, ``m1``, ``small``, ``medium``, ``large``, ``350m``, ``1b``,
        ``bench-d2048``, ``bench-d1024``) with optional overrides.

        ``mod="every_other"`` is the paper's best setting (MoD on every other block from the
        second, capacity 0.125 unless ``mod_capacity`` is overridden); any
        :func:`mod_pattern` value works.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(_PRESETS)}")
        kwargs = {**_PRESETS[name], **overrides}
        if mod is not None:
            if "routing" in overrides:
                raise ValueError("give either mod= or routing=, not both")
            kwargs["routing"] = mod
        return cls(**kwargs)

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (per-layer fields re-validated). Changing
        ``n_layers`` keeps a uniform ``routing`` / ``mlp`` (every layer the same) for the new
        depth; a per-layer one must then be given anew."""
        if "n_layers" in changes and changes["n_layers"] != self.n_layers:
            for name in ("routing", "mlp"):
                if name in changes:
                    continue
                values = set(getattr(self, name))
                if len(values) != 1:
                    raise ValueError(f"{name} lists one entry per layer ({getattr(self, name)}); changing n_layers "
                                     f"needs a new {name}= for {changes['n_layers']} layers")
                changes[name] = values.pop()  # "all" / "mod" / "dense" / "moe": every layer
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field as plain JSON types (per-layer tuples become lists); the inverse of
        :meth:`from_dict`. This is what a checkpoint's ``config.json`` holds."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from :meth:`to_dict`'s output (e.g. a parsed ``config.json``); unknown
        keys raise ValueError naming them, so a typo never silently falls back to a default."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict needs a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    # ----------------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_to_multiple_of)

    @property
    def ffn_dim(self) -> int:
        d_ff = self.d_ff if self.d_ff is not None else _round_up(8 * self.d_model // 3, 8)
        return _round_up(d_ff, self.pad_to_multiple_of)

    @property
    def moe_ffn_dim(self) -> int:
        return _round_up(self.moe_d_ff, self.pad_to_multiple_of) if self.moe_d_ff else self.ffn_dim

    @property
    def moe_shared_ffn_dim(self) -> int:
        """The shared expert's hidden size (0: none), padded as ``d_ff`` is."""
        return _round_up(self.moe_shared_d_ff, self.pad_to_multiple_of) if self.moe_shared_d_ff else 0

    @property
    def moe_experts_per_token(self) -> float:
        return self.moe_top_k if self.moe_router == "token_choice" else self.moe_capacity_factor

    @property
    def predictor_hidden(self) -> int:
        return self.mod_predictor_hidden or max(8, self.d_model // 8)

    # ----------------------------------------------------------------- FLOPs
    def forward_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (2 per multiply-add) of a sequence of ``seq_len`` tokens.

        Counted: every matmul (QKV and output projections ``8 D^2``, MLP ``2 * 3 D F``, the
        head ``2 D V_padded``), attention scores and values ``4 Dh H`` per (query, key) pair
        over the causal context: a query at position i sees i + 1 keys, ``(S + 1) / 2`` on
        average, so ``2 D (S + 1)`` per token. Not counted: norms, RoPE, softmax, SwiGLU's
        elementwise product, the embedding lookup (no matmul).

        * MoD layer: only ``k = ceil(capacity * S)`` tokens enter; their attention sees the
          causal context among the k selected tokens, ``(k + 1) / 2`` keys on average. So per
          token of the sequence: ``k / S * (matmuls + 2 D (k + 1))`` plus the router
          ``2 D`` for every token (and the predictor ``2 (D h + h)`` when ``mod_causal``
          is ``"predictor"``).
        * MoE layer: ``top_k`` experts (expert choice: ``capacity_factor`` on average) of
          ``2 * 3 D F_e`` each plus the router ``2 D E``, and the shared expert's ``2 * 3 D F_s``.
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= self.max_seq_len:
            raise ValueError(f"seq_len must be an int in [1, max_seq_len={self.max_seq_len}], got {seq_len!r}")
        D = self.d_model
        attn_proj = 2 * 4 * D * D
        total = 2.0 * D * self.padded_vocab_size
        for routing, mlp in zip(self.routing, self.mlp):
            if mlp == "moe":
                mlp_flops = (self.moe_experts_per_token * 2 * 3 * D * self.moe_ffn_dim + 2 * D * self.moe_n_experts
                             + 2 * 3 * D * self.moe_shared_ffn_dim)
            else:
                mlp_flops = 2 * 3 * D * self.ffn_dim
            if routing == "mod":
                k = mod_capacity(seq_len, self.mod_capacity)
                total += k / seq_len * (attn_proj + mlp_flops + 2 * D * (k + 1)) + 2 * D
                if self.mod_causal == "predictor":
                    total += self._predictor_fwd_flops()
            else:
                total += attn_proj + mlp_flops + 2 * D * (seq_len + 1)
        return total

    def _predictor_fwd_flops(self) -> float:
        h = self.predictor_hidden
        return 2.0 * (self.d_model * h + h)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the "6N" rule extended to attention,
        MoD and MoE: backward costs twice the forward (input and weight gradients), so
        3 x :meth:`forward_flops_per_token`. Exception: the MoD predictor sees stop-gradient
        inputs, so its backward computes weight gradients only (and its hidden activation's
        gradient): 2 x its forward instead of 3 x."""
        total = 3.0 * self.forward_flops_per_token(seq_len)
        if self.mod_causal == "predictor":
            total -= self.n_mod_layers * self._predictor_fwd_flops()
        return total

    @property
    def n_mod_layers(self) -> int:
        return sum(r == "mod" for r in self.routing)


# ----------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` in fp32, rounded once to x's dtype (the same
    arithmetic as ``rmsnorm_gather_tokens``). x: ``[..., D]``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(x.dtype)


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables ``[max_seq_len, head_dim / 2]``; frequency i is ``theta^(-2i / head_dim)``."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: ``[B, T, H, Dh]``; cos, sin: ``[B, T, Dh/2]`` (already indexed at
    each row's position). Math in fp32, result in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class LayerKVCache:
    """Keys and values of one attention layer, per batch row, with each key's position.

    Rows may hold different numbers of keys (a MoD layer caches only the tokens routed into
    it): ``length[b]`` keys are valid in row b, the rest of the buffer is padding that the
    attention mask hides. Buffers grow geometrically. Inference only (host synchronises to
    size the buffers).

    Attributes:
        k, v: ``[B, capacity, H, Dh]``; pos: ``[B, capacity]`` int64; length: ``[B]`` int64.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.length: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None):
        """Append T new keys per row and return everything cached.

        Args:
            k, v: ``[B, T, H, Dh]``; pos: ``[B, T]``.
            valid: ``[B, T]`` bool or None (all valid). In each row the valid entries must be
                a prefix (MoD puts its selected tokens first), so they land at
                ``length[b] + t`` and invalid ones only write slots beyond the new length.

        Returns ``(k_all [B, L, H, Dh], v_all, pos_all [B, L], key_valid [B, L])`` with
        ``L = max(length)`` after the append.
        """
        B, T = pos.shape
        if self.k is None:
            self.k = k.new_zeros(B, 0, *k.shape[2:])
            self.v = v.new_zeros(B, 0, *v.shape[2:])
            self.pos = pos.new_zeros(B, 0)
            self.length = torch.zeros(B, dtype=torch.long, device=k.device)
        need = int(self.length.max()) + T
        cap = self.k.shape[1]
        if need > cap:
            grow = max(need, 2 * cap) - cap
            self.k = torch.cat((self.k, self.k.new_zeros(B, grow, *self.k.shape[2:])), 1)
            self.v = torch.cat((self.v, self.v.new_zeros(B, grow, *self.v.shape[2:])), 1)
            self.pos = torch.cat((self.pos, self.pos.new_zeros(B, grow)), 1)
        rows = torch.arange(B, device=k.device)[:, None]
        dest = self.length[:, None] + torch.arange(T, device=k.device)[None, :]
        self.k[rows, dest] = k
        self.v[rows, dest] = v
        self.pos[rows, dest] = pos
        self.length = self.length + (T if valid is None else valid.sum(1))
        L = int(self.length.max())
        key_valid = torch.arange(L, device=k.device)[None, :] < self.length[:, None]
        return self.k[:, :L], self.v[:, :L], self.pos[:, :L], key_valid


class KVCache:
    """One :class:`LayerKVCache` per layer plus the number of tokens consumed so far
    (``seq_len``; the next token's position)."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKVCache() for _ in range(n_layers)]
        self.seq_len = 0


def _attention_mask(q_pos, q_valid, k_pos, k_valid) -> torch.Tensor:
    """``[B, 1, T, L]`` bool, True = attend: key valid and at or before the query's original
    position. Invalid (padding) query rows attend to every key so their (discarded) output
    stays finite instead of the NaN of an all-masked softmax."""
    ok = k_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
    if q_valid is not None:
        ok = ok | ~q_valid[:, :, None]
    return ok[:, None]


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE at explicit positions, through
    ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.wqkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.wo = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the RoPE tables (angles up to max_seq_len):
        # they follow the device but stay fp32.
        cos, sin = self.rope_cos, self.rope_sin
        super()._apply(fn, recurse)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)
        return self

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, valid: torch.Tensor | None = None,
                kv_cache: LayerKVCache | None = None) -> torch.Tensor:
        """x: ``[B, T, D]`` rows (all tokens, or a MoD layer's selected tokens);
        positions: ``[B, T]`` their original positions; valid: ``[B, T]`` bool or None
        (False marks padding rows, which are neither attended to nor cached).

        Without cache and padding the rows must be in increasing position order (true for
        the full sequence and for MoD's sorted selection): then causality over the original
        positions is causality over the row order and SDPA's ``is_causal`` suffices. Otherwise
        an explicit mask over positions is built. Returns ``[B, T, D]``.
        """
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None and valid is None:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, dropout_p=dropout)
        else:
            if kv_cache is None:
                k_pos, k_valid = positions, valid
            else:
                k, v, k_pos, k_valid = kv_cache.append(k, v, positions, valid)
            mask = _attention_mask(positions, valid, k_pos, k_valid)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, dropout_p=dropout)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    """``w_out(silu(gate) * up)`` with ``[gate, up] = w_in(x)``. x: ``[..., D]``."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def _make_moe(cfg: ModelConfig) -> nn.Module:
    """``flopwise.models.moe.MoE`` for an ``mlp="moe"`` layer, imported lazily so that dense
    and MoD models work without it."""
    try:
        from flopwise.models.moe import MoE, MoEConfig
    except ImportError as exc:
        raise ImportError(
            "mlp='moe' needs flopwise.models.moe (MoE, MoEConfig with "
            "MoEConfig(d_model, d_ff, n_experts, top_k, router=...) and MoE(cfg)(x) -> (y, aux_loss)), "
            f"which could not be imported: {exc}"
        ) from exc
    kwargs = dict(d_model=cfg.d_model, d_ff=cfg.moe_ffn_dim, n_experts=cfg.moe_n_experts, top_k=cfg.moe_top_k,
                  router=cfg.moe_router, score=cfg.moe_score, normalize_topk=cfg.moe_normalize_topk,
                  shared_d_ff=cfg.moe_shared_ffn_dim, load_balance_coef=cfg.moe_load_balance_coef,
                  z_loss_coef=cfg.moe_z_loss_coef, bias_update_rate=cfg.moe_bias_update_rate,
                  n_group=cfg.moe_n_group, topk_group=cfg.moe_topk_group, group_score=cfg.moe_group_score,
                  route_scale=cfg.moe_route_scale, load_balance_scope=cfg.moe_load_balance_scope)
    if cfg.moe_router == "expert_choice":
        kwargs["capacity_factor"] = cfg.moe_capacity_factor
    return MoE(MoEConfig(**kwargs))


class Block(nn.Module):
    """Pre-norm transformer block, split so a wrapper (MoD) can run it on a subset of rows.

    Sequential (default): ``f(h) = a + mlp(norm2(h + a))`` with ``a = attn(norm1(h))``.
    Parallel (``cfg.parallel_block``): ``f(h) = attn(n) + mlp(n)`` with ``n = norm1(h)``;
    it needs only the normalised rows, so MoD can use the fused RMSNorm-gather.
    The block output is ``h + f(h)``.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.parallel = cfg.parallel_block
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = None if cfg.parallel_block else RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.mlp[layer] == "moe"
        self.mlp = _make_moe(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def _mlp(self, x):
        if self.is_moe:
            y, aux, losses = self.mlp(x, return_losses=True)
            out = {"moe_aux_loss": aux}
            if self.mlp.config.router == "token_choice":
                out["moe_max_violation"] = losses["max_violation"]
                out["moe_max_violation_seq"] = losses["max_violation_seq"]
            return y, out
        return self.mlp(x), {}

    def delta(self, h: torch.Tensor | None, positions: torch.Tensor, *, normed: torch.Tensor | None = None,
              valid: torch.Tensor | None = None, kv_cache: LayerKVCache | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The residual update ``f(h)`` for the rows given.

        Args:
            h: ``[B, T, D]`` rows of the residual stream (may be None for a parallel block
                when ``normed`` is given).
            positions: ``[B, T]`` original positions of the rows (RoPE and causality).
            normed: ``norm1(h)`` if the caller already has it (fused RMSNorm-gather).
            valid: ``[B, T]`` bool, False on padding rows (see :meth:`Attention.forward`).
            kv_cache: this layer's cache (generation); valid rows are appended.

        Returns ``(f(h) [B, T, D], aux)``; aux holds the MoE auxiliary loss for MoE layers.
        """
        if normed is None:
            if h is None:
                raise ValueError("delta needs h or normed")
            normed = self.norm1(h)
        a = self.drop(self.attn(normed, positions, valid=valid, kv_cache=kv_cache))
        if self.parallel:
            m, aux = self._mlp(normed)
        else:
            if h is None:
                raise ValueError("a sequential block needs h (its inner residual), not only normed")
            m, aux = self._mlp(self.norm2(h + a))
        return a + self.drop(m), aux

    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, kv_cache: LayerKVCache | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: ``[B, S, D]`` -> ``(x + f(x), aux)``."""
        d, aux = self.delta(x, positions, kv_cache=kv_cache)
        return x + d, aux


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------


def build_layer(cfg: ModelConfig, i: int) -> nn.Module:
    """Layer ``i`` of the model ``cfg`` describes: a :class:`Block`, wrapped in a
    :class:`~flopwise.models.mod.MoDBlock` where ``cfg.routing[i] == "mod"``. Its state-dict
    names are the model's without the ``layers.{i}.`` prefix."""
    from flopwise.models.mod import MoDBlock, MoDConfig  # mod.py imports this module's pieces

    block = Block(cfg, i)
    if cfg.routing[i] == "mod":
        block = MoDBlock(block, MoDConfig(
            capacity=cfg.mod_capacity, causal=cfg.mod_causal, aux_loss_weight=cfg.mod_aux_loss_weight,
            predictor_hidden=cfg.predictor_hidden, impl=cfg.mod_impl))
    return block


class ModelOutput(NamedTuple):
    """``logits [B, S, vocab_size]``; ``loss``: LM cross-entropy + auxiliary losses (None
    without targets); ``aux``: scalar tensors, per layer (``"layer3.mod_aux_loss"``) and
    totals (``"lm_loss"``, ``"aux_loss"``, ``"mod_predictor_acc"``, ...)."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux: dict[str, torch.Tensor]


class Transformer(nn.Module):
    """Decoder-only LM: embedding, ``n_layers`` blocks (dense or MoD-wrapped, SwiGLU or
    MoE), final RMSNorm, (tied) head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(build_layer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for linear and embedding weights, output projections (``wo``,
        ``w_out``) scaled by 1/sqrt(2 n_layers) (GPT-2), biases 0, norms 1. Modules of other
        types (an MoE layer) keep their own initialisation."""
        std = 0.02
        moe = tuple(f"{name}.mlp" for name, m in self.named_modules() if isinstance(m, Block) and m.is_moe)
        for name, module in self.named_modules():
            if moe and name.startswith(moe):
                continue
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo", "w_out")) else 1.0
                nn.init.normal_(module.weight, 0.0, std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def moe_bias_layers(self) -> list[nn.Module]:
        """The MoE layers with a selection bias (``moe_bias_update_rate > 0``)."""
        return [m for m in self.modules() if getattr(m, "expert_bias", None) is not None and hasattr(m, "update_bias")]

    @torch.no_grad()
    def update_moe_biases(self, group=None) -> int:
        """One auxiliary-loss-free balancing step on every MoE layer with a selection bias
        (:meth:`flopwise.models.moe.MoE.update_bias`): call it after each optimizer step, as
        the trainer does. ``group``: see ``update_bias``. Returns the number of layers updated."""
        layers = self.moe_bias_layers()
        for m in layers:
            m.update_bias(group)
        return len(layers)

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.head.weight.numel()
        return n

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, check_ids: bool = True) -> ModelOutput:
        """tokens: ``[B, S]`` int ids; targets: ``[B, S]`` next-token ids (-100 ignored).

        With ``kv_cache`` the tokens continue the cached sequence (positions start at
        ``kv_cache.seq_len``); requires eval mode for MoD layers (causal routing).
        ``check_ids=False`` skips the range check of the ids (on a GPU a few small kernels
        per call) for callers that checked them already: the Trainer on flopwise's data
        classes, whose arrays are checked when built, and :meth:`generate`.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError("tokens must be an int32/int64 tensor [B, S]")
        B, S = tokens.shape
        if B < 1:
            raise ValueError("tokens must hold at least one sequence (batch size >= 1), got shape "
                             f"{tuple(tokens.shape)}")
        start = kv_cache.seq_len if kv_cache is not None else 0
        if S < 1 or start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + S} must be in [1, max_seq_len={self.cfg.max_seq_len}]")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int32, torch.int64):
                raise TypeError("targets must be an int32/int64 tensor [B, S] of token ids (-100: ignored), got "
                                + (f"dtype {targets.dtype}" if isinstance(targets, torch.Tensor)
                                   else type(targets).__name__))
            if tuple(targets.shape) != (B, S):
                raise ValueError(f"targets must have shape {(B, S)} like tokens, got {tuple(targets.shape)}")
        if check_ids:
            self._check_ids(tokens, targets)
        if kv_cache is not None:
            self._check_cache(kv_cache)
        positions = (start + torch.arange(S, device=tokens.device)).expand(B, S)
        x = self.drop(self.embed(tokens))
        aux: dict[str, torch.Tensor] = {}
        # Without autograd the residual stream is ours to update: MoD layers add into its
        # selected rows in place instead of copying every row. Not while forward hooks are
        # registered: a hook may keep a layer's output, which the next MoD layer would change.
        inplace = not torch.is_grad_enabled() and not _has_forward_hooks(self)
        # Layers append to their caches one by one and seq_len advances only at the end: a
        # layer that raises half-way would leave earlier layers one call ahead. Put the
        # lengths back instead (appends write only beyond the old lengths).
        saved = None if kv_cache is None else [(c.k, c.v, c.pos, c.length) for c in kv_cache.layers]
        try:
            for i, layer in enumerate(self.layers):
                kw = {"inplace": True} if inplace and self.cfg.routing[i] == "mod" else {}
                x, layer_aux = layer(x, positions, kv_cache=None if kv_cache is None else kv_cache.layers[i], **kw)
                for key, val in layer_aux.items():
                    aux[f"layer{i}.{key}"] = val
        except BaseException:
            if saved is not None:
                for c, (k, v, pos, length) in zip(kv_cache.layers, saved):
                    c.k, c.v, c.pos, c.length = k, v, pos, length
            raise
        if kv_cache is not None:
            kv_cache.seq_len += S
        logits = self.head(self.norm(x))[..., : self.cfg.vocab_size]
        aux_loss = _collect(aux, logits)
        loss = None
        if targets is not None:
            lm_loss = F.cross_entropy(logits.float().reshape(B * S, -1), targets.reshape(-1).long(), ignore_index=-100)
            aux["lm_loss"] = lm_loss.detach()
            loss = lm_loss + aux_loss
        return ModelOutput(logits, loss, aux)

    def _check_ids(self, tokens: torch.Tensor, targets: torch.Tensor | None) -> None:
        """Token ids in [0, vocab_size), targets also -100 (ignored). An id past vocab_size
        but inside the padded vocabulary would read an untrained embedding row silently.
        On the CPU a direct check; elsewhere (and under torch.compile) an asynchronous
        assert, so the training step pays no host synchronisation (the Trainer's data is
        range-checked on the host, and generate checks its prompt there)."""
        V = self.cfg.vocab_size
        # Under torch.compile a value-dependent branch would break the graph: assert instead.
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"tokens must be ids in [0, vocab_size={V}), got values in [{lo}, {hi}]")
            if targets is not None:
                bad = (targets != -100) & ((targets < 0) | (targets >= V))
                if bool(bad.any()):
                    raise ValueError(f"targets must be ids in [0, vocab_size={V}) or -100 (ignored), got "
                                     f"{int(targets[bad][0])}")
            return
        torch._assert_async(((tokens >= 0) & (tokens < V)).all(), f"tokens must be ids in [0, vocab_size={V})")
        if targets is not None:
            ok = (targets == -100) | ((targets >= 0) & (targets < V))
            torch._assert_async(ok.all(), f"targets must be ids in [0, vocab_size={V}) or -100")

    def _check_cache(self, kv_cache) -> None:
        """Everything that would make a layer refuse the cache, checked before any layer
        appends to it."""
        if not isinstance(kv_cache, KVCache) or len(kv_cache.layers) != len(self.layers):
            raise ValueError(f"kv_cache must be a KVCache({len(self.layers)}) for this model's {len(self.layers)} "
                             "layers")
        if self.cfg.n_mod_layers and (self.training or self.cfg.mod_causal == "none"):
            raise ValueError("a KV cache needs causal MoD routing: call eval() and use mod_causal 'router' or "
                             "'predictor'")

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, seed: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Autoregressive continuation. prompt: ``[B, S0]`` -> ``[B, S0 + max_new_tokens]``.

        ``temperature=0``: greedy (argmax, ties to the lower id). Otherwise sample from
        ``softmax(logits / temperature)``, restricted to the ``top_k`` most likely tokens when
        given (``top_k`` with ``temperature=0`` is refused: greedy takes the most likely
        one), with a ``torch.Generator`` seeded by ``seed``. Runs in eval mode (MoD layers
        route causally) and restores the previous mode. ``use_cache=False`` recomputes the
        whole sequence each step (the definition the cached path must match). Expert-choice
        MoE layers route over all tokens of a call, so they are not causal: such a model
        generates only with ``use_cache=False``.
        """
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1:
            raise ValueError("prompt must be an int tensor [B, S0] with B >= 1 and S0 >= 1")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if prompt.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"prompt must hold int32/int64 token ids, got dtype {prompt.dtype}")
        lo, hi = int(prompt.min()), int(prompt.max())  # once per call, on the host: a clear error on any device
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"prompt must hold ids in [0, vocab_size={self.cfg.vocab_size}), got values in "
                             f"[{lo}, {hi}]")
        if prompt.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt length + max_new_tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be None or an int, got {type(seed).__name__}")
        if seed is not None and not -2**63 <= int(seed) < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64) (a torch.Generator seed), got {seed}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_k is not None and temperature == 0:
            raise ValueError(f"top_k={top_k} applies to sampling (temperature > 0); temperature=0 is greedy "
                             "decoding, which always takes the most likely token")
        if use_cache and self.cfg.n_mod_layers and self.cfg.mod_causal == "none":
            raise ValueError("KV-cache generation needs causal MoD routing (mod_causal 'router' or 'predictor'); "
                             "use_cache=False (flopwise generate --no-cache) reruns the whole sequence instead")
        if use_cache and "moe" in self.cfg.mlp and self.cfg.moe_router == "expert_choice":
            raise ValueError(
                "KV-cache generation needs causal routing, and expert choice is not causal: each expert picks "
                "its top tokens among all tokens of the call (at a one-token step, every expert picks that "
                "token). Use use_cache=False (flopwise generate --no-cache), which reruns the whole sequence each "
                "step, or token choice.")
        gen = None
        if seed is not None:
            gen = torch.Generator(device=prompt.device).manual_seed(int(seed))
        was_training = self.training
        self.eval()
        try:
            tokens = prompt
            cache = KVCache(len(self.layers)) if use_cache else None
            if use_cache and max_new_tokens:
                logits = self(prompt, kv_cache=cache, check_ids=False).logits[:, -1]
            for step in range(max_new_tokens):
                if not use_cache:
                    logits = self(tokens, check_ids=False).logits[:, -1]
                nxt = _sample(logits, temperature, top_k, gen)
                tokens = torch.cat((tokens, nxt[:, None].to(tokens.dtype)), dim=1)
                if use_cache and step + 1 < max_new_tokens:
                    logits = self(tokens[:, -1:], kv_cache=cache, check_ids=False).logits[:, -1]
            return tokens
        finally:
            self.train(was_training)


def _has_forward_hooks(model: nn.Module) -> bool:
    """A forward hook that could see the residual stream: on the model, the embedding, the
    dropout after it, any layer (their outputs are the stream), or a global one."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in (model, model.embed, model.drop, *model.layers))


def _collect(aux: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Add totals to ``aux`` in place: ``aux_loss`` (the sum of every ``*aux_loss`` entry,
    already weighted by its layer) and the mean of each per-layer metric. Returns aux_loss."""
    total = like.new_zeros((), dtype=torch.float32)
    sums: dict[str, list[torch.Tensor]] = {}
    for key, val in list(aux.items()):
        name = key.split(".", 1)[1]
        if name.endswith("aux_loss"):
            total = total + val.float()
        aux[key] = val.detach()
        sums.setdefault(name, []).append(val.detach().float())
    for name, vals in sums.items():
        aux[name] = torch.stack(vals).mean() if not name.endswith("aux_loss") else torch.stack(vals).sum()
    aux["aux_loss"] = total.detach()
    return total


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen) -> torch.Tensor:
    """logits ``[B, V]`` -> token ids ``[B]``."""
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted first, so that the most likely token scores 0 at any temperature: a tiny one
    # then makes the others -inf (greedy among ties), never inf / inf. Below float32's
    # smallest normal number the division runs in float64, where no positive temperature
    # rounds to 0.
    logits = logits.float()
    logits = logits - logits.amax(-1, keepdim=True)
    if temperature < torch.finfo(torch.float32).tiny:
        logits = logits.double()
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
