"""Where an eager clip spends host time: per entry point and list length, plus the CUDA
runtime calls the profiler sees (their host duration). Needs a GPU.

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import gradclip
from gradclip.backends import clip_grads_, resolve


def host_us(fn, calls: int = 300) -> float:
    """Host microseconds per call, queueing ``calls`` calls back to back (GPU work is tiny)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def main() -> None:
    backend = resolve("cuda", torch.device("cuda"))
    ext = backend._module()
    one = torch.ones(1, device="cuda")
    print(f"{'tensors':>8} {'entry point':34s} {'host us/call':>12}")
    for count in (1, 147, 2000):
        params = [torch.nn.Parameter(torch.randn(64, device="cuda")) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-4
        grads = [p.grad for p in params]
        rows = {
            "ext.norm_stats(grads)": lambda: ext.norm_stats(grads, 2.0, 1.0, None),
            "ext.scale_(grads, 1)": lambda: ext.scale_(grads, one, None),
            "ext.clip_grads(grads)": lambda: ext.clip_grads(grads, 2.0, 1.0, None),
            "ext.clip_parameters(params)": lambda: ext.clip_parameters(params, 2.0, 1.0, None),
            "gradclip.clip_grad_norm_(params)": lambda: gradclip.clip_grad_norm_(params, 1.0),
            "gradclip.get_total_norm(grads)": lambda: gradclip.get_total_norm(grads),
            "backends.clip_grads_(grads, inv)": lambda: clip_grads_(grads, 2.0, 1.0, one),
            "torch.ops.gradclip.norm_stats": lambda: torch.ops.gradclip.norm_stats(grads, 2.0, 1.0, None),
            "baseline: one.add_(1)": lambda: one.add_(1),
        }
        for name, fn in rows.items():
            print(f"{count:8d} {name:34s} {host_us(fn):12.1f}", flush=True)
        if count == 2000:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    ext.clip_parameters(params, 2.0, 1.0, None)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
