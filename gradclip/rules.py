"""The clip rules: what threshold the pipeline clips to, and how.

Two kinds, two base classes (``docs/design.md``, "The clip pipeline"):

- :class:`GlobalRule`: a threshold for the global norm, set on the device each step from
  the norms seen so far: :class:`ZClip`, :class:`AutoClip` (a plain ``max_norm`` float is
  the fixed one). Accepted wherever ``max_norm`` is. Each step the pipeline measures the
  global norm, hands it to :meth:`GlobalRule.threshold_`, which updates the rule's state
  and returns the threshold, and clips to it; the state is a handful of device tensors
  allocated once and updated in place, so a step never reads the host, ``torch.compile``
  traces it and a CUDA graph can capture it.
- :class:`LocalRule`: each gradient clipped on its own (``gradclip.PerTensor``,
  ``gradclip.AGC``, in :mod:`gradclip.per_tensor`).

The reference implementations call ``.item()`` every step (ZClip) or rebuild the whole
history (AutoClip); the arithmetic here is theirs, tested against plain-Python ports of
the papers' algorithms (``tests/test_rules.py``).

:class:`~gradclip.guard.SpikeGuard` (imported here for older code) decides whether a step
is taken at all.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .eager import run_eagerly
from .guard import SpikeGuard  # noqa: F401  (its home until this release)


def _state_dtype(device: torch.device) -> torch.dtype:
    # The rules' running statistics in float64 (as the reference code's Python floats),
    # except where the device has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


# torch 2.13's Inductor loses in-place updates of a rule's 0-d state (seen: ZClip's mean
# and variance stay 0, so a compiled step clips every gradient to 0). There the rule's
# update runs eagerly inside a compiled step (a graph break); from 2.14 it is traced.
_TRACEABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


@run_eagerly
def _update_eagerly(rule: GlobalRule, x: Tensor) -> Tensor:
    return rule._update(x)


class GlobalRule:
    """A threshold for the global norm, computed on the device from the norms seen so far
    (:class:`ZClip`, :class:`AutoClip`).

    Subclasses define ``_allocate(device)`` (the state tensors, as a dict of name to
    tensor), ``_update(norm) -> threshold`` and ``config()``. The base class binds the
    state to a device and to one optimizer, keeps skipped steps out of it, and saves it.
    """

    def __init__(self) -> None:
        self._state: dict[str, Tensor] = {}
        self._owner = None

    def config(self) -> dict:
        raise NotImplementedError

    def _allocate(self, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _update(self, norm: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device | None:
        """Where the state lives; ``None`` until the rule first sees a norm."""
        for tensor in self._state.values():
            return tensor.device
        return None

    def bind(self, device: torch.device | str) -> GlobalRule:
        """Allocate the state on ``device`` (done by the first step otherwise)."""
        device = torch.device(device)
        if self.device is None:
            self._state = self._allocate(device)
        elif self.device != device and not (self.device.type == device.type
                                              and device.index is None):
            raise RuntimeError(f"this {type(self).__name__} keeps its state on {self.device}, "
                               f"and was given norms on {device}; use one rule per device "
                               "(a rule is the state of one run)")
        return self

    def attach(self, owner) -> GlobalRule:
        """Make ``owner`` (a ClippedOptimizer) the only optimizer this rule's state follows."""
        if self._owner is not None and self._owner is not owner:
            raise ValueError(f"this {type(self).__name__} already sets the threshold of another "
                             "ClippedOptimizer, and its state is the history of that run; give "
                             "each optimizer its own rule (copy.deepcopy(rule) copies the settings)")
        self._owner = owner
        return self

    def detach(self) -> None:
        self._owner = None

    @torch.no_grad()
    def threshold_(self, norm: Tensor, accept: Tensor | None = None) -> Tensor:
        """Update the state with this step's pre-clip ``norm`` (0-d; non-finite norms are
        ignored, as the scaler skips those steps) and return the threshold to clip it to,
        a 0-d tensor on the norm's device; ``inf`` means "do not clip".

        ``accept`` (a 0-d bool device tensor): where it is False (a step the spike guard
        skips), the state is left exactly as it was; the threshold is still returned.
        """
        self.bind(norm.device)
        x = norm.reshape(()).to(_state_dtype(norm.device))
        if accept is None:
            return self._update(x) if _TRACEABLE else _update_eagerly(self, x)
        before = {name: t.clone() for name, t in self._state.items()}
        threshold = self._update(x) if _TRACEABLE else _update_eagerly(self, x)
        for name, t in self._state.items():
            t.copy_(torch.where(accept, t, before[name]))
        return threshold

    def state_dict(self) -> dict:
        """Settings and state tensors; ``ClippedOptimizer.state_dict`` includes it."""
        return {"rule": type(self).__name__, "config": self.config(),
                **{name: t.clone() for name, t in self._state.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state saved by a rule of this class with the same settings."""
        if state.get("rule") != type(self).__name__:
            raise ValueError(f"this state is a {state.get('rule')}'s, not a "
                             f"{type(self).__name__}'s; load it into that rule")
        _check(state["config"] == self.config(),
               f"the checkpoint's {type(self).__name__} settings {state['config']} differ from "
               f"this one's {self.config()}; build the rule with the saved settings")
        _check(self.restore_fitting(state), f"the checkpoint's {type(self).__name__} state does "
               "not fit this rule")

    def restore_fitting(self, state: dict) -> bool:
        """Restore the saved state tensors if every one fits this rule's (same names and
        shapes; the settings may differ); ``False``, and nothing changed, if not."""
        saved = {k: torch.as_tensor(v) for k, v in state.items() if k not in ("rule", "config")}
        if not saved:
            return False
        self.bind(self.device or next(iter(saved.values())).device)
        if saved.keys() != self._state.keys() or any(
                saved[name].shape != t.shape for name, t in self._state.items()):
            return False
        for name, tensor in self._state.items():
            tensor.copy_(saved[name])
        return True

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


# The name of GlobalRule in earlier releases.
ClipRule = GlobalRule


class LocalClip(NamedTuple):
    """What a local rule's clip did: the global pre-clip ``norm`` (0-d), the ``smallest``
    factor applied (0-d; 1 when nothing was clipped), and each gradient's pre-clip norm
    (``tensor_norms``, when the rule measures per tensor)."""

    norm: Tensor
    smallest: Tensor
    tensor_norms: Tensor | None = None


class LocalRule:
    """Clips each gradient (or each unit of one) on its own (:class:`gradclip.PerTensor`,
    :class:`gradclip.AGC`). Stateless: settings only, so one may serve several optimizers.

    Subclasses define ``norm_type``, ``config()`` and ``clip_measured_``, which the
    pipeline (:mod:`gradclip.pipeline`) calls with the gradients it measured.
    """

    norm_type: float = 2.0
    #: Whether ``clip_measured_`` needs the per-tensor norms of the measure pass.
    uses_tensor_norms: bool = False

    def config(self) -> dict:
        raise NotImplementedError

    def clip_measured_(self, params: list[Tensor], grads: list[Tensor], norms: Tensor | None,
                       inv_scale: Tensor | None, skip: Tensor | None, backend: str) -> LocalClip:
        """Clip ``grads`` (of ``params``, in the same order) in place, and unscale them by
        ``inv_scale`` when given (AMP), writing nothing where ``skip`` is set when it can.
        ``norms``: their unscaled per-tensor norms when the pipeline measured them, else
        ``None`` (the rule measures them itself, in its fused op)."""
        raise NotImplementedError

    def reported_threshold(self) -> float:
        """What ``metrics()['max_norm']`` shows: the threshold in force (NaN: none single)."""
        raise NotImplementedError

    def attach(self, owner) -> LocalRule:
        return self

    def detach(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"rule": type(self).__name__, "config": self.config()}

    def restore_fitting(self, state: dict) -> bool:
        return True  # no state: the settings given to the constructor stand

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class ZClip(GlobalRule):
    r"""Clip the norm when its z-score against running statistics is an outlier (ZClip,
    Kumar et al. 2025, the default ``zscore`` mode with ``adaptive_scaling``).

    The first ``warmup_steps`` finite norms set the mean and variance (population
    variance); after that, each step computes ``z = (norm - mean) / (std + eps)``. When
    ``z > z_thresh`` the norm is clipped to ``mean + z_thresh * std / (z / z_thresh)``
    (larger outliers are clipped harder), and that threshold, not the outlier, updates
    the statistics: ``mean = alpha * mean + (1 - alpha) * x``, then
    ``var = alpha * var + (1 - alpha) * (x - mean) ** 2``. Otherwise the norm is left
    alone and updates them itself.

    Args:
        alpha (float): EMA smoothing of the mean and variance, in (0, 1). Default: 0.97
        z_thresh (float): z-score above which a norm is clipped, > 0. Default: 2.5
        warmup_steps (int): finite norms collected before the statistics start. Default: 25
        max_norm (float, optional): a fixed ceiling applied at every step, warm-up
            included (the reference code's ``max_grad_norm``, whose default is 1.0 there;
            here ``None``, no ceiling). Default: None
        eps (float): added to the standard deviation of the z-score. Default: 1e-6

    Differences from the reference code: non-finite norms (steps the GradScaler skips)
    update nothing; the statistics are float64 tensors on the device.

    Example::

        >>> opt = gradclip.ClippedOptimizer(torch.optim.AdamW(params), max_norm=gradclip.ZClip())
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, *,
                 max_norm: float | None = None, eps: float = 1e-6):
        super().__init__()
        _check(0 < alpha < 1, f"alpha must be in (0, 1), got {alpha!r}; the paper uses 0.97")
        _check(z_thresh > 0, f"z_thresh must be > 0, got {z_thresh!r}; the paper uses 2.5")
        _check(int(warmup_steps) == warmup_steps and warmup_steps >= 1,
               f"warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        _check(max_norm is None or max_norm > 0,
               f"max_norm must be > 0 or None (no ceiling), got {max_norm!r}")
        _check(eps >= 0, f"eps must be >= 0, got {eps!r}")
        self.alpha, self.z_thresh, self.warmup_steps = float(alpha), float(z_thresh), int(warmup_steps)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)

    def config(self) -> dict:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps,
                "max_norm": self.max_norm, "eps": self.eps}

    def _allocate(self, device):
        dtype = _state_dtype(device)
        return {"mean": torch.zeros((), dtype=dtype, device=device),
                "var": torch.zeros((), dtype=dtype, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device),
                "warmup": torch.zeros(self.warmup_steps, dtype=dtype, device=device)}

    def _update(self, x: Tensor) -> Tensor:
        s, a, zt = self._state, self.alpha, self.z_thresh
        finite = torch.isfinite(x)
        in_warmup = s["count"] < self.warmup_steps
        std = s["var"].sqrt()
        z = (x - s["mean"]) / (std + self.eps)
        outlier = ~in_warmup & finite & (z > zt)
        adaptive = s["mean"] + (zt * std) / (z / zt)
        threshold = torch.where(outlier, adaptive, math.inf)
        if self.max_norm is not None:
            threshold = torch.clamp(threshold, max=self.max_norm)

        # Warm-up: collect the norm; the statistics start when the buffer is full.
        slot = torch.clamp(s["count"], max=self.warmup_steps - 1).reshape(1)
        collect = in_warmup & finite
        s["warmup"].index_copy_(0, slot, torch.where(collect, x, s["warmup"].index_select(0, slot)))
        count = s["count"] + finite.to(torch.int64)
        starts = in_warmup & (count == self.warmup_steps)
        start_mean = s["warmup"].mean()
        start_var = (s["warmup"] - start_mean).square().mean()
        # After warm-up: the EMA, fed the threshold in place of an outlier.
        fed = torch.where(outlier, adaptive, x)
        ema_mean = a * s["mean"] + (1 - a) * fed
        ema_var = a * s["var"] + (1 - a) * (fed - ema_mean).square()
        updates = ~in_warmup & finite
        s["mean"].copy_(torch.where(starts, start_mean, torch.where(updates, ema_mean, s["mean"])))
        s["var"].copy_(torch.where(starts, start_var, torch.where(updates, ema_var, s["var"])))
        s["count"].copy_(count)
        return threshold


