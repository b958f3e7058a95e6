"""``python -m gradclip demo``: why clipping matters, in one short training run.

A small character-level LSTM learns the text that ships with gradclip
(``gradclip/data/corpus.txt``), twice, from the same initialisation and on the same batches,
with plain SGD at an aggressive learning rate:

- without clipping: the first steps, taken where the loss surface is steep, have gradient
  norms in the tens; at this learning rate each such step throws the weights far away and
  the model never recovers (or turns to NaN);
- with :class:`gradclip.ClippedOptimizer` (``max_norm=1``): those few steps are scaled down
  to a step of norm 1, every other step is left alone, and the loss falls steadily.

Then a third run, clipped as the second and half as long, is fed a few bad batches (their loss multiplied
by 50, as a corrupted batch or a loss-scaling bug would) and, from 60% of the run on, a loss
that stays 10 times larger (a new loss weighting or data mixture: a new level, not a bad
batch). It is guarded by :class:`gradclip.SpikeGuard`, which skips the bad batches, skips
``max_consecutive`` steps of the new level, then accepts it and trains on; it prints which
steps it flagged, skipped and where it accepted the new level, and plots the norm history
with all of them marked.

Both runs go through ``ClippedOptimizer``: the unclipped one with ``max_norm=inf``, which
only records the norm. On a GPU the runs use AMP (float16 autocast) with
``gradclip.GradScaler``. The summary table goes to the terminal and ``summary.txt``; the
per-step numbers to ``summary.json``; the plot (loss and pre-clip norm per step, clip events
marked) to ``demo.png``, the spike-guarded run's to ``spike_guard.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

import gradclip
from gradclip.step_state import COUNTER_NAMES

HIDDEN, EMBED, BATCH, SEQ = 128, 48, 32, 64
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_MAX_NORM = 300, 25.0, 1.0
# The spike-guarded run: where its bad batches fall (fractions of the run), how much larger
# their loss is, where the loss moves to a lasting new level and by how much, and the guard.
BAD_BATCH_AT, BAD_BATCH_FACTOR = (0.3, 0.45, 0.85), 50.0
LEVEL_AT, LEVEL_FACTOR = 0.6, 10.0
GUARD_FACTOR, GUARD_WINDOW, GUARD_WARMUP, GUARD_CONSECUTIVE = 3.0, 25, 10, 5
SPIKE, SKIPPED, REGIME = (COUNTER_NAMES.index(name)
                          for name in ("spike_steps", "skipped_steps", "regime_changes"))


def load_corpus() -> str:
    return resources.files("gradclip").joinpath("data/corpus.txt").read_text(encoding="utf-8")


class CharLSTM(nn.Module):
    """Embedding, one LSTM layer, a linear read-out over the characters."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, EMBED)
        self.lstm = nn.LSTM(EMBED, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, vocab)

    def forward(self, x: torch.Tensor, state=None):
        h, state = self.lstm(self.embed(x), state)
        return self.head(h), state


class Batches:
    """Random windows of the corpus; the same sequence for every run with the same seed."""

    def __init__(self, ids: torch.Tensor, seed: int, device: torch.device):
        self.ids, self.device = ids, device
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(SEQ + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.ids) - SEQ - 1, (BATCH, 1), generator=self.generator)
        window = self.ids[starts + self.offsets].to(self.device)
        return window[:, :-1], window[:, 1:]


