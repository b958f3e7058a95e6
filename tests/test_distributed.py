"""Sharded gradients: DTensors, process_group= and (tensors, group) pairs, on gloo CPU ranks.

Each test spawns 2 processes (4 for a 2-D mesh) that run several checks in turn; a run
that does not finish within its deadline fails (a deadlock must not hang CI). Every
norm is compared with the float64 norm of the full, unsharded gradients that each rank
builds from the same seed, or with torch's own clip where torch can compute it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import re
import signal
import os
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import gradclip
from conftest import gpu

if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

DEADLINE_S = 240
NORM_TYPES = (1.0, 2.0, 3.5, math.inf)
BACKENDS = ["reference", "triton"]


# -- the harness ------------------------------------------------------------------------


_RECORDS: list[dict] = []  # what a scenario reports (norms per layout), on each rank
_FOLDER: Path | None = None  # the run's folder, on each rank


def record(**fields) -> None:
    """Keep ``fields`` (JSON values) for the test that runs this scenario: ``run_ranks``
    returns every rank's records."""
    _RECORDS.append({"rank": dist.get_rank(), **fields})


def _worker(rank: int, world: int, folder: str, scenario, backends: list[str]) -> None:
    """One rank: run ``scenario`` for each backend, then leave a marker saying the work is
    done. Any exception is written down for the parent before the process exits."""
    global _FOLDER
    folder = _FOLDER = Path(folder)
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=90))
        for backend in backends:
            scenario(rank, world, backend)
            dist.barrier()
        (folder / f"records-{rank}.json").write_text(json.dumps(_RECORDS))
        dist.barrier()  # every rank's checks passed
        (folder / f"done-{rank}").touch()
    except BaseException:
        # Before the group goes: the peers then fail too, and this error must come first.
        (folder / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def runnable_backends() -> list[str]:
    """The reference backend, and the Triton kernels where they run (the interpreter here)."""
    return [b for b in BACKENDS if gradclip.available_backends()[b].available]


def _scenario(scenario):
    return SCENARIOS[scenario] if isinstance(scenario, str) else scenario


def run_ranks(scenario, backends: list[str] | None = None, world: int = 2,
              deadline_s: float = DEADLINE_S) -> list[dict]:
    """Run ``scenario`` (a name in SCENARIOS, or a module-level function of a test module)
    for each backend (one spawn for all: starting ranks costs seconds) on ``world`` gloo
    ranks, and return the ranks' records.

    Fails on an error in any rank, on a rank that dies before its work is done, and past
    the deadline (a rank stuck in a collective). A rank that aborts after every rank
    finished its work (FSDP2 on gloo sometimes does, with SIGABRT, as it exits:
    TOOLCHAIN.md) is not a failure.
    """
    backends = runnable_backends() if backends is None else backends
    scenario = _scenario(scenario)
    name = f"{scenario.__name__} on {world} ranks"
    with tempfile.TemporaryDirectory() as folder:
        spawn = multiprocessing.get_context("spawn")
        processes = [spawn.Process(target=_worker, args=(rank, world, folder, scenario, backends))
                     for rank in range(world)]
        for process in processes:
            process.start()
        deadline = time.monotonic() + deadline_s
        try:
            while any(process.is_alive() for process in processes):
                failed = [rank for rank, process in enumerate(processes)
                          if _failed(process, rank, folder)]
                if failed:
                    pytest.fail(_failure_report(name, failed, folder))
                if time.monotonic() >= deadline:
                    pytest.fail(f"{name} did not finish in {deadline_s} s (a rank is stuck in "
                                "a collective)")
                time.sleep(0.2)
            failed = [rank for rank, process in enumerate(processes)
                      if _failed(process, rank, folder)]
            if failed:
                pytest.fail(_failure_report(name, failed, folder))
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                process.join(timeout=10)
        return [row for rank in range(world)
                for row in json.loads(Path(folder, f"records-{rank}.json").read_text())]


def _failed(process, rank: int, folder: str) -> bool:
    """Whether ``process`` (rank ``rank``) ended without its work done: an error, or an
    exit before its done marker. SIGABRT after the marker is the known exit abort."""
    if process.exitcode is None:
        return Path(folder, f"error-{rank}.txt").exists()
    if process.exitcode == 0:
        return not Path(folder, f"done-{rank}").exists()
    if process.exitcode == -signal.SIGABRT and Path(folder, f"done-{rank}").exists():
        return False
    return True


def _failure_report(name: str, failed: list[int], folder: str) -> str:
    """The failed ranks' tracebacks, the first written first (the others usually follow
    from it: a peer's connection closed)."""
    def written(rank: int) -> float:
        error = Path(folder, f"error-{rank}.txt")
        return error.stat().st_mtime if error.exists() else math.inf

    parts = []
    for rank in sorted(failed, key=written):
        error = Path(folder, f"error-{rank}.txt")
        parts.append(f"rank {rank} failed during its work:\n" + (
            error.read_text() if error.exists()
            else "(no traceback: the process died or aborted)\n"))
    return f"{name}: " + "".join(parts)


# -- helpers the ranks use ----------------------------------------------------------------


def full_tensors(seed: int, shapes, dtype=torch.float32, scale=1.0) -> list[torch.Tensor]:
    """The same tensors on every rank (one seed)."""
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
            for shape in shapes]


