"""Quick check of the cuda backend's kernels on one GPU: correctness, then time against torch.

    python benchmarks/cuda_quick.py [--repeats 20] [--workloads llama-1b gpt2 ...] [--json OUT]
    python benchmarks/cuda_quick.py --sanitize    # small correctness run for compute-sanitizer

Sections, in order:

1. correctness against a float64 oracle on random data: mixed dtypes, empty/odd/one-chunk
   sizes, misaligned views, non-finite values, AMP skip, more tensors than one launch holds,
   CUDA graph replay, bitwise determinism. ``--sanitize`` runs only this, on small sizes.
2. ceilings: read (``vector_norm``) and read/write (``mul_``) bandwidth on a flat 4 GiB fp32
   buffer, the floors of docs/performance.md.
3. per workload of docs/performance.md (shapes from ``gradclip.bench.workloads``): ``norm`` (the
   norm alone), ``no-clip`` (gradients of norm 0.5, max_norm 1), ``clip`` (norm 4), ``amp``
   (fp32 only: gradients scaled by 2**16, unscale+clip; torch runs
   ``_amp_foreach_non_finite_check_and_unscale_`` then ``clip_grad_norm_``), each as CUDA
   graph replay (device time) and eager calls (host overhead included), gradients evicted
   from L2 before each sample. Ours: ``gradclip.clip_grad_norm_(params, backend="cuda")``
   (eager: the C++ fast path over the parameters); torch: ``torch.nn.utils.clip_grad_norm_``.
4. host overhead: one eager call on a single 4-element tensor, and its graph replay.

The summary table comes last: microseconds (median), GB/s of the bytes the ideal path
moves, % of the floor (floor / time: 100% is the floor), speedup over torch. Targets
(issue 3): no-clip within 1.15x of one read; clip within 1.08x of three passes; bf16 norm
>= 90% of read bandwidth; eager 2000 x 4096 <= 150 us; ResNet-50 eager <= 1.5x graph.
Under 4 minutes on an H100 once the extension is built (``python -m gradclip build``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import gradclip
from gradclip.backends import cuda_build, resolve
from gradclip.backends.base import COEF, FOUND_INF, NORM
from gradclip.bench.timing import CacheEvictor, measure_ceilings, time_call
from gradclip.bench.workloads import get_workload

WORKLOADS = [("llama-1b", torch.float32), ("llama-1b", torch.bfloat16), ("gpt2", torch.float32),
             ("gpt2", torch.bfloat16), ("resnet50", torch.float32), ("2000x4096", torch.float32)]
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
LOSS_SCALE = 2.0 ** 16
# (reads, read/writes) of the gradient bytes: the ideal path's and torch's (docs/performance.md).
PASSES = {"norm": ((1, 0), (1, 0)), "no-clip": ((1, 0), (1, 1)), "clip": ((1, 1), (1, 1)),
          "amp": ((1, 1), (1, 2))}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


# -- 1. correctness ---------------------------------------------------------------------------

def oracle(tensors, norm_type, max_norm, inv_scale=None):
    """(norm, coef, found_inf) in float64, from the definition (base.py's contract)."""
    flat = torch.cat([t.reshape(-1).double() for t in tensors]) if tensors else torch.zeros(0)
    found = float(not bool(torch.isfinite(flat).all()))
    scale = 1.0 if inv_scale is None else inv_scale
    norm = float(torch.linalg.vector_norm(flat * scale, norm_type)) if flat.numel() else 0.0
    if flat.isnan().any():
        norm = math.nan
    coef = max_norm * (1.0 / (norm + 1e-6))
    return norm, scale * (coef if math.isnan(coef) else min(1.0, coef)), found


def close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(b) or math.isinf(b):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-30)


def random_list(gen, sizes, dtypes, offset=0, scale=1.0):
    out = []
    for i, n in enumerate(sizes):
        base = (torch.randn(n + offset, generator=gen, dtype=torch.float64) * scale)
        out.append(base.to(dtypes[i % len(dtypes)]).cuda()[offset:])
    return out