def train(model: nn.Module, batches: Batches, steps: int, lr: float, max_norm: float,
          device: torch.device, backend: str, progress, amp: bool, spike_guard=None,
          bad_steps: tuple[int, ...] = (), level_from: int | None = None) -> dict:
    """SGD through a ClippedOptimizer (with float16 autocast and gradclip.GradScaler when
    ``amp``); returns per-step losses, norms and the counters. ``bad_steps`` (0-based)
    get their loss multiplied by ``BAD_BATCH_FACTOR``, and every step from ``level_from``
    on by ``LEVEL_FACTOR``; with a ``spike_guard`` the steps it flagged, skipped and
    accepted a new level at are returned too (1-based)."""
    optimizer = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=lr),
                                          max_norm=max_norm, backend=backend,
                                          spike_guard=spike_guard)
    scaler = gradclip.GradScaler(device.type) if amp else None
    vocab = model.head.out_features
    losses, norms, counters = [], [], []
    started = time.perf_counter()
    for step in range(steps):
        x, y = batches.next()
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits, _ = model(x)
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        if step in bad_steps:
            loss = loss * BAD_BATCH_FACTOR
        if level_from is not None and step >= level_from:
            loss = loss * LEVEL_FACTOR
        optimizer.zero_grad()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        # Device tensors, read once at the end: no host synchronisation per step. last_norm
        # is updated in place: keep a copy of each step's.
        losses.append(loss.detach())
        norms.append(optimizer.last_norm.detach().clone())
        counters.append(optimizer.counters.clone())
        progress(step + 1)
    run = {
        "loss": torch.stack(losses).float().cpu().tolist(),
        "norm": torch.stack(norms).cpu().tolist(),
        "seconds": time.perf_counter() - started,
        **optimizer.stats(),
    }
    if spike_guard is not None:
        # Steps whose counter moved: read once, at the end.
        moved = torch.diff(torch.stack(counters).cpu(), dim=0, prepend=torch.zeros(1, len(COUNTER_NAMES), dtype=torch.int64))
        run["flagged"] = [i + 1 for i in moved[:, SPIKE].nonzero().flatten().tolist()]
        run["skipped"] = [i + 1 for i in moved[:, SKIPPED].nonzero().flatten().tolist()]
        run["new_level"] = [i + 1 for i in moved[:, REGIME].nonzero().flatten().tolist()]
        run["bad"] = [i + 1 for i in bad_steps]
        run["level_from"] = None if level_from is None else level_from + 1
    return run


@torch.no_grad()
def sample(model: nn.Module, chars: list[str], prompt: str, length: int, device: torch.device,
           seed: int) -> str:
    """Text the model writes after ``prompt`` (temperature 0.7, fixed seed)."""
    index = {c: i for i, c in enumerate(chars)}
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor([[index[c] for c in prompt]], device=device)
    logits, state = model(x)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float() / 0.7, dim=-1)
        if not torch.isfinite(probs).all():
            return "".join(out) + " [the model outputs NaN]"
        nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(chars[nxt.item()])
        logits, state = model(nxt.view(1, 1), state)
    return "".join(out)


