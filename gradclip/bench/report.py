"""Derived columns, the terminal table, bench.json, bench.md and the PNG plots."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path

from .timing import Ceilings


# Why a CPU run reports no floor: the ceilings measured there do not bound its calls (a
# "read" ceiling below the read+write one was seen; one thread's bandwidth depends on caches
# and prefetchers, not on the memory alone).
CPU_FLOOR_NOTE = ("% floor: not given on the CPU, where the measured ceilings do not bound a "
                  "call (read can come out below read+write)")


def workload_entry(workload, dtype: str, nbytes: int, ceilings: Ceilings | None) -> dict:
    """A workload's description in bench.json; its floors only with ``ceilings`` (a GPU run)."""
    return {"key": workload.key, "title": workload.title, "dtype": dtype,
            "tensors": workload.n_tensors, "params": workload.numel, "bytes": nbytes,
            "floor_1_read_us": ceilings.floor_us(1, 0, nbytes) if ceilings else None,
            "floor_3_passes_us": ceilings.floor_us(1, 1, nbytes) if ceilings else None}


def derive(row: dict, passes, floor_passes, nbytes: int, ceilings: Ceilings | None) -> None:
    """Add bytes moved and GB/s to a measured row (when ``passes`` is known), and the floor
    and % of it when ``ceilings`` bound the run (a GPU run; ``None`` on the CPU)."""
    if ceilings is not None:
        row["floor_us"] = ceilings.floor_us(*floor_passes, nbytes)
    if "median_us" not in row:
        return
    us = row["median_us"]
    if passes is not None:
        row["bytes_moved"] = (passes[0] + 2 * passes[1]) * nbytes
        row["gbs"] = row["bytes_moved"] / us / 1e3
    if ceilings is not None:
        row["pct_floor"] = 100.0 * row["floor_us"] / us


def add_speedups(rows: list[dict]) -> None:
    """``speedup``: torch's median in the same workload, dtype, mode and timing over this one."""
    torch_us = {_key(r): r["median_us"] for r in rows if r["backend"] == "torch" and "median_us" in r}
    for r in rows:
        base = torch_us.get(_key(r))
        if base is not None and "median_us" in r:
            r["speedup"] = base / r["median_us"]


def _key(row: dict) -> tuple:
    return row["workload"], row["dtype"], row["mode"], row["method"]


