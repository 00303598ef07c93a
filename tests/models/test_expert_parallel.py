"""Expert-parallel MoE on gloo (2 and 4 spawned processes) against the single-process layer."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flopwise.models.expert_parallel import ExpertParallelMoE
from flopwise.models.moe import MoE, MoEConfig


def _close(a, b, what, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4, msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}")


def _worker(rank: int, world: int, port: int, scenario: str):
    # the test process serves the store on a port the OS picked: nothing to race for
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        {"edges": _check_edges, "failure": _check_failure}.get(scenario, _check)(rank, world, scenario)
        if scenario in ("edges", "skewed"):  # two group sizes
            _check_construction(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: checks passed", flush=True)
    # Leave without running C++ static destructors: at interpreter exit a spawned gloo rank
    # sometimes aborted ("terminate called without an active exception") after every check
    # had passed and the group was destroyed. A failed check raises above, so exit code 0
    # still means the checks passed.
    import os

    sys.stderr.flush()
    os._exit(0)


def _check(rank: int, world: int, scenario: str):
    E = 2 * world if scenario != "mesh" else 4
    router = "expert_choice" if scenario == "expert_choice" else "token_choice"
    cfg = MoEConfig(d_model=16, d_ff=24, n_experts=E, top_k=2, router=router, capacity_factor=1.0, block_m=16,
                    init_std=0.3, shared_d_ff=8 if scenario == "shared" else 0)
    torch.manual_seed(0)
    full = MoE(cfg)  # identical on every rank
    if scenario == "skewed":
        with torch.no_grad():  # the last rank's experts are never chosen: it receives nothing
            full.router.weight[-(E // world):] = 0.0
            full.router.weight[: -(E // world)] = full.router.weight[: -(E // world)].abs()
    group = None
    mesh = None
    if scenario == "mesh":  # 2 data-parallel replicas x 2 expert-parallel ranks
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        group = mesh["ep"].get_group()
    ep = ExpertParallelMoE.from_dense_layer(full, group)
    if mesh is not None:
        # FSDP2: the router is replicated on every rank (each rank has its own tokens), so it
        # is sharded over all ranks; expert weights are replicated only across "dp".
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(ep.router, mesh=init_device_mesh("cpu", (world,)))
        fully_shard(ep, mesh=mesh["dp"])

    g = torch.Generator().manual_seed(100 + rank)
    T = 3 + 4 * rank  # uneven loads across ranks
    if scenario == "skewed":
        x = torch.randn(T, 16, generator=g).abs()  # positive inputs: positive logits for kept experts only
    else:
        x = torch.randn(T, 16, generator=g)
    gy = torch.randn(T, 16, generator=g)

    x1 = x.clone().requires_grad_(True)
    y, aux = ep(x1)
    ((y * gy).sum() + aux).backward()
    x2 = x.clone().requires_grad_(True)
    y_ref, aux_ref = full(x2)
    ((y_ref * gy).sum() + aux_ref).backward()

    _close(y, y_ref, "output")
    _close(aux, aux_ref, "aux loss")
    _close(x1.grad, x2.grad, "dx")
    if mesh is None:
        _close(ep.router.weight.grad, full.router.weight.grad, "router grad")
    else:  # FSDP2 averages the router's gradient over all ranks
        ref = full.router.weight.grad.clone()
        dist.all_reduce(ref)
        _close(ep.router.weight.grad.full_tensor(), ref / world, "router grad (FSDP2)")
    if ep.shared is not None:
        _close(ep.shared.down.weight.grad, full.shared.down.weight.grad, "shared expert grad")
    for name in ("w_gate", "w_up", "w_down"):
        ref = getattr(full, name).grad.clone()
        dist.all_reduce(ref)  # every rank's tokens contribute to the experts' gradients
        got = getattr(ep, name).grad
        if got is None:
            got = torch.zeros_like(getattr(ep, name))
        if mesh is not None:  # FSDP2 over "dp" averages the two replicas' expert gradients
            got, ref = got.full_tensor(), ref / 2
        _close(got, ref[ep.expert_slice], f"{name} grad")
    if mesh is not None:  # checkpoints both ways with FSDP2-sharded (DTensor) parameters
        for k, v in ep.dense_state_dict().items():
            assert torch.equal(v, full.state_dict()[k]), f"rank {rank}: dense_state_dict under FSDP2: {k}"
        torch.manual_seed(9)
        other = MoE(cfg)
        ep.load_state_dict(other.state_dict())  # a full single-process checkpoint
        for k, v in ep.dense_state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), f"rank {rank}: loaded under FSDP2: {k}"
        with torch.no_grad():
            _close(ep(x)[0], other(x)[0], "output after loading a full checkpoint under FSDP2")
    if scenario == "skewed" and rank == world - 1:
        _, plan = full.route(x)
        counts = plan.expert_counts.long()
        assert counts[-(E // world):].sum() == 0  # nobody routes here, so this rank receives nothing


def _check_construction(rank: int, world: int):
    """Only the rank's experts are allocated; rank 0's seed initialises every rank."""
    from torch.utils._python_dispatch import TorchDispatchMode

    E = 2 * world
    cfg = MoEConfig(d_model=8, d_ff=12, n_experts=E, top_k=2, block_m=16, shared_d_ff=4)

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    torch.manual_seed(5 + rank)  # every rank seeded differently
    with LargestTensor() as mode:
        ep = ExpertParallelMoE(cfg)
    assert mode.largest == (E // world) * 8 * 12, f"rank {rank}: a tensor of {mode.largest} elements was made"
    got = ep.dense_state_dict()
    torch.manual_seed(5)  # rank 0's seed
    full = MoE(cfg)
    assert got.keys() == full.state_dict().keys()
    for k, v in full.state_dict().items():
        assert torch.equal(got[k], v), f"rank {rank}: {k} differs from MoE(cfg) under rank 0's seed"


def _check_failure(rank: int, world: int, scenario: str):
    """The last rank raises before the exchange (a wrong input width): the others raise too
    instead of waiting in the all-to-all, and the group serves the next forward."""
    E = 2 * world
    cfg = MoEConfig(d_model=8, d_ff=12, n_experts=E, top_k=2, block_m=16, init_std=0.3)
    torch.manual_seed(0)
    full = MoE(cfg)
    ep = ExpertParallelMoE.from_dense_layer(full)
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(rank))
    if rank == world - 1:
        with pytest.raises(ValueError, match="x must be a tensor"):
            ep(torch.randn(2, 3, 7))
    else:
        with pytest.raises(RuntimeError, match=rf"group rank\(s\) \[{world - 1}\] raised before the token exchange"):
            ep(x)
    y, aux = ep(x)  # every rank again: the exchange is in step
    y_ref, aux_ref = full(x)
    _close(y, y_ref, "output after a failed forward")


def _check_edges(rank: int, world: int, scenario: str):
    """Several cheap cases in one spawn: a rank without tokens, checkpoints, dtypes, groups."""
    E = 2 * world
    for router in ("token_choice", "expert_choice"):
        # rank 0 has no tokens (B * S == 0): it must still serve its experts to the others
        cfg = MoEConfig(d_model=8, d_ff=12, n_experts=E, top_k=2, router=router, capacity_factor=1.0, block_m=16,
                        init_std=0.3)
        torch.manual_seed(0)
        full = MoE(cfg)
        ep = ExpertParallelMoE.from_dense_layer(full)
        x = torch.randn(2, 0 if rank == 0 else 3, 8, generator=torch.Generator().manual_seed(rank))
        x1 = x.clone().requires_grad_(True)
        y, aux = ep(x1)
        (y.sum() + aux).backward()
        assert y.shape == x.shape
        if rank == 0:
            assert aux.item() == 0.0, aux  # no tokens, no aux loss (not NaN)
            for p in full.parameters():
                p.grad = torch.zeros_like(p)
        else:
            y_ref, aux_ref = full(x)
            (y_ref.sum() + aux_ref).backward()
            _close(y, y_ref, f"{router}: output beside a rank without tokens")
            _close(aux, aux_ref, f"{router}: aux loss")
        _close(ep.router.weight.grad, full.router.weight.grad, f"{router}: router grad")
        for name in ("w_gate", "w_up", "w_down"):
            ref = getattr(full, name).grad.clone()
            dist.all_reduce(ref)
            _close(getattr(ep, name).grad, ref[ep.expert_slice], f"{router}: {name} grad")

    # checkpoints: a full single-process state dict loads into the shard, and gathers back
    cfg = MoEConfig(d_model=8, d_ff=12, n_experts=E, top_k=2, block_m=16, shared_d_ff=4)
    torch.manual_seed(1)
    full = MoE(cfg)
    ep = ExpertParallelMoE(cfg)
    ep.load_state_dict(full.state_dict())
    for name in ("w_gate", "w_up", "w_down"):
        torch.testing.assert_close(getattr(ep, name), getattr(full, name)[ep.expert_slice])
    torch.testing.assert_close(ep.router.weight, full.router.weight)
    dense = ep.to_dense_layer()
    assert type(dense) is MoE
    for k, v in full.state_dict().items():
        torch.testing.assert_close(dense.state_dict()[k], v, msg=lambda m: f"to_dense_layer: {k}: {m}")
    assert ep.dense_state_dict().keys() == full.state_dict().keys()

    # from_dense_layer keeps the layer's dtype and copies (the dense layer stays independent)
    full.to(torch.bfloat16)
    ep = ExpertParallelMoE.from_dense_layer(full)
    for (k, p), (_, q) in zip(ep.named_parameters(), full.named_parameters()):
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad and p.dtype == q.dtype == torch.bfloat16, k
    with torch.no_grad():
        full.router.weight.add_(1.0)
        full.w_gate.add_(1.0)
    assert not torch.equal(ep.router.weight, full.router.weight)
    assert not torch.equal(ep.w_gate, full.w_gate[ep.expert_slice])

    # a process that is not in the group gets a clear error; group ranks, not global ones
    sub = dist.new_group([world - 1])  # the last rank alone: its group rank is 0
    if rank == world - 1:
        assert ExpertParallelMoE(cfg, sub).rank == 0
    else:
        with pytest.raises(ValueError, match="not a member"):
            ExpertParallelMoE(cfg, sub)


@pytest.mark.parametrize("world,scenario", [
    pytest.param(2, "plain", id="2-ranks"),
    pytest.param(4, "skewed", id="4-ranks-one-receives-nothing"),
    pytest.param(2, "expert_choice", id="2-ranks-expert-choice"),
    pytest.param(2, "shared", id="2-ranks-shared-expert"),
    pytest.param(4, "mesh", id="dp2-x-ep2-mesh"),
    pytest.param(2, "edges", id="2-ranks-empty-rank-checkpoints-dtypes-groups"),
    pytest.param(4, "failure", id="4-ranks-one-fails-before-the-exchange"),
])
def test_expert_parallel_matches_single_process(world, scenario):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    try:
        mp.spawn(_worker, args=(world, server.port, scenario), nprocs=world, join=True)
    finally:
        del server


def test_needs_process_group():
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ExpertParallelMoE(MoEConfig(d_model=8, d_ff=8, n_experts=4, top_k=1))
