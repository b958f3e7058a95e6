"""2-D layouts on 4 gloo ranks: FSDP2 over tensor parallelism, groups reached through
several meshes, expert parallelism, the rank-consistency check, and torchtitan's clip.

Each test spawns 4 processes once (the harness of ``test_distributed.py``, with its
deadline) and checks many cases in them. The oracle is the float64 norm of the full
gradients: those of an unsharded replica of the model trained on the same batches where
the layout comes from a model, the tensors a DTensor was distributed from otherwise, or
torch's own ``full_tensor()`` (its all-gather) where noted. torchtitan's
``clip_grad_norm_`` is compared on the layouts it supports. Each rank records what it
returned; the tests print the table (``pytest -s``).
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch
import torch.distributed as dist

import gradclip
from test_distributed import (Watch, assert_close, expect_error, full_tensors, oracle_norm,
                              record, run_ranks)

NORM_TYPES = (1.0, 2.0, 3.0, math.inf)
DEADLINE_S = 480  # 4 ranks on a small CI machine; a hang still fails


def norm_of(returned) -> tuple[float, float]:
    """(the global value, what this rank holds) of a norm gradclip or torchtitan returned."""
    from torch.distributed.tensor import DTensor

    if isinstance(returned, DTensor):
        return returned.full_tensor().item(), returned.to_local().item()
    return returned.item(), returned.item()


def rtol(norm_type: float) -> float:
    return 2e-5 if norm_type in (1.0, 2.0, math.inf) else 1e-4


def check_clipped(params, oracle_grads, coef: float, what: str) -> None:
    """The clipped gradients, gathered, are the oracle's scaled by ``coef``."""
    for p, full in zip(params, oracle_grads):
        torch.testing.assert_close(p.grad.full_tensor().double(), full * coef, rtol=1e-5,
                                   atol=1e-7, msg=lambda m: f"{what}: {m}")


def coef_of(max_norm: float, norm: float) -> float:
    return min(1.0, max_norm / (norm + 1e-6))


# -- models ---------------------------------------------------------------------------------


class Block(torch.nn.Module):
    """A norm, then a column- and a row-parallel linear layer (a transformer MLP)."""

    def __init__(self, dim: int = 5, hidden: int = 6, out: int = 1):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, out)

    def forward(self, x):
        return self.down(torch.tanh(self.up(self.norm(x))))


def batches(count: int, shape=(3, 6, 5), seed: int = 10) -> list[torch.Tensor]:
    return [torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
            for i in range(count)]


def fsdp_over_tp(mesh, out: int = 1):
    """``Block`` with TP on ``mesh["tp"]`` (SequenceParallel norm, Colwise up, Rowwise
    down) and FSDP2 on ``mesh["dp"]``, as torchtitan builds it; its unsharded replica;
    this rank's input and the replica's loss (the mean over the dp ranks' batches, as
    FSDP2 averages). With ``out=1``, the dp rank 1 shards of ``down`` are empty."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    torch.manual_seed(0)
    model = Block(out=out)
    torch.manual_seed(0)
    replica = Block(out=out)
    parallelize_module(model, mesh["tp"], {"norm": SequenceParallel(),
                                           "up": ColwiseParallel(input_layouts=Shard(1)),
                                           "down": RowwiseParallel(output_layouts=Shard(1))})
    fully_shard(model, mesh=mesh["dp"])
    data = batches(mesh.size(0))
    x = data[mesh.get_local_rank("dp")].chunk(mesh.size(1), dim=1)[mesh.get_local_rank("tp")]
    replica_loss = sum(replica(b).square().sum() for b in data) / len(data)
    return model, replica, x, replica_loss


def replica_grads(model, replica, loss) -> list[torch.Tensor]:
    """The replica's float64 gradients, in ``model``'s parameter order, after checking
    that the sharded model's gradients gather to them (the oracle checks itself)."""
    loss.backward()
    full = dict(replica.named_parameters())
    grads = []
    for name, p in model.named_parameters():
        grads.append(full[name].grad.double())
        torch.testing.assert_close(p.grad.full_tensor().double(), grads[-1], rtol=1e-5,
                                   atol=1e-7, msg=lambda m: f"oracle check, {name}: {m}")
    return grads


# -- FSDP2 over TP, through the functional API and ClippedOptimizer + GradScaler -------------