def oracle_norm(tensors, norm_type: float) -> float:
    flat = torch.cat([t.detach().double().reshape(-1) for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type).item()


def norm_rtol(norm_type: float, dtype=torch.float32) -> float:
    base = 1e-5 if dtype == torch.float32 else 1e-12
    return base * (20 if norm_type not in (1.0, 2.0, math.inf) else 4)


def assert_close(actual: float, expected: float, rtol: float, what: str) -> None:
    assert math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-30), (
        f"{what}: got {actual!r}, expected {expected!r} (rtol {rtol})")


def as_params(grads) -> list[torch.Tensor]:
    """Parameters whose ``.grad`` are ``grads`` (DTensors stay DTensors)."""
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def full_of(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


class Watch(TorchDispatchMode):
    """Fails on a host read (``.item()``, ``bool()``), or counts them; counts all-reduces."""

    def __init__(self, allow_host_reads: bool = False):
        super().__init__()
        self.all_reduces = 0
        self.host_reads = 0
        self.allow_host_reads = allow_host_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_local_scalar_dense" in name:
            if not self.allow_host_reads:
                raise AssertionError("host synchronisation (aten._local_scalar_dense)")
            self.host_reads += 1
        if ("all_reduce" in name or "allreduce" in name) and "wait" not in name:
            self.all_reduces += 1
        return func(*args, **(kwargs or {}))


def device_decides():
    """The reference backend decides on the host for CPU tensors (no device to wait for);
    to check that the distributed layer itself never reads the host, make it decide on
    the device, as it does for GPU tensors."""
    from gradclip.backends import reference

    reference._decides_on_host = lambda device: False


def expect_error(error_type, match: str, fn, also: str = "") -> None:
    try:
        fn()
    except error_type as error:
        for text in (match, also):
            assert text in str(error), f"{error_type.__name__} without {text!r}: {error}"
    else:
        raise AssertionError(f"no {error_type.__name__} ({match!r})")


# -- scenarios ----------------------------------------------------------------------------


SHAPES = [(6, 5), (7, 3), (2, 9), (1, 4)]  # uneven over 2 ranks, one shard empty


def dtensor_layouts(rank: int, world: int, backend: str) -> None:
    """Shard(0), Shard(1), Replicate and all three in one call: norms 1, 2, 3.5, inf, the
    clip, the returned DTensor, no host read, one all-reduce; torch agrees."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    layouts = {"shard0": [Shard(0)] * 4, "shard1": [Shard(1)] * 4, "replicate": [Replicate()] * 4,
               "mixed": [Shard(0), Replicate(), Shard(1), Shard(0)]}
    for seed, (name, placements) in enumerate(layouts.items()):
        for dtype in (torch.float32, torch.bfloat16):
            full = full_tensors(seed, SHAPES, dtype)
            grads = [distribute_tensor(t.clone(), mesh, [p]) for t, p in zip(full, placements)]
            for norm_type in NORM_TYPES:
                what = f"{name} {dtype} p={norm_type} {backend}"
                norm = gradclip.get_total_norm(grads, norm_type, backend=backend)
                assert_close(norm.full_tensor().item(), oracle_norm(full, norm_type),
                             norm_rtol(norm_type), what)
                assert_close(norm.to_local().item(), norm.full_tensor().item(), 0, what + " local")
                if math.isinf(norm_type):
                    continue  # torch's inf norm refuses the empty shard of SHAPES[3]
                expected = torch.nn.utils.get_total_norm(
                    [g.float() for g in grads] if dtype == torch.bfloat16 else grads, norm_type)
                assert_close(norm.full_tensor().item(), expected.full_tensor().item(),
                             norm_rtol(norm_type), what + " vs torch")
            params = as_params(grads)
            max_norm = 0.5 * oracle_norm(full, 2.0)
            returned = gradclip.clip_grad_norm_(params, max_norm, backend=backend)
            coef = max_norm / (oracle_norm(full, 2.0) + 1e-6)
            assert_close(returned.full_tensor().item(), oracle_norm(full, 2.0), 1e-5, name)
            for p, t in zip(params, full):
                torch.testing.assert_close(p.grad.full_tensor().double(), t.double() * coef,
                                           rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                           atol=1e-6)

    # clip_grads_with_norm_ takes torch's (Partial) norm and ours; clip_grad_value_ clamps.
    full = full_tensors(9, SHAPES)
    grads = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    ours, torchs = as_params(grads), as_params(grads)
    gradclip.clip_grads_with_norm_(ours, 1.0, torch.nn.utils.get_total_norm([p.grad for p in ours]),
                                   backend=backend)
    torch.nn.utils.clip_grads_with_norm_(torchs, 1.0, torch.nn.utils.get_total_norm(
        [p.grad for p in torchs]))
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor())
    gradclip.clip_grad_value_(ours, 0.1, backend=backend)
    for a, t in zip(ours, full):
        assert a.grad.full_tensor().abs().max() <= torch.tensor(0.1)

    # What docs/distributed.md says of host reads and overflow. The reference backend on
    # CPU tensors decides on the host by design: is the norm finite, is the factor 1.
    if backend == "reference":
        params = as_params(grads)
        with Watch(allow_host_reads=True) as watch:
            gradclip.clip_grad_norm_(params, 0.1, backend=backend)
        assert watch.host_reads == 2, watch.host_reads
        with Watch(allow_host_reads=True) as watch:
            gradclip.get_total_norm([p.grad for p in params], backend=backend)
        assert watch.host_reads == 1, watch.host_reads
    # Each rank's norm is float32 (the backend's accumulation): values of 3e19 overflow
    # their squares' sum, as torch's do. The ranks' sums are combined in float64: local
    # norms that are finite give a finite global norm (torch's float32 stack overflows).
    huge = [distribute_tensor(torch.full((4, 3), 3e19), mesh, [Shard(0)])]
    assert gradclip.get_total_norm(huge, backend=backend).full_tensor().item() == math.inf
    assert torch.nn.utils.get_total_norm(huge).full_tensor().item() == math.inf
    large = [distribute_tensor(torch.full((4, 3), 7e18), mesh, [Shard(0)])]
    assert_close(gradclip.get_total_norm(large, backend=backend).full_tensor().item(),
                 7e18 * math.sqrt(12), 1e-6, "7e18")
    assert torch.nn.utils.get_total_norm(large).full_tensor().item() == math.inf

    # No host read, exactly one all-reduce (one mesh, one group) per clip.
    if backend == "reference":
        device_decides()
    params = as_params(grads)
    for max_norm in (1e9, 0.1):  # nothing to clip, then clipping
        with Watch() as watch:
            gradclip.clip_grad_norm_(params, max_norm, backend=backend)
        assert watch.all_reduces == 1, watch.all_reduces
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), max_norm=0.1, backend=backend)
    with Watch() as watch:
        opt.step()
    assert watch.all_reduces == 1, watch.all_reduces


def mesh_2d(rank: int, world: int, backend: str) -> None:
    """A 2x2 mesh: every mix of Shard and Replicate on its two dimensions, in one call; one
    all-reduce per mesh dimension. Then pipeline stages over it: DTensors on each stage's
    mesh plus process_group across the stages."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    placements = [[Shard(0), Shard(1)], [Shard(0), Replicate()], [Replicate(), Shard(0)],
                  [Replicate(), Replicate()]]
    full = full_tensors(3, SHAPES)
    grads = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    for norm_type in NORM_TYPES:
        with Watch(allow_host_reads=True) as watch:
            norm = gradclip.get_total_norm(grads, norm_type, backend=backend)
        assert watch.all_reduces == 2, watch.all_reduces
        assert_close(norm.full_tensor().item(), oracle_norm(full, norm_type),
                     norm_rtol(norm_type), f"2-D mesh p={norm_type}")

    # Pipeline: stage s = mesh["pp"] coordinate holds layers of its own, sharded over "dp".
    stage = mesh.get_coordinate()[0]
    stage_layers = [full_tensors(10 + s, [(5, 4), (3,)]) for s in range(2)]
    local = [distribute_tensor(t, mesh["dp"], [Shard(0)]) for t in stage_layers[stage]]
    params = as_params(local)
    pp_group = mesh.get_group("pp")
    everything = stage_layers[0] + stage_layers[1]
    max_norm = 0.3 * oracle_norm(everything, 2.0)
    with Watch(allow_host_reads=True) as watch:
        returned = gradclip.clip_grad_norm_(params, max_norm, process_group=pp_group,
                                            backend=backend)
    assert watch.all_reduces == 2, watch.all_reduces
    assert_close(returned.full_tensor().item(), oracle_norm(everything, 2.0), 1e-5, "pipeline")
    coef = max_norm / (oracle_norm(everything, 2.0) + 1e-6)
    for p, t in zip(params, stage_layers[stage]):
        torch.testing.assert_close(p.grad.full_tensor(), t * coef)
    hsdp_loss(rank, mesh, backend)
    expect_error(ValueError, "also a mesh dimension", lambda: gradclip.get_total_norm(
        local, process_group=mesh.get_group("dp"), backend=backend))


