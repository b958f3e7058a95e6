"""``python -m gradclip bench``: time the clip paths of each backend against torch, check
gradclip's backends against the float64 oracle, or compare with torch on the CPU."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import gradclip

from . import check, cpu_section, report
from .paths import BACKEND_NAMES, MODES, Buffers, Unsupported, cases, release, select_backends
from .timing import METHODS, CacheEvictor, measure_ceilings, time_call
from .workloads import ALL_WORKLOADS, WORKLOADS, get_workload, load_shapes_file, model_workload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GRADCLIP_BACKENDS = ("cuda", "triton", "reference")
MIN_CEILING_GIB = 0.001  # about 1 MiB: a smaller buffer times the caches, not the memory

DESCRIPTION = """\
Time gradient clipping: torch's paths against gradclip's backends (and apex or
TransformerEngine when importable), on the workloads of docs/performance.md, and report each
against the memory floor. With no options on a GPU it runs everything (a few minutes on an
H100, plus a first build of the CUDA extension); without a GPU it makes a small CPU run that
checks the machinery (its numbers say nothing about GPUs). --check also verifies every
gradclip backend against a float64 oracle; --cpu-section compares gradclip with torch on the
CPU.
"""

EPILOG = """\
workloads (--workloads, default the first four on a GPU; resnet50 on the CPU):
  llama-1b    llama-1B-like decoder: 147 tensors, 953M params (3.8 GB of fp32 gradients)
  gpt2        GPT-2 124M: 148 tensors
  resnet50    ResNet-50: 161 tensors, 25.6M params
  2000x4096   2000 tensors of 4096 elements: many small tensors, where host overhead rules
  odd-sizes   for --check and sanitizer runs: empty, tiny and chunk-edge sizes, 3000 small
              tensors (several launches)
  --shapes FILE adds a JSON list of shapes ([[4096, 4096], [4096], ...] or
  {"name": ..., "shapes": [...]}); --model NAME adds a model's parameter shapes (a torchvision
  model when torchvision is importable, resnet50/gpt2/llama-1b built in, or pkg.module:factory).

modes (--modes, default all):
  norm          the global norm alone (torch: torch._foreach_norm)
  no-clip       clip_grad_norm_(max_norm=1) on gradients of norm 0.5: nothing to clip
  clip          the same on gradients of norm 4: every call scales
  amp           AMP unscale then clip, gradients scaled by 2**16 (torch:
                _amp_foreach_non_finite_check_and_unscale_ + clip_grad_norm_; gradclip:
                backends.clip_grads_ with inv_scale)
  amp-step      a whole AMP step whose optimizer step does nothing, eager (torch:
                scaler.unscale_, clip_grad_norm_, scaler.step, scaler.update; gradclip:
                ClippedOptimizer + gradclip.GradScaler): the unscale and clip work alone
  amp-adamw     the same with AdamW(fused=True)
  adamw         torch's fused AdamW step alone, eager: what amp-adamw adds to
  adamw-scaled  that step with grad_scale/found_inf set, as AMP hands them to it
  per-tensor    each gradient clipped to its own norm (clip_grad_norm_per_tensor_, max_norm
                1, gradients of global norm 0.5): nothing to clip (torch, which has no such
                function: _foreach_norm, the factors, _foreach_mul_)
  all-tensors   the same with max_norm 0: every tensor is written
  agc           adaptive gradient clipping (adaptive_clip_grad_, clip_factor 0.01), gradients
                1e-3 of the weights: nothing to clip (baseline: timm's adaptive_clip_grad,
                shown as "timm"; skipped without timm)
  agc-all       the same with gradients as large as the weights: every unit is clipped
  AMP modes and the AdamW baselines run on fp32 gradients only (AMP keeps fp32 gradients).
  x torch in the reports is torch's time / this path's time: above 1, this path is faster.

