"""Derived columns, the terminal table, bench.json, bench.md and the PNG plots."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from .timing import Ceilings


def workload_entry(workload, dtype: str, nbytes: int, ceilings: Ceilings) -> dict:
    return {"key": workload.key, "title": workload.title, "dtype": dtype,
            "tensors": workload.n_tensors, "params": workload.numel, "bytes": nbytes,
            "floor_1_read_us": ceilings.floor_us(1, 0, nbytes),
            "floor_3_passes_us": ceilings.floor_us(1, 1, nbytes)}


def derive(row: dict, passes, floor_passes, nbytes: int, ceilings: Ceilings) -> None:
    """Add bytes moved, GB/s, the floor and % of it to a measured row."""
    row["floor_us"] = ceilings.floor_us(*floor_passes, nbytes)
    if "median_us" not in row:
        return
    us = row["median_us"]
    if passes is not None:
        row["bytes_moved"] = (passes[0] + 2 * passes[1]) * nbytes
        row["gbs"] = row["bytes_moved"] / us / 1e3
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


def terminal_table(result: dict) -> str:
    """One line per mode and backend: the first timing method with GB/s, % of floor and
    speedup; the second (eager) with its time and speedup."""
    env, c = result["environment"], result["ceilings"]
    methods = result["settings"]["methods"]
    first, second = methods[0], (methods[1] if len(methods) > 1 else None)
    out = [("CPU RUN: the numbers below time this CPU, not a GPU; they are not meaningful "
            "for GPU performance.") if env["device"] == "cpu"
           else f"{env['gpu']}, torch {env['torch']}, {env['date']}",
           f"ceilings on {c['buffer_bytes'] / 2**30:.2f} GiB: read {c['read_gbs']:.0f} GB/s, "
           f"read/write {c['read_write_gbs']:.0f} GB/s, copy {c['copy_gbs']:.0f} GB/s"]
    head = f"{'mode':<10}{'backend':<10}{first + ' us':>10}{'GB/s':>7}{'%floor':>7}{'x torch':>8}"
    if second:
        head += f"{second + ' us':>11}{'x torch':>8}"
    for entry, rows in _grouped(result):
        out += ["", f"{entry['title']} {entry['dtype']}: {entry['tensors']} tensors, "
                f"{entry['params'] / 1e6:.1f}M params, {entry['bytes'] / 1e6:.0f} MB; floor 1 read "
                f"{entry['floor_1_read_us']:.0f} us, 3 passes {entry['floor_3_passes_us']:.0f} us", head]
        for (mode, backend), by_method in rows.items():
            main, other, tag = by_method.get(first), by_method.get(second), ""
            if main is None:  # a mode timed with the second method only (eager)
                main, other, tag = other, None, f" ({second})"
            line = f"{mode:<10}{backend:<10}"
            if "median_us" in main:
                line += (f"{main['median_us']:>10.1f}{_fmt(main.get('gbs'), '.0f'):>7}"
                         f"{_fmt(main.get('pct_floor'), '.1f'):>7}{_fmt(main.get('speedup'), '.2f'):>8}")
            else:
                line += f"{'n/a':>10}{'':>22}"
            if other is not None:
                line += f"{_fmt(other.get('median_us'), '.1f', 'n/a'):>11}{_fmt(other.get('speedup'), '.2f'):>8}"
            errors = [r["error"] for r in (main, other) if r is not None and "error" in r]
            out.append(line + tag + (f"  {errors[0][:60]}" if errors else ""))
    skipped = [b for b in result["backends"] if b["skipped"]]
    if skipped:
        out += ["", "skipped: " + "; ".join(f"{b['name']} ({b['skipped']})" for b in skipped)]
    if "seconds" in env:
        out.append(f"run took {env['seconds']:.0f} s")
    return "\n".join(out)


# docs/performance.md's baseline columns: (header, mode, method, backend).
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
           f"Run {env['date']}: `{env['command']}`.", "",
           f"Ceilings on a flat {c['buffer_bytes'] / 2**30:.2f} GiB fp32 buffer: `vector_norm` read "
           f"{c['read_gbs']:.0f} GB/s, `mul_` read+write {c['read_write_gbs']:.0f} GB/s, "
           f"`copy_` {c['copy_gbs']:.0f} GB/s.", "",
           "Times in microseconds, median of per-call samples; " +
           ("graph = CUDA graph replay (device time), eager = plain calls from an idle device "
            "(host overhead included)." if "graph" in methods else "CPU perf_counter.") +
           " GB/s counts the bytes each path moves; % floor = floor / time; x torch = torch's time / this time.",
           ""]
    cols = [m for m in ("graph", "eager", "cpu") if m in methods]
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
            out.append(f"| {entry['title']} | {entry['dtype']} | {mode} | {backend} | " + " | ".join(cells) + " |")
    out += ["", "## torch baseline (docs/performance.md's columns)", ""]
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
        out.append(f"| {entry['title']} {entry['dtype']} | {entry['tensors']} | {_params(entry['params'])} | "
                   f"{entry['floor_1_read_us']:.0f} | {entry['floor_3_passes_us']:.0f} | " + " | ".join(cells) + " |")
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
    timing where there is one); bench-eager.png: eager times, log scale."""
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
    for name, value, ylabel, only in (
            ("bench.png", "pct_floor", "% of the memory floor (higher is better)", None),
            ("bench-eager.png", "median_us", "eager time, us (log scale, lower is better)", "eager")):
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
                ax.bar([j + i * width for j in range(len(modes))], heights, width, label=backend)
            ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(modes))])
            ax.set_xticklabels(modes, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{entry['title']} {entry['dtype']}", fontsize=9)
            if only:
                ax.set_yscale("log")
            else:
                ax.axhline(100, color="gray", lw=0.8, ls="--")
        for ax in list(axes.flat)[len(groups):]:
            ax.axis("off")
        axes.flat[0].set_ylabel(ylabel, fontsize=8)
        axes.flat[0].legend(fontsize=7)
        env = result["environment"]
        fig.suptitle(("CPU run (not meaningful for GPUs)" if env["device"] == "cpu" else env["gpu"])
                     + f", torch {env['torch']}, {env['date'][:10]}", fontsize=10)
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