def hsdp_loss(rank: int, mesh, backend: str) -> None:
    """HSDP (replicate over "pp", shard over "dp"): the norm's all-reduce never crosses the
    replicas, whose losses differ; the loss then gets one all-reduce of its own, and every
    rank sees the mean of the four."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    params = as_params([distribute_tensor(t, mesh, [Replicate(), Shard(0)])
                        for t in full_tensors(4, [(6, 2)])])
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), backend=backend,
                                    spike_guard=gradclip.SpikeGuard(window=4, watch="loss"))
    with Watch(allow_host_reads=True) as watch:
        opt.step(loss=torch.tensor(float(rank + 1)))
    assert watch.all_reduces == 2, watch.all_reduces
    windows = opt.spike_guard._windows
    assert windows.values[0, 0].item() == 2.5, windows.values  # (1 + 2 + 3 + 4) / 4


def two_meshes(rank: int, world: int, backend: str) -> None:
    """DTensors on two meshes in one call (torch's stack refuses them): each mesh reduced
    once, combined on the device; plus plain tensors over process_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dense_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    expert_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("x", "ep"))
    dense, experts = full_tensors(20, SHAPES[:2]), full_tensors(21, [(4, 6), (8, 2)])
    grads = ([distribute_tensor(t, dense_mesh, [Shard(0)]) for t in dense]
             + [distribute_tensor(t, expert_mesh, [Shard(1), Shard(0)]) for t in experts])
    for norm_type in NORM_TYPES:
        norm = gradclip.get_total_norm(grads, norm_type, backend=backend)
        assert_close(norm.full_tensor().item(), oracle_norm(dense + experts, norm_type),
                     norm_rtol(norm_type), f"two meshes p={norm_type}")
    params = as_params(grads)
    returned = gradclip.clip_grad_norm_(params, 1.0, backend=backend)
    total = oracle_norm(dense + experts, 2.0)
    assert_close(returned.full_tensor().item(), total, 1e-5, "two meshes clip")
    for p, t in zip(params, dense + experts):
        torch.testing.assert_close(p.grad.full_tensor(), t / (total + 1e-6))


