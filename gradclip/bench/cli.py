"""``python -m gradclip bench``: time the clip paths of each backend against torch."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

from . import report
from .paths import BACKEND_NAMES, MODES, Buffers, Unsupported, cases, release, select_backends
from .timing import CacheEvictor, measure_ceilings, time_call
from .workloads import WORKLOADS, get_workload, load_shapes_file, model_workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

DESCRIPTION = """\
Time gradient clipping: torch's paths against gradclip's backends (and apex or
TransformerEngine when importable), on the workloads of docs/performance.md, and report each
against the memory floor. With no options on a GPU it runs everything (a few minutes on an
H100, plus a first build of the CUDA extension); without a GPU it makes a small CPU run that
checks the machinery (its numbers say nothing about GPUs).
"""

EPILOG = """\
workloads (--workloads, default all on a GPU; resnet50 on the CPU):
  llama-1b    llama-1B-like decoder: 147 tensors, 953M params (3.8 GB of fp32 gradients)
  gpt2        GPT-2 124M: 148 tensors
  resnet50    ResNet-50: 161 tensors, 25.6M params
  2000x4096   2000 tensors of 4096 elements: many small tensors, where host overhead rules
  --shapes FILE adds a JSON list of shapes ([[4096, 4096], [4096], ...] or
  {"name": ..., "shapes": [...]}); --model NAME adds a model's parameter shapes (a torchvision
  model when torchvision is importable, resnet50/gpt2/llama-1b built in, or pkg.module:factory).

modes (--modes, default all):
  norm        the global norm alone (torch: torch._foreach_norm)
  no-clip     clip_grad_norm_(max_norm=1) on gradients of norm 0.5: nothing to clip
  clip        the same on gradients of norm 4: every call scales
  amp         AMP unscale then clip, gradients scaled by 2**16 (torch:
              _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_; gradclip:
              backends.clip_grads_ with inv_scale)
  amp-adamw   a whole AMP step with AdamW(fused=True), eager (torch: scaler.unscale_,
              clip_grad_norm_, scaler.step, scaler.update; gradclip: ClippedOptimizer)
  adamw       torch's fused AdamW step alone, eager: what amp-adamw adds to
  amp, amp-adamw and adamw run on fp32 gradients only (AMP keeps fp32 gradients).

