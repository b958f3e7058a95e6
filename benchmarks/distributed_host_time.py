"""Host time of clipping many DTensor gradients: gradclip against torch, side by side.

2 gloo ranks on the CPU (spawned here), 2000 gradients of 64x16 sharded ``Shard(0)`` on a
1-D mesh (FSDP2's layout), ``clip_grad_norm_`` of each library timed call by call in
turn (each after a barrier, so both ranks start together), median of ``--calls`` calls after
``--warmup``. Two cases: nothing to clip (max_norm above the norm) and clipping.
On the CPU the whole call is host time: the Python work per tensor, the norm, the
collective and the rescale.

    python benchmarks/distributed_host_time.py [--tensors 2000] [--calls 30] [--backend reference]

Prints one line per case with both medians (ms per call), gradclip / torch, and what the
same backend takes to clip the local shards alone as plain tensors in one process (its
floor here: the distributed layer's own cost is the difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def _time_in_turn(fns, calls: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called in turn (so that load from elsewhere
    on the machine falls on both alike), each after a barrier."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples = [[] for _ in fns]
    for _ in range(calls):
        for fn, times in zip(fns, samples):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return samples


def _rank(rank: int, world: int, store: str, args, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        import gradclip
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (world,))
        generator = torch.Generator().manual_seed(0)
        params = []
        for _ in range(args.tensors):
            full = torch.randn(64, 16, generator=generator)
            param = torch.nn.Parameter(distribute_tensor(torch.zeros(64, 16), mesh, [Shard(0)]))
            param.grad = distribute_tensor(full, mesh, [Shard(0)])
            params.append(param)
        # The local shards as plain parameters: what a single-process clip of the same
        # tensors costs (the floor of the backend here, without the distributed layer).
        local_params = []
        for param in params:
            local = torch.nn.Parameter(torch.zeros_like(param.grad.to_local()))
            local.grad = param.grad.to_local()
            local_params.append(local)
        norm = gradclip.get_total_norm([p.grad for p in params]).full_tensor().item()
        lines = []
        for case, max_norm in (("no clip needed", norm * 10), ("clipping", norm * 0.999)):
            # Clipping at 0.999 of the norm keeps the gradients (and so every call's work)
            # about the same for the length of the run.
            torch_ms, ours_ms, local_ms = _time_in_turn(
                [lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
                 lambda: gradclip.clip_grad_norm_(params, max_norm, backend=args.backend),
                 lambda: gradclip.clip_grad_norm_(local_params, max_norm, backend=args.backend)],
                args.calls, args.warmup)
            torch_median, ours_median, local_median = (statistics.median(samples) * 1e3 for samples
                                                       in (torch_ms, ours_ms, local_ms))
            lines.append(f"{case:15s}  torch {torch_median:7.2f} ms   gradclip[{args.backend}] "
                         f"{ours_median:7.2f} ms   gradclip/torch {ours_median / torch_median:.3f}   "
                         f"(same backend on the local shards alone, no reduction: "
                         f"{local_median:.2f} ms)")
        if rank == 0:
            results.put(lines)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="reference", choices=("reference", "triton", "auto"))
    args = parser.parse_args(argv)
    if args.backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.start_processes(
            _rank, args=(2, os.path.join(folder, "store"), args, results), nprocs=2,
            start_method="spawn")
    print(f"torch {torch.__version__}, 2 gloo ranks on the CPU, {args.tensors} DTensor grads of "
          f"64x16 Shard(0), median of {args.calls} calls")
    for line in results.get():
        print(line)


if __name__ == "__main__":
    main()
