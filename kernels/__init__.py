"""Triton kernels with their PyTorch references and autograd wrappers.

Each op dispatches through :mod:`flopwise.kernels._dispatch`: Triton on CUDA tensors,
Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1``, the reference otherwise.
"""

from .grouped_mm import grouped_mm, grouped_mm_reference, moe_mlp, moe_mlp_reference
from .mod_gather import (
    gather_tokens,
    gather_tokens_reference,
    rmsnorm_gather_tokens,
    rmsnorm_gather_tokens_reference,
    scatter_tokens,
    scatter_tokens_reference,
)
from .routing import (
    MoDSelection,
    RoutingPlan,
    expert_choice_capacity,
    expert_choice_route,
    expert_choice_route_reference,
    mod_capacity,
    mod_select,
    mod_select_reference,
    plan_from_counts,
    plan_from_topk,
    plan_from_topk_reference,
    topk_route,
    topk_route_reference,
    topk_rows,
    topk_rows_reference,
)

__all__ = [
    "MoDSelection",
    "RoutingPlan",
    "expert_choice_capacity",
    "expert_choice_route",
    "expert_choice_route_reference",
    "gather_tokens",
    "gather_tokens_reference",
    "grouped_mm",
    "grouped_mm_reference",
    "mod_capacity",
    "mod_select",
    "mod_select_reference",
    "moe_mlp",
    "moe_mlp_reference",
    "plan_from_counts",
    "plan_from_topk",
    "plan_from_topk_reference",
    "rmsnorm_gather_tokens",
    "rmsnorm_gather_tokens_reference",
    "scatter_tokens",
    "scatter_tokens_reference",
    "topk_route",
    "topk_route_reference",
    "topk_rows",
    "topk_rows_reference",
]
