"""Mixture-of-Depths routing around a transformer block (Raposo et al. 2024).

A linear router (D -> 1) scores every token. In training the top ``k = ceil(capacity * S)``
tokens of each sequence enter the block, the others ride the residual stream:

    out = x;  out[b, i] = x[b, i] + sigmoid(r[b, i]) * f(x)[b, i]   for the k selected i

``f`` is the wrapped :class:`~flopwise.models.transformer.Block`'s residual update, computed on
the selected rows only: attention among the selected tokens, causal over their *original*
positions, RoPE at those positions. Scaling by the router weight puts the router on the
gradient path, so it learns which tokens need the block.

Top-k over the sequence looks at the future, so autoregressive inference needs a causal
decision. Both fixes of the paper are here (``MoDConfig.causal``):

* ``"router"``: an auxiliary BCE loss teaches ``sigmoid(r)`` to predict top-k membership;
  in eval a token enters iff ``sigmoid(r) > 0.5``.
* ``"predictor"``: a small MLP on stop-gradient inputs is trained with BCE on top-k
  membership; in eval a token enters iff ``sigmoid(predictor) > 0.5``. (The router weight
  still scales the block output.)

Either way, in ``eval()`` a token's routing depends on that token alone, so outputs at
positions < t never depend on tokens >= t. The number of selected tokens then varies per
sequence: each row's selected positions come first (in position order) and the rows are
padded to the batch maximum with unselected positions, marked invalid. Padding rows are
neither attended to nor cached and get router weight 0, so the scatter leaves them as they
were. Sizing that batch maximum reads one number back from the device; inference only.
With a KV cache each MoD layer caches K/V only for the tokens routed into it. (An
expert-choice MoE inside the block sees the padding rows too; its routing looks across
tokens anyway, so it is not causal in any case.)

Shape legend: B batch, S sequence, D model dim, K tokens a MoD layer processes per row.

Token movement goes through flopwise's kernels (``impl="kernels"``): ``mod_select``,
``gather_tokens`` (or ``rmsnorm_gather_tokens`` for a parallel block, whose first and only
use of the rows is the pre-norm, so the selected rows are read once and normalised in the
same pass; a sequential block also needs the raw rows for its inner residual, so it gathers
them once and normalises the contiguous copy), and ``scatter_tokens``: out of place while
autograd records, in place (only the k selected rows read and written) in a
:class:`~flopwise.models.transformer.Transformer` forward without autograd.
``impl="torch"`` is the plain-torch pipeline (``topk``, ``sort``, ``torch.gather``,
``scatter_add``), the same function, kept for benchmarks and as the readable definition.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.kernels import gather_tokens, mod_capacity, mod_select, rmsnorm_gather_tokens, scatter_tokens

from .moe import autocast_off
from .transformer import Block, LayerKVCache

__all__ = ["MoDConfig", "MoDBlock"]


@dataclass(frozen=True)
class MoDConfig:
    """Attributes:
    capacity: fraction of each sequence routed into the block (paper's best: 0.125).
    causal: ``"router"``, ``"predictor"`` or ``"none"`` (see the module docstring).
    aux_loss_weight: weight of the BCE loss on top-k membership.
    predictor_hidden: hidden size of the ``"predictor"`` MLP.
    impl: ``"kernels"`` or ``"torch"`` (token movement; same function).
    """

    capacity: float = 0.125
    causal: str = "router"
    aux_loss_weight: float = 0.01
    predictor_hidden: int = 16
    impl: str = "kernels"

    def __post_init__(self):
        for name in ("capacity", "aux_loss_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"MoDConfig.{name} must be a number, got {type(v).__name__}")
            object.__setattr__(self, name, float(v))
        if not 0 < self.capacity <= 1:
            raise ValueError(f"capacity must be in (0, 1], got {self.capacity}")
        if self.causal not in ("router", "predictor", "none"):
            raise ValueError(f"causal must be 'router', 'predictor' or 'none', got {self.causal!r}")
        if self.impl not in ("kernels", "torch"):
            raise ValueError(f"impl must be 'kernels' or 'torch', got {self.impl!r}")
        if not (self.aux_loss_weight >= 0 and math.isfinite(self.aux_loss_weight)):
            raise ValueError(f"aux_loss_weight must be finite and >= 0, got {self.aux_loss_weight}")
        if isinstance(self.predictor_hidden, bool) or not isinstance(self.predictor_hidden, int) \
                or self.predictor_hidden < 1:
            raise ValueError(f"predictor_hidden must be an int >= 1, got {self.predictor_hidden!r}")


class MoDBlock(nn.Module):
    """A :class:`Block` behind a Mixture-of-Depths router.

    ``forward(x [B, S, D], positions [B, S], kv_cache=None) -> (out [B, S, D], aux)``.
    Training (and eval with ``causal="none"``): top-k per sequence. Eval with causal routing:
    per-token threshold (see the module docstring). ``aux`` holds ``mod_aux_loss`` (weighted,
    part of the training objective) and ``mod_predictor_acc`` (how often the causal decision,
    ``sigmoid > 0.5`` of router or predictor, agrees with true top-k membership), plus
    ``mod_selected_frac`` in eval.
    """

    def __init__(self, block: Block, cfg: MoDConfig | None = None):
        super().__init__()
        if not isinstance(block, Block):
            raise TypeError(f"block must be a flopwise.models.transformer.Block, got {type(block).__name__}")
        self.cfg = cfg = cfg or MoDConfig()
        if not isinstance(cfg, MoDConfig):
            raise TypeError(f"cfg must be a MoDConfig, got {type(cfg).__name__}")
        self.block = block
        D = block.norm1.weight.shape[0]
        # The bias does not change the top-k, but lets the BCE loss centre sigmoid(r) at 0.5.
        self.router = nn.Linear(D, 1)
        self.predictor = None
        if cfg.causal == "predictor":
            self.predictor = nn.Sequential(nn.Linear(D, cfg.predictor_hidden), nn.SiLU(),
                                           nn.Linear(cfg.predictor_hidden, 1))
        nn.init.normal_(self.router.weight, 0.0, 0.02)
        nn.init.zeros_(self.router.bias)

    @property
    def routes_causally(self) -> bool:
        """True in eval mode with a causal method: routing is a per-token decision."""
        return not self.training and self.cfg.causal != "none"

    # ------------------------------------------------------------------ token movement
    def _gather(self, x: torch.Tensor, idx: torch.Tensor):
        """(h, normed) for the selected rows: h [B, K, D] (None when the block needs only the
        normalised rows), normed [B, K, D] or None (the block normalises h itself)."""
        blk = self.block
        if self.cfg.impl == "torch":
            return torch.gather(x, 1, idx.long()[..., None].expand(-1, -1, x.shape[-1])), None
        if blk.parallel:
            return None, rmsnorm_gather_tokens(x, idx, blk.norm1.weight, blk.norm1.eps)
        return gather_tokens(x, idx), None

    def _scatter(self, x: torch.Tensor, f: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                 inplace: bool = False) -> torch.Tensor:
        """``x`` with ``x[b, idx[b, j]] += w[b, j] * f[b, j]``: out of place, or into x's own
        rows when ``inplace`` (no autograd: only the k selected rows are read and written)."""
        if self.cfg.impl == "torch":
            idx_e = idx.long()[..., None].expand(-1, -1, x.shape[-1])
            add = w.to(x.dtype)[..., None] * f
            return x.scatter_add_(1, idx_e, add) if inplace else x.scatter_add(1, idx_e, add)
        # Under autocast the block's output is bf16 while the residual stream stays fp32.
        return scatter_tokens(x, f.to(x.dtype), idx, w, inplace=inplace)

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k per row: (indices [B, K] increasing, selected scores [B, K])."""
        k = mod_capacity(scores.shape[1], self.cfg.capacity)
        if self.cfg.impl == "torch":
            idx = scores.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
            return idx, scores.gather(1, idx)
        sel = mod_select(scores, k=k)
        return sel.indices, sel.weights

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, positions: torch.Tensor, *, kv_cache: LayerKVCache | None = None,
                inplace: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: ``[B, S, D]``; positions: ``[B, S]`` (original positions, int64).

        ``inplace``: when autograd is off (inference, evaluation), add the block's output into
        x's selected rows and return x itself, instead of copying all B x S rows: the caller
        hands over x (the :class:`~flopwise.models.transformer.Transformer` does, for its own
        residual stream). Ignored while autograd records."""
        if x.dim() != 3 or positions.shape != x.shape[:2]:
            raise ValueError(f"x must be [B, S, D] and positions [B, S], got {tuple(x.shape)} and "
                             f"{tuple(positions.shape)}")
        # Router scores in fp32, under autocast and for a bf16 model alike: top-k over bf16
        # scores (8 mantissa bits) would tie often among thousands of tokens, and ties go to
        # the lower position. The router is D + 1 numbers; the fp32 pass over x is cheap.
        with autocast_off(x.device):
            r = self.router
            scores = F.linear(x.float(), r.weight.float(), r.bias.float()).squeeze(-1)  # [B, S]
        inplace = inplace and not torch.is_grad_enabled()
        if self.routes_causally:
            return self._forward_causal(x, positions, scores, kv_cache, inplace)
        if kv_cache is not None:
            raise ValueError("a MoD layer can use a KV cache only with causal routing: call eval() and use "
                             "causal='router' or 'predictor'")
        idx, sel_scores = self._select(scores)
        h, normed = self._gather(x, idx)
        f, aux = self.block.delta(h, positions.gather(1, idx.long()), normed=normed)
        aux.update(self._aux(x, scores, idx))  # before the scatter, which may update x in place
        return self._scatter(x, f, idx, torch.sigmoid(sel_scores), inplace), aux

    def _forward_causal(self, x, positions, scores, kv_cache, inplace=False):
        """Eval: token i enters iff its causal logit > 0 (sigmoid > 0.5); rows padded to the
        batch maximum (see the module docstring)."""
        B, S, _ = x.shape
        decide = scores if self.predictor is None else self.predictor(x).squeeze(-1)
        chosen = decide > 0
        aux: dict[str, torch.Tensor] = {}
        if kv_cache is None:  # metrics need a whole sequence, not one decoding step
            idx_topk, _ = self._select(scores)
            aux.update(self._aux(x, scores, idx_topk, decide=decide))
            aux["mod_selected_frac"] = chosen.float().mean()
        counts = chosen.sum(1)
        kmax = int(counts.max())  # host sync: the padded width (inference only)
        if kmax == 0:
            return x, aux
        ar = torch.arange(S, device=x.device)
        # Selected positions first, then the rest, each group in position order; distinct.
        idx = torch.argsort(torch.where(chosen, ar, ar + S), dim=1)[:, :kmax]
        valid = ar[:kmax][None, :] < counts[:, None]
        w = torch.sigmoid(scores.gather(1, idx)) * valid  # padding: weight 0, row unchanged
        h, normed = self._gather(x, idx)
        f, block_aux = self.block.delta(h, positions.gather(1, idx), normed=normed, valid=valid, kv_cache=kv_cache)
        aux.update(block_aux)
        return self._scatter(x, f, idx, w, inplace), aux

    def _aux(self, x, scores, idx, decide=None) -> dict[str, torch.Tensor]:
        """BCE of the causal logit against top-k membership (weighted) and its accuracy."""
        if self.cfg.causal == "none":
            return {}
        member = torch.zeros_like(scores, dtype=torch.float32).scatter(1, idx.long(), 1.0)
        if decide is None:
            # The predictor reads stop-gradient inputs: its loss must not shape the model.
            decide = scores if self.predictor is None else self.predictor(x.detach()).squeeze(-1)
        bce = F.binary_cross_entropy_with_logits(decide.float(), member)
        acc = ((decide > 0) == (member > 0)).float().mean()
        return {"mod_aux_loss": self.cfg.aux_loss_weight * bce, "mod_predictor_acc": acc.detach()}
