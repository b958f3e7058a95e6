"""Quick AMP timing: torch's unscale_ + clip_grad_norm_ against ClippedOptimizer, on one GPU.

    python benchmarks/amp_quick.py [--workload llama-1b] [--backend auto] [--repeats 20]

Float32 gradients of a llama-1B-like model (147 tensors, 953M parameters), already scaled by
the GradScaler's scale, as after ``scaler.scale(loss).backward()``. Each row is timed from a
synchronised start with CUDA events, with the gradients restored (untimed) before each run,
and reported as the median over the repeats. Rows:

- floors: one read of the gradient bytes (``vector_norm`` of a flat buffer of that size) and
  one read/write (``mul_``); the three-pass floor is their sum.
- unscale + clip (no optimizer work: the inner optimizer's step does nothing):
  torch (``unscale_``, ``clip_grad_norm_``, ``step``, ``update``) against
  ``ClippedOptimizer`` with ``torch.amp.GradScaler`` and with ``gradclip.GradScaler``.
- with ``AdamW(fused=True)``: its step alone; its step with ``grad_scale``/``found_inf`` set
  (what AMP hands it, which also makes it store the unscaled gradients back); torch's AMP
  loop with clipping; and the wrapper with either scaler.

Runs in well under 3 minutes on an H100 (about 25 GB of device memory for llama-1b).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

import gradclip
from gradclip.backends import resolve

SCALE = 2.0 ** 16
MAX_NORM = 1.0


def llama_1b_like_shapes() -> list[tuple[int, ...]]:
    """Used when gradclip.bench.workloads is not there: the same llama-1B-like shapes."""
    hidden, mlp, vocab = 2048, 5632, 32000
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(16):
        shapes += [(hidden, hidden)] * 4 + [(mlp, hidden), (mlp, hidden), (hidden, mlp)]
        shapes += [(hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def workload_shapes(key: str) -> list[tuple[int, ...]]:
    try:
        from gradclip.bench.workloads import get_workload
    except ImportError:
        if key != "llama-1b":
            raise SystemExit(f"workload {key!r} needs gradclip.bench.workloads") from None
        return llama_1b_like_shapes()
    return list(get_workload(key).shapes)


class NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: isolates the unscale and clip work."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def flat_views(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    views, offset = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[offset:offset + n].view(shape))
        offset += n
    return views


def time_us(run: Callable[[], object], restore: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    """Median microseconds of ``run`` from a synchronised start, ``restore`` untimed before each
    (CUDA events on a GPU; the host clock with ``--device cpu``, a smoke test only)."""
    samples = []
    for i in range(warmup + repeats):
        restore()
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) * 1000.0
        else:
            begin = time.perf_counter()
            run()
            elapsed = (time.perf_counter() - begin) * 1e6
        if i >= warmup:
            samples.append(elapsed)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="llama-1b")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a smoke test of the script itself (use a small --workload)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("amp_quick.py needs a CUDA device (or --device cpu for a smoke test)", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    shapes = workload_shapes(args.workload)
    numel = sum(math.prod(s) for s in shapes)
    backend_name = resolve(args.backend, device).name
    print(f"{device_name}, torch {torch.__version__}, gradclip backend "
          f"{backend_name!r}; {args.workload}: {len(shapes)} tensors, {numel / 1e6:.0f}M params, fp32 grads")

    gen = torch.Generator(device).manual_seed(0)
    param_flat = torch.randn(numel, device=device, generator=gen) * 0.02
    grad_flat = torch.empty(numel, device=device)
    # Scaled gradients whose unscaled norm is about 0.5: the common, no-clip step.
    saved = torch.randn(numel, device=device, generator=gen) * (0.5 / math.sqrt(numel) * SCALE)
    params = [torch.nn.Parameter(v) for v in flat_views(param_flat, shapes)]
    for p, g in zip(params, flat_views(grad_flat, shapes)):
        p.grad = g

    def restore() -> None:
        grad_flat.copy_(saved)

    results: dict[str, float] = {}

    def row(name: str, run: Callable[[], object]) -> None:
        results[name] = time_us(run, restore, args.repeats)

    row("floor: one read", lambda: torch.linalg.vector_norm(saved))
    scratch = torch.empty_like(saved)
    row("floor: one read/write", lambda: scratch.mul_(1.0))
    del scratch
    results["floor: three passes"] = results["floor: one read"] + results["floor: one read/write"]

    # -- unscale + clip, no optimizer work ----------------------------------------------
    def scaler(kind=torch.amp.GradScaler):
        s = kind(device.type, init_scale=SCALE, growth_interval=10 ** 9)
        s.scale(torch.ones((), device=device))
        return s

    noop, torch_scaler = NoStep(params), scaler()

    def torch_unscale_clip():
        torch_scaler.unscale_(noop)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        torch_scaler.step(noop)
        torch_scaler.update()

    row("unscale+clip: torch unscale_+clip_grad_norm_+step+update", torch_unscale_clip)
    wrapped, plain = gradclip.ClippedOptimizer(NoStep(params), MAX_NORM, backend=args.backend), scaler()

    def ours_plain_scaler():
        plain.step(wrapped)
        plain.update()

    row("unscale+clip: ClippedOptimizer + torch.amp.GradScaler", ours_plain_scaler)
    ours_scaler = scaler(gradclip.GradScaler)

    def ours_gradclip_scaler():
        ours_scaler.step(wrapped)
        ours_scaler.update()

    row("unscale+clip: ClippedOptimizer + gradclip.GradScaler", ours_gradclip_scaler)
    restore()
    expected = torch.nn.utils.get_total_norm([p.grad for p in params]).item() / SCALE
    ours_gradclip_scaler()
    got = wrapped.last_norm.item()
    print(f"check: unscaled norm {got:.6f}, torch {expected:.6f}")
    del noop, wrapped

    # -- with AdamW(fused=True) ---------------------------------------------------------
    adamw = torch.optim.AdamW(params, lr=1e-4, fused=True)
    restore()
    adamw.step()  # creates the state outside the timings
    row("AdamW(fused): step alone", adamw.step)
    ones, zero = torch.ones((), device=device), torch.zeros((), device=device)

    def step_with_grad_scale():
        adamw.grad_scale, adamw.found_inf = ones, zero
        adamw.step()
        del adamw.grad_scale, adamw.found_inf

    row("AdamW(fused): step with grad_scale/found_inf", step_with_grad_scale)
    torch_scaler = scaler()

    def torch_amp_step():
        torch_scaler.step(adamw)
        torch_scaler.update()

    row("AdamW(fused): torch scaler.step+update, no clip", torch_amp_step)

    def torch_amp_clip_step():
        torch_scaler.unscale_(adamw)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        torch_scaler.step(adamw)
        torch_scaler.update()

    row("AdamW(fused): torch unscale_+clip_grad_norm_+step+update", torch_amp_clip_step)
    wrapped, plain = gradclip.ClippedOptimizer(adamw, MAX_NORM, backend=args.backend), scaler()

    def ours_fused_plain():
        plain.step(wrapped)
        plain.update()

    row("AdamW(fused): ClippedOptimizer + torch.amp.GradScaler", ours_fused_plain)
    ours_scaler = scaler(gradclip.GradScaler)

    def ours_fused():
        ours_scaler.step(wrapped)
        ours_scaler.update()

    row("AdamW(fused): ClippedOptimizer + gradclip.GradScaler", ours_fused)

    read = results["floor: one read"]
    width = max(len(k) for k in results)
    print(f"\n{'path':{width}s}  {'median us':>10s}  {'x 1 read':>8s}")
    for name, us in results.items():
        print(f"{name:{width}s}  {us:10.0f}  {us / read:8.2f}")
    floor3 = results["floor: three passes"]
    torch_clip = results["unscale+clip: torch unscale_+clip_grad_norm_+step+update"]
    ours_clip = results["unscale+clip: ClippedOptimizer + gradclip.GradScaler"]
    step_alone = results["AdamW(fused): step alone"]
    step_scaled = results["AdamW(fused): step with grad_scale/found_inf"]
    ours_fused_us = results["AdamW(fused): ClippedOptimizer + gradclip.GradScaler"]
    print(f"\nunscale+clip with gradclip.GradScaler: {ours_clip / floor3:.2f}x the three-pass floor "
          f"(target <= 1.10); torch: {torch_clip / floor3:.2f}x")
    print(f"AdamW(fused) + wrapper + gradclip.GradScaler: +{(ours_fused_us - step_alone) / read:.2f} reads "
          f"over the step alone (target <= 1.15), +{(ours_fused_us - step_scaled) / read:.2f} over the "
          f"step with grad_scale set; grad_scale itself costs +{(step_scaled - step_alone) / read:.2f} "
          "reads (the fused step then stores the unscaled gradients back)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "torch": torch.__version__,
                       "backend": backend_name, "workload": args.workload, "results_us": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