class Progress:
    """A one-line progress bar on a terminal; on a pipe, a line every tenth of the run."""

    def __init__(self, stream=None, width: int = 24):
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def start(self, total: int) -> None:
        self.total, self.done, self.t0, self.shown = max(total, 1), 0, time.perf_counter(), -1

    def step(self, label: str) -> None:
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        frac = self.done / self.total
        if self.tty:
            bar = "#" * int(frac * self.width)
            self.stream.write(f"\r[{bar:<{self.width}}] {self.done}/{self.total} "
                              f"{_clock(elapsed)} eta {_clock(eta)}  {label[:40]:<40}")
            self.stream.flush()
        elif int(frac * 10) > self.shown:
            self.shown = int(frac * 10)
            self.stream.write(f"  {100 * frac:3.0f}% {self.done}/{self.total} after {_clock(elapsed)}: {label}\n")
            self.stream.flush()
        self.done += 1

    def finish(self) -> None:
        elapsed = time.perf_counter() - self.t0
        end = "\r" + " " * (self.width + 80) + "\r" if self.tty else ""
        self.stream.write(f"{end}  timed {self.total} rows in {_clock(elapsed)}\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def banner(env: dict, settings: dict) -> str:
    lines = []
    if env["device"] == "cpu":
        lines.append("CPU RUN: no CUDA device here. These numbers time the CPU and say nothing "
                     "about GPU performance; run on a GPU for the real benchmark.")
    else:
        lines.append(f"GPU run: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}"
                     + (f", triton {env['triton']}" if "triton" in env else ""))
    lines.append("workloads: " + ", ".join(f"{w.key}" for w in settings["workloads"])
                 + f"; dtypes {','.join(settings['dtypes'])}; modes {','.join(settings['modes'])}; "
                 f"timing {','.join(settings['methods'])}; {settings['repeats']} repeats")
    return "\n".join(lines)


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _grouped(result: dict):
    """Per workload and dtype: its entry and, per (mode, backend), the rows by method."""
    groups: dict = {}
    for row in result["rows"]:
        by_row = groups.setdefault((row["workload"], row["dtype"]), {})
        by_row.setdefault((row["mode"], row["backend"]), {})[row["method"]] = row
    entries = {(w["key"], w["dtype"]): w for w in result["workloads"]}
    return [(entries[k], v) for k, v in groups.items()]


def _floors(entry: dict) -> str:
    if entry["floor_1_read_us"] is None:
        return ""
    return f"; floor 1 read {entry['floor_1_read_us']:.0f} us, 3 passes {entry['floor_3_passes_us']:.0f} us"


def terminal_table(result: dict) -> str:
    """One line per mode and backend: the first timing method with GB/s, % of floor and
    speedup; each further method (eager, host) with its time and speedup. A mode that has
    no row for the first method shows its first timed one there, named after the line."""
    env, c = result["environment"], result["ceilings"]
    methods = result["settings"]["methods"]
    first, others = methods[0], methods[1:]
    cpu = env["device"] == "cpu"
    out = [("CPU RUN: the numbers below time this CPU, not a GPU; they are not meaningful "
            "for GPU performance.") if cpu
           else f"{env['gpu']}, torch {env['torch']}, {env['date']}",
           f"gradclip {env.get('gradclip', '?')}",
           f"ceilings on {c['buffer_bytes'] / 2**30:.2f} GiB: read {c['read_gbs']:.0f} GB/s, "
           f"read/write {c['read_write_gbs']:.0f} GB/s, copy {c['copy_gbs']:.0f} GB/s"]
    if cpu:
        out.append(CPU_FLOOR_NOTE)
    head = f"{'mode':<13}{'backend':<10}{first + ' us':>10}{'GB/s':>7}{'%floor':>7}{'x torch':>8}"
    head += "".join(f"{m + ' us':>11}{'x torch':>8}" for m in others)
    for entry, rows in _grouped(result):
        out += ["", f"{entry['title']} {entry['dtype']}: {entry['tensors']} tensors, "
                f"{entry['params'] / 1e6:.1f}M params, {entry['bytes'] / 1e6:.0f} MB" + _floors(entry), head]
        for (mode, backend), by_method in rows.items():
            out.append(_terminal_line(mode, backend, by_method, methods))
    out += ["", SPEEDUP_NOTE]
    if any(mode in AGC_MODES for _, rows in _grouped(result) for mode, _ in rows):
        out.append(AGC_NOTE)
    skipped = [b for b in result["backends"] if b["skipped"]]
    if skipped:
        out += ["", "skipped: " + "; ".join(f"{b['name']} ({b['skipped']})" for b in skipped)]
    if "seconds" in env:
        out.append(f"run took {env['seconds']:.0f} s")
    return "\n".join(out)


SPEEDUP_NOTE = ("x torch = torch's time / this path's time, for the same mode and timing: "
                "above 1 this path is faster than torch, below 1 slower.")
AGC_MODES = ("agc", "agc-all")
AGC_NOTE = ("agc, agc-all: torch has no adaptive clipping; the rows named timm time timm's "
            "adaptive_clip_grad, the baseline of those modes.")


def shown_backend(backend: str, mode: str) -> str:
    """The name a row goes by: torch's row of the AGC modes times timm's function."""
    return "timm" if backend == "torch" and mode in AGC_MODES else backend


def _terminal_line(mode: str, backend: str, by_method: dict, methods: list[str]) -> str:
    shown = [m for m in methods if m in by_method]
    main_method, tag = shown[0], ""
    if main_method != methods[0]:  # an eager-only mode: its first timed method comes first
        tag = f" ({main_method})"
    main = by_method[main_method]
    line = f"{mode:<13}{shown_backend(backend, mode):<10}"
    if "median_us" in main:
        line += (f"{main['median_us']:>10.1f}{_fmt(main.get('gbs'), '.0f'):>7}"
                 f"{_fmt(main.get('pct_floor'), '.1f'):>7}{_fmt(main.get('speedup'), '.2f'):>8}")
    else:
        line += f"{'n/a':>10}{'':>22}"
    for m in shown[1:]:
        other = by_method[m]
        line += f"{_fmt(other.get('median_us'), '.1f', 'n/a'):>11}{_fmt(other.get('speedup'), '.2f'):>8}"
    errors = [by_method[m]["error"] for m in shown if "error" in by_method[m]]
    return line + tag + (f"  {errors[0][:60]}" if errors else "")


# The columns of torch's baseline in bench.md: (header, mode, method).
_BASELINE = (
    ("torch clip, graph", "clip", "graph"),
    ("torch clip when no clip needed, graph", "no-clip", "graph"),
    ("torch `_foreach_norm` alone", "norm", "graph"),
    ("torch clip, eager", "clip", "eager"),
    ("torch unscale+clip, graph", "amp", "graph"),
    ("torch unscale+clip, eager", "amp", "eager"),
    ("fused AdamW step, eager", "adamw", "eager"),
)


def markdown(result: dict) -> str:
    env = result["environment"]
    c = result["ceilings"]
    methods = result["settings"]["methods"]
    where = ("CPU run (numbers time the CPU, not meaningful for GPUs)" if env["device"] == "cpu"
             else f"{env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}"
             + (f", triton {env['triton']}" if "triton" in env else ""))
    out = [f"# gradclip bench: {where}", "",
           f"Run {env['date']}: `{env['command']}`, gradclip {env.get('gradclip', '?')}.", "",
           f"Ceilings on a flat {c['buffer_bytes'] / 2**30:.2f} GiB fp32 buffer: `vector_norm` read "
           f"{c['read_gbs']:.0f} GB/s, `mul_` read+write {c['read_write_gbs']:.0f} GB/s, "
           f"`copy_` {c['copy_gbs']:.0f} GB/s.", "",
           "Times in microseconds, median of per-call samples; " +
           ("graph = CUDA graph replay (device time), eager = plain calls from an idle device "
            "(host overhead included), host = host time per call queued back to back."
            if env["device"] == "cuda" else "CPU perf_counter.") +
           " GB/s counts the bytes each path moves; % floor = floor / time; x torch = torch's time / this time.",
           ""]
    if any(r["mode"] in AGC_MODES for r in result["rows"]):
        out += [AGC_NOTE, ""]
    if env["device"] == "cpu":
        out += [CPU_FLOOR_NOTE + ".", ""]
    cols = [m for m in ("graph", "eager", "host", "cpu") if m in methods]
    header = "| workload | dtype | mode | backend | " + " | ".join(
        f"{m} us | GB/s | % floor | x torch" for m in cols) + " |"
    out += [header, "|" + "---|" * (4 + 4 * len(cols))]
    for entry, rows in _grouped(result):
        for (mode, backend), by_method in rows.items():
            cells = []
            for m in cols:
                r = by_method.get(m)
                if r is None or "median_us" not in r:
                    cells += ["–", "", "", ""]
                else:
                    cells += [f"{r['median_us']:.1f}", _fmt(r.get("gbs"), ".0f", ""),
                              _fmt(r.get("pct_floor"), ".1f", ""), _fmt(r.get("speedup"), ".2f", "")]
            out.append(f"| {entry['title']} | {entry['dtype']} | {mode} | "
                       f"{shown_backend(backend, mode)} | " + " | ".join(cells) + " |")
    out += ["", "## torch baseline (docs/performance.md's columns, and no-clip graph and AMP eager)", ""]
    out.append("| workload (shapes) | tensors | params | floor 1 read | floor 3 passes | "
               + " | ".join(h for h, _, _ in _BASELINE) + " |")
    out.append("|" + "---|" * (5 + len(_BASELINE)))
    torch_rows = {(r["workload"], r["dtype"], r["mode"], r["method"]): r
                  for r in result["rows"] if r["backend"] == "torch" and "median_us" in r}
    for entry in result["workloads"]:
        cells = []
        for _, mode, method in _BASELINE:
            method = method if method in methods else methods[0]
            r = torch_rows.get((entry["key"], entry["dtype"], mode, method))
            cells.append(f"{r['median_us']:.0f}" if r else "–")
        floors = [_fmt(entry["floor_1_read_us"], ".0f", "–"), _fmt(entry["floor_3_passes_us"], ".0f", "–")]
        out.append(f"| {entry['title']} {entry['dtype']} | {entry['tensors']} | {_params(entry['params'])} | "
                   + " | ".join(floors + cells) + " |")
    notes = [b for b in result["backends"] if b["skipped"] or b["note"]]
    if notes:
        out += ["", "Backends:", ""]
        out += [f"- {b['name']}: " + (f"skipped, {b['skipped']}" if b["skipped"] else b["note"]) for b in notes]
    errors = [r for r in result["rows"] if "error" in r]
    if errors:
        out += ["", "Rows not timed:", ""]
        out += [f"- {r['title']} {r['dtype']} {r['mode']} {r['backend']} {r['method']}: {r['error']}" for r in errors]
    return "\n".join(out) + "\n"


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e8 else f"{n / 1e6:.0f}M"


def plots(result: dict, out: Path) -> list[Path]:
    """bench.png: % of floor per mode and backend, one panel per workload and dtype (graph
    timing where there is one; on the CPU, which has no floor, the times on a log scale);
    bench-eager.png: eager times, log scale."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed, no plots (pip install matplotlib)", file=sys.stderr)
        return []
    groups = _grouped(result)
    backends = [b["name"] for b in result["backends"] if not b["skipped"]]
    methods = result["settings"]["methods"]
    written = []
    main = (("bench.png", "median_us", "time, us (log scale, lower is better)", None)
            if result["environment"]["device"] == "cpu"
            else ("bench.png", "pct_floor", "% of the memory floor (higher is better)", None))
    for name, value, ylabel, only in (
            main, ("bench-eager.png", "median_us", "eager time, us (log scale, lower is better)", "eager")):
        if only and only not in methods:
            continue
        cols = min(4, len(groups))
        rows_n = -(-len(groups) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
        for ax, (entry, rows) in zip(axes.flat, groups):
            modes = list(dict.fromkeys(m for m, _ in rows))
            width = 0.8 / max(len(backends), 1)
            for i, backend in enumerate(backends):
                heights = []
                for mode in modes:
                    by_method = rows.get((mode, backend), {})
                    r = by_method.get(only) if only else next(
                        (by_method[m] for m in methods if m in by_method and "median_us" in by_method[m]), None)
                    heights.append(r.get(value, 0) if r else 0)
                label = backend
                if backend == "torch" and any(m in AGC_MODES for m in modes):
                    label = "torch (timm for agc)"
                ax.bar([j + i * width for j in range(len(modes))], heights, width, label=label)
            ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(modes))])
            ax.set_xticklabels(modes, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{entry['title']} {entry['dtype']}", fontsize=9)
            if value == "median_us":
                ax.set_yscale("log")
            else:
                ax.axhline(100, color="gray", lw=0.8, ls="--")
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        axes.flat[0].set_ylabel(ylabel, fontsize=8)
        axes.flat[0].legend(fontsize=7)
        env = result["environment"]
        title = (("CPU run (not meaningful for GPUs)" if env["device"] == "cpu" else env["gpu"])
                 + f", torch {env['torch']}, gradclip {env.get('gradclip', '?')}, {env['date'][:10]}")
        # Wrapped to the figure's width: a one-panel figure is narrower than the title.
        fig.suptitle(textwrap.fill(title, width=int(4.2 * cols * 12)), fontsize=10)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_all(result: dict, out: Path) -> list[Path]:
    json_path, md_path = out / "bench.json", out / "bench.md"
    json_path.write_text(json.dumps(result, indent=1))
    md_path.write_text(markdown(result))
    return [json_path, md_path] + plots(result, out)
