"""``python -m gradclip bench --check``: each gradclip backend's results on the bench's
gradients against the float64 oracle (:mod:`gradclip.oracle`).

Per workload, dtype and backend, on the data the timed modes use:

- ``norm``: ``get_total_norm`` for norm types 2, 1, 3.5 and inf;
- ``no-clip``: ``clip_grad_norm_`` returns the norm and leaves every gradient bitwise as it was;
- ``clip``: it returns the norm and scales every gradient by the coefficient of that norm;
- ``amp``: ``clip_grads_`` with ``inv_scale`` gives the stats of the unscaled gradients and
  scales them by the coefficient it returns (``inv_scale`` times the clip factor);
- ``nonfinite``: a NaN in the last element of the last non-empty gradient: the stats say so
  (NaN norm, found_inf 1) and the AMP clip leaves every gradient bitwise untouched.

torch.nn.utils is the baseline the bench times, not a backend under test: it is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import gradclip
from gradclip.backends import dispatch
from gradclip.backends.base import COEF

from .. import oracle
from .paths import LOSS_SCALE, MODES, Buffers

CHECKS = ("norm", "no-clip", "clip", "amp", "nonfinite")
NORM_TYPES = (2.0, 1.0, 3.5, math.inf)
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def check_backend(buffers: Buffers, backend: str) -> list[dict]:
    """One row per check: ``{"check", "ok", "detail"}``. Leaves the buffers to be reloaded."""
    rows = []
    for name, run in _CHECKS.items():
        try:
            problems = run(buffers, backend)
        except Exception as error:  # a backend that raises fails this check, not the run
            problems = [f"raised {type(error).__name__}: {str(error).strip().splitlines()[0]}"]
        rows.append({"check": name, "ok": not problems, "detail": "; ".join(problems)})
    buffers.mode = None  # the checks changed the gradients
    return rows


def _norm(b: Buffers, backend: str) -> list[str]:
    b.load(MODES["norm"])
    problems = []
    for p in NORM_TYPES:
        norm = gradclip.get_total_norm(b.grads, norm_type=p, backend=backend)
        want = oracle.expected_stats(b.grads, p, math.inf)[0]
        # Powers other than 1 and 2 (and max) round once more per element in float32.
        rtol = oracle.norm_rtol(b.grads) * (1 if p in (1.0, 2.0, math.inf) else 5)
        if not oracle.close_or_both_nan(norm.item(), want, rtol):
            problems.append(f"p={p}: norm {norm.item()!r}, expected {want!r}")
    return problems


def _clip(mode: str) -> Callable[[Buffers, str], list[str]]:
    def run(b: Buffers, backend: str) -> list[str]:
        b.load(MODES[mode])
        norm = oracle.expected_stats(b.grads, 2.0, b.max_norm)[0]
        before = b.flat.clone()
        got = gradclip.clip_grad_norm_(b.params, b.max_norm, backend=backend).item()
        problems = [] if oracle.close_or_both_nan(got, norm, oracle.norm_rtol(b.grads)) else [
            f"norm {got!r}, expected {norm!r}"]
        if mode == "no-clip":
            if not _bitwise_equal(b.flat, before):
                problems.append("nothing to clip, but the gradients changed")
        else:
            # The norm was checked above; the scaling is checked against the coefficient
            # of the norm the backend found (its float32 rounding is not the scaling's error).
            problems += _scaled_by(b, before, min(1.0, b.max_norm * (1.0 / (got + oracle.EPS))))
        return problems
    return run


def _amp(b: Buffers, backend: str) -> list[str]:
    b.load(MODES["amp"])
    before = b.flat.clone()
    inv_scale = 1.0 / LOSS_SCALE
    expected = oracle.expected_stats(b.grads, 2.0, b.max_norm, inv_scale)
    stats = dispatch.clip_grads_(b.grads, 2.0, b.max_norm, b.inv_scale, backend=backend)
    return _stats_problems(stats, expected, b.grads) + _scaled_by(b, before, stats[COEF].item())


def _nonfinite(b: Buffers, backend: str) -> list[str]:
    b.load(MODES["amp"])
    last = next((g for g in reversed(b.grads) if g.numel()), None)
    if last is None:
        return []
    last.view(-1)[-1] = math.nan
    before = b.flat.clone()
    expected = oracle.expected_stats(b.grads, 2.0, b.max_norm, 1.0 / LOSS_SCALE)
    stats = dispatch.clip_grads_(b.grads, 2.0, b.max_norm, b.inv_scale, backend=backend)
    problems = _stats_problems(stats, expected, b.grads)
    if not _bitwise_equal(b.flat, before):
        problems.append("found_inf set, but the gradients changed")
    return problems


def _stats_problems(stats: torch.Tensor, expected: tuple, grads) -> list[str]:
    return oracle.value_mismatches(stats.detach().cpu().tolist(), expected, oracle.norm_rtol(grads))


def _scaled_by(b: Buffers, before: torch.Tensor, coef: float) -> list[str]:
    """Every gradient equals its value in ``before`` (a copy of the buffer) times ``coef``,
    up to one rounding to the gradients' dtype."""
    tolerance = oracle.storage_rtol(b.dtype)
    start = b.flat.data_ptr()
    worst, where = 0.0, None
    for i, g in enumerate(b.grads):
        offset = (g.data_ptr() - start) // g.element_size()
        was = before[offset:offset + g.numel()]
        error = oracle.scaled_mismatch(g.reshape(-1), was, coef)
        if error > worst:
            worst, where = error, i
    if worst > tolerance:
        return [f"gradient {where} off by {worst:.2e} (relative) from its value times {coef!r}; "
                f"tolerance {tolerance:.0e}"]
    return []


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


_CHECKS: dict[str, Callable[[Buffers, str], list[str]]] = {
    "norm": _norm, "no-clip": _clip("no-clip"), "clip": _clip("clip"), "amp": _amp,
    "nonfinite": _nonfinite}
