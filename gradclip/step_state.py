"""What a ``ClippedOptimizer`` step records, kept on the device: counters and history.

Every value a step records (the norm, the clip factor, the threshold in force, the
counters, the norm history) is a device tensor allocated once and updated in place by a
fixed handful of ops: a step costs no host synchronisation, and ``torch.compile`` keeps
the updates (Dynamo drops attribute writes on optimizers, not in-place tensor updates).
The host reads them only when asked (``stats()``, ``norm_history()``). The spike guard's
windows and verdicts are the guard's own (:mod:`gradclip.guard`); this module counts them.

A step is classified with one ``bucketize`` of its norm against ``bounds``: the largest
vanishing norm, the largest norm that is not clipped (computed on the host, exactly,
whenever a fixed ``max_norm`` changes) and the largest finite value; the bucket indexes a
row of ``_DELTAS``, which is added to the counters. NaN and inf land past every bound.
Under a threshold that changes per step (a rule, the spike guard's clip, a local rule)
the clipped count comes from the step's clip factor instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.base import largest_unclipped_norm
from .guard import RollingWindows, Verdict

COUNTER_NAMES = ("steps", "clipped_steps", "nonfinite_steps", "skipped_steps", "spike_steps",
                 "vanishing_steps", "regime_changes")
STEPS, CLIPPED, NONFINITE, SKIPPED, SPIKE, VANISHING, REGIME = range(len(COUNTER_NAMES))
# What stats() reports of an optimizer that keeps no history and has no spike guard.
CLIP_COUNTERS = COUNTER_NAMES[:3]
# The counter increments of a step whose norm is: vanishing, neither, clipped, non-finite.
_DELTAS = ((1, 0, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0, 0),
           (1, 0, 1, 0, 0, 0, 0))
# The window of accepted norms behind metrics()' mean and std when no guard watches norms.
DEFAULT_WINDOW = 100


def _one_hot(index: int) -> list[int]:
    row = [0] * len(COUNTER_NAMES)
    row[index] = 1
    return row


def _largest_below(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` number strictly below ``value``: ``bucketize`` puts ``x <= b``
    in the lower bucket, and a vanishing norm is one strictly below ``vanishing``."""
    v = torch.tensor(value, dtype=dtype)
    if float(v) >= value:
        v = torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype))
    return float(v)