backends (--backends, default all): torch (torch.nn.utils itself), gradclip's cuda, triton
  and reference (its pure-torch backend; default on the CPU only), apex and te
  (multi_tensor_l2norm + multi_tensor_scale as Megatron uses them: the host reads the clip
  factor, so eager only). One that cannot run here is listed as skipped, with the reason.

timing (--timing, default graph,eager on a GPU): every sample times one call with CUDA
  events; the figure is the median of --repeats samples after --warmup untimed calls.
  graph   the call captured in a CUDA graph, replays timed: device time only.
  eager   the call as user code makes it, from an idle device: host overhead included.
  host    host time per call, 20 calls queued back to back (perf_counter): the Python and
          launch overhead that graphs remove.
  Before each sample a read of 4x the L2 size evicts the gradients from the cache (workloads
  that fit in L2 are not timed hot); calls that change the gradients get them restored
  before each sample, outside the timed region. On the CPU: perf_counter on one thread,
  no graphs (--timing does not apply), and the read evicts 4x the last-level cache.

columns:
  us        median microseconds per call
  GB/s      bytes this path moves over the time, counting its passes over the gradients
            (docs/performance.md's model: torch no-clip reads and read/writes, 3x the bytes;
            gradclip's no-clip reads once): how close the path runs to the memory ceiling
  %floor    floor / time: the floor is the bytes the ideal path must move over the
            ceilings measured in this run (vector_norm read and mul_ read/write over a
            flat fp32 buffer, 4 GiB on a GPU): one read for norm and no-clip, three passes
            (a read and a read/write) for clip, amp and amp-step, one read plus the fused
            AdamW step's bytes for amp-adamw (the step's bytes alone for adamw and
            adamw-scaled). GPU runs only: on the CPU the ceilings measured do
            not bound a call (the read one came out below read+write), so none is given.
  x torch   torch's time in the same mode and timing over this path's time

--check, --check-only: before timing (or instead of it), each gradclip backend's results
  on the selected workloads and dtypes against a float64 oracle (gradclip/oracle.py,
  the one the tests use): the norm for p = 2, 1, 3.5, inf; no-clip leaves the gradients
  bitwise untouched; clip and amp scale them by the coefficient; a NaN gives a NaN norm,
  found_inf and no AMP rescale. A failed check is listed and the command exits with 1.