def process_groups(rank: int, world: int, backend: str) -> None:
    """process_group= over plain shards (ZeRO-style and pipeline stages), the expert golden
    case, Megatron-style TP with replicated layer norms, and a rank without tensors."""
    group = dist.group.WORLD
    full = full_tensors(30, SHAPES + [(5, 5), (3,)])
    mine = full[rank::world]  # disjoint shards
    for norm_type in NORM_TYPES:
        with Watch(allow_host_reads=True) as watch:
            norm = gradclip.get_total_norm(mine, norm_type, process_group=group, backend=backend)
        assert watch.all_reduces == 1
        assert_close(norm.item(), oracle_norm(full, norm_type), norm_rtol(norm_type),
                     f"plain shards p={norm_type}")
    params = as_params(mine)
    max_norm = 0.5 * oracle_norm(full, 2.0)
    norm = gradclip.clip_grad_norm_(params, max_norm, process_group=group, backend=backend)
    assert_close(norm.item(), oracle_norm(full, 2.0), 1e-5, "plain shards clip")
    for p, t in zip(params, mine):
        torch.testing.assert_close(p.grad, t * (max_norm / (oracle_norm(full, 2.0) + 1e-6)))

    # torch.compile traces the reduction: the all-reduce is in the graph (finding the
    # groups is host bookkeeping and runs eagerly, before it).
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    compiled = torch.compile(lambda ts: gradclip.get_total_norm(ts, 3.5, process_group=group,
                                                                backend="reference"),
                             backend=record)
    assert_close(compiled(mine).item(), oracle_norm(full, 3.5), norm_rtol(3.5), "compiled")
    assert any("all_reduce" in graph for graph in graphs), graphs

    # fullgraph=True cannot take that eager step: gradclip's error says why and what works
    # (not Dynamo's "call to a callable object with no traceable __call__").
    if backend == "reference":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        params = as_params([distribute_tensor(t, mesh, [Shard(0)]) for t in full[:3]])
        for clip in (lambda ps: gradclip.clip_grad_norm_(ps, 1.0),
                     lambda ps: gradclip.get_total_norm([p.grad for p in ps],
                                                        process_group=group)):
            one_graph = torch.compile(clip, fullgraph=True, backend="eager")
            expect_error(RuntimeError, "gradclip: a sharded clip plans on the host",
                         lambda: one_graph(params), also="Compile without fullgraph=True")
        opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), max_norm=1.0)
        expect_error(RuntimeError, "gradclip: a sharded clip plans on the host",
                     torch.compile(opt.step, fullgraph=True, backend="eager"))
        dist.barrier()

    # A rank with nothing to measure still joins, and the others get the right answer.
    local = mine if rank == 0 else []
    norm = gradclip.get_total_norm(local, process_group=group, backend=backend)
    assert_close(norm.item(), oracle_norm(full[0::world], 2.0), 1e-5, "rank without tensors")

    # Experts: squared norm 20 on rank 0 and 100 on rank 1, plus dense grads replicated on
    # both (counted once): sqrt(120 + dense), never an average (DeepSpeed#8475).
    expert = torch.full((5,), 2.0) if rank == 0 else torch.full((4,), 5.0)  # 20 and 100
    dense = full_tensors(31, [(3, 3), (4,)])
    dense_params, expert_params = as_params(dense), as_params([expert])
    expected = math.sqrt(120.0 + oracle_norm(dense, 2.0) ** 2)
    pairs = [(dense_params, None), (expert_params, group)]
    norm = gradclip.clip_grad_norm_(dense_params + expert_params, math.inf, process_group=pairs,
                                    backend=backend)
    assert_close(norm.item(), expected, 1e-6, "expert golden")
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(dense_params + expert_params, lr=0.0),
                                    max_norm=1.0, process_group=pairs, backend=backend)
    opt.step()
    assert_close(opt.last_norm.item(), expected, 1e-6, "expert golden, ClippedOptimizer")
    coef = 1.0 / (expected + 1e-6)
    for p, t in zip(dense_params + expert_params, dense + [expert]):
        torch.testing.assert_close(p.grad, t * coef)

    # Megatron-style TP: column-sharded weights (disjoint over TP), a layer norm replicated
    # on every TP rank. Either list it in a pair with no group, or count it on TP rank 0.
    weight = full_tensors(32, [(4, 6)])[0]
    layer_norm = full_tensors(33, [(6,)])[0]
    shard = weight.chunk(world, dim=1)[rank]
    expected = oracle_norm([weight, layer_norm], 2.0)
    w, ln = as_params([shard]), as_params([layer_norm])
    by_pairs = gradclip.get_total_norm([w[0].grad, ln[0].grad], backend=backend,
                                       process_group=[([w[0].grad], group), ([ln[0].grad], None)])
    # [(sharded, tp)] + [(replicated, None)] counts the layer norm on every rank's side
    # once, then adds the TP sum: right, since the replicated part is not summed.
    assert_close(by_pairs.item(), math.sqrt(oracle_norm([weight], 2.0) ** 2
                                            + oracle_norm([layer_norm], 2.0) ** 2), 1e-6, "TP pairs")
    counted_once = [w[0].grad] + ([ln[0].grad] if rank == 0 else [])
    norm = gradclip.get_total_norm(counted_once, process_group=group, backend=backend)
    assert_close(norm.item(), expected, 1e-6, "TP, layer norm on rank 0 only")
    expect_error(ValueError, "in no (tensors, group) pair", lambda: gradclip.get_total_norm(
        [w[0].grad, ln[0].grad], process_group=[([w[0].grad], group)], backend=backend))