def check_stats(stats, tensors, norm_type, max_norm, inv_scale=None, what=""):
    norm, coef, found = oracle(tensors, norm_type, max_norm, inv_scale)
    got = stats.double().cpu().tolist()
    rtol = 1e-12 if all(t.dtype == torch.float64 for t in tensors) else (
        2e-5 if norm_type in (1.0, 2.0, math.inf) else 1e-4)
    ok = close(got[NORM], norm, rtol) and close(got[COEF], coef, 2 * rtol) and got[FOUND_INF] == found
    check(ok, f"{what}: got {got}, expected {[norm, coef, found]}")


def correctness(small: bool) -> None:
    print("\n== correctness (float64 oracle)", flush=True)
    backend = resolve("cuda", torch.device("cuda", torch.cuda.current_device()))
    gen = torch.Generator().manual_seed(1234)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    big = 1 if small else 20
    sizes = [0, 1, 7, 16384, 16385, 32768, 8192 * big, 100_003 * big, 0]
    for offset in (0, 1):
        for norm_type in (2.0, 1.0, math.inf, 3.0):
            tensors = random_list(gen, sizes, dtypes, offset)
            check_stats(backend.norm_stats(tensors, norm_type, 1.0), tensors, norm_type, 1.0,
                        what=f"mixed dtypes, offset {offset}, p={norm_type}")
    for dtype in dtypes:
        tensors = random_list(gen, [1000, 70_001, 3], [dtype], offset=1, scale=3.0)
        before = [t.clone() for t in tensors]
        stats = backend.clip_grads_(tensors, 2.0, 1.0)
        check_stats(stats, before, 2.0, 1.0, what=f"clip {SHORT[dtype]} misaligned")
        coef = stats[COEF].item()
        tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        ok = all(torch.allclose(t.double(), (b.double() * coef).to(dtype).double(), rtol=tol, atol=0)
                 for t, b in zip(tensors, before))
        check(ok, f"clip {SHORT[dtype]}: every element scaled by the coefficient")
    for bad in (math.nan, math.inf, -math.inf):
        tensors = random_list(gen, [5000, 3, 70_001], dtypes[:3])
        tensors[-1].view(-1)[-1] = bad
        for norm_type in (2.0, math.inf):
            check_stats(backend.norm_stats(tensors, norm_type, 1.0), tensors, norm_type, 1.0,
                        what=f"{bad} at the last element, p={norm_type}")
        before = [t.clone() for t in tensors]
        stats = backend.clip_grads_(tensors, 2.0, 1.0, torch.tensor([0.5], device="cuda"))
        check(stats[FOUND_INF].item() == 1.0 and all(torch.equal(t.nan_to_num(), b.nan_to_num())
                                                     for t, b in zip(tensors, before)),
              f"AMP with {bad}: found_inf set, gradients untouched")
    tensors = random_list(gen, [70_000, 5], dtypes)
    before = [t.clone() for t in tensors]
    stats = backend.clip_grads_(tensors, 2.0, 1e9)
    check(stats[COEF].item() == 1.0 and all(torch.equal(t, b) for t, b in zip(tensors, before)),
          "no clip needed: gradients bitwise untouched")
    count = 2000 if small else 5000
    sizes = [int(n) for n in torch.randint(0, 3000, (count,), generator=gen)] + [0]
    tensors = random_list(gen, sizes, dtypes[:3])
    check_stats(backend.norm_stats(tensors, 2.0, 1.0), tensors, 2.0, 1.0,
                what=f"{count} tensors (several launches), trailing empty")
    stats = [backend.norm_stats(tensors, 2.0, 1.0) for _ in range(5)]
    check(all(torch.equal(s, stats[0]) for s in stats), "bitwise identical over repeated runs")
    backend.clamp_(tensors, 0.5)
    check(all(t.abs().max().item() <= 0.5 for t in tensors if t.numel()), "clamp_ bounds every tensor")
    if small:
        return  # CUDA graphs need the caching allocator, which a sanitizer run turns off

    grads = random_list(gen, [3000, 70_001, 1], [torch.float32, torch.bfloat16])
    backend.clip_grads_(grads, 2.0, 1.0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        stats = backend.clip_grads_(grads, 2.0, 1.0)
    ok = True
    for scale in (5.0, 1e-4):
        fresh = random_list(gen, [3000, 70_001, 1], [torch.float32, torch.bfloat16], scale=scale)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        graph.replay()
        norm, coef, _ = oracle(fresh, 2.0, 1.0)
        ok &= close(stats[NORM].item(), norm, 2e-5)
        ok &= all(torch.allclose(g.float(), (f.float() * stats[COEF].item()).to(f.dtype).float(),
                                 rtol=8e-3, atol=0) for g, f in zip(grads, fresh))
    check(ok, "CUDA graph replay follows new gradients (clip, then no clip)")
    torch.cuda.synchronize()


# -- 2-4. timings -----------------------------------------------------------------------------

def make_params(workload, dtype, norm, seed=0):
    """Parameters (storage not needed: empty) with fresh normal gradients of 2-norm ``norm``."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    params = []
    for shape in workload.shapes:
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="cuda"))
        p.grad = torch.empty(shape, dtype=dtype, device="cuda").normal_(generator=gen)
        params.append(p)
    set_norm([p.grad for p in params], norm)
    return params


def set_norm(grads, norm):
    """Rescale ``grads`` to a global 2-norm of ``norm`` (syncs: used outside timed regions)."""
    current = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
    torch._foreach_mul_(grads, norm / current.item())


def calls(mode, params, grads, inv_scale, found_inf):
    """(ours, torch) callables for a mode; both capturable (no host sync)."""
    if mode == "norm":
        backend = resolve("cuda", grads[0].device)
        return (lambda: backend.norm_stats(grads, 2.0, math.inf),
                lambda: torch.nn.utils.get_total_norm(grads, 2.0, foreach=True))
    if mode == "amp":
        backend = resolve("cuda", grads[0].device)

        def torch_amp():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)

        return lambda: backend.clip_parameters_(params, 2.0, 1.0, inv_scale), torch_amp
    return (lambda: gradclip.clip_grad_norm_(params, 1.0, backend="cuda"),
            lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))


def time_workload(key, dtype, ceilings, evict, repeats, rows):
    workload = get_workload(key)
    nbytes = workload.nbytes(dtype)
    modes = ["norm", "no-clip", "clip"] + (["amp"] if dtype == torch.float32 else [])
    print(f"\n== {workload.describe()} {SHORT[dtype]}: {nbytes / 1e9:.3f} GB of gradients", flush=True)
    params = make_params(workload, dtype, 0.5)
    grads = [p.grad for p in params]
    inv_scale = torch.tensor([1.0 / LOSS_SCALE], device="cuda")
    found_inf = torch.zeros(1, device="cuda")
    for mode in modes:
        # Modes that scale the gradients get them back to their norm before each sample
        # (untimed): repeated clipping would converge to a factor of exactly 1.
        reset = {"clip": lambda: set_norm(grads, 4.0),
                 "amp": lambda: set_norm(grads, 0.5 * LOSS_SCALE)}.get(mode)
        if reset is not None:
            reset()
        ours, theirs = calls(mode, params, grads, inv_scale, found_inf)
        if mode == "no-clip":
            # Quick correctness on this workload's data: the norm, and nothing written.
            ends = grads[:3] + grads[-3:]
            saved = [g.clone() for g in ends]
            stats = gradclip.clip_grad_norm_(params, 1.0, backend="cuda")
            check(abs(stats.item() - 0.5) < 1e-4 and all(torch.equal(g, s) for g, s in zip(ends, saved)),
                  f"{key} {SHORT[dtype]}: norm {stats.item():.6f} (expected 0.5), no-clip writes nothing")
        if mode == "clip":
            stats = gradclip.clip_grad_norm_(params, 1.0, backend="cuda")
            after = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)))
            check(abs(stats.item() - 4.0) < 4e-4 and abs(after.item() - 1.0) < 1e-2,
                  f"{key} {SHORT[dtype]}: clip from norm {stats.item():.5f} to {after.item():.5f} "
                  "(expected 4 to 1)")
            reset()
        for method in ("graph", "eager"):
            ours_t = time_call(ours, method=method, device=grads[0].device, repeats=repeats,
                               evict=evict, reset=reset).median_us
            torch_t = time_call(theirs, method=method, device=grads[0].device, repeats=repeats,
                                evict=evict, reset=reset).median_us
            (r, rw), _ = PASSES[mode]
            floor = ceilings.floor_us(r, rw, nbytes)
            moved = (r + 2 * rw) * nbytes
            row = dict(workload=f"{workload.title} {SHORT[dtype]}", tensors=workload.n_tensors,
                       mode=mode, method=method, ours_us=ours_t, torch_us=torch_t,
                       gbs=moved / ours_t / 1e3, floor_us=floor, pct_floor=100 * floor / ours_t,
                       speedup=torch_t / ours_t)
            rows.append(row)
            print(f"  {mode:8s} {method:5s} ours {ours_t:9.1f} us  torch {torch_t:9.1f} us  "
                  f"{row['gbs']:7.0f} GB/s  {row['pct_floor']:5.1f}% of floor  x{row['speedup']:.2f}",
                  flush=True)
    del params, grads
    torch.cuda.empty_cache()


def host_overhead(evict, repeats, rows):
    print("\n== host overhead: one 4-element tensor", flush=True)
    p = torch.nn.Parameter(torch.empty(4, device="cuda"))
    p.grad = torch.full((4,), 0.1, device="cuda")
    params = [p]
    for method in ("graph", "eager"):
        ours = time_call(lambda: gradclip.clip_grad_norm_(params, 1.0, backend="cuda"), method=method,
                         device=p.device, repeats=repeats, evict=evict).median_us
        theirs = time_call(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
                           method=method, device=p.device, repeats=repeats, evict=evict).median_us
        rows.append(dict(workload="1 x 4 fp32", tensors=1, mode="no-clip", method=method, ours_us=ours,
                         torch_us=theirs, gbs=float("nan"), floor_us=float("nan"),
                         pct_floor=float("nan"), speedup=theirs / ours))
        print(f"  {method:5s} ours {ours:7.1f} us  torch {theirs:7.1f} us", flush=True)


def summary(rows, ceilings) -> None:
    print(f"\n== summary (H100 targets in the docstring); read {ceilings.read_gbs:.0f} GB/s, "
          f"read/write {ceilings.read_write_gbs:.0f} GB/s on {ceilings.buffer_bytes / 2**30:.0f} GiB fp32")
    header = f"{'workload':22s} {'n':>5s} {'mode':8s} {'method':6s} {'ours us':>9s} {'torch us':>9s} " \
             f"{'GB/s':>6s} {'%floor':>6s} {'x torch':>7s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['workload']:22s} {r['tensors']:5d} {r['mode']:8s} {r['method']:6s} {r['ours_us']:9.1f} "
              f"{r['torch_us']:9.1f} {r['gbs']:6.0f} {r['pct_floor']:6.1f} {r['speedup']:7.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workloads", nargs="*", default=None,
                        help="keys of gradclip.bench.workloads (default: the six of docs/performance.md)")
    parser.add_argument("--sanitize", action="store_true",
                        help="only the correctness section, on small sizes (for compute-sanitizer)")
    parser.add_argument("--ceiling-gib", type=float, default=4.0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_quick: needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cuda_build.load_extension()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; extension loaded in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    correctness(small=args.sanitize)
    if args.sanitize:
        print(f"\n{len(failures)} failure(s)")
        return 1 if failures else 0

    evict = CacheEvictor(torch.device("cuda"))
    ceilings = measure_ceilings(torch.device("cuda"), int(args.ceiling_gib * 2**30), evict=evict)
    print(f"\n== ceilings: read {ceilings.read_gbs:.0f} GB/s, read/write {ceilings.read_write_gbs:.0f} GB/s",
          flush=True)
    rows: list[dict] = []
    selected = [(k, d) for k, d in WORKLOADS if args.workloads is None or k in args.workloads]
    for key, dtype in selected:
        time_workload(key, dtype, ceilings, evict, args.repeats, rows)
    host_overhead(evict, args.repeats, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), ceilings=vars(ceilings), rows=rows,
                           failures=failures), f, indent=1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; {len(failures)} correctness failure(s)")
    summary(rows, ceilings)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
