"""What a ``ClippedOptimizer`` step records, kept on the device.

Every value a step updates (the norm, the clip factor, the threshold in force, the
counters, the norm history, the window of accepted norms the spike guard judges against)
is a device tensor allocated once and updated in place by a fixed handful of ops: a step
costs no host synchronisation, and ``torch.compile`` keeps the updates (Dynamo drops
attribute writes on optimizers, not in-place tensor updates). The host reads them only
when asked (``stats()``, ``norm_history()``).

A step is classified with one ``bucketize`` of its norm against ``bounds``: the largest
vanishing norm, the largest norm that is not clipped (computed on the host, exactly,
whenever a fixed ``max_norm`` changes) and the largest finite value; the bucket indexes a
row of ``_DELTAS``, which is added to the counters. NaN and inf land past every bound.
Under a threshold that changes per step (a rule, or the spike guard's clip) the clipped
count comes from the step's clip factor instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.base import clip_coefficient

COUNTER_NAMES = ("steps", "clipped_steps", "nonfinite_steps", "skipped_steps", "spike_steps",
                 "vanishing_steps")
STEPS, CLIPPED, NONFINITE, SKIPPED, SPIKE, VANISHING = range(len(COUNTER_NAMES))
# What stats() reports of an optimizer that keeps no history and has no spike guard.
CLIP_COUNTERS = COUNTER_NAMES[:3]
# The counter increments of a step whose norm is: vanishing, neither, clipped, non-finite.
_DELTAS = ((1, 0, 0, 0, 0, 1), (1, 0, 0, 0, 0, 0), (1, 1, 0, 0, 0, 0), (1, 0, 1, 0, 0, 0))
# The window of accepted norms behind metrics()' mean and std when no spike guard sets one.
DEFAULT_WINDOW = 100


def largest_unclipped_norm(max_norm: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` norm whose clip coefficient is exactly 1 (torch's formula and
    rounding, as ``clip_coefficient``), so that "clipped" means what the rescale did."""
    finfo = torch.finfo(dtype)
    if math.isinf(max_norm) or max_norm >= finfo.max:
        return finfo.max
    x = torch.tensor(max(max_norm - 1e-6, 0.0), dtype=dtype)
    up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)

    def clips(v: Tensor) -> bool:
        return bool(clip_coefficient(v, max_norm) < 1)

    while clips(x) and x > 0:
        x = torch.nextafter(x, down)
    while not clips(torch.nextafter(x, up)):
        x = torch.nextafter(x, up)
    return float(x)


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
    ``threshold`` (0-d), the norm ``history`` ring buffer (``history`` > 0), and the window
    of the last ``window`` accepted norms (finite, not spikes), kept when a spike guard or
    a history is asked for. ``guard``: a :class:`gradclip.SpikeGuard` or ``None``.
    """

    def __init__(self, device: torch.device, norm_dtype: torch.dtype, max_norm: float | None, *,
                 history: int = 0, guard=None, vanishing: float = 1e-5):
        self.counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        # [norm, clip factor] of the last step, in one buffer: the fixed-threshold path
        # records both with one copy from the clip's stats.
        self._last = torch.tensor([0.0, 1.0], dtype=norm_dtype, device=device)
        self.last_norm, self.last_coef = self._last[0], self._last[1]
        self._last_norm_1d = self._last[:1]
        self._nothing = torch.tensor([0.0, 1.0], dtype=norm_dtype, device=device)
        self.threshold = torch.zeros((), dtype=norm_dtype, device=device)
        self.spike = torch.zeros((), dtype=torch.bool, device=device)
        self.guard = guard
        self.vanishing = float(vanishing)
        self._bounds = torch.empty(3, dtype=norm_dtype, device=device)
        self._deltas = torch.tensor(_DELTAS, dtype=torch.int64, device=device)
        # What a clip factor < 1 moves (from "neither" to "clipped"), and what a spike adds.
        self._clipped_row = self._deltas[2] - self._deltas[1]
        spike_row = [0] * len(COUNTER_NAMES)
        spike_row[SPIKE] = 1
        spike_row[SKIPPED] = int(guard is not None and guard.action == "skip")
        self._spike_row = torch.tensor(spike_row, dtype=torch.int64, device=device)
        self._pending = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        self._in_closure = False
        self.history_size = int(history)
        self._history = torch.full((self.history_size,), math.nan, dtype=norm_dtype, device=device)
        self._written = torch.zeros((), dtype=torch.int64, device=device)
        # How many of the recorded norms gradclip.log_metrics has written to every sink:
        # host-side, set by log_metrics (never by a step), in the state dict, so that a
        # resumed run does not write them again.
        self.logged = 0
        keeps_window = guard is not None or self.history_size > 0
        size = guard.window if guard is not None else DEFAULT_WINDOW
        self.window_size = size if keeps_window else 0
        self._window = torch.zeros(self.window_size, dtype=norm_dtype, device=device)
        self._accepted = torch.zeros((), dtype=torch.int64, device=device)
        self._slots = torch.arange(self.window_size, device=device)
        self.set_max_norm(max_norm)

    # -- the threshold -------------------------------------------------------------------

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

    # -- the spike guard -----------------------------------------------------------------

    def window_mean_std(self) -> tuple[Tensor, Tensor]:
        """Mean and (population) standard deviation of the accepted norms in the window;
        NaN before the first one (and always NaN without a window)."""
        n = torch.clamp(self._accepted, max=self.window_size)
        valid = self._slots < n
        count = n.to(self._window.dtype)
        mean = torch.where(valid, self._window, 0).sum() / count
        spread = torch.where(valid, self._window - mean, 0)
        return mean, torch.sqrt(spread.square().sum() / count)

    @torch.no_grad()
    def judge(self, norm: Tensor) -> Tensor:
        """Flag ``norm`` a spike if it exceeds ``factor`` x the mean of the accepted norms
        in the window, once ``warmup`` norms were accepted (into ``spike``); returns
        ``factor * mean``."""
        guard = self.guard
        # Slots not yet written hold 0, so the window's sum is that of its accepted norms.
        count = torch.clamp(self._accepted, max=self.window_size).to(self._window.dtype)
        limit = self._window.sum() / count * guard.factor
        warmed = self._accepted >= guard.warmup
        self.spike.copy_(warmed & torch.isfinite(norm) & (norm > limit))
        return limit

    # -- recording -----------------------------------------------------------------------

    @torch.no_grad()
    def record(self, norm: Tensor | None, coef: Tensor | None = None, varies: bool = False) -> None:
        """Count one evaluation of the gradients with pre-clip ``norm`` (``None``: there
        were no gradients, the norm of nothing is 0) and clip factor ``coef`` (``None``:
        not known, kept). ``varies``: the threshold is set per step (a rule, the spike
        guard's clip; it was written into ``threshold`` and ``set_max_norm(None)`` was
        called): the clipped count then comes from ``coef``, else from the norm."""
        if norm is None:
            self._last.copy_(self._nothing)
            self.spike.zero_()
            self._count(self._deltas[1], accept=False)
            return
        self.last_norm.copy_(norm)
        if coef is not None:
            self.last_coef.copy_(coef)
        self._classify(varies)

    @torch.no_grad()
    def record_stats(self, stats: Tensor, varies: bool = False) -> None:
        """:meth:`record` from the clip's ``stats`` (``[norm, coef, found_inf]``): one copy."""
        self._last.copy_(stats[:2])
        self._classify(varies)

    def _classify(self, varies: bool) -> None:
        # index_select keeps the shape static (a tensor index would not, for Dynamo).
        bucket = torch.bucketize(self._last_norm_1d, self._bounds)
        delta = self._deltas.index_select(0, bucket)[0]
        if varies:
            clipped = (self.last_coef < 1) & torch.isfinite(self.last_norm)
            delta = delta + self._clipped_row * clipped
        if self.guard is not None:
            delta = delta + self._spike_row * self.spike
        self._count(delta, accept=True)

    def _count(self, delta: Tensor, accept: bool) -> None:
        if self._in_closure:
            torch.maximum(self._pending, delta, out=self._pending)
            return
        self.counters.add_(delta)
        self._remember(self.last_norm, accept)

    def _remember(self, norm: Tensor, accept: bool = True) -> None:
        """The norm into the history; into the window too if accepted (finite, no spike;
        a step without gradients measured nothing, and enters only the history)."""
        if self.history_size:
            slot = torch.remainder(self._written, self.history_size).reshape(1)
            self._history.index_copy_(0, slot, norm.reshape(1).to(self._history.dtype))
            self._written.add_(1)
        if self.window_size and accept:
            accepted = torch.isfinite(norm) & ~self.spike
            slot = torch.remainder(self._accepted, self.window_size).reshape(1)
            kept = self._window.index_select(0, slot)
            self._window.index_copy_(0, slot, torch.where(accepted, norm.reshape(1), kept))
            self._accepted.add_(accepted.to(torch.int64))

    def begin_closure(self) -> None:
        """A step whose closure may evaluate the gradients several times (LBFGS) counts
        once: clipped (or non-finite) if any evaluation was; its last norm is remembered."""
        self._pending.zero_()
        self._in_closure = True

    def end_closure(self) -> None:
        self._in_closure = False
        self._pending[STEPS] = 1  # the step itself, even if the closure never ran
        self.counters.add_(self._pending)
        self._remember(self.last_norm)

    # -- reading -------------------------------------------------------------------------

    def metrics(self) -> dict[str, Tensor]:
        """0-d device tensors, no host synchronisation (see ``ClippedOptimizer.metrics``)."""
        mean, std = self.window_mean_std()
        values = {"norm": self.last_norm, "clip_coef": self.last_coef, "max_norm": self.threshold,
                  "mean": mean, "std": std}
        values.update({name: self.counters[i] for i, name in enumerate(COUNTER_NAMES)})
        return values

    def stats(self) -> dict[str, int]:
        """The counters as ints: one host synchronisation. The clip counters always; the
        health counters too when a history or a spike guard is kept."""
        values = dict(zip(COUNTER_NAMES, self.counters.tolist()))
        if self.history_size or self.guard is not None:
            return values
        return {name: values[name] for name in CLIP_COUNTERS}

    def history(self) -> Tensor:
        """The recorded norms, oldest first, on the host: one host copy."""
        if not self.history_size:
            return torch.empty(0, dtype=self._history.dtype)
        written, ring, _ = self.snapshot([])
        ring = ring.to(self._history.dtype)
        if written < self.history_size:
            return ring[:written]
        return torch.roll(ring, -(written % self.history_size))

    def snapshot(self, extra: list[Tensor]) -> tuple[int, Tensor, Tensor]:
        """One host copy of: how many norms were ever recorded, the history ring (in ring
        order, float64) and ``extra`` (0-d or 1-d tensors, flattened and concatenated)."""
        parts = [self._written.to(torch.float64).reshape(1), self._history.to(torch.float64)]
        parts += [t.detach().reshape(-1).to(device=self._written.device, dtype=torch.float64)
                  for t in extra]
        both = torch.cat(parts).cpu()
        ring_end = 1 + self.history_size
        return int(both[0]), both[1:ring_end], both[ring_end:]

    def state_dict(self) -> dict[str, Tensor]:
        return {"counters": self.counters.clone(), "last_norm": self.last_norm.clone(),
                "last_coef": self.last_coef.clone(), "threshold": self.threshold.clone(),
                "spike": self.spike.clone(), "history": self._history.clone(),
                "written": self._written.clone(), "window": self._window.clone(),
                "accepted": self._accepted.clone(), "logged": torch.tensor(self.logged)}

    def load_state_dict(self, state: dict) -> None:
        counters = torch.as_tensor(state["counters"], dtype=torch.int64)
        # A checkpoint from before the newer counters: they start at 0.
        self.counters.zero_()
        self.counters[:counters.numel()].copy_(counters)
        last = state.get("last_norm")
        self.last_norm.copy_(0.0 if last is None else last)
        for key, own in (("last_coef", self.last_coef), ("threshold", self.threshold),
                         ("spike", self.spike), ("written", self._written),
                         ("accepted", self._accepted)):
            if key in state:
                own.copy_(state[key])
        for key, own in (("history", self._history), ("window", self._window)):
            if key in state:
                self._load_ring(key, own, torch.as_tensor(state[key]))
        # A checkpoint from before log_metrics' progress was saved: all of it is unwritten.
        self.logged = int(state.get("logged", 0))

    def _load_ring(self, key: str, own: Tensor, saved: Tensor) -> None:
        if saved.numel() != own.numel():
            size = {"history": "history", "window": "spike_guard window"}[key]
            raise ValueError(f"the checkpoint's {key} holds {saved.numel()} norms, this "
                             f"optimizer's {own.numel()}; build it with the same {size} size "
                             "to load it")
        own.copy_(saved)