--cpu-section: torch.nn.utils.clip_grad_norm_ (torch's defaults) against
  gradclip.clip_grad_norm_ (backend auto: the reference backend on the CPU), fp32, one
  thread, side by side (timed call by call in turn), when nothing needs clipping (norm
  0.5, max_norm 1) and when clipping (norm 4), on resnet50 and 2000x4096 (or --workloads,
  --shapes, --model); prints each time, gradclip/torch and the target (no-clip <= 0.6x,
  clip <= 1.1x). Takes --repeats (samples each, default 15) and --warmup (default 1).

output: the table is printed last; with --out DIR (default ./gradclip-bench) also
  bench.json (every number, the environment, the skipped backends and why), bench.md
  (the table, and torch's baseline with docs/performance.md's columns) and bench.png (% of floor
  per workload, mode and backend; times on the CPU) and bench-eager.png (eager times, log scale).

examples:
  python -m gradclip bench                          everything this machine can run
  python -m gradclip bench --quick                  gpt2 and 2000x4096, fewer repeats
  python -m gradclip bench --workloads llama-1b --dtypes bf16 --modes no-clip,clip
  python -m gradclip bench --model vit_b_16 --backends torch,cuda
  python -m gradclip bench --check-only --workloads odd-sizes --backends cuda
  python -m gradclip bench --cpu-section            gradclip against torch on the CPU
  python -m gradclip bench --from-json gradclip-bench/bench.json   redraw the reports
"""


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list; choose from {', '.join(choices)}")
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _int_at_least(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is too small: give at least {lowest}")
        return value
    return parse


def _ceiling_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value < MIN_CEILING_GIB:
        raise argparse.ArgumentTypeError(
            f"{text} GiB: give at least {MIN_CEILING_GIB} (about 1 MiB; a smaller buffer times "
            "the caches, not the memory)")
    return value


def _shapes_file(text: str):
    try:
        return load_shapes_file(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _model(text: str):
    try:
        return model_workload(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _bench_json(text: str) -> dict:
    try:
        result = json.loads(Path(text).read_text())
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{text} is not JSON: {error}") from None
    if not isinstance(result, dict) or "environment" not in result or not (
            "rows" in result or "checks" in result or "cpu_section" in result):
        raise argparse.ArgumentTypeError(f"{text} is not a bench.json that gradclip bench wrote")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(bench_parser=parser)
    parser.add_argument("--workloads", type=_csv(tuple(ALL_WORKLOADS)), metavar="LIST",
                        help="comma-separated: " + ",".join(ALL_WORKLOADS))
    parser.add_argument("--shapes", type=_shapes_file, action="append", default=[], metavar="FILE",
                        help="add a workload: a JSON list of shapes (repeatable)")
    parser.add_argument("--model", type=_model, action="append", default=[], metavar="NAME",
                        help="add a workload: a model's parameter shapes (repeatable)")
    parser.add_argument("--dtypes", type=_csv(tuple(DTYPES)), metavar="LIST",
                        help="gradient dtypes: fp32,bf16,fp16 (default fp32,bf16; fp32 on the CPU)")
    parser.add_argument("--modes", type=_csv(tuple(MODES)), metavar="LIST",
                        help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--backends", type=_csv(BACKEND_NAMES), metavar="LIST",
                        help="comma-separated: " + ",".join(BACKEND_NAMES))
    parser.add_argument("--timing", type=_csv(METHODS), metavar="LIST",
                        help=",".join(METHODS) + " (GPU only; the CPU uses perf_counter)")
    parser.add_argument("--repeats", type=_int_at_least(1), metavar="N",
                        help="timed samples per row, at least 1 (default 30; 10 with --quick; 5 on the CPU)")
    parser.add_argument("--warmup", type=_int_at_least(0), metavar="N",
                        help="untimed calls first (default 3; 1 on the CPU)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run: gpt2 and 2000x4096 (2000x4096 alone on the CPU), fewer repeats")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="default: cuda when available, else cpu")
    parser.add_argument("--ceiling-gib", type=_ceiling_gib, metavar="GIB",
                        help=f"size of the bandwidth-ceiling buffer, at least {MIN_CEILING_GIB} "
                             "(default 4 on a GPU, 1/16 on the CPU)")
    parser.add_argument("--check", action="store_true",
                        help="first check gradclip's backends against the float64 oracle (exit 1 on a failure)")
    parser.add_argument("--check-only", action="store_true", help="the checks of --check, no timing")
    parser.add_argument("--cpu-section", action="store_true",
                        help="gradclip against torch on the CPU, one thread, with the targets; nothing else")
    parser.add_argument("--out", default="gradclip-bench", metavar="DIR",
                        help="write bench.json, bench.md and PNG plots here (default ./gradclip-bench; '' for none)")
    parser.add_argument("--from-json", type=_bench_json, metavar="FILE",
                        help="redraw table and files from a bench.json; time nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# Options that choose what is measured, by the name argparse gives them.
_MEASURING = ("workloads", "shapes", "model", "dtypes", "modes", "backends", "timing", "repeats",
              "warmup", "quick", "device", "ceiling_gib", "check", "check_only", "cpu_section")
# What --cpu-section and --check-only take of them.
_CPU_SECTION_TAKES = {"workloads", "shapes", "model", "repeats", "warmup", "device", "cpu_section"}
_CHECK_ONLY_TAKES = {"workloads", "shapes", "model", "dtypes", "backends", "device", "check", "check_only"}


def _given(args: argparse.Namespace, names) -> list[str]:
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n) not in (None, False, [])]


def _do_not_apply(options: list[str]) -> str:
    return ", ".join(options) + (" does" if len(options) == 1 else " do") + " not apply"


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Combinations that would be ignored or cannot run are errors, never silence."""
    if args.from_json is not None:
        extra = _given(args, _MEASURING)
        if extra:
            parser.error(f"--from-json redraws a result and times nothing; drop {', '.join(extra)}")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device here")
    if args.cpu_section:
        extra = _given(args, [n for n in _MEASURING if n not in _CPU_SECTION_TAKES])
        if extra:
            parser.error(f"--cpu-section times torch against gradclip's auto on fp32 on the CPU; "
                         f"{_do_not_apply(extra)}")
        if args.device == "cuda":
            parser.error("--cpu-section runs on the CPU; drop --device cuda")
        return
    if args.check_only:
        extra = _given(args, [n for n in _MEASURING if n not in _CHECK_ONLY_TAKES])
        if extra:
            parser.error(f"--check-only times nothing; {_do_not_apply(extra)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.timing:
        parser.error("--timing chooses GPU timing methods; the CPU is timed with perf_counter, drop it")
    if (args.check or args.check_only) and args.backends and not set(args.backends) & set(GRADCLIP_BACKENDS):
        parser.error(f"--check verifies gradclip's backends ({', '.join(GRADCLIP_BACKENDS)}); "
                     "--backends names none of them")


def _workloads(args: argparse.Namespace, default: list[str]) -> list:
    keys = args.workloads or ([] if args.shapes or args.model else default)
    return [get_workload(k) for k in keys] + args.shapes + args.model


def _settings(args: argparse.Namespace, device: torch.device) -> dict:
    gpu = device.type == "cuda"
    if args.quick:
        default = ["gpt2", "2000x4096"] if gpu else ["2000x4096"]
    else:
        default = list(WORKLOADS) if gpu else ["resnet50"]
    backends = args.backends or [b for b in BACKEND_NAMES if gpu is False or b != "reference"]
    return {
        "workloads": _workloads(args, default),
        "dtypes": args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"]),
        "modes": args.modes or list(MODES),
        "backends": backends,
        "check_backends": [b for b in (args.backends or GRADCLIP_BACKENDS) if b in GRADCLIP_BACKENDS],
        "methods": (args.timing or ["graph", "eager"]) if gpu else ["cpu"],
        "repeats": args.repeats or (5 if not gpu else 10 if args.quick else 30),
        "warmup": args.warmup if args.warmup is not None else 3 if gpu else 1,
        "ceiling_bytes": int((args.ceiling_gib or (4 if gpu else 1 / 16)) * 2 ** 30),
    }


def _source_commit() -> str:
    """The commit of the gradclip that ran ("+changes" when its tracked files differ from
    it), or "unknown" outside a git checkout: every figure says what code made it."""
    root = str(Path(gradclip.__file__).resolve().parent.parent)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+changes" if changed else "")


def _environment(device: torch.device) -> dict:
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m gradclip " + " ".join(sys.argv[1:]),
        "gradclip": f"{gradclip.__version__} ({_source_commit()})",
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
    # Floors only where the ceilings bound a call: see report.CPU_FLOOR_NOTE.
    floors = ceilings if device.type == "cuda" else None
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
                workloads.append(report.workload_entry(w, dtype, w.nbytes(DTYPES[dtype]), floors))
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
                if mode.key in ("amp-step", "amp-adamw", "adamw", "adamw-scaled"):
                    release()
        report.derive(row, backend.passes(mode.key), mode.floor_passes, buffers.nbytes, floors)
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


def run_checks(settings: dict, device: torch.device) -> list[dict]:
    """``--check``: one row per workload, dtype, gradclip backend and check (:mod:`.check`)."""
    backends = select_backends(settings["check_backends"], device)
    for b in backends:
        if b.skipped:
            print(f"check: {b.name} skipped ({b.skipped})")
    ready = [b.name for b in backends if not b.skipped]
    rows = []
    for w in settings["workloads"]:
        for dtype in settings["dtypes"]:
            buffers = Buffers(w, DTYPES[dtype], device)
            for name in ready:
                found = check.check_backend(buffers, name)
                rows += [{"workload": w.key, "dtype": dtype, "backend": name, **r} for r in found]
                print(_check_line(w.key, dtype, name, found), flush=True)
            del buffers
            release()
    return rows


def _check_line(workload: str, dtype: str, backend: str, found: list[dict]) -> str:
    failed = [r for r in found if not r["ok"]]
    head = f"{'FAIL' if failed else 'ok  '} check {workload} {dtype} {backend}: "
    if not failed:
        return head + ", ".join(r["check"] for r in found)
    return head + "; ".join(f"{r['check']}: {r['detail']}" for r in failed)


def checks_failed(result: dict) -> bool:
    """Whether checks were asked for and one failed, or none could run (nothing was verified)."""
    checks = result.get("checks")
    return checks is not None and (not checks or any(not r["ok"] for r in checks))


def check_summary(checks: list[dict]) -> str:
    failed = [r for r in checks if not r["ok"]]
    lines = [f"checks: {len(checks) - len(failed)} passed, {len(failed)} failed"
             + ("" if checks else ": FAIL, nothing was checked (no gradclip backend could run here)")]
    lines += [f"  FAIL {r['workload']} {r['dtype']} {r['backend']} {r['check']}: {r['detail']}"
              for r in failed]
    return "\n".join(lines)


def _write(result: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if "rows" in result:
        return report.write_all(result, out)
    json_path = out / "bench.json"
    json_path.write_text(json.dumps(result, indent=1))
    if "cpu_section" not in result:
        return [json_path]
    md_path = out / "bench.md"
    md_path.write_text(cpu_section.markdown(result))
    return [json_path, md_path]


def _render(result: dict) -> str:
    parts = []
    if "cpu_section" in result:
        parts.append(cpu_section.terminal_table(result))
    if "rows" in result:
        parts.append(report.terminal_table(result))
    if "checks" in result:
        parts.append(check_summary(result["checks"]))
    return "\n\n".join(parts)


def _measure_cpu_section(args: argparse.Namespace, progress: report.Progress | None) -> dict:
    env = _environment(torch.device("cpu"))
    workloads = _workloads(args, list(cpu_section.DEFAULT_WORKLOADS))
    print(f"CPU section: {', '.join(w.key for w in workloads)}; torch against gradclip, one thread")
    started = time.perf_counter()
    warmup = 1 if args.warmup is None else args.warmup
    section = cpu_section.measure(workloads, args.repeats or cpu_section.DEFAULT_SAMPLES, warmup, progress)
    env["seconds"] = round(time.perf_counter() - started, 1)
    return {"environment": env, "cpu_section": section}


def _measure_all(args: argparse.Namespace) -> dict:
    progress = None if args.no_progress else report.Progress()
    if args.cpu_section:
        return _measure_cpu_section(args, progress)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = _settings(args, device)
    env = _environment(device)
    banner = report.banner(env, settings)
    if args.check_only:
        banner = banner.splitlines()[0] + (
            f"\ncheck: {', '.join(w.key for w in settings['workloads'])}; dtypes "
            f"{','.join(settings['dtypes'])}; backends {','.join(settings['check_backends'])}")
    print(banner)
    started = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # One thread: on a busy machine idle threads spin and the run takes several times
        # longer. The CPU run checks the machinery; its numbers are not the point.
        torch.set_num_threads(1)
    try:
        result = {}
        if args.check or args.check_only:
            result["checks"] = run_checks(settings, device)
        if not args.check_only:
            result.update(measure(settings, device, progress))
    finally:
        torch.set_num_threads(threads)
    env["seconds"] = round(time.perf_counter() - started, 1)
    return {"environment": env, **result}


def run(args: argparse.Namespace) -> int:
    _validate(args, args.bench_parser)
    result = args.from_json if args.from_json is not None else _measure_all(args)
    if args.out:
        for path in _write(result, Path(args.out)):
            print(f"wrote {path}")
    print(_render(result))
    return 1 if checks_failed(result) else 0