def nonfinite(rank: int, world: int, backend: str) -> None:
    """An inf on one rank: the norm is inf everywhere; error_if_nonfinite raises on every
    rank with no rank left in a collective; under gradclip.GradScaler every rank skips the
    step and backs off the same scale."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = full_tensors(40, SHAPES)
    for bad in (math.inf, math.nan):
        grads = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full]
        if rank == 1:
            grads[0].to_local()[0, 0] = bad
        for norm_type in NORM_TYPES:
            norm = gradclip.get_total_norm(grads, norm_type, backend=backend).full_tensor().item()
            assert (math.isnan(norm) if math.isnan(bad) else norm == math.inf), (bad, norm_type, norm)
        params = as_params(grads)
        expect_error(RuntimeError, "non-finite", lambda: gradclip.clip_grad_norm_(
            params, 1.0, error_if_nonfinite=True, backend=backend))
        torch.testing.assert_close(params[1].grad.full_tensor(), full[1])  # untouched
        dist.barrier()  # every rank got here: none is waiting in a collective

    # AMP: scaled grads, an inf on rank 1 only.
    scaler = gradclip.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))  # creates the scale
    weights = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full]
    params = [torch.nn.Parameter(w) for w in weights]
    for p, t in zip(params, full):
        p.grad = distribute_tensor(t * 256.0, mesh, [Shard(0)])
    if rank == 1:
        params[0].grad.to_local()[0, 0] = math.inf
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=1.0), max_norm=1.0, backend=backend)
    before = [p.detach().full_tensor().clone() for p in params]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 128.0, scaler.get_scale()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach().full_tensor(), b)
    assert opt.stats()["nonfinite_steps"] == 1
    # A finite step after it moves every rank the same way.
    for p, t in zip(params, full):
        p.grad = distribute_tensor(t * 128.0, mesh, [Shard(0)])
    scaler.step(opt)
    scaler.update()
    total = oracle_norm(full, 2.0)
    for p, b, t in zip(params, before, full):
        torch.testing.assert_close(p.detach().full_tensor(), b - t / (total + 1e-6))

    # torch.amp.GradScaler with a non-fused inner optimizer: torch unscales, and for
    # DTensor grads its inf check is reduced over the mesh, so every rank skips.
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    torch_scaler.scale(torch.ones(()))
    for p, t in zip(params, full):
        p.grad = distribute_tensor(t * 256.0, mesh, [Shard(0)])
    if rank == 1:
        params[2].grad.to_local()[0, 0] = math.inf
    kept = [p.detach().full_tensor().clone() for p in params]
    torch_scaler.step(opt)
    torch_scaler.update()
    assert torch_scaler.get_scale() == 128.0, torch_scaler.get_scale()
    for p, k in zip(params, kept):
        torch.testing.assert_close(p.detach().full_tensor(), k)

    # Plain shards over process_group, a manual unscale_ first: torch's unscale_ finds the
    # NaN on rank 1 only (for DTensors it reduces the flag itself); every rank still skips
    # and backs off alike.
    shards = [torch.nn.Parameter(t.clone()) for t in full[rank::world]]
    for p in shards:
        p.grad = p.detach() * 128.0
    if rank == 1:
        shards[0].grad[0, 0] = math.nan
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(shards, lr=1.0), max_norm=1.0,
                                    process_group=dist.group.WORLD, backend=backend)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 64.0, scaler.get_scale()
    for p, t in zip(shards, full[rank::world]):
        torch.testing.assert_close(p.detach(), t)
    assert opt.stats()["nonfinite_steps"] == 1


def bad_inputs(rank: int, world: int, backend: str) -> None:
    """Partial placements, a mesh or process group without this rank, a rank whose
    parameters have no gradient: a clear error or the right answer, never a hang."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    partial = DTensor.from_local(torch.ones(3), mesh, [Partial()], run_check=False)
    expect_error(ValueError, "Partial", lambda: gradclip.get_total_norm([partial], backend=backend))

    only_rank0 = dist.new_group([0])
    if rank != 0:
        expect_error(ValueError, "does not contain this rank", lambda: gradclip.get_total_norm(
            [torch.ones(3)], process_group=only_rank0, backend=backend))
    small_mesh = DeviceMesh("cpu", [0])
    if rank != 0:
        outside = DTensor.from_local(torch.ones(3), small_mesh, [Shard(0)], run_check=False)
        expect_error(ValueError, "does not contain this rank", lambda: gradclip.get_total_norm(
            [outside], backend=backend))
    dist.barrier()

    # Rank 1's parameters have no gradient this step: it still joins the reduction.
    full = full_tensors(50, SHAPES)
    params = as_params([distribute_tensor(t, mesh, [Shard(0)]) for t in full])
    if rank == 1:
        for p in params:
            p.grad = None
    local_sq = sum(p.grad.to_local().double().square().sum().item() for p in params
                   if p.grad is not None)
    sq = torch.tensor([float(local_sq)], dtype=torch.float64)
    dist.all_reduce(sq)
    norm = gradclip.clip_grad_norm_(params, math.inf, backend=backend)
    assert_close(full_of(norm).item(), math.sqrt(sq.item()), 1e-5, "a rank without grads")
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=1.0, backend=backend)
    opt.step()
    assert_close(opt.last_norm.item(), math.sqrt(sq.item()), 1e-5, "optimizer, a rank without grads")
    # The same under AMP, where the step of a rank without grads used to return early and
    # leave the other rank in the all-reduce; and with an inf on rank 0, both skip alike.
    for fused, inf in ((False, False), (True, False), (False, True)):
        # torch has no DTensor rule for fused SGD; fused AdamW is what FSDP2 users run.
        inner = torch.optim.AdamW(params, lr=0.0, fused=True) if fused else torch.optim.SGD(params, lr=0.0)
        opt = gradclip.ClippedOptimizer(inner, max_norm=1.0, backend=backend)
        scaler = gradclip.GradScaler("cpu", init_scale=4.0)
        scaler.scale(torch.zeros(()))  # as a loss would: the scale exists from here
        scaled = [distribute_tensor(t * 4.0, mesh, [Shard(0)]) for t in full]  # a collective
        if rank == 0:
            for p, g in zip(params, scaled):
                p.grad = g
            if inf:
                params[0].grad.to_local().view(-1)[0] = math.inf
        scaler.step(opt)
        scaler.update()
        expected = math.inf if inf else math.sqrt(sq.item())
        if not inf:
            assert_close(opt.last_norm.item(), expected, 1e-5, f"AMP (fused={fused}), a rank without grads")
        assert scaler.get_scale() == (2.0 if inf else 4.0), "every rank backs off alike"