def fsdp_tp_scenario(rank: int, world: int, backend: str) -> None:
    """FSDP2 on dp of a 2x2 mesh over Colwise/Rowwise/SequenceParallel on tp: uneven
    shards, empty ones, ``_StridedShard``; norms 1, 2, 3, inf on every rank; the clipped
    gradients; the same through ClippedOptimizer under gradclip.GradScaler (CPU AMP)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, replica, x, replica_loss = fsdp_over_tp(mesh)
    model(x).square().sum().backward()
    oracle = replica_grads(model, replica, replica_loss)
    params = list(model.parameters())
    placements = {str(p.grad.placements) for p in params}
    assert any("_StridedShard" in text for text in placements), placements
    assert any(p.grad.to_local().numel() == 0 for p in params) == (mesh.get_local_rank("dp") == 1)
    saved = [p.grad.detach().clone() for p in params]
    layout = "FSDP2 + TP (2x2, empty shards)"
    for norm_type in NORM_TYPES:
        expected = oracle_norm(oracle, norm_type)
        what = f"{layout} p={norm_type} {backend}"
        for p, g in zip(params, saved):
            p.grad = g.clone()
        total, local = norm_of(gradclip.get_total_norm([p.grad for p in params], norm_type,
                                                       backend=backend))
        assert_close(total, expected, rtol(norm_type), what)
        assert_close(local, expected, rtol(norm_type), what + " (to_local)")
        max_norm = 0.5 * expected
        for p, g in zip(params, saved):
            p.grad = g.clone()
        total, local = norm_of(gradclip.clip_grad_norm_(params, max_norm, norm_type,
                                                        backend=backend))
        assert_close(local, expected, rtol(norm_type), what + " clip_grad_norm_")
        check_clipped(params, oracle, coef_of(max_norm, expected), what)
        record(layout=layout, call="clip_grad_norm_", backend=backend, norm_type=norm_type,
               gradclip=local, oracle=expected)

    # ClippedOptimizer under gradclip.GradScaler: the norm of the unscaled gradients, and
    # SGD steps with the clipped ones, on every rank alike.
    for norm_type in NORM_TYPES:
        model, replica, x, replica_loss = fsdp_over_tp(mesh)
        oracle = replica_grads_only(replica, replica_loss, model)
        expected = oracle_norm(oracle, norm_type)
        max_norm = 0.5 * expected
        opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        max_norm=max_norm, norm_type=norm_type, backend=backend)
        scaler = gradclip.GradScaler("cpu", init_scale=1024.0)
        before = [p.detach().full_tensor().double() for p in model.parameters()]
        scaler.scale(model(x).square().sum()).backward()
        scaler.step(opt)
        scaler.update()
        what = f"{layout} ClippedOptimizer + GradScaler p={norm_type} {backend}"
        assert_close(opt.last_norm.item(), expected, rtol(norm_type), what)
        coef = coef_of(max_norm, expected)
        for p, b, g in zip(model.parameters(), before, oracle):
            torch.testing.assert_close(p.detach().full_tensor().double(), b - 0.1 * coef * g,
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        assert scaler.get_scale() == 1024.0
        record(layout=layout, call="ClippedOptimizer + GradScaler", backend=backend,
               norm_type=norm_type, gradclip=opt.last_norm.item(), oracle=expected)


def replica_grads_only(replica, loss, model) -> list[torch.Tensor]:
    """The replica's float64 gradients in ``model``'s parameter order (no sharded
    gradients to compare yet)."""
    loss.backward()
    full = dict(replica.named_parameters())
    return [full[name].grad.double() for name, _ in model.named_parameters()]


def test_fsdp_over_tensor_parallel_norms_and_clipped_grads_match_the_full_gradients():
    rows = run_ranks(fsdp_tp_scenario, world=4, deadline_s=DEADLINE_S)
    print_table(rows)


# -- meshes, groups and orders ------------------------------------------------------------


_MESHES: dict[str, object] = {}


def mesh_after_extra_groups():
    """A 2x2 (dp, tp) mesh made after seven other groups, so that the names of its groups
    reach "10" ("10" sorts before "8" as a string; real jobs create dozens): made once
    per process, for every backend."""
    from torch.distributed.device_mesh import init_device_mesh

    if "after groups" not in _MESHES:
        for ranks in ([0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2], [0, 1, 2, 3]):
            dist.new_group(ranks)
        _MESHES["after groups"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    return _MESHES["after groups"]


def mixed_dtensors(mesh):
    """DTensors on a 2x2 mesh and on its submeshes (which reuse its groups): every kind of
    placement, an empty shard; and the full tensors they hold."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    layouts = [((6, 4), mesh, [Shard(0), Shard(1)]),
               ((8, 3), mesh, [_StridedShard(0, split_factor=2), Shard(0)]),
               ((5, 3), mesh["tp"], [Shard(0)]),
               ((3, 5), mesh["dp"], [Shard(1)]),
               ((7,), mesh, [Replicate(), Shard(0)]),
               ((1, 2), mesh, [Shard(0), Replicate()]),
               ((2, 2), mesh["tp"], [Replicate()])]
    full = full_tensors(70, [shape for shape, _, _ in layouts])
    return [distribute_tensor(t, m, p) for t, (_, m, p) in zip(full, layouts)], full


