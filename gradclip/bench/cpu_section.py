"""``python -m gradclip bench --cpu-section``: gradclip against torch on the CPU, side by side.

``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (torch's defaults) against
``gradclip.clip_grad_norm_(params, max_norm)`` (``backend="auto"``, the reference backend on
the CPU), in one run, on one thread, on the same gradients: ``no-clip`` (norm 0.5,
``max_norm`` 1: nothing to clip) and ``clip`` (norm 4: every call scales). The two are timed
call by call in turn (torch, gradclip, gradclip, torch, ...), so that load from other work on
the machine falls on both alike; each figure is the median of its samples.

The targets, gradclip's time over torch's at most: on small lists (6 and 28 tensors, where a
call is host overhead) and on ResNet-50's 161 tensors, no slower than torch (1.0) in either
mode; where reading the gradients dominates, 0.6 when there is nothing to clip (one read
against torch's three passes), and 1.1 when clipping on 2000 tiny tensors.
"""

from __future__ import annotations

import statistics

import torch

import gradclip
from gradclip.backends import dispatch

from .paths import MODES, Buffers
from .timing import CacheEvictor, time_call
from .workloads import Workload, get_workload

DEFAULT_WORKLOADS = ("mlp-6", "tiny-gpt-28", "resnet50", "2000x4096")
DEFAULT_SAMPLES = 15
SECTION_MODES = ("no-clip", "clip")
# gradclip's time over torch's, at most, per workload and mode (other workloads: DEFAULT_TARGETS).
TARGETS = {("mlp-6", "no-clip"): 1.0, ("mlp-6", "clip"): 1.0,
           ("tiny-gpt-28", "no-clip"): 1.0, ("tiny-gpt-28", "clip"): 1.0,
           ("resnet50", "no-clip"): 0.6, ("resnet50", "clip"): 1.0}
DEFAULT_TARGETS = {"no-clip": 0.6, "clip": 1.1}


def target(workload: str, mode: str) -> float:
    return TARGETS.get((workload, mode), DEFAULT_TARGETS[mode])


def default_workloads() -> list[Workload]:
    return [get_workload(k) for k in DEFAULT_WORKLOADS]


def measure(workloads: list[Workload], repeats: int, warmup: int, progress=None) -> dict:
    """Time both on every workload, one thread, ``repeats`` samples each after ``warmup``
    untimed calls each; returns the ``cpu_section`` of bench.json."""
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        backend = dispatch.resolve("auto", cpu).name
        evict = CacheEvictor(cpu)
        if progress:
            progress.start(len(workloads) * len(SECTION_MODES))
        rows = []
        for w in workloads:
            buffers = Buffers(w, torch.float32, cpu)
            for mode in SECTION_MODES:
                if progress:
                    progress.step(f"{w.key} {mode}")
                rows.append(_time_mode(buffers, mode, repeats, warmup, evict))
            del buffers
    finally:
        torch.set_num_threads(threads)
    if progress:
        progress.finish()
    return {"backend": backend, "repeats": repeats, "threads": 1, "rows": rows}


def _time_mode(b: Buffers, mode: str, repeats: int, warmup: int, evict) -> dict:
    b.load(MODES[mode])
    calls = {
        "torch": lambda: torch.nn.utils.clip_grad_norm_(b.params, b.max_norm),
        "gradclip": lambda: gradclip.clip_grad_norm_(b.params, b.max_norm),
    }
    restore = b.reset() or (lambda: None)
    norms = {}
    for name, call in calls.items():  # one untimed call each: the norms they return
        restore()
        norms[name] = float(call())
    for _ in range(warmup):
        for call in calls.values():
            restore()
            call()
    samples = {name: [] for name in calls}
    for i in range(repeats):
        for name in list(calls) if i % 2 == 0 else list(calls)[::-1]:
            m = time_call(calls[name], method="cpu", device=b.device, repeats=1, warmup=0,
                          reset=restore, evict=evict)
            samples[name].append(m.median_us)
    torch_us = statistics.median(samples["torch"])
    ours_us = statistics.median(samples["gradclip"])
    ratio = ours_us / torch_us
    goal = target(b.workload.key, mode)
    return {"workload": b.workload.key, "title": b.workload.title, "tensors": b.workload.n_tensors,
            "params": b.workload.numel, "mode": mode, "torch_us": torch_us, "gradclip_us": ours_us,
            "ratio": ratio, "target": goal, "met": ratio <= goal,
            "torch_norm": norms["torch"], "gradclip_norm": norms["gradclip"],
            "samples_us": samples}


def _norms_differ(row: dict) -> bool:
    a, b = row["torch_norm"], row["gradclip_norm"]
    return abs(a - b) > 1e-4 * max(abs(a), abs(b))


def _header(result: dict) -> list[str]:
    env, section = result["environment"], result["cpu_section"]
    return [f"CPU section, {env['date']}: torch {env['torch']}, gradclip "
            f"{env.get('gradclip', '?')}, {env.get('host_cpu', '?')}, "
            f"{section['threads']} thread, fp32 gradients",
            "torch = torch.nn.utils.clip_grad_norm_(params, max_norm); gradclip = "
            f"gradclip.clip_grad_norm_(params, max_norm), backend auto -> {section['backend']!r}",
            f"median of {section['repeats']} samples each, torch and gradclip timed call by call in "
            "turn; no-clip: norm 0.5, max_norm 1; clip: norm 4, max_norm 1"]


def _cells(row: dict) -> list[str]:
    return [f"{row['title']} ({row['tensors']} tensors, {row['params'] / 1e6:.2f}M)", row["mode"],
            f"{row['torch_us']:.1f}", f"{row['gradclip_us']:.1f}", f"{row['ratio']:.3f}x",
            f"<= {row['target']:.1f}x", "met" if row["met"] else "missed"]


_COLUMNS = ("workload", "mode", "torch us", "gradclip us", "gradclip/torch", "target", "")


def terminal_table(result: dict) -> str:
    rows = result["cpu_section"]["rows"]
    cells = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = _header(result) + [""]
    for line in cells:
        lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                               for j, (c, w) in enumerate(zip(line, widths))).rstrip())
    lines += _warnings(rows)
    return "\n".join(lines)


def markdown(result: dict) -> str:
    env = result["environment"]
    out = ["# gradclip bench: CPU section", "", f"Run `{env['command']}`.", ""]
    out += [line + "  " for line in _header(result)] + [""]
    out.append("| " + " | ".join(c or "verdict" for c in _COLUMNS) + " |")
    out.append("|" + "---|" * len(_COLUMNS))
    out += ["| " + " | ".join(_cells(r)) + " |" for r in result["cpu_section"]["rows"]]
    warnings = _warnings(result["cpu_section"]["rows"])
    return "\n".join(out + ([""] + warnings if warnings else [])) + "\n"


def _warnings(rows: list[dict]) -> list[str]:
    return [f"WARNING: {r['title']} {r['mode']}: torch's norm {r['torch_norm']!r} and gradclip's "
            f"{r['gradclip_norm']!r} differ" for r in rows if _norms_differ(r)]