backends (--backends, default all): torch (torch.nn.utils), cuda and triton (gradclip),
  reference (gradclip's pure-torch backend; default on the CPU only), apex and te
  (multi_tensor_l2norm + multi_tensor_scale as Megatron uses them: the host reads the clip
  factor, so eager only). One that cannot run here is listed as skipped, with the reason.

timing (--timing, default graph,eager on a GPU): every sample times one call with CUDA
  events; the figure is the median of --repeats samples after --warmup untimed calls.
  graph   the call captured in a CUDA graph, replays timed: device time only.
  eager   the call as user code makes it, from an idle device: host overhead included.
  Before each sample a read of 4x the L2 size evicts the gradients from the cache (workloads
  that fit in L2 are not timed hot); calls that change the gradients get them restored
  before each sample, outside the timed region. On the CPU: perf_counter on one thread,
  no graphs.

columns:
  us        median microseconds per call
  GB/s      bytes this path moves over the time, counting its passes over the gradients
            (docs/performance.md's model: torch no-clip reads and read/writes, 3x the bytes;
            gradclip's no-clip reads once): how close the path runs to the memory ceiling
  %floor    floor / time: the floor is the bytes the ideal path must move over the
            ceilings measured in this run (vector_norm read and mul_ read/write over a
            flat fp32 buffer, 4 GiB on a GPU): one read for norm and no-clip, three passes
            (a read and a read/write) for clip and amp, one read plus the fused AdamW
            step's bytes for amp-adamw
  x torch   torch's time in the same mode and timing over this path's time

output: the table is printed last; with --out DIR (default ./gradclip-bench) also
  bench.json (every number, the environment, the skipped backends and why), bench.md
  (the table, and torch's baseline in docs/performance.md's layout) and bench.png (% of floor
  per workload, mode and backend) and bench-eager.png (eager times, log scale).

examples:
  python -m gradclip bench                          everything this machine can run
  python -m gradclip bench --quick                  gpt2 and 2000x4096, fewer repeats
  python -m gradclip bench --workloads llama-1b --dtypes bf16 --modes no-clip,clip
  python -m gradclip bench --model vit_b_16 --backends torch,cuda
  python -m gradclip bench --from-json gradclip-bench/bench.json   redraw the reports
"""


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return items
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--workloads", type=_csv(tuple(WORKLOADS)), metavar="LIST",
                        help="comma-separated: " + ",".join(WORKLOADS))
    parser.add_argument("--shapes", action="append", default=[], metavar="FILE",
                        help="add a workload: a JSON list of shapes (repeatable)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="add a workload: a model's parameter shapes (repeatable)")
    parser.add_argument("--dtypes", type=_csv(tuple(DTYPES)), metavar="LIST",
                        help="gradient dtypes: fp32,bf16,fp16 (default fp32,bf16; fp32 on the CPU)")
    parser.add_argument("--modes", type=_csv(tuple(MODES)), metavar="LIST",
                        help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--backends", type=_csv(BACKEND_NAMES), metavar="LIST",
                        help="comma-separated: " + ",".join(BACKEND_NAMES))
    parser.add_argument("--timing", type=_csv(("graph", "eager")), metavar="LIST",
                        help="graph,eager (GPU only; the CPU uses perf_counter)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="timed samples per row (default 30; 10 with --quick; 5 on the CPU)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed calls first (default 3; 1 on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: gpt2 and 2000x4096 (2000x4096 alone on the CPU), fewer repeats")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--ceiling-gib", type=float, metavar="GIB",
                        help="size of the bandwidth-ceiling buffer (default 4 on a GPU, 1/16 on the CPU)")
    parser.add_argument("--out", default="gradclip-bench", metavar="DIR",
                        help="write bench.json, bench.md and PNG plots here (default ./gradclip-bench; '' for none)")
    parser.add_argument("--from-json", metavar="FILE", help="redraw table and files from a bench.json; time nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _settings(args: argparse.Namespace, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if args.workloads:
        keys = args.workloads
    elif args.shapes or args.model:
        keys = []
    elif args.quick:
        keys = ["gpt2", "2000x4096"] if gpu else ["2000x4096"]
    else:
        keys = list(WORKLOADS) if gpu else ["resnet50"]
    workloads = [get_workload(k) for k in keys]
    workloads += [load_shapes_file(f) for f in args.shapes]
    workloads += [model_workload(m) for m in args.model]
    backends = args.backends or [b for b in BACKEND_NAMES if gpu is False or b != "reference"]
    return {
        "workloads": workloads,
        "dtypes": args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"]),
        "modes": args.modes or list(MODES),
        "backends": backends,
        "methods": (args.timing or ["graph", "eager"]) if gpu else ["cpu"],
        "repeats": args.repeats or (5 if not gpu else 10 if args.quick else 30),
        "warmup": args.warmup if args.warmup is not None else 3 if gpu else 1,
        "ceiling_bytes": int((args.ceiling_gib or (4 if gpu else 1 / 16)) * 2 ** 30),
    }


def _environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m gradclip " + " ".join(sys.argv[1:]),
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, cuda=torch.version.cuda, sms=props.multi_processor_count,
                   l2_bytes=getattr(props, "L2_cache_size", None))
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def measure(settings: dict, device: torch.device, progress: report.Progress | None = None) -> dict:
    """Run the benchmark; returns the result (the structure bench.json holds)."""
    backends = select_backends(settings["backends"], device)
    evict = CacheEvictor(device)
    ceilings = measure_ceilings(device, settings["ceiling_bytes"], evict=evict)
    ready = {b.name: b for b in backends if not b.skipped}
    tasks = [(w, dtype, MODES[mode], ready[name], method) for w, dtype, mode, name, method in
             cases(settings["workloads"], settings["dtypes"], settings["modes"], ready, settings["methods"])]
    if progress:
        progress.start(len(tasks))
    rows, workloads = [], []
    buffers, fatal = None, None
    for w, dtype, mode, backend, method in tasks:
        row = {"workload": w.key, "title": w.title, "dtype": dtype, "mode": mode.key,
               "backend": backend.name, "method": method}
        rows.append(row)
        if progress:
            progress.step(f"{w.key} {dtype} {mode.key} {backend.name} {method}")
        if fatal:
            row["error"] = f"not run: {fatal}"
            continue
        try:
            if buffers is None or (buffers.workload, buffers.dtype) != (w, DTYPES[dtype]):
                workloads.append(report.workload_entry(w, dtype, w.nbytes(DTYPES[dtype]), ceilings))
                buffers = None
                release()
                buffers = Buffers(w, DTYPES[dtype], device)
            if buffers.mode is not mode:
                buffers.load(mode)
        except Exception as error:  # the device is unusable (out of memory, a sticky fault)
            fatal = f"{w.key} {dtype} {mode.key}: {_first_line(error)}"
            row["error"] = fatal
            continue
        if method == "graph" and not backend.graph_ok(mode.key):
            row["error"] = "not capturable: the host reads the clip factor (.item()) every call"
        else:
            try:
                fn = backend.path(buffers, mode.key)
                m = time_call(fn, method=method, device=device, repeats=settings["repeats"],
                              warmup=settings["warmup"], reset=buffers.reset(), evict=evict)
                row.update(m.as_dict())
            except Unsupported as why:
                row["error"] = str(why)
            except Exception as error:  # one failing path must not lose the whole run
                row["error"] = _first_line(error)
                buffers.mode = None  # the failed call may have left the gradients half-changed
            finally:
                fn = None
                if mode.key in ("amp-adamw", "adamw"):
                    release()
        report.derive(row, backend.passes(mode.key), mode.floor_passes, buffers.nbytes, ceilings)
    buffers = None
    release()
    if progress:
        progress.finish()
    report.add_speedups(rows)
    return {
        "ceilings": ceilings.__dict__,
        "workloads": workloads,
        "backends": [{"name": b.name, "skipped": b.skipped, "note": b.note} for b in backends],
        "settings": {**{k: v for k, v in settings.items() if k != "workloads"},
                     "workloads": [w.key for w in settings["workloads"]]},
        "rows": rows,
    }


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print("bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            settings = _settings(args, device)
        except ValueError as error:
            print(f"bench: {error}", file=sys.stderr)
            return 2
        env = _environment(device)
        print(report.banner(env, settings))
        started = time.perf_counter()
        progress = None if args.no_progress else report.Progress()
        threads = torch.get_num_threads()
        if device.type == "cpu":
            # One thread: on a busy machine idle threads spin and the run takes several times
            # longer. The CPU run checks the machinery; its numbers are not the point.
            torch.set_num_threads(1)
        try:
            result = measure(settings, device, progress)
        finally:
            torch.set_num_threads(threads)
        env["seconds"] = round(time.perf_counter() - started, 1)
        result = {"environment": env, **result}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for path in report.write_all(result, out):
            print(f"wrote {path}")
    print(report.terminal_table(result))
    return 0