def summarise(name: str, run: dict) -> dict:
    tail = run["loss"][-max(1, len(run["loss"]) // 10):]
    finite = [n for n in run["norm"] if math.isfinite(n)]
    return {
        "run": name,
        "final loss": sum(tail) / len(tail),
        "max pre-clip norm": max(finite) if finite else math.nan,
        "clip rate": run["clipped_steps"] / max(run["steps"], 1),
        "non-finite steps": run["nonfinite_steps"],
        "seconds": run["seconds"],
    }


def table(rows: list[dict]) -> str:
    lines = [f"{'run':<26}{'final loss':>11}{'max pre-clip norm':>19}{'clip rate':>11}"
             f"{'non-finite steps':>18}{'seconds':>9}"]
    for r in rows:
        lines.append(f"{r['run']:<26}{r['final loss']:>11.3f}{r['max pre-clip norm']:>19.2f}"
                     f"{100 * r['clip rate']:>10.1f}%{r['non-finite steps']:>18d}{r['seconds']:>9.1f}")
    return "\n".join(lines)


def plot(runs: dict[str, dict], max_norm: float, path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    colours = {"without clipping": "tab:red", "with ClippedOptimizer": "tab:blue"}
    for name, run in runs.items():
        steps = range(1, len(run["loss"]) + 1)
        top.plot(steps, run["loss"], lw=0.9, color=colours.get(name), label=name)
        bottom.plot(steps, run["norm"], lw=0.9, color=colours.get(name), label=name)
        bad = [i + 1 for i, (l, n) in enumerate(zip(run["loss"], run["norm"]))
               if not (math.isfinite(l) and math.isfinite(n))]
        if bad:
            top.plot(bad, [top.get_ylim()[1]] * len(bad), "x", color=colours.get(name),
                     label=f"{name}: non-finite")
    clipped = runs.get("with ClippedOptimizer")
    if clipped:
        events = [(i + 1, n) for i, n in enumerate(clipped["norm"]) if n > max_norm]
        if events:
            bottom.scatter(*zip(*events), s=14, color="black", zorder=3,
                           label=f"clip events ({len(events)})")
    bottom.axhline(max_norm, color="gray", ls="--", lw=0.8, label=f"max_norm = {max_norm:g}")
    top.set_ylabel("training loss (nats/char)")
    top.set_yscale("log")
    bottom.set_ylabel("pre-clip gradient norm")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_spike_guard(run: dict, path: Path, title: str) -> bool:
    """The guarded run's pre-clip norm per step, with the bad batches, the skipped steps,
    the start of the new level and where the guard accepted it marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.8))
    steps = range(1, len(run["norm"]) + 1)
    ax.plot(steps, run["norm"], lw=0.9, color="tab:blue", label="pre-clip gradient norm")
    if run.get("level_from"):
        ax.axvspan(run["level_from"], len(run["norm"]), color="tab:orange", alpha=0.12,
                   label=f"loss x{LEVEL_FACTOR:g} from step {run['level_from']} (a new level)")
    marks = (("bad", "x", "tab:red", "bad batch injected"),
             ("skipped", "o", "black", "skipped by SpikeGuard"),
             ("new_level", "^", "tab:green",
              f"new level accepted after {GUARD_CONSECUTIVE} spikes in a row"))
    for key, marker, colour, label in marks:
        where = run.get(key) or []
        if where:
            ax.scatter(where, [run["norm"][s - 1] for s in where], marker=marker, s=40,
                       **({"facecolors": "none", "edgecolors": colour} if marker == "o"
                          else {"color": colour}),
                       zorder=3, label=f"{label} ({len(where)})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("pre-clip gradient norm")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def spike_guarded_run(args, ids, initial, vocab: int, device: torch.device) -> dict:
    """The clipped run again, for half as many steps (the norms have settled by then; the
    demo stays short), fed a few bad batches and, from ``LEVEL_AT`` on, a lasting new
    level of the loss, with a SpikeGuard that skips the bad batches and takes the level."""
    steps = (args.steps + 1) // 2
    bad = tuple(sorted({int(f * steps) for f in BAD_BATCH_AT} - set(range(GUARD_WARMUP))))
    model = CharLSTM(vocab).to(device)
    model.load_state_dict(initial)
    guard = gradclip.SpikeGuard(factor=GUARD_FACTOR, window=GUARD_WINDOW, warmup=GUARD_WARMUP,
                                action="skip", max_consecutive=GUARD_CONSECUTIVE)
    return train(model, Batches(ids, args.seed + 1, device), steps, args.lr, args.max_norm,
                 device, args.backend, _progress("  with SpikeGuard", steps),
                 amp=device.type == "cuda", spike_guard=guard, bad_steps=bad,
                 level_from=int(LEVEL_AT * steps))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n", 1)[1]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="gradclip-demo", metavar="DIR",
                        help="where demo.png, summary.txt and summary.json go (default ./gradclip-demo)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                        help=f"training steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"SGD learning rate, aggressive on purpose (default {DEFAULT_LR:g})")
    parser.add_argument("--max-norm", type=float, default=DEFAULT_MAX_NORM,
                        help=f"clipping threshold of the clipped run (default {DEFAULT_MAX_NORM:g})")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (default 0)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available (with AMP), else cpu")
    parser.add_argument("--backend", default="auto", help="gradclip backend (default auto)")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1:
        print(f"demo: --steps must be at least 1, got {args.steps}")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # A small LSTM runs its time steps one after another: a second thread mostly waits,
        # and on a busy machine it slows the run down several times.
        torch.set_num_threads(1)
    try:
        return _demo(args, device)
    finally:
        torch.set_num_threads(threads)


def _demo(args: argparse.Namespace, device: torch.device) -> int:
    text = load_corpus()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    torch.manual_seed(args.seed)
    initial = CharLSTM(len(chars)).state_dict()
    where = f"{device.type}" + (" with AMP (float16 autocast, gradclip.GradScaler)" if device.type == "cuda" else "")
    print(f"gradclip demo: character LSTM ({sum(v.numel() for v in initial.values()):,} parameters) "
          f"on {len(text):,} characters of the shipped text, {args.steps} steps of SGD at "
          f"lr {args.lr:g}, on {where}")
    runs, rows, models = {}, [], {}
    for name, max_norm in (("without clipping", math.inf), ("with ClippedOptimizer", args.max_norm)):
        model = CharLSTM(len(chars)).to(device)
        model.load_state_dict(initial)
        batches = Batches(ids, args.seed + 1, device)
        label = f"  {name:<22}"
        runs[name] = train(model, batches, args.steps, args.lr, max_norm, device, args.backend,
                           _progress(label, args.steps), amp=device.type == "cuda")
        rows.append(summarise(name, runs[name]))
        models[name] = model
    summary = table(rows)
    print()
    print(summary)
    prompt = "The "
    samples = {name: sample(model, chars, prompt, 70, device, args.seed) for name, model in models.items()}
    print()
    for name, text_out in samples.items():
        print(f"{name:<22} writes: {prompt}{text_out!r}"[:110])
    print()
    guarded = spike_guarded_run(args, ids, initial, len(chars), device)
    guard_line = (f"SpikeGuard(factor={GUARD_FACTOR:g}, window={GUARD_WINDOW}, warmup={GUARD_WARMUP}, "
                  f"max_consecutive={GUARD_CONSECUTIVE}): bad batches (loss x{BAD_BATCH_FACTOR:g}) "
                  f"at steps {guarded['bad']}, loss x{LEVEL_FACTOR:g} from step "
                  f"{guarded['level_from']}; flagged {guarded['flagged']}, skipped "
                  f"{guarded['skipped']}, new level accepted at {guarded['new_level']}; final loss "
                  f"{summarise('guarded', guarded)['final loss']:.3f}")
    print(guard_line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.txt").write_text(summary + "\n" + guard_line + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"device": device.type, "steps": args.steps, "lr": args.lr, "max_norm": args.max_norm,
         "seed": args.seed, "summary": rows, "samples": samples, "runs": runs,
         "spike_guard": guarded}, indent=1))
    title = (f"char LSTM, SGD lr {args.lr:g}, {args.steps} steps, {where}, torch {torch.__version__}")
    wrote_plot = plot(runs, args.max_norm, out / "demo.png", title)
    if wrote_plot:
        plot_spike_guard(guarded, out / "spike_guard.png",
                         f"max_norm {args.max_norm:g} + SpikeGuard: bad batches, then a new level; {where}")
    print()
    print(f"wrote {out / 'summary.txt'}, {out / 'summary.json'}"
          + (f", {out / 'demo.png'}, {out / 'spike_guard.png'}" if wrote_plot
             else " (no plot: pip install matplotlib)"))
    return 0


def _progress(label: str, total: int):
    tty = sys.stderr.isatty()

    def update(done: int) -> None:
        if tty and (done % 10 == 0 or done == total):
            sys.stderr.write(f"\r{label} step {done}/{total}")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return update