def orders(count: int) -> list[list[int]]:
    """The tensors as given, reversed, the one on the tp submesh first (its group is then
    met first as dimension 0 of a 1-D mesh), and three shuffles."""
    shuffled = random.Random(5)
    result = [list(range(count)), list(reversed(range(count))),
              [2] + [i for i in range(count) if i != 2]]
    for _ in range(3):
        result.append(shuffled.sample(range(count), count))
    return result


def meshes_scenario(rank: int, world: int, backend: str) -> None:
    """Groups reached through a 2-D mesh and its submeshes, after 7 other groups, tensors
    in several orders: each group is reduced once and the norm is the full tensors'. The
    single ``_StridedShard`` tensor and torchtitan's expert layout (distributed from known
    tensors) against the oracle and torch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = mesh_after_extra_groups()
    assert mesh["tp"].get_group() is mesh.get_group(1)
    names = (mesh.get_group(0).group_name, mesh.get_group(1).group_name)
    assert sorted(names) != sorted(names, key=int), names  # the case string order breaks

    grads, full = mixed_dtensors(mesh)
    layout = "2x2 mesh + submeshes, 7 groups first"
    for order in orders(len(grads)):
        for norm_type in NORM_TYPES:
            with Watch(allow_host_reads=True) as watch:
                norm = gradclip.get_total_norm([grads[i] for i in order], norm_type,
                                               backend=backend)
            assert watch.all_reduces == 2, (order, watch.all_reduces)  # dp once, tp once
            expected = oracle_norm(full, norm_type)
            total, local = norm_of(norm)
            assert_close(local, expected, rtol(norm_type), f"{layout} {order} p={norm_type}")
            if order == list(range(len(grads))):
                record(layout=layout, call="get_total_norm", backend=backend,
                       norm_type=norm_type, gradclip=local, oracle=expected)
    for order in orders(len(grads))[1:3]:
        params = [torch.nn.Parameter(torch.zeros_like(grads[i])) for i in order]
        for p, i in zip(params, order):
            p.grad = grads[i].clone()
        expected = oracle_norm(full, 2.0)
        returned = gradclip.clip_grad_norm_(params, 0.25 * expected, backend=backend)
        assert_close(norm_of(returned)[1], expected, 2e-5, f"{layout} clip {order}")
        check_clipped(params, [full[i].double() for i in order],
                      coef_of(0.25 * expected, expected), f"{layout} clip {order}")

    # Plain shards over the world group in pairs beside the DTensors: a third group.
    plain_full = full_tensors(71, [(4, 3), (5,), (2,)])
    plain = [torch.tensor_split(t, world)[rank] for t in plain_full]  # some empty
    pairs = [(grads, None), (plain, dist.group.WORLD)]
    for norm_type in NORM_TYPES:
        with Watch(allow_host_reads=True) as watch:
            norm = gradclip.get_total_norm(grads + plain, norm_type, process_group=pairs,
                                           backend=backend)
        assert watch.all_reduces == 3, watch.all_reduces
        assert_close(norm_of(norm)[1], oracle_norm(full + plain_full, norm_type),
                     rtol(norm_type), f"pairs p={norm_type}")

    # The single _StridedShard tensor of the issue: torch's norm, ours, the full tensor's.
    single = full_tensors(72, [(8, 3)])[0]
    strided = distribute_tensor(single, mesh, [_StridedShard(0, split_factor=2), Shard(0)])
    for norm_type in NORM_TYPES:
        ours = norm_of(gradclip.get_total_norm([strided], norm_type, backend=backend))[1]
        assert_close(ours, oracle_norm([single], norm_type), rtol(norm_type), "_StridedShard")
        torchs = torch.nn.utils.get_total_norm([strided], norm_type).full_tensor().item()
        assert_close(ours, torchs, rtol(norm_type), "_StridedShard vs torch")
        record(layout="one _StridedShard tensor", call="get_total_norm", backend=backend,
               norm_type=norm_type, gradclip=ours, oracle=oracle_norm([single], norm_type),
               torch=torchs)

    # torchtitan's expert parallelism: dense weights on a 1-D FSDP mesh, experts on
    # (efsdp, ep) as (_StridedShard(0, sf=2), Shard(0)); each mesh built on its own.
    dense_mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("fsdp",))
    sparse_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    dense, experts = full_tensors(73, [(8, 5), (8,)]), full_tensors(74, [(4, 5, 3), (4, 3)])
    ep_grads = ([distribute_tensor(t, dense_mesh, [Shard(0)]) for t in dense]
                + [distribute_tensor(t, sparse_mesh, [_StridedShard(0, split_factor=2), Shard(0)])
                   for t in experts])
    for norm_type in NORM_TYPES:
        ours = norm_of(gradclip.get_total_norm(ep_grads, norm_type, backend=backend))[1]
        expected = oracle_norm(dense + experts, norm_type)
        assert_close(ours, expected, rtol(norm_type), f"expert parallel p={norm_type}")
        record(layout="expert parallel (distributed tensors)", call="get_total_norm",
               backend=backend, norm_type=norm_type, gradclip=ours, oracle=expected)


# -- GRADCLIP_CHECK_RANKS=1 ----------------------------------------------------------------


def rank_check_scenario(rank: int, world: int, backend: str) -> None:
    """With the check on, ranks that passed different DTensors raise on every rank, a rank
    that fails to plan makes every rank raise, and nothing hangs; layouts that differ by
    design (pipeline stages) pass, at the cost of one more all-reduce."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = mesh_after_extra_groups()
    grads, full = mixed_dtensors(mesh)
    os.environ["GRADCLIP_CHECK_RANKS"] = "1"  # as users set it
    try:
        with Watch(allow_host_reads=True) as watch:
            norm = gradclip.get_total_norm(grads, backend=backend)
        assert watch.all_reduces == 3, watch.all_reduces  # dp, tp, and the check
        assert_close(norm_of(norm)[1], oracle_norm(full, 2.0), 2e-5, "checked, consistent")

        extra = distribute_tensor(torch.ones(3), mesh, [Replicate(), Replicate()])
        wrong_shape = distribute_tensor(torch.ones(6, 5), mesh, [Shard(0), Shard(1)])
        only_tp = distribute_tensor(torch.ones(4, 2), mesh["tp"], [Shard(0)])
        partial = DTensor.from_local(torch.ones(2), mesh, [Partial(), Replicate()],
                                     run_check=False)
        mismatches = {
            "an extra Replicate DTensor on rank 0": grads + [extra] * (rank == 0),
            "another shape on rank 2": [wrong_shape] + grads[1:] if rank == 2 else grads,
            "an extra tp-sharded DTensor on rank 0": grads + [only_tp] * (rank == 0),
            "fewer DTensors on rank 1": grads[:3] if rank == 1 else grads,
        }
        for what, tensors in mismatches.items():
            expect_error(ValueError, "did not pass the same sharded tensors",
                         lambda: gradclip.get_total_norm(tensors, backend=backend))
            dist.barrier()
        params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = gradclip.ClippedOptimizer(torch.optim.SGD(params[: 5 if rank == 3 else 7], lr=0.0),
                                        backend=backend)
        expect_error(ValueError, "did not pass the same sharded tensors", opt.step)
        dist.barrier()
        if rank == 3:
            expect_error(ValueError, "Partial", lambda: gradclip.get_total_norm(
                grads + [partial], backend=backend))
        else:
            expect_error(RuntimeError, "other rank(s) raised", lambda: gradclip.get_total_norm(
                grads, backend=backend))
        dist.barrier()

        # Pipeline stages hold different layers by design: no false alarm.
        stage = mesh.get_local_rank("dp")
        stage_full = [full_tensors(75 + s, [(4 + s, 3)]) for s in range(2)]
        stage_grads = [distribute_tensor(t, mesh["tp"], [Shard(0)]) for t in stage_full[stage]]
        norm = gradclip.get_total_norm(stage_grads, process_group=mesh.get_group("dp"),
                                       backend=backend)
        assert_close(norm_of(norm)[1], oracle_norm(stage_full[0] + stage_full[1], 2.0), 2e-5,
                     "checked pipeline stages")
    finally:
        del os.environ["GRADCLIP_CHECK_RANKS"]