class AutoClip(GlobalRule):
    r"""Clip to the ``percentile``-th percentile of the norms seen so far (AutoClip,
    Seetharaman et al. 2020).

    Each step adds its norm to the history, then clips to the percentile of the history
    (linear interpolation between the closest ranks, as ``numpy.percentile``). The paper
    keeps every norm of the run; here the last ``history`` norms, in a device ring buffer
    (a ``history`` longer than the run gives the paper's rule exactly).

    Args:
        percentile (float): in [0, 100]. Default: 10.0 (the paper's choice)
        history (int): how many recent norms to keep, >= 1. Default: 1000

    Non-finite norms (steps the GradScaler skips) do not enter the history.

    Example::

        >>> norm = gradclip.clip_grad_norm_(model.parameters(), max_norm=gradclip.AutoClip())
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000):
        super().__init__()
        _check(0 <= percentile <= 100, f"percentile must be in [0, 100], got {percentile!r}")
        _check(int(history) == history and history >= 1,
               f"history must be an integer >= 1, got {history!r}")
        self.percentile, self.history = float(percentile), int(history)

    def config(self) -> dict:
        return {"percentile": self.percentile, "history": self.history}

    def _allocate(self, device):
        dtype = _state_dtype(device)
        # Empty slots hold +inf, which sorts after every norm.
        return {"norms": torch.full((self.history,), math.inf, dtype=dtype, device=device),
                "count": torch.zeros((), dtype=torch.int64, device=device)}

    def _update(self, x: Tensor) -> Tensor:
        s = self._state
        finite = torch.isfinite(x)
        slot = torch.remainder(s["count"], self.history).reshape(1)
        s["norms"].index_copy_(0, slot, torch.where(finite, x, s["norms"].index_select(0, slot)))
        s["count"].add_(finite.to(torch.int64))
        n = torch.clamp(s["count"], min=1, max=self.history)
        ordered = torch.sort(s["norms"]).values
        rank = (n - 1).to(ordered.dtype) * (self.percentile / 100)
        low = torch.floor(rank)
        t = rank - low
        below = ordered.index_select(0, low.to(torch.int64).reshape(1))[0]
        above = ordered.index_select(0, torch.ceil(rank).to(torch.int64).reshape(1))[0]
        # numpy's lerp: from the nearer end, so that t = 0 and t = 1 give the end points.
        diff = above - below
        value = torch.where(t >= 0.5, above - diff * (1 - t), below + diff * t)
        return torch.where(s["count"] > 0, value, math.inf)


# Every rule a checkpoint can name: the global ones here, the local ones (PerTensor, AGC)
# registered by gradclip.per_tensor when it is imported.
RULES: dict[str, type] = {cls.__name__: cls for cls in (ZClip, AutoClip)}


def register_rule(cls: type) -> type:
    RULES[cls.__name__] = cls
    return cls


def rule_from_state(state: dict, device: torch.device | str | None = None):
    """The rule a rule's ``state_dict()`` describes, with its state loaded (onto
    ``device``, default: where the saved tensors are)."""
    cls = RULES.get(state.get("rule"))
    if cls is None:
        raise ValueError(f"unknown clip rule {state.get('rule')!r}; known: {sorted(RULES)}")
    rule = cls(**state["config"])
    if isinstance(rule, GlobalRule):
        if device is not None:
            rule.bind(device)
        rule.load_state_dict(state)
    return rule


def suggest_max_norm(norms: Tensor | Iterable[float], percentile: float = 90.0,
                     skip_first: float = 0.1) -> float:
    r"""A fixed ``max_norm`` for a run like the one whose norms were recorded.

    The rule: drop the first ``skip_first`` fraction of the steps (the large norms of the
    first steps, which a fixed threshold should not be set by), drop non-finite norms,
    and return the ``percentile``-th percentile of the rest (linear interpolation, as
    ``numpy.percentile``). With the default 90, about one step in ten of a run like the
    recorded one is clipped: the threshold sits above the typical (median) norm and
    below the peaks, which it clips.

    Record the norms with ``ClippedOptimizer(..., max_norm=float("inf"), history=N)``
    (only measures) and pass ``opt.norm_history()``.

    Args:
        norms (Tensor or iterable of floats): the pre-clip norms, oldest first.
        percentile (float): in (50, 100): above the median, below the maximum.
            Default: 90.0
        skip_first (float): fraction of the steps to ignore at the start, in [0, 1).
            Default: 0.1

    Returns:
        The threshold, a float.

    Example::

        >>> probe = gradclip.ClippedOptimizer(opt, max_norm=float("inf"), history=1000)
        >>> ...  # train a few hundred steps
        >>> max_norm = gradclip.suggest_max_norm(probe.norm_history())
    """
    _check(50 < percentile < 100, f"percentile must be in (50, 100), got {percentile!r}: "
           "the threshold must sit above the median norm and below the largest")
    _check(0 <= skip_first < 1, f"skip_first must be in [0, 1), got {skip_first!r}")
    values = torch.as_tensor(norms if isinstance(norms, Tensor) else list(norms),
                             dtype=torch.float64).detach().cpu().flatten()
    values = values[int(len(values) * skip_first):]
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        raise ValueError("norms holds no finite norm after skip_first; record more steps "
                         "(ClippedOptimizer(..., max_norm=float('inf'), history=N))")
    return float(torch.quantile(values, percentile / 100, interpolation="linear"))


__all__ = ["AutoClip", "ClipRule", "GlobalRule", "LocalClip", "LocalRule", "SpikeGuard", "ZClip",
           "suggest_max_norm"]
