"""Expert parallelism: an MoE layer whose experts are spread over the ranks of a process group.

Each rank holds ``E / world`` consecutive experts (rank r owns experts
``r*E_local : (r+1)*E_local``) and a full copy of the router. Per forward:

1. route the rank's own tokens over all E experts (the plan sorts rows by expert, hence by
   owning rank);
2. exchange per-expert row counts with one ``all_to_all_single`` of an ``[E]`` int tensor
   on the device, then read the per-rank split sizes on the host (the one host sync:
   ``all_to_all_single`` needs them as Python ints);
3. send each row to the rank owning its expert (``all_to_all_single``), run the local
   experts with the grouped kernels over a plan built from the received counts, and send
   the outputs back with the reverse ``all_to_all_single``;
4. combine on the source rank: ``y[t] += w_r * out_r``.

Both collectives are differentiable (``torch.distributed._functional_collectives``), so
gradients flow back to the tokens, the router and the local experts. Works with
token-choice and expert-choice routers; each rank routes its own tokens, exactly as a
single-process layer would on that rank's batch. In particular expert choice picks each
expert's top ``C = ceil(T_local * capacity_factor / E)`` tokens among the rank's own
``T_local`` tokens (per rank, not over the group's tokens), and the auxiliary losses
(load balance, z-loss) use the rank's own tokens' statistics, as ``MoE`` on that rank's batch
(average them over ranks as any per-rank loss). A rank with no tokens (``B * S == 0``) must
still call ``forward`` (its experts serve the other ranks): it returns an empty output and a
zero aux loss.

Initialisation: constructing the layer is a collective (every rank of the group constructs it).
Group rank 0's seed (see :meth:`MoE.reset_parameters`) initialises every rank, so the
replicated router and shared expert are identical on all ranks whatever each rank's own seed,
and the shards gathered equal ``MoE(config)`` built under that seed, for any group size. Only
the rank's own experts are ever allocated.

Checkpoints: ``state_dict()`` holds this rank's shard under :class:`MoE`'s names;
``load_state_dict`` also accepts a full single-process :class:`MoE` state dict (it keeps this
rank's experts), and :meth:`ExpertParallelMoE.dense_state_dict` / ``to_dense_layer`` gather the
full layer back (collectives: every rank of the group calls them). Both also work on
parameters that FSDP2's ``fully_shard`` made DTensors: a full checkpoint's tensors are split
into the local shards without a collective, and the gather returns plain tensors.

An error raised on one rank before the exchange (a wrong input width, say) does not leave the
other ranks waiting in the all-to-all until the process group's timeout: the failing rank
sends negative row counts in the counts exchange (the collective the others are waiting in)
and raises its own error; the others read the counts on the host anyway (the one sync) and
raise ``RuntimeError`` naming the failed ranks, before any further collective. The group
stays usable for the next forward. An error after the exchange (in the local experts, say)
is not covered: the others then wait in the next all-to-all.

Data parallelism composes through a 2-D ``DeviceMesh`` with an expert-parallel dimension:
pass ``mesh["ep"]``'s group here, and reduce the replicated parameters' gradients over the
data-parallel dimension (DDP, or FSDP2's ``fully_shard`` on the non-expert parameters); the
expert weights are replicated across the data-parallel dimension only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch.distributed.tensor import DTensor, distribute_tensor

from flopwise.kernels import plan_from_counts

from .moe import MoE, MoEConfig

_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")

__all__ = ["ExpertParallelMoE"]


class ExpertParallelMoE(MoE):
    """:class:`MoE` with its experts sharded over ``group`` (``E % world_size == 0``).

    ``w_gate, w_up: [E_local, D, F]``, ``w_down: [E_local, F, D]``; the router (and the shared
    expert, if any) is replicated. ``forward`` is :class:`MoE`'s; only the routed experts' part differs.

    Example (launch with ``torchrun --nproc-per-node 4 train.py``)::

        dist.init_process_group("nccl")
        moe = ExpertParallelMoE(MoEConfig(d_model=1024, d_ff=512, n_experts=64, top_k=8))
        y, aux = moe(x)            # x: this rank's tokens
    """

    def __init__(self, config: MoEConfig, group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0 or self.world < 1:
            raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the given process group")
        if config.n_experts % self.world:
            raise ValueError(f"n_experts = {config.n_experts} must be divisible by the group size {self.world}")
        self.n_local = config.n_experts // self.world
        super().__init__(config)  # allocates this rank's experts only (_held_experts)

    @property
    def expert_slice(self) -> slice:
        """The global expert ids this rank owns."""
        return slice(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def _held_experts(self) -> range:
        return range(self.rank * self.n_local, (self.rank + 1) * self.n_local)

    def _init_seed(self) -> int:
        # Every rank draws (its default generator advances as on the others), then group rank
        # 0's draw wins: the replicated router and shared expert start identical everywhere,
        # and the experts as a single-process MoE built under rank 0's seed.
        seed = [super()._init_seed()]
        dist.broadcast_object_list(seed, src=dist.get_global_rank(self.group, 0), group=self.group)
        return seed[0]

    @classmethod
    def from_dense_layer(cls, moe: MoE, group: dist.ProcessGroup | None = None) -> "ExpertParallelMoE":
        """This rank's shard of a full (single-process) :class:`MoE` with the same config, on
        ``moe``'s device and in its parameters' dtypes (copies; ``moe`` is left as it is)."""
        ep = cls(moe.config, group)
        sd = {k: (v[ep.expert_slice] if k in _EXPERT_WEIGHTS else v).clone() for k, v in moe.state_dict().items()}
        ep.load_state_dict(sd, assign=True)  # assign: take moe's dtypes and device
        return ep

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Runs before the submodules load, so it may rewrite their entries too.
        for name, p in self.named_parameters():
            key = prefix + name
            v = state_dict.get(key)
            if not isinstance(v, torch.Tensor) or isinstance(v, DTensor):
                continue
            # A full single-process MoE checkpoint ([E, ...] expert weights): keep this rank's experts.
            if name in _EXPERT_WEIGHTS and v.dim() == 3 and v.shape[0] == self.config.n_experts \
                    and self.n_local != self.config.n_experts:
                v = state_dict[key] = v[self.expert_slice].clone()
            # Parameters sharded by FSDP2 (DTensors): a plain tensor of the parameter's full shape,
            # the same on every rank (read from one file), is split locally, no collective.
            if isinstance(p, DTensor) and v.shape == p.shape:
                state_dict[key] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """The full single-process :class:`MoE` state dict (expert weights gathered over the
        group, in group-rank order), plain tensors on every rank, also when FSDP2 shards the
        parameters (DTensors are gathered over their meshes first). A collective: every rank of
        the group (and of the FSDP2 meshes) calls it."""
        sd = {}
        for k, v in self.state_dict().items():  # the same order on every rank
            v = v.detach()
            sd[k] = v.full_tensor() if isinstance(v, DTensor) else v.clone()
        for name in _EXPERT_WEIGHTS:
            w = sd[name].contiguous()
            parts = [torch.empty_like(w) for _ in range(self.world)]
            dist.all_gather(parts, w, group=self.group)
            sd[name] = torch.cat(parts)
        return sd

    def to_dense_layer(self) -> MoE:
        """A single-process :class:`MoE` with the full layer's weights (see :meth:`dense_state_dict`)."""
        moe = MoE(self.config)
        moe.load_state_dict(self.dense_state_dict(), assign=True)
        return moe

    def forward(self, x: torch.Tensor, *, return_losses: bool = False):
        self._exchanged = False
        try:
            return super().forward(x, return_losses=return_losses)
        except Exception:
            if not self._exchanged:  # the others wait in the counts exchange: tell them, then raise
                self._signal_failure()
            raise

    def update_bias(self, group=None) -> torch.Tensor | None:
        """:meth:`MoE.update_bias` with the loads summed over ``group`` (default: the layer's
        own group, whose ranks route different tokens); every rank of it calls this. With data
        parallelism beside the experts' group (a 2-D mesh), pass the group spanning both, or
        the replicas' biases drift apart."""
        return super().update_bias(self.group if group is None else group)

    def _signal_failure(self) -> None:
        """This rank's part of the counts exchange with every count -1 (no real count is
        negative): the other ranks raise instead of sending rows."""
        W, El = self.world, self.n_local
        flag = torch.full((W * El,), -1, dtype=torch.int64, device=self.router.weight.device)
        fc.wait_tensor(fc.all_to_all_single(flag, [El] * W, [El] * W, self.group))

    def _experts(self, x_TD: torch.Tensor, plan) -> torch.Tensor:
        """Run the plan's rows on the experts' owners and bring the outputs back: ``[N, D]``."""
        W, El = self.world, self.n_local
        counts = plan.expert_counts.to(torch.int64)
        # recv_counts[s, e]: rows source rank s sends to my local expert e
        self._exchanged = True
        recv_counts = fc.wait_tensor(fc.all_to_all_single(counts, [El] * W, [El] * W, self.group)).view(W, El)
        splits = torch.stack([counts.view(W, El).sum(1), recv_counts.sum(1)]).tolist()  # the one host sync
        send_splits, recv_splits = splits
        failed = [s for s, n in enumerate(recv_splits) if n < 0]
        if failed:
            raise RuntimeError(f"ExpertParallelMoE: group rank(s) {failed} raised before the token exchange "
                               "(their own error says why); this rank stops its forward too")
        rows = x_TD[plan.token_idx.long()]  # expert order == owner order
        recv = fc.all_to_all_single_autograd(rows, recv_splits, send_splits, self.group)
        # Received rows are ordered (source, expert); the local plan sorts them by expert.
        R = sum(recv_splits)
        expert_of_row = torch.repeat_interleave(
            torch.arange(El, device=x_TD.device).repeat(W), recv_counts.reshape(-1), output_size=R)
        order = torch.sort(expert_of_row, stable=True).indices
        local_plan = plan_from_counts(order, torch.ones(R, device=x_TD.device), recv_counts.sum(0), R,
                                      block_m=self.config.block_m)
        out = super()._routed_experts(recv, local_plan)  # local experts, one "token" per received row
        return fc.all_to_all_single_autograd(out, send_splits, recv_splits, self.group)

    def _routed_experts(self, x_TD: torch.Tensor, plan) -> torch.Tensor:
        back = self._experts(x_TD, plan)
        y = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        return y.index_add(0, plan.token_idx.long(), back.float() * plan.weights[:, None].float()).to(x_TD.dtype)