def meshes_and_rank_check_scenario(rank: int, world: int, backend: str) -> None:
    """Both in one spawn (starting 4 ranks costs more than either); the check runs the
    same for every backend."""
    meshes_scenario(rank, world, backend)
    if backend == "reference":
        rank_check_scenario(rank, world, backend)


def test_groups_through_several_meshes_any_order_strided_and_expert_layouts_rank_check():
    rows = run_ranks(meshes_and_rank_check_scenario, world=4, deadline_s=DEADLINE_S)
    print_table(rows)


# -- torchtitan -------------------------------------------------------------------------------


def torchtitan_scenario(rank: int, world: int, backend: str) -> None:
    """gradclip's clip_grad_norm_ and torchtitan's on the layouts torchtitan trains with
    (every parameter of a kind on one mesh, as its models do): the same norm on every
    rank, the same clipped gradients, both the full gradients' (oracle)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from torchtitan.distributed.utils import clip_grad_norm_ as titan_clip

    def mlp(seed: int):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))

    def compare(layout: str, params, oracle, titan_kwargs=None, ours_kwargs=None,
                norm_types=NORM_TYPES):
        saved = [p.grad.detach().clone() for p in params]
        for norm_type in norm_types:
            expected = oracle_norm(oracle, norm_type)
            max_norm = 0.5 * expected
            clipped = {}
            for who, clip, kwargs in (("torchtitan", titan_clip, titan_kwargs or {}),
                                      ("gradclip", gradclip.clip_grad_norm_, ours_kwargs or {})):
                for p, g in zip(params, saved):
                    p.grad = g.clone()
                if who == "gradclip":
                    kwargs = dict(kwargs, backend=backend)
                returned = norm_of(clip(params, max_norm, norm_type, **kwargs))[1]
                clipped[who] = returned
                what = f"{layout} {who} p={norm_type}"
                assert_close(returned, expected, rtol(norm_type), what)
                check_clipped(params, oracle, coef_of(max_norm, expected), what)
            record(layout=layout, call="clip_grad_norm_", backend=backend, norm_type=norm_type,
                   gradclip=clipped["gradclip"], torchtitan=clipped["torchtitan"],
                   oracle=expected)

    data = batches(world, shape=(3, 5))

    # FSDP2 on the 4 ranks.
    flat = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model, replica = mlp(1), mlp(1)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=flat)
    fully_shard(model, mesh=flat)
    model(data[rank]).square().sum().backward()
    oracle = replica_grads(model, replica, sum(replica(b).square().sum() for b in data) / world)
    compare("FSDP2 (4)", list(model.parameters()), oracle)

    # FSDP2 over TP on a 2x2 mesh (no empty shard: torchtitan's inf norm refuses one).
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model, replica, x, replica_loss = fsdp_over_tp(mesh, out=2)
    model(x).square().sum().backward()
    oracle = replica_grads(model, replica, replica_loss)
    compare("FSDP2 + TP (2x2, no empty shard)", list(model.parameters()), oracle)

    # HSDP: replicated over one dimension, sharded over the other.
    hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_replicate", "dp_shard"))
    model, replica = mlp(2), mlp(2)
    fully_shard(model, mesh=hsdp)
    model(data[rank]).square().sum().backward()
    oracle = replica_grads(model, replica, sum(replica(b).square().sum() for b in data) / world)
    compare("HSDP (2x2)", list(model.parameters()), oracle)

    # Pipeline stages: each holds its own layers, FSDP2 over the stage's dp ranks.
    pp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage, dp = pp.get_local_rank("pp"), pp.get_local_rank("dp")
    model = mlp(10 + stage)
    fully_shard(model, mesh=pp["dp"])
    stage_data = [batches(2, shape=(3, 5), seed=20 + 2 * s) for s in range(2)]
    model(stage_data[stage][dp]).square().sum().backward()
    oracle_by_stage = []
    for s in range(2):
        replica = mlp(10 + s)
        (sum(replica(b).square().sum() for b in stage_data[s]) / 2).backward()
        oracle_by_stage.append([p.grad.double() for p in replica.parameters()])
    for p, g in zip(model.parameters(), oracle_by_stage[stage]):
        torch.testing.assert_close(p.grad.full_tensor().double(), g, rtol=1e-5, atol=1e-7)
    compare_stages("pipeline (pp=2 x dp=2)", list(model.parameters()), oracle_by_stage, stage,
                   backend, titan_clip, pp)

    # Expert parallelism: dense weights on a 1-D mesh, experts (sharded over ep, then FSDP2
    # over efsdp) on the other; the oracle is torch's all-gather of each gradient.
    dense_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    sparse = init_device_mesh("cpu", (2, 2), mesh_dim_names=("efsdp", "ep"))
    torch.manual_seed(3)
    dense = torch.nn.Linear(5, 8)
    experts = Experts(distribute_tensor(torch.randn(4, 8, 3), sparse["ep"], [Shard(0)]))
    fully_shard(dense, mesh=dense_mesh)
    fully_shard(experts, mesh=sparse["efsdp"])
    experts(dense(data[rank])).square().sum().backward()
    params = list(dense.parameters()) + list(experts.parameters())
    placements = str(experts.weight.grad.placements)
    assert "_StridedShard" in placements, placements
    compare("expert parallel (fsdp=4; efsdp=2 x ep=2)", params,
            [p.grad.full_tensor().double() for p in params], titan_kwargs={"ep_enabled": True})


class Experts(torch.nn.Module):
    """Each rank applies the experts it holds (``weight`` sharded over ep)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x):
        return torch.einsum("bd,edh->beh", x, self.weight.to_local())