class StepState:
    """The device tensors of one ``ClippedOptimizer``.

    ``counters`` (int64, named by :data:`COUNTER_NAMES`), ``last_norm``, ``last_coef`` and
    ``threshold`` (0-d), the norm ``history`` ring buffer (``history`` > 0), and, for
    ``metrics()``' mean and std, a window of accepted norms: the spike guard's when it
    watches norms, else one of :data:`DEFAULT_WINDOW` norms when a history is kept.
    """

    def __init__(self, device: torch.device, norm_dtype: torch.dtype, max_norm: float | None, *,
                 history: int = 0, vanishing: float = 1e-5):
        self.device, self.norm_dtype = device, norm_dtype
        self.counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        # [norm, clip factor] of the last step, in one buffer: the fixed-threshold path
        # records both with one copy from the clip's stats.
        self._last = torch.tensor([0.0, 1.0], dtype=norm_dtype, device=device)
        self.last_norm, self.last_coef = self._last[0], self._last[1]
        self._last_norm_1d = self._last[:1]
        self._nothing = torch.tensor([0.0, 1.0], dtype=norm_dtype, device=device)
        self.threshold = torch.zeros((), dtype=norm_dtype, device=device)
        self.vanishing = float(vanishing)
        self._bounds = torch.empty(3, dtype=norm_dtype, device=device)
        self._deltas = torch.tensor(_DELTAS, dtype=torch.int64, device=device)
        # A step without gradients ("neither"), what a clip factor < 1 moves (from
        # "neither" to "clipped"), and the guard's rows.
        self._unmeasured = self._deltas[1]
        self._clipped_row = self._deltas[2] - self._deltas[1]
        self._guard_rows = torch.tensor([_one_hot(SPIKE), _one_hot(SKIPPED), _one_hot(REGIME)],
                                        dtype=torch.int64, device=device)
        self._pending = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        self._in_closure = False
        self.history_size = int(history)
        self._history = torch.full((self.history_size,), math.nan, dtype=norm_dtype, device=device)
        self._written = torch.zeros((), dtype=torch.int64, device=device)
        # The index of the first recorded norm the ring still holds a value for: 0, or
        # where a checkpoint's history, restored into a ring of another size, begins.
        self._history_start = 0
        # How many of the recorded norms gradclip.log_metrics has written to every sink:
        # host-side, set by log_metrics (never by a step), in the state dict, so that a
        # resumed run does not write them again.
        self.logged = 0
        self.guard = None
        self._own_window: RollingWindows | None = None
        self.set_guard(None)
        self.set_max_norm(max_norm)

    # -- settings ------------------------------------------------------------------------

    def set_max_norm(self, max_norm: float | None) -> None:
        """A fixed ``max_norm``, or ``None`` when a rule sets the threshold each step."""
        dtype = self._bounds.dtype
        top = torch.finfo(dtype).max
        unclipped = top if max_norm is None else largest_unclipped_norm(max_norm, dtype)
        vanishing = _largest_below(self.vanishing, dtype)
        if vanishing > unclipped:
            raise ValueError(f"vanishing ({self.vanishing:g}) must be below max_norm ({max_norm:g}): "
                             "a norm cannot be both vanishing and clipped; lower vanishing")
        self._bounds.copy_(torch.tensor((vanishing, unclipped, top), dtype=dtype))
        self.threshold.fill_(math.inf if max_norm is None else max_norm)

    def set_guard(self, guard) -> None:
        """The spike guard whose verdicts are counted (``None``: no guard). The window of
        norms behind ``metrics()``' mean and std is the guard's when it watches norms, else
        one of :data:`DEFAULT_WINDOW` norms of this state's own (with a history or a guard)."""
        self.guard = guard
        if guard is not None:
            guard.bind(self.device)
        keeps_own = (guard is not None or self.history_size > 0) and self._guard_window() is None
        if not keeps_own:
            self._own_window = None
        elif self._own_window is None:
            self._own_window = RollingWindows(1, DEFAULT_WINDOW, self.device, self.norm_dtype)

    def _guard_window(self) -> tuple[RollingWindows, int] | None:
        return None if self.guard is None else self.guard.norm_window()

    @property
    def keeps_health(self) -> bool:
        return bool(self.history_size) or self.guard is not None

    # -- recording -----------------------------------------------------------------------

    @torch.no_grad()
    def record(self, norm: Tensor | None, coef: Tensor | None = None, varies: bool = False,
               verdict: Verdict | None = None) -> None:
        """Count one evaluation of the gradients with pre-clip ``norm`` (``None``: there
        were no gradients, the norm of nothing is 0) and clip factor ``coef`` (``None``:
        not known, kept). ``varies``: the threshold is set per step (written into
        ``threshold``): the clipped count then comes from ``coef``, else from the norm.
        ``verdict``: the spike guard's, counted."""
        if norm is None:
            self._last.copy_(self._nothing)
            self._count(self._unmeasured, None, measured=False)
            return
        self.last_norm.copy_(norm)
        if coef is not None:
            self.last_coef.copy_(coef)
        self._classify(varies, verdict)

    @torch.no_grad()
    def record_stats(self, stats: Tensor, varies: bool = False,
                     verdict: Verdict | None = None) -> None:
        """:meth:`record` from the clip's ``stats`` (``[norm, coef, found_inf]``): one copy."""
        self._last.copy_(stats[:2])
        self._classify(varies, verdict)

    def _classify(self, varies: bool, verdict: Verdict | None) -> None:
        # index_select keeps the shape static (a tensor index would not, for Dynamo).
        bucket = torch.bucketize(self._last_norm_1d, self._bounds)
        delta = self._deltas.index_select(0, bucket)[0]
        if varies:
            clipped = (self.last_coef < 1) & torch.isfinite(self.last_norm)
            delta = delta + self._clipped_row * clipped
        if verdict is not None:
            skip = verdict.skip if verdict.skip is not None else torch.zeros_like(verdict.spike)
            flags = torch.stack([verdict.spike, skip, verdict.regime_change]).to(torch.int64)
            delta = delta + flags @ self._guard_rows
        self._count(delta, verdict, measured=True)

    def _count(self, delta: Tensor, verdict: Verdict | None, measured: bool) -> None:
        if self._in_closure:
            torch.maximum(self._pending, delta, out=self._pending)
            return
        self.counters.add_(delta)
        self._remember(self.last_norm, verdict, measured)

    def _remember(self, norm: Tensor, verdict: Verdict | None, measured: bool = True) -> None:
        """The norm into the history; into metrics' own window too if accepted (finite, no
        spike; a step without gradients measured nothing and enters only the history)."""
        if self.history_size:
            slot = torch.remainder(self._written, self.history_size).reshape(1)
            self._history.index_copy_(0, slot, norm.reshape(1).to(self._history.dtype))
            self._written.add_(1)
        window = self._own_window
        if window is not None and measured:
            accept = torch.isfinite(norm)
            if verdict is not None:
                accept = accept & ~verdict.spike
            window.update_(norm.reshape(1).to(window.values.dtype), accept.reshape(1),
                           torch.zeros(1, dtype=torch.bool, device=norm.device))

    def begin_closure(self) -> None:
        """A step whose closure may evaluate the gradients several times (LBFGS) counts
        once: clipped (or non-finite) if any evaluation was; its last norm is remembered."""
        self._pending.zero_()
        self._in_closure = True

    def end_closure(self) -> None:
        self._in_closure = False
        self._pending[STEPS] = 1  # the step itself, even if the closure never ran
        self.counters.add_(self._pending)
        self._remember(self.last_norm, None)

    # -- reading -------------------------------------------------------------------------

    def metrics(self) -> dict[str, Tensor]:
        """0-d device tensors, no host synchronisation (see ``ClippedOptimizer.metrics``)."""
        source = self._guard_window() or (None if self._own_window is None else (self._own_window, 0))
        if source is None:
            mean = std = torch.full((), math.nan, dtype=self.norm_dtype, device=self.device)
        else:
            windows, row = source
            means, stds = windows.mean_std()
            mean, std = means[row], stds[row]
        values = {"norm": self.last_norm, "clip_coef": self.last_coef, "max_norm": self.threshold,
                  "mean": mean.to(self.norm_dtype), "std": std.to(self.norm_dtype)}
        values.update({name: self.counters[i] for i, name in enumerate(COUNTER_NAMES)})
        return values

    def stats(self) -> dict[str, int]:
        """The counters as ints: one host synchronisation. The clip counters always; the
        health counters too when a history or a spike guard is kept."""
        values = dict(zip(COUNTER_NAMES, self.counters.tolist()))
        if self.keeps_health:
            return values
        return {name: values[name] for name in CLIP_COUNTERS}

    def history(self) -> Tensor:
        """The recorded norms, oldest first, on the host: one host copy."""
        if not self.history_size:
            return torch.empty(0, dtype=self._history.dtype)
        written, ring, _ = self.snapshot([])
        ring = ring.to(self._history.dtype)
        held = min(written - self._history_start, self.history_size)
        ordered = ring[:written] if written < self.history_size else \
            torch.roll(ring, -(written % self.history_size))
        return ordered[ordered.numel() - held:]

    def snapshot(self, extra: list[Tensor]) -> tuple[int, Tensor, Tensor]:
        """One host copy of: how many norms were ever recorded, the history ring (in ring
        order, float64) and ``extra`` (0-d or 1-d tensors, flattened and concatenated)."""
        parts = [self._written.to(torch.float64).reshape(1), self._history.to(torch.float64)]
        parts += [t.detach().reshape(-1).to(device=self._written.device, dtype=torch.float64)
                  for t in extra]
        both = torch.cat(parts).cpu()
        ring_end = 1 + self.history_size
        return int(both[0]), both[1:ring_end], both[ring_end:]

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Tensor]:
        state = {"counters": self.counters.clone(), "last_norm": self.last_norm.clone(),
                 "last_coef": self.last_coef.clone(), "threshold": self.threshold.clone(),
                 "history": self._history.clone(), "written": self._written.clone(),
                 "logged": torch.tensor(self.logged)}
        if self._own_window is not None:
            state["norm_window"] = self._own_window.state_dict()
        return state

    def load_state_dict(self, state: dict) -> list[str]:
        """Restore what fits this optimizer's settings; returns what was dropped (named)."""
        counters = torch.as_tensor(state["counters"], dtype=torch.int64)
        # A checkpoint from before the newer counters: they start at 0.
        self.counters.zero_()
        self.counters[:counters.numel()].copy_(counters)
        last = state.get("last_norm")
        self.last_norm.copy_(0.0 if last is None else last)
        for key, own in (("last_coef", self.last_coef), ("threshold", self.threshold)):
            if key in state:
                own.copy_(state[key])
        self.logged = int(state.get("logged", 0))
        dropped = []
        if "history" in state:
            dropped += self._load_history(torch.as_tensor(state["history"]),
                                          int(torch.as_tensor(state.get("written", 0))))
        saved_window = state.get("norm_window")
        if saved_window is not None and self._own_window is not None:
            self._own_window.load_rows([0], saved_window)
        return dropped

    def _load_history(self, saved: Tensor, written: int) -> list[str]:
        """The saved norms into this history, each at its ring slot (``written`` is kept,
        so logging carries on where it was): all of them if they fit, else the most
        recent ``history`` (the rest named as dropped)."""
        size, saved_size = self.history_size, saved.numel()
        count = min(written, saved_size)
        # The saved ring oldest first: norm i of the run sat at slot i % saved_size.
        first = written - count
        ordered = saved[torch.remainder(torch.arange(first, written), max(saved_size, 1))]
        kept = min(count, size)
        self._history.fill_(math.nan)
        if kept:
            slots = torch.remainder(torch.arange(written - kept, written), size)
            self._history.index_copy_(0, slots.to(self._history.device),
                                      ordered[count - kept:].to(self._history))
        self._written.fill_(written)
        self._history_start = written - kept
        lost = count - kept
        if not lost:
            return []
        return [f"{lost} of the {count} saved norms of the history (this optimizer keeps {size})"]