def fsdp2_training(rank: int, world: int, backend: str) -> None:
    """An FSDP2 model trained N steps with ClippedOptimizer and with torch's clip_grad_norm_
    loop: the same weights and norms, step by step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    ours, reference = build(), build()
    opt = gradclip.ClippedOptimizer(torch.optim.AdamW(ours.parameters(), lr=1e-2), max_norm=0.05,
                                    backend=backend)
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(100 + rank)
    for step in range(4):
        x, y = torch.randn(6, 8, generator=generator), torch.randn(6, 4, generator=generator)
        for model in (ours, reference):
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch_opt.step()
        torch_opt.zero_grad()
        assert_close(opt.last_norm.item(), norm.full_tensor().item(), 1e-5, f"step {step}")
        for a, b in zip(ours.parameters(), reference.parameters()):
            torch.testing.assert_close(a.full_tensor(), b.full_tensor(), rtol=1e-5, atol=1e-6)
    assert opt.stats()["clipped_steps"] == 4

    # A rule sees the global norm (the same on every rank): every rank keeps the same state.
    rule_opt = gradclip.ClippedOptimizer(torch.optim.SGD(ours.parameters(), lr=0.0),
                                         max_norm=gradclip.ZClip(warmup_steps=2), backend=backend)
    for _ in range(3):
        torch.nn.functional.mse_loss(ours(x), y).backward()
        rule_opt.step()
        rule_opt.zero_grad()
    norms = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(norms, rule_opt.last_norm.double().reshape(1))
    assert all(n.item() == norms[0].item() for n in norms), norms
    guarded_losses(rank, world, backend, ours, mesh)


# The losses of a guarded run on each rank: rank 1's spike at step 14 alone lifts the mean
# above 3x; rank 0's at 17 is a spike of its own loss but not of the mean.
LOSS_STEPS = 22


def rank_losses(rank: int) -> list[float]:
    losses = [2.0 + 0.02 * ((step * (rank + 3)) % 5) for step in range(LOSS_STEPS)]
    if rank == 1:
        losses[14] *= 12.0
    if rank == 0:
        losses[17] *= 2.5
    return losses


def guarded_losses(rank: int, world: int, backend: str, model, mesh) -> None:
    """A spike guard watching the loss over ranks whose losses disagree decides alike on
    every rank, on the mean of the ranks' losses, which rides in the norm's own all-reduce
    (FSDP2, and plain shards over a process_group); a rank without a loss is left out."""
    from recipes import GuardPort

    mean = [sum(rank_losses(r)[step] for r in range(world)) / world for step in range(LOSS_STEPS)]
    port = GuardPort(window=8, warmup=4, watch="loss")
    expected = [step for step, loss in enumerate(mean) if port.judge(1.0, loss)["skip"]]
    assert expected == [14], expected
    plain = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    for params, group in ((list(model.parameters()), None), (plain, dist.group.WORLD)):
        opt = gradclip.ClippedOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=1.0,
                                        backend=backend, process_group=group,
                                        spike_guard=gradclip.SpikeGuard(window=8, warmup=4,
                                                                        watch="loss"))
        skipped = []
        for step, loss in enumerate(rank_losses(rank)):
            for p in params:
                p.grad = torch.ones_like(p)
            before = int(opt.counters[3])
            with Watch(allow_host_reads=True) as watch:
                opt.step(loss=torch.tensor(loss))
            assert watch.all_reduces == 1, "the loss rides in the norm's all-reduce"
            if int(opt.counters[3]) > before:
                skipped.append(step)
        assert skipped == expected, (rank, skipped)
    # A rank without a loss (a pipeline stage before the last) counts for nothing.
    opt = gradclip.ClippedOptimizer(torch.optim.SGD(plain, lr=0.0), process_group=dist.group.WORLD,
                                    backend=backend,
                                    spike_guard=gradclip.SpikeGuard(window=8, watch="loss"))
    for p in plain:
        p.grad = torch.ones_like(p)
    opt.step(loss=torch.tensor(6.0) if rank == 0 else None)
    windows, _ = opt.spike_guard._windows, None
    assert windows.values[0, 0].item() == 6.0 and windows.count.item() == 1


ROOT = Path(__file__).resolve().parent.parent


def distributed_examples() -> list[str]:
    """The ```py blocks of docs/distributed.md and README.md: examples that need several
    ranks (the ```python blocks run in one process, in test_docs.py)."""
    blocks = []
    for doc in (ROOT / "docs" / "distributed.md", ROOT / "README.md"):
        blocks += re.findall(r"```py\n(.*?)```", doc.read_text(), flags=re.S)
    return blocks


def documented_examples(rank: int, world: int, backend: str) -> None:
    """Every multi-rank example of the docs runs, as users copy it."""
    examples = distributed_examples()
    assert len(examples) >= 3, "docs/distributed.md: FSDP2, pipeline, Megatron"
    for code in examples:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
        dist.barrier()


SCENARIOS = {f.__name__: f for f in (dtensor_layouts, mesh_2d, two_meshes, process_groups,
                                     nonfinite, bad_inputs, fsdp2_training, documented_examples)}


# -- the harness itself ------------------------------------------------------------------------


def _one_rank_raises(rank: int, world: int, backend: str) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 raises on purpose")
    dist.barrier()  # waits for rank 1, which never comes


def _aborts_after_its_work(rank: int, world: int, backend: str) -> None:
    """Rank 0 aborts (SIGABRT) once its done marker is written, as FSDP2 on gloo sometimes
    does at exit."""
    if rank == 0:
        marker = _FOLDER / "done-0"

        def abort_when_done():
            while not marker.exists():
                time.sleep(0.01)
            os.abort()

        threading.Thread(target=abort_when_done, daemon=True).start()


def _aborts_during_its_work(rank: int, world: int, backend: str) -> None:
    if rank == 0:
        os.abort()
    dist.barrier()


def test_harness_fails_at_once_on_a_rank_that_raises():
    # Rank 0 then fails too (its peer is gone): rank 1's error comes first.
    with pytest.raises(pytest.fail.Exception,
                       match=r"(?s)on 2 ranks: rank 1 failed during its work:\n.*"
                             r"RuntimeError: rank 1 raises on purpose"):
        run_ranks(_one_rank_raises, ["reference"])


def test_harness_tells_an_abort_at_exit_from_an_abort_during_the_work():
    run_ranks(_aborts_after_its_work, ["reference"])  # passes: the work was done
    with pytest.raises(pytest.fail.Exception, match="rank 0 failed during its work"):
        run_ranks(_aborts_during_its_work, ["reference"])


# -- the tests (each scenario over the reference backend and the Triton kernels) -------------


def test_dtensor_shard_replicate_and_mixed_match_the_full_gradient_norm():
    run_ranks("dtensor_layouts")


def test_2d_mesh_and_pipeline_stages_reduce_once_per_group():
    run_ranks("mesh_2d", world=4)


def test_two_meshes_in_one_call():
    run_ranks("two_meshes")


def test_process_group_pairs_experts_and_tensor_parallel():
    run_ranks("process_groups")


def test_nonfinite_on_one_rank_is_seen_by_every_rank():
    run_ranks("nonfinite")


def test_bad_inputs_raise_or_answer_never_hang():
    run_ranks("bad_inputs", ["reference"])


def test_fsdp2_clipped_optimizer_trains_as_torch_clip_grad_norm():
    run_ranks("fsdp2_training")


def test_documented_multi_rank_examples_run():
    run_ranks("documented_examples", ["reference"])


# -- on a GPU (not run without one) ---------------------------------------------------------


@gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_nccl_mesh_of_one_gpu_clips_and_captures_in_a_cuda_graph(backend, tmp_path):
    """Each GPU backend on DTensor local shards over a 1-process NCCL mesh, eager and
    replayed from a CUDA graph that captured the clip with its all-reduce."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        full = [t.cuda() for t in full_tensors(60, SHAPES)]
        grads = [distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in full]
        for norm_type in NORM_TYPES:
            norm = gradclip.get_total_norm(grads, norm_type, backend=backend)
            assert_close(norm.full_tensor().item(), oracle_norm(full, norm_type),
                         norm_rtol(norm_type), f"{backend} p={norm_type}")
        params = as_params(grads)
        total = oracle_norm(full, 2.0)
        max_norm = 0.5 * total
        gradclip.clip_grad_norm_(params, max_norm, backend=backend)  # warm-up (tables, plans)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gradclip.clip_grad_norm_(params, max_norm, backend=backend)
        for p, t in zip(params, full):
            p.grad.to_local().copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        for p, t in zip(params, full):
            torch.testing.assert_close(p.grad.full_tensor(), t * (max_norm / (total + 1e-6)))
    finally:
        dist.destroy_process_group()