def compare_stages(layout, params, oracle_by_stage, stage, backend, titan_clip, pp) -> None:
    """As ``compare``, for pipeline stages: torchtitan's ``pp_mesh``, gradclip's
    ``process_group``; the oracle is every stage's gradients."""
    everything = oracle_by_stage[0] + oracle_by_stage[1]
    saved = [p.grad.detach().clone() for p in params]
    for norm_type in NORM_TYPES:
        expected = oracle_norm(everything, norm_type)
        max_norm = 0.5 * expected
        returned = {}
        for who in ("torchtitan", "gradclip"):
            for p, g in zip(params, saved):
                p.grad = g.clone()
            if who == "torchtitan":
                norm = titan_clip(params, max_norm, norm_type, pp_mesh=pp["pp"])
            else:
                norm = gradclip.clip_grad_norm_(params, max_norm, norm_type, backend=backend,
                                                process_group=pp.get_group("pp"))
            returned[who] = norm_of(norm)[1]
            what = f"{layout} {who} p={norm_type}"
            assert_close(returned[who], expected, rtol(norm_type), what)
            check_clipped(params, oracle_by_stage[stage], coef_of(max_norm, expected), what)
        record(layout=layout, call="clip_grad_norm_", backend=backend, norm_type=norm_type,
               gradclip=returned["gradclip"], torchtitan=returned["torchtitan"], oracle=expected)


def test_torchtitan_clip_agrees_on_its_layouts():
    pytest.importorskip("torchtitan.distributed.utils")
    rows = run_ranks(torchtitan_scenario, ["reference"], world=4, deadline_s=DEADLINE_S)
    print_table(rows)


# -- the table of what each rank returned ----------------------------------------------------


def print_table(rows: list[dict]) -> None:
    """One line per (layout, call, backend, norm type): each rank's norm, then the
    oracle's (and torch's or torchtitan's where compared)."""
    keys = sorted({(r["layout"], r["call"], r["backend"], r["norm_type"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    print()
    for key in keys:
        mine = sorted((r for r in rows if (r["layout"], r["call"], r["backend"],
                                           r["norm_type"]) == key), key=lambda r: r["rank"])
        ranks = " ".join(f"{r['gradclip']:.7g}" for r in mine)
        others = " ".join(f"{name} {mine[0][name]:.7g}" for name in ("torchtitan", "torch")
                          if name in mine[0])
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {ranks} | "
              f"{mine[0]['oracle']:.7g} | {others} |")
