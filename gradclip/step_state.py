"""What a ``ClippedOptimizer`` step records, kept on the device.

Every value a step updates (the norm, the counters) is a device tensor allocated once and
updated in place by a fixed handful of ops: a step costs no host synchronisation, and
``torch.compile`` keeps the updates (Dynamo drops attribute writes on optimizers, not
in-place tensor updates). The host reads them only when asked (``stats()``).

A step is classified with one ``bucketize`` of its norm against ``bounds``, the largest
norm that is not clipped (computed on the host, exactly, whenever ``max_norm`` changes)
and the largest finite value; the bucket indexes a row of ``_DELTAS``, which is added to
the counters. NaN and inf land past both bounds.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.base import clip_coefficient

COUNTER_NAMES = ("steps", "clipped_steps", "nonfinite_steps")
# The counter increments of a step whose norm is: not clipped, clipped, non-finite.
_DELTAS = ((1, 0, 0), (1, 1, 0), (1, 0, 1))


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


class StepState:
    """The device tensors of one ``ClippedOptimizer``: ``counters`` (int64, named by
    :data:`COUNTER_NAMES`), ``last_norm`` (0-d), and what classifies a step."""

    def __init__(self, device: torch.device, norm_dtype: torch.dtype, max_norm: float):
        self.counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        self.last_norm = torch.zeros((), dtype=norm_dtype, device=device)
        self._bounds = torch.empty(2, dtype=norm_dtype, device=device)
        self._deltas = torch.tensor(_DELTAS, dtype=torch.int64, device=device)
        self._pending = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=device)
        self._in_closure = False
        self.set_max_norm(max_norm)

    def set_max_norm(self, max_norm: float) -> None:
        dtype = self._bounds.dtype
        bounds = (largest_unclipped_norm(max_norm, dtype), torch.finfo(dtype).max)
        self._bounds.copy_(torch.tensor(bounds, dtype=dtype))

    @torch.no_grad()
    def record(self, norm: Tensor | None) -> None:
        """Count one evaluation of the gradients with pre-clip ``norm`` (``None``: there
        were no gradients, the norm of nothing is 0)."""
        if norm is None:
            self.last_norm.zero_()
            delta = self._deltas[0]
        else:
            self.last_norm.copy_(norm)
            # index_select keeps the shape static (a tensor index would not, for Dynamo).
            bucket = torch.bucketize(self.last_norm, self._bounds).reshape(1)
            delta = self._deltas.index_select(0, bucket)[0]
        if self._in_closure:
            torch.maximum(self._pending, delta, out=self._pending)
        else:
            self.counters.add_(delta)

    def begin_closure(self) -> None:
        """A step whose closure may evaluate the gradients several times (LBFGS) counts
        once: clipped (or non-finite) if any evaluation was."""
        self._pending.zero_()
        self._in_closure = True

    def end_closure(self) -> None:
        self._in_closure = False
        self._pending[0] = 1  # the step itself, even if the closure never ran
        self.counters.add_(self._pending)

    def stats(self) -> dict[str, int]:
        """The counters as ints: one host synchronisation."""
        return dict(zip(COUNTER_NAMES, self.counters.tolist()))

    def state_dict(self) -> dict[str, Tensor]:
        return {"counters": self.counters.clone(), "last_norm": self.last_norm.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.counters.copy_(torch.as_tensor(state["counters"], dtype=torch.int64))
        last = state.get("last_norm")
        self.last_norm.copy_(0.0 if last is None else last)
