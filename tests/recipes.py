"""Plain-Python ports of gradclip's own rules, written from their documentation: the oracles
for what has no counterpart in another project (the spike guard), and the pieces the
composition matrix's torch-written recipe is made of.

Floats and lists only, no torch: a port shares no code with what it checks.
"""

from __future__ import annotations

import math
import statistics


def lower_median(values: list[float]) -> float:
    """The median, the lower of the middle two for an even count (as torch.nanmedian)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


class GuardPort:
    """``gradclip.SpikeGuard``'s rule (docs/optimizer.md, "Spike guard"), step by step."""

    def __init__(self, factor=None, window=100, warmup=None, action="skip", *, sigma=None,
                 watch="norm", max_consecutive=5):
        if factor is None and sigma is None:
            factor = 3.0
        self.factor, self.sigma, self.window = factor, sigma, window
        self.warmup = window if warmup is None else warmup
        self.action, self.max_consecutive = action, max_consecutive
        self.signals = ("norm", "loss") if watch == "both" else (watch,)
        self.accepted = {s: [] for s in self.signals}  # since the window (re)started
        self.consecutive = 0

    def _limit(self, signal: str) -> float:
        values = self.accepted[signal][-self.window:]
        if len(self.accepted[signal]) < self.window + self.warmup:  # holds warm-up values
            centre = lower_median(values)
            spread = 1.4826 * lower_median([abs(v - centre) for v in values])
        else:
            centre, spread = statistics.fmean(values), statistics.pstdev(values)
        limits = []
        if self.factor is not None:
            limits.append(self.factor * centre)
        if self.sigma is not None:
            limits.append(centre + self.sigma * spread)
        return min(limits)

    def judge(self, norm: float, loss: float | None = None) -> dict:
        """The verdict on one step: spike, skip, regime_change, clip_limit."""
        values = {"norm": norm, "loss": loss}
        spikes, limits = {}, {}
        for s in self.signals:
            v = values[s]
            judged = len(self.accepted[s]) >= self.warmup
            limits[s] = self._limit(s) if judged else math.inf
            spikes[s] = judged and math.isfinite(v) and v > limits[s]
        any_spike = any(spikes.values())
        regime_change = any_spike and self.consecutive >= self.max_consecutive
        spike = any_spike and not regime_change
        finite_norm = math.isfinite(norm)
        if spike:
            self.consecutive += 1
        elif finite_norm:
            self.consecutive = 0
        for s in self.signals:
            v = values[s]
            if regime_change and spikes[s]:
                self.accepted[s] = [v]
            elif math.isfinite(v) and finite_norm and not spike:
                self.accepted[s].append(v)
        skip = self.action == "skip" and (spike or not finite_norm)
        clip_limit = limits.get("norm", math.inf) if spike and self.action == "clip" else math.inf
        return {"spike": spike, "skip": skip, "regime_change": regime_change,
                "clip_limit": clip_limit}
