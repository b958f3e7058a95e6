"""Quick check and timing of the triton backend on one GPU: correctness first, then triton
against torch (and the cuda backend when it loads) on the workloads of docs/performance.md.

    python benchmarks/triton_quick.py [--repeats 15] [--no-sweep] [--backends torch cuda triton]
                                      [--json OUT.json]

Sections, in order:

1. correctness: mixed dtypes, empty/0-d/odd sizes, misaligned views, non-finite values,
   against an fp64 reference and the reference backend; bitwise determinism; launches per clip.
2. timings: ``no-clip`` (gradients of norm 0.5, max_norm 1) and ``clip`` (norm 4) through
   ``gradclip.clip_grad_norm_`` / ``torch.nn.utils.clip_grad_norm_``; ``graph`` = CUDA graph
   replay (device time), ``eager`` = plain calls (host overhead included); medians, with the
   gradients evicted from L2 before each sample (``gradclip.bench.timing``).
3. the metadata cache: eager ``TritonBackend.clip_grads_`` with the cached chunk table against
   rebuilding it every call.
4. sweep (unless ``--no-sweep``): launch parameters of the triton kernels on llama-1B fp32/bf16
   and 2000 x 4096, graph replay; prints the best as a ``GRADCLIP_TRITON_CONFIG`` value.

The summary table comes last. About 2-3 minutes on an H100, most of it building the cuda
backend (cold) and compiling Triton kernel variants; ``--backends torch triton`` skips the build.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace

import torch

import gradclip
from gradclip.backends import get_backend
from gradclip.backends.base import COEF, FOUND_INF, NORM
from gradclip.backends.reference import ReferenceBackend
from gradclip.backends.triton import TritonBackend, TritonConfig, _config_from_env
from gradclip.bench.paths import MODES, Buffers, release, select_backends
from gradclip.bench.timing import CacheEvictor, measure_ceilings, time_call
from gradclip.bench.workloads import get_workload

WORKLOADS = [("llama-1b", torch.float32), ("llama-1b", torch.bfloat16), ("gpt2", torch.float32),
             ("gpt2", torch.bfloat16), ("resnet50", torch.float32), ("2000x4096", torch.float32)]
SWEEP = [      # the default (TritonConfig()) is the fourth
    dict(block=2048, num_warps=4, programs_per_sm=4),
    dict(block=2048, num_warps=8, programs_per_sm=4),
    dict(block=4096, num_warps=8, programs_per_sm=2),
    dict(block=4096, num_warps=8, programs_per_sm=4),
    dict(block=8192, num_warps=8, programs_per_sm=2),
    dict(block=4096, num_warps=8, programs_per_sm=4, chunks_per_program=64),
]
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16"}
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


# -- 1. correctness ---------------------------------------------------------------------------

def mixed_tensors(device, seed=0, with_f64=True):
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if with_f64 else [])
    sizes = [0, 1, (), 4095, 4097, 65536, 0, 65537, 1_000_003, 3_000_017, 0]
    out = []
    for i, size in enumerate(sizes):
        t = torch.randn(() if size == () else (size,), generator=gen, dtype=torch.float64)
        out.append(t.to(device=device, dtype=dtypes[i % len(dtypes)]))
    storage = torch.randn(200_003, generator=gen).to(device)
    out.append(storage[1:100_001])                            # misaligned view
    out.append(storage.to(torch.bfloat16)[3:70_000])          # misaligned bf16
    return out


def fp64_norm(tensors, p, inv=1.0):
    flat = torch.cat([t.double().flatten() for t in tensors]) * inv
    return torch.linalg.vector_norm(flat, p).item()


def correctness(device, names) -> None:
    print("\n== correctness (vs an fp64 reference and the reference backend) ==")
    for name in names:
        try:
            check_backend(device, name)
        except Exception as error:  # report it and go on to the timings
            check(False, f"[{name}] raised {type(error).__name__}: {error}")
    torch.cuda.synchronize()


def check_backend(device, name) -> None:
    ref = ReferenceBackend()
    backend = TritonBackend() if name == "triton" else get_backend(name)
    tag = f"[{name}]"
    for with_f64 in (False, True):
        tensors = mixed_tensors(device, with_f64=with_f64)
        for p in (2.0, 1.0, math.inf, 3.0):
            stats = backend.norm_stats(tensors, p, 0.5)
            want = fp64_norm(tensors, p)
            rel = abs(stats[NORM].item() - want) / want
            expect = ref.norm_stats(tensors, p, 0.5)
            close = torch.allclose(stats, expect, rtol=1e-4, atol=0)
            check(rel < 1e-4 and close and stats.dtype == expect.dtype,
                  f"{tag} norm p={p} f64={with_f64}: rel err {rel:.1e} vs fp64, stats "
                  f"{stats.tolist()} vs reference {expect.tolist()}")
        first = backend.norm_stats(tensors, 2.0, 0.5)
        same = all(torch.equal(backend.norm_stats(tensors, 2.0, 0.5), first) for _ in range(20))
        check(same, f"{tag} bitwise identical over 20 calls (f64={with_f64})")
        clipped = [t.clone() for t in tensors]
        expected = [t.clone() for t in tensors]
        s = backend.clip_grads_(clipped, 2.0, 0.5)
        ref.clip_grads_(expected, 2.0, 0.5)
        worst = max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(clipped, expected) if a.numel())
        check(worst < 1e-2 and s[COEF].item() < 1, f"{tag} clip matches reference (worst rel {worst:.1e})")
        untouched = [t.clone() for t in tensors]
        backend.clip_grads_(untouched, 2.0, 1e9)
        check(all(torch.equal(a, b) for a, b in zip(untouched, tensors)), f"{tag} no clip leaves grads untouched")
    for value in (math.nan, math.inf, -math.inf):
        for where in (0, -1):
            tensors = mixed_tensors(device, seed=1, with_f64=False)
            target = [t for t in tensors if t.numel() > 1][where]
            target.view(-1)[where] = value
            for p in (2.0, math.inf):
                stats = backend.norm_stats(tensors, p, 1.0)
                norm = stats[NORM].item()
                good = stats[FOUND_INF].item() == 1 and (math.isnan(norm) if math.isnan(value) else norm == math.inf)
                check(good, f"{tag} {value} in {'first' if where == 0 else 'last'} tensor, p={p}: {stats.tolist()}")
            before = [t.clone() for t in tensors]
            backend.clip_grads_(tensors, 2.0, 1e-3, torch.tensor(0.5, device=device))
            check(all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(tensors, before)),
                  f"{tag} found_inf ({value}) skips the rescale")


def launches_per_clip(device) -> dict:
    from torch.profiler import ProfilerActivity, profile
    backend = TritonBackend()
    grads = mixed_tensors(device, with_f64=False)
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    backend.clip_grads_(grads, 2.0, 0.5)
    torch.cuda.synchronize()
    counts = {}
    for label, fn in (("TritonBackend.clip_grads_", lambda: backend.clip_grads_(grads, 2.0, 0.5)),
                      ("gradclip.clip_grad_norm_(backend='triton')",
                       lambda: gradclip.clip_grad_norm_(params, 0.5, backend="triton"))):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
        counts[label] = names
        print(f"  {label}: {len(names)} device operations: {sorted(set(names))}")
    check(len(counts["TritonBackend.clip_grads_"]) == 2, "two launches per clip (norm, rescale)")
    return {k: len(v) for k, v in counts.items()}


# -- 2. timings -------------------------------------------------------------------------------

def timings(device, names, repeats, evict, read_gbs) -> list[dict]:
    print("\n== timings (us, median) ==")
    rows = []
    backends = select_backends(names, device)
    for b in backends:
        print(f"  {b.name}: {b.skipped or b.note}")
    for key, dtype in WORKLOADS:
        workload = get_workload(key)
        buffers = Buffers(workload, dtype, device)
        for mode_key in ("no-clip", "clip"):
            mode = MODES[mode_key]
            buffers.load(mode)
            floor = (1 if mode_key == "no-clip" else 3) * buffers.nbytes / read_gbs / 1e3
            for method in ("graph", "eager"):
                row = {"workload": workload.title, "dtype": SHORT[dtype], "mode": mode_key,
                       "method": method, "floor_us": floor}
                for b in backends:
                    if b.skipped:
                        continue
                    fn = b.path(buffers, mode_key)
                    m = time_call(fn, method=method, device=device, repeats=repeats,
                                  reset=buffers.reset(), evict=evict)
                    row[b.name] = m.median_us
                    release()
                if method == "eager" and any(b.name == "triton" and not b.skipped for b in backends):
                    direct = TritonBackend()
                    max_norm = buffers.max_norm
                    m = time_call(lambda: direct.clip_grads_(buffers.grads, 2.0, max_norm),
                                  method="eager", device=device, repeats=repeats,
                                  reset=buffers.reset(), evict=evict)
                    row["triton_backend_only"] = m.median_us
                rows.append(row)
                print("  " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
        del buffers
        release()
    return rows


# -- 3. the metadata cache ------------------------------------------------------------------

def cache_pays(device, repeats, evict) -> list[dict]:
    print("\n== metadata cache: eager TritonBackend.clip_grads_, no clip needed (us) ==")
    rows = []
    for key in ("2000x4096", "resnet50", "llama-1b"):
        buffers = Buffers(get_workload(key), torch.float32, device)
        buffers.load(MODES["no-clip"])
        backend = TritonBackend()
        cached = time_call(lambda: backend.clip_grads_(buffers.grads, 2.0, 1.0), method="eager",
                           device=device, repeats=repeats, evict=evict)

        def rebuilt():
            backend.clear_cache()
            backend.clip_grads_(buffers.grads, 2.0, 1.0)
        uncached = time_call(rebuilt, method="eager", device=device, repeats=repeats, evict=evict)
        start = time.perf_counter()
        for _ in range(50):
            backend._table(buffers.grads)
        key_us = (time.perf_counter() - start) / 50 * 1e6
        row = {"workload": key, "cached_us": cached.median_us, "rebuilt_us": uncached.median_us,
               "cache_hit_lookup_us": key_us}
        rows.append(row)
        print(f"  {key}: cached {cached.median_us:.1f}, rebuilt every call {uncached.median_us:.1f}, "
              f"host lookup on a hit {key_us:.1f}")
        del buffers
        release()
    return rows


# -- 4. launch-parameter sweep ------------------------------------------------------------------

def scale_twins(fields: dict) -> dict:
    """The same block, warps and grid for the rescale kernel."""
    return {"scale_" + k: v for k, v in fields.items() if k in ("block", "num_warps", "programs_per_sm")}


def env_value(fields: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in {**fields, **scale_twins(fields)}.items())


def sweep(device, repeats, evict) -> list[dict]:
    print("\n== sweep: triton launch parameters, graph replay (us) ==")
    rows = []
    cases = [("llama-1b", torch.float32), ("llama-1b", torch.bfloat16), ("2000x4096", torch.float32)]
    buffers = {case: Buffers(get_workload(case[0]), case[1], device) for case in cases}
    for fields in SWEEP:
        config = replace(TritonConfig(), **fields, **scale_twins(fields))
        backend = TritonBackend(config)
        row = {"config": ",".join(f"{k}={v}" for k, v in fields.items())}
        for (key, dtype), b in buffers.items():
            for mode_key, max_norm in (("no-clip", 1.0), ("clip", 1.0)):
                b.load(MODES[mode_key])
                m = time_call(lambda: backend.clip_grads_(b.grads, 2.0, max_norm), method="graph",
                              device=device, repeats=repeats, reset=b.reset(), evict=evict)
                row[f"{key} {SHORT[dtype]} {mode_key}"] = m.median_us
        rows.append(row)
        print("  " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    del buffers
    release()
    cols = [k for k in rows[0] if k != "config"]
    best_at = min(range(len(rows)), key=lambda i: sum(rows[i][c] / min(r[c] for r in rows) for c in cols))
    print(f"  best overall (least sum of times relative to each column's best): {rows[best_at]['config']}")
    print(f"  to use it: GRADCLIP_TRITON_CONFIG={env_value(SWEEP[best_at])}")
    return rows


# -- summary ----------------------------------------------------------------------------------

def summary(rows: list[dict], names: list[str]) -> None:
    print("\n== summary: clip_grad_norm_ (us, median; graph = device time, eager = with host) ==")
    cols = [n for n in ("torch", "cuda", "triton") if any(n in r for r in rows)]
    header = ["workload", "dtype", "mode", "method", "floor"] + cols
    if "cuda" in cols:
        header.append("triton/cuda")
    header.append("torch/triton")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["workload"], r["dtype"], r["mode"], r["method"], f"{r['floor_us']:.0f}"]
        cells += [f"{r[c]:.0f}" if c in r else "-" for c in cols]
        if "cuda" in cols:
            cells.append(f"{r['triton'] / r['cuda']:.2f}" if "cuda" in r and "triton" in r else "-")
        cells.append(f"{r['torch'] / r['triton']:.2f}x" if "torch" in r and "triton" in r else "-")
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--backends", nargs="+", default=["torch", "cuda", "triton"])
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("triton_quick.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    import triton
    props = torch.cuda.get_device_properties(device)
    config = _config_from_env(TritonConfig())
    print(f"torch {torch.__version__}, triton {triton.__version__}, {props.name}, "
          f"{props.multi_processor_count} SMs")
    print(f"triton config: {asdict(config)}"
          + (f" (from {os.environ['GRADCLIP_TRITON_CONFIG']})" if os.environ.get("GRADCLIP_TRITON_CONFIG") else ""))
    statuses = gradclip.available_backends()
    for name in ("cuda", "triton"):
        print(f"{name} backend: {statuses[name]}")
    names = [n for n in args.backends if n == "torch" or statuses[n].available]
    checked = [n for n in ("triton", "cuda") if n in names]
    if "cuda" in checked:
        try:
            t0 = time.perf_counter()
            gradclip.backends.resolve("cuda", device)
            print(f"cuda backend loaded in {time.perf_counter() - t0:.1f} s")
        except Exception as error:
            print(f"cuda backend does not load: {error}")
            checked.remove("cuda")
            names.remove("cuda")
    correctness(device, checked)
    print("\n== launches ==")
    try:
        launches = launches_per_clip(device)
    except Exception as error:  # the profiler needs CUPTI
        print(f"  cannot count launches: {error}")
        launches = {}
    evict = CacheEvictor(device)
    ceilings = measure_ceilings(device, 1 << 30, evict=evict)
    print(f"\nread ceiling {ceilings.read_gbs:.0f} GB/s, read+write {ceilings.read_write_gbs:.0f} GB/s")
    rows = timings(device, names, args.repeats, evict, ceilings.read_gbs)
    cache = cache_pays(device, args.repeats, evict)
    swept = [] if args.no_sweep else sweep(device, max(5, args.repeats // 2), evict)
    summary(rows, names)
    print(f"\n{len(failures)} correctness failures; total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(config), "launches": launches, "timings": rows,
                       "cache": cache, "sweep": swept, "failures": failures,
                       "ceilings": asdict(ceilings), "device": props.name,
                       "torch": torch.__version__, "triton": triton.__version__}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
