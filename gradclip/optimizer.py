"""``ClippedOptimizer``: any ``torch.optim`` optimizer, with global-norm clipping in ``step()``.

What one ``step()`` moves over the gradient bytes B (fused backends; the ``reference``
backend's passes are described in :mod:`gradclip.backends.reference`):

=====================================================  ==========================================
path                                                   passes
=====================================================  ==========================================
no scaler                                              read (+ read/write only when clipping)
``gradclip.GradScaler``, any inner optimizer           read (norm of the unscaled grads and the
                                                       inf flag) + read/write (``inv_scale*coef``)
``gradclip.GradScaler``, inner built with              read; the factor goes to the fused step as
``fused=True``                                         its ``grad_scale`` (no write pass of ours)
``torch.amp.GradScaler``, inner ``fused=True``         torch's inf check (read/write) + read
``torch.amp.GradScaler``, other inner optimizers       torch's unscale (read/write) + read
                                                       (+ read/write only when clipping)
=====================================================  ==========================================

A ``torch.amp.GradScaler`` asks ``optimizer._step_supports_amp_scaling`` whether the
optimizer unscales by itself. The wrapper answers as its inner optimizer would: ``True``
for torch's ``fused=True`` optimizers, whose ``grad_scale`` can take the clip factor too,
``False`` otherwise, so that torch unscales and skips inf/NaN steps exactly as without
the wrapper (and the wrapper, seeing unscaled gradients, only clips).
``gradclip.GradScaler`` instead hands the wrapper the scale, lets it find inf/NaN in the
same read as the norm, and records the flag for ``update()``.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import distributed
from .backends import dispatch
from .eager import run_eagerly
from .backends.base import COEF, FOUND_INF, NORM, clip_coefficient, stats_dtype
from .functional import (check_max_norm, check_norm_type, clip_norm_, clip_parameters_norm_,
                         norm_stats, with_device_threshold)
from .per_tensor import tensor_norms
from .rules import RULES, ClipRule, SpikeGuard, rule_from_state
from .step_state import StepState

_STATE_KEY = "gradclip"
_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
               "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


class ScalerRequest:
    """What :class:`gradclip.GradScaler` hands :meth:`ClippedOptimizer.step` for one step.

    ``scale``: the scaler's scale tensor, or ``None`` when ``unscale_`` already ran.
    ``found_inf``: the inf/NaN flag when already known (after ``unscale_``), else ``None``.
    ``found_inf_out``: set by the wrapper: the flag the scaler records for ``update()``.
    """

    __slots__ = ("scale", "found_inf", "found_inf_out")

    def __init__(self, scale: Tensor | None, found_inf: Tensor | None):
        self.scale, self.found_inf, self.found_inf_out = scale, found_inf, None


# The attribute through which gradclip.GradScaler passes a ScalerRequest to step().
SCALER_REQUEST_ATTR = "_gradclip_scaler_request"


def _check_positive_max_norm(max_norm) -> float:
    value = check_max_norm(max_norm)
    if value == 0:
        raise ValueError("max_norm must be > 0, got 0; a max_norm of 0 would zero every gradient. "
                         "Use a positive threshold such as 1.0, or float('inf') to only measure the norm")
    return value


def _is_per_tensor_rule(max_norm) -> bool:
    """``gradclip.PerTensor`` and ``gradclip.AGC``: rules that clip each tensor themselves."""
    return callable(getattr(max_norm, "clip_", None))


def _check_clip_setting(max_norm):
    """A float > 0 (``inf`` only measures), a :class:`~gradclip.rules.ClipRule`, or a
    per-tensor rule."""
    if isinstance(max_norm, ClipRule) or _is_per_tensor_rule(max_norm):
        return max_norm
    return _check_positive_max_norm(max_norm)


class _GuardedThreshold:
    """The threshold of a step whose threshold is set on the device (a rule, or the spike
    guard's clip): what ``functional.clip_norm_`` calls with the step's pre-clip norm. It
    judges the spike, asks the rule, and writes the threshold in force into the step state."""

    def __init__(self, state: StepState, rule: ClipRule | None, max_norm: float,
                 guard: SpikeGuard | None):
        self.state, self.rule, self.max_norm, self.guard = state, rule, max_norm, guard

    def threshold_(self, norm: Tensor) -> Tensor:
        state = self.state
        limit = state.judge(norm) if self.guard is not None else None
        if self.rule is not None:
            threshold = self.rule.threshold_(norm).to(norm.dtype)
        else:
            threshold = torch.full_like(norm, self.max_norm)
        if limit is not None and self.guard.action == "clip":
            spike_limit = torch.where(state.spike, limit.to(norm.dtype), math.inf)
            threshold = torch.minimum(threshold, spike_limit)
        state.threshold.copy_(threshold)
        return threshold


def _reciprocal_of_scale(scale: Tensor) -> Tensor:
    # As torch.amp.GradScaler.unscale_ does (float64 where the device has it), so that
    # the unscaled gradients are bit-identical to torch's.
    if scale.device.type == "mps":
        return scale.reciprocal()
    return scale.double().reciprocal().float()


def _takes_folded_scale(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` divides the grads by ``optimizer.grad_scale`` and skips
    on ``optimizer.found_inf`` (torch's ``fused=True`` optimizers), so that the clip
    factor can ride along instead of being written into the gradients."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    # The older contract passes the scaler itself as a keyword: nothing to fold into.
    return "grad_scaler" not in inspect.signature(optimizer.step).parameters


class ClippedOptimizer(Optimizer):
    r"""Wraps an optimizer so that ``step()`` first clips the global gradient norm.

    ``step()`` computes the norm of all gradients of all parameter groups together, as
    :func:`torch.nn.utils.clip_grad_norm_` does, scales them by
    ``min(1, max_norm / (norm + 1e-6))``, then steps the inner optimizer. Nothing leaves
    the device: the norm, the clip factor and the counters stay tensors, so a step costs
    no host synchronisation (except under AMP with a non-fused inner optimizer, where
    skipping an inf/NaN step needs the flag on the host, as in torch).

    The wrapper is an :class:`torch.optim.Optimizer`: ``param_groups``, ``state`` and
    ``defaults`` are the inner optimizer's own objects, so LR schedulers, ``zero_grad``,
    ``add_param_group`` and the step hooks work on it as on the inner optimizer.

    AMP: drop the ``scaler.unscale_`` and ``clip_grad_norm_`` lines and keep
    ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``. With
    ``torch.amp.GradScaler`` the gradients are unscaled before the norm, inf/NaN steps
    are skipped and the scale backs off exactly as without the wrapper. With
    :class:`gradclip.GradScaler` (a drop-in subclass) the unscale, the inf check and the
    norm share one read of the gradients; with an inner optimizer built with
    ``fused=True`` the unscale and clip factor is handed to its fused step, and the wrapper
    writes nothing. Calling ``scaler.unscale_(opt)`` before ``scaler.step(opt)`` (to look
    at the gradients, say) works too: nothing is unscaled or clipped twice.

    Closures: the gradients are clipped after each evaluation of the closure, so
    :class:`torch.optim.LBFGS`, which evaluates it several times per step, sees a clipped
    gradient at every evaluation; ``last_norm`` is then the norm of the last evaluation,
    and a step counts as clipped (or non-finite) if any of its evaluations was.

    Args:
        optimizer (torch.optim.Optimizer): the optimizer to wrap.
        max_norm (float or rule): the largest global norm allowed, > 0; ``float('inf')``
            only measures the norm (``last_norm``) and never scales the gradients. Or a
            rule: :class:`gradclip.ZClip`, :class:`gradclip.AutoClip` (a threshold set on
            the device each step), :class:`gradclip.PerTensor`, :class:`gradclip.AGC`
            (each tensor clipped on its own). Default: 1.0
        norm_type (float): order of the norm, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): without a grad scaler, raise ``RuntimeError`` before
            touching the gradients when their norm is NaN or inf (costs a host
            synchronisation per step). Under AMP inf/NaN steps are expected: they are
            skipped and counted, never raised. Default: False
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``
        process_group (ProcessGroup or list of (parameters, group) pairs, optional): the
            gradients on each rank are disjoint parts of one model over this group (ZeRO
            shards, pipeline stages), as in :func:`gradclip.clip_grad_norm_`; DTensor
            gradients (FSDP2) need none. See ``docs/distributed.md``. Default: None
        history (int): keep the last ``history`` pre-clip norms on the device
            (:meth:`norm_history`, :func:`gradclip.log_metrics`). Default: 0
        spike_guard (gradclip.SpikeGuard, optional): flag, clip or skip steps whose norm
            jumps above the recent ones. Default: None
        vanishing (float): a norm below it counts in ``vanishing_steps``. Default: 1e-5
        track_tensor_norms (bool): keep each gradient's pre-clip norm
            (:meth:`tensor_norms`; one more read of the gradients). Default: False

    Attributes:
        optimizer: the wrapped optimizer.
        last_norm (Tensor): the pre-clip norm of the unscaled gradients at the last step, a
            0-d tensor on the first parameter's device, updated in place (0 before the
            first step and after a step without gradients).

    Example::

        >>> opt = gradclip.ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)
        >>> loss = model(x).sum()
        >>> loss.backward()
        >>> opt.step()          # clips, then steps
        >>> opt.zero_grad()
        >>> opt.stats()         # one host synchronisation
        {'steps': 1, 'clipped_steps': 1, 'nonfinite_steps': 0}
    """

    def __init__(self, optimizer: Optimizer, max_norm: float | ClipRule = 1.0,
                 norm_type: float = 2.0, *, error_if_nonfinite: bool = False,
                 backend: str = "auto", history: int = 0, spike_guard: SpikeGuard | None = None,
                 vanishing: float = 1e-5, track_tensor_norms: bool = False,
                 process_group=None):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                            "build the optimizer first, e.g. "
                            "ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)")
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError("optimizer is already a ClippedOptimizer; set its max_norm or "
                            "norm_type instead of wrapping it twice")
        dispatch.requested_backend(backend)
        _check_health_settings(history, spike_guard, vanishing)
        self.optimizer = optimizer
        self._guard = spike_guard
        # What a step updates lives on the device (see gradclip.step_state).
        self._step_state = StepState(self._first_param_device(), self._norm_dtype(), None,
                                     history=int(history), guard=spike_guard,
                                     vanishing=float(vanishing))
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.track_tensor_norms = bool(track_tensor_norms)
        self._tensor_norms = torch.full((0,), math.nan, device=self._first_param_device())
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.backend = backend
        # Sharded gradients: the norm is reduced over this group (gradclip.distributed).
        self.process_group = process_group
        self._folds_scale = _takes_folded_scale(optimizer)
        self._params_key: tuple = ()
        self._flat_params: list[Tensor] = []
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict())
        # Optimizer.__init__ is not called (it would build param_groups of our own): this
        # is the part of it that makes the step hooks and the profiler label work.
        self._patch_step_function()

    # -- the inner optimizer's objects, shared -------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler reads this: see the module docstring.
        return self._folds_scale

    # -- settings ------------------------------------------------------------------------

    @property
    def max_norm(self) -> float | ClipRule:
        """The threshold: a float, or the rule object that sets it each step."""
        return self._max_norm

    @max_norm.setter
    def max_norm(self, value: float | ClipRule) -> None:
        value = _check_clip_setting(value)
        if _is_per_tensor_rule(value) and self._guard is not None and self._guard.action == "clip":
            raise ValueError(f"spike_guard action='clip' clips the global norm, and max_norm="
                             f"{type(value).__name__}(...) clips each tensor on its own; use "
                             "action='flag' or 'skip' with a per-tensor rule")
        rule = value if isinstance(value, ClipRule) else None
        if rule is not None:
            rule.bind(self._first_param_device())
        fixed = value if isinstance(value, float) else math.inf
        guard_clips = self._guard is not None and self._guard.action == "clip"
        varies = rule is not None or guard_clips
        # A threshold set per step is classified by the step's clip factor, not the norm.
        self._step_state.set_max_norm(None if varies or _is_per_tensor_rule(value) else fixed)
        self._max_norm = value
        self._threshold = (_GuardedThreshold(self._step_state, rule, fixed, self._guard)
                           if varies else None)

    @property
    def norm_type(self) -> float:
        return self._norm_type

    @norm_type.setter
    def norm_type(self, value: float) -> None:
        self._norm_type = check_norm_type(value)

    # -- the optimizer interface ---------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None):
        """Clip the gradients of all parameter groups by their global norm, then step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss; its
                gradients are clipped after every evaluation.

        Returns:
            What the inner optimizer's ``step`` returns (the loss, with a closure).
        """
        request = self._scaler_request()
        if closure is not None:
            if request is not None:
                raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
            if self._guard is not None:
                raise RuntimeError("spike_guard judges one gradient per step; a closure (LBFGS) "
                                   "evaluates several. Use spike_guard=None with closures")
            return self._step_with_closure(closure)
        if request is not None:
            return self._scaled_step(self._grads(), request)
        with torch.no_grad():
            self._clip()
        if self._skips_spikes():
            return self._step_unless(self._step_state.spike)
        return self.optimizer.step()

    @property
    def last_norm(self) -> Tensor:
        """The pre-clip norm of the unscaled gradients at the last step: a 0-d tensor on the
        first parameter's device, updated in place (0 before the first step, and after a
        step without gradients, as torch's norm of nothing)."""
        return self._step_state.last_norm

    def stats(self) -> dict[str, int]:
        """The counters as ints, read with one host synchronisation.

        ``steps``: calls of ``step()``; ``clipped_steps``: steps whose gradients were
        scaled down (norm above the threshold in force); ``nonfinite_steps``: steps whose
        norm was inf or NaN (under AMP, the steps the scaler skipped); ``skipped_steps``:
        steps the spike guard skipped; ``spike_steps``: steps it judged spikes (whatever
        its action); ``vanishing_steps``: steps whose norm was below ``vanishing``. The
        last three are listed when the optimizer keeps a ``history`` or a
        ``spike_guard`` (:meth:`metrics` always has them). With
        ``torch.amp.GradScaler`` and a non-fused inner optimizer, torch skips inf/NaN
        steps without calling ``step()``; those are not counted (``gradclip.GradScaler``
        counts them). The same values as :meth:`metrics`' counters.
        """
        return self._step_state.stats()

    def metrics(self) -> dict[str, Tensor]:
        """The state of the last step, as 0-d device tensors: no host synchronisation.

        ``norm``: the pre-clip norm (``last_norm``); ``clip_coef``: the factor the
        gradients were scaled by (1 when not clipped; without the AMP unscale);
        ``max_norm``: the threshold in force (a rule's threshold of that step, ``inf``
        when it did not clip); ``mean``, ``std``: mean and standard deviation of the last
        ``window`` accepted norms (finite, not spikes; the spike guard's window, or 100
        with ``history`` and no guard; NaN when neither is set); and the counters of
        :meth:`stats`: ``steps``, ``clipped_steps``, ``skipped_steps``, ``spike_steps``,
        ``nonfinite_steps``, ``vanishing_steps`` (int64).
        """
        return self._step_state.metrics()

    def norm_history(self) -> Tensor:
        """The last ``history`` pre-clip norms, oldest first, as a CPU tensor (one host
        copy). Every step enters, spikes and non-finite norms included; empty without
        ``history``."""
        return self._step_state.history()

    def tensor_norms(self, named_parameters=None):
        """The pre-clip norm of each parameter's gradient at the last step (needs
        ``track_tensor_norms=True``; unscaled under AMP; NaN for a parameter that had no
        gradient). No host synchronisation.

        Args:
            named_parameters (iterable of (str, Tensor), optional): e.g.
                ``model.named_parameters()``.

        Returns:
            A 1-d device tensor in ``param_groups`` order without ``named_parameters``;
            with it, a dict from each name whose parameter this optimizer holds to its
            0-d norm, largest first is up to the caller (``gradclip.log_metrics`` sorts).
        """
        if not self.track_tensor_norms:
            raise RuntimeError("tensor_norms() needs ClippedOptimizer(..., track_tensor_norms=True)")
        norms = self._tensor_norms
        if named_parameters is None:
            return norms
        position = {id(p): i for i, p in enumerate(self._params())}
        return {name: norms[position[id(p)]] for name, p in named_parameters
                if id(p) in position and position[id(p)] < norms.numel()}

    @property
    def counters(self) -> Tensor:
        """The counters named by ``gradclip.step_state.COUNTER_NAMES`` (``steps``,
        ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps``, ``spike_steps``,
        ``vanishing_steps``), an int64 device tensor (no sync)."""
        return self._step_state.counters

    @property
    def spike_guard(self) -> SpikeGuard | None:
        return self._guard

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the wrapper's settings and counters
        under the key ``"gradclip"`` (a plain optimizer's ``load_state_dict`` ignores it)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.optimizer.state_dict()
        own = self._max_norm
        state_dict[_STATE_KEY] = {
            "max_norm": own if isinstance(own, float) else None,
            "rule_type": None if isinstance(own, float) else type(own).__name__,
            "rule": None if isinstance(own, float) else own.state_dict(),
            "norm_type": self._norm_type,
            "error_if_nonfinite": self.error_if_nonfinite,
            "spike_guard": None if self._guard is None else self._guard.config(),
            **self._step_state.state_dict(),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (or a plain optimizer's state dict, which
        leaves the wrapper's settings and counters as they are)."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        own = state_dict.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if own is not None:
            self._check_same_guard(own.get("spike_guard"))
            self.max_norm = self._clip_setting_from(own)
            self.norm_type = own["norm_type"]
            self.error_if_nonfinite = bool(own["error_if_nonfinite"])
            self._step_state.load_state_dict(own)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _check_same_guard(self, saved: dict | None) -> None:
        mine = None if self._guard is None else self._guard.config()
        if saved != mine:
            raise ValueError(f"the checkpoint was saved with spike_guard {saved}, this optimizer "
                             f"has {mine}; build it with the same spike_guard to load it")

    def _clip_setting_from(self, own: dict):
        """The max_norm a checkpoint's "gradclip" entry holds: a float, or a rule."""
        kind, saved = own.get("rule_type"), own.get("rule")
        if kind is None:
            return own["max_norm"]
        current = self._max_norm
        if kind == type(current).__name__:
            current.load_state_dict(saved)
            return current
        if kind in RULES:
            return rule_from_state(saved, self._first_param_device())
        raise ValueError(f"the checkpoint's max_norm is a {kind}, this optimizer's a "
                         f"{type(current).__name__}; build the optimizer with a {kind} to load it")

    def __getstate__(self) -> dict[str, Any]:
        keep = ("optimizer", "_max_norm", "_norm_type", "error_if_nonfinite", "backend",
                "process_group",
                "_folds_scale", "_step_state", "_guard", "_threshold", "track_tensor_norms",
                "_tensor_norms")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._params_key, self._flat_params = (), []
        for name in _HOOK_DICTS:
            self.__dict__.setdefault(name, OrderedDict())
        self._patch_step_function()

    def __repr__(self) -> str:
        inner = "\n    ".join(repr(self.optimizer).splitlines())
        return (f"{type(self).__name__}(max_norm={self._max_norm}, norm_type={self._norm_type}, "
                f"optimizer=\n    {inner}\n)")

    # -- the work ------------------------------------------------------------------------

    def _first_param_device(self) -> torch.device:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _norm_dtype(self) -> torch.dtype:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return stats_dtype(params)

    def _params(self) -> list[Tensor]:
        """All parameters, as one list rebuilt only when the groups change (a step would
        otherwise build it anew for thousands of parameters)."""
        groups = self.optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if key != self._params_key:
            self._flat_params = [p for g in groups for p in g["params"]]
            self._params_key = key
        return self._flat_params

    def _grads(self) -> list[Tensor]:
        return [p.grad for p in self._params() if p.grad is not None]

    def _scaler_request(self) -> ScalerRequest | None:
        """The AMP information for this step, from gradclip.GradScaler or torch's protocol."""
        request = self.__dict__.get(SCALER_REQUEST_ATTR)
        if request is not None:
            return request
        if "found_inf" in self.__dict__:
            # torch.amp.GradScaler, because _step_supports_amp_scaling is True: grad_scale is
            # the scale (None once unscale_ ran), found_inf the flag of its own inf check.
            return ScalerRequest(self.__dict__.get("grad_scale"), self.__dict__["found_inf"])
        return None

    def _clip(self) -> None:
        """Clip gradients that are not scaled (no AMP)."""
        params = self._params()
        if self.track_tensor_norms:
            self._track_tensor_norms(None)
        if _is_per_tensor_rule(self._max_norm):
            grads = self._grads()
            self._record(self._max_norm.clip_(params, backend=self.backend) if grads else None)
            return
        threshold = self._max_norm if self._threshold is None else self._threshold
        stats = clip_parameters_norm_(params, self._norm_type, threshold,
                                      error_if_nonfinite=self.error_if_nonfinite,
                                      backend=self.backend, process_group=self.process_group)
        if stats is None:
            self._record(None)
        else:
            self._record_stats(stats)

    def _skips_spikes(self) -> bool:
        return self._guard is not None and self._guard.action == "skip"

    def _step_unless(self, skip: Tensor):
        """The inner step, skipped where ``skip`` (a 0-d device flag) is set: on the device
        by a fused optimizer's ``found_inf``, else read on the host (as torch's GradScaler)."""
        if self._folds_scale:
            return self._fused_step(None, skip.float())
        if skip.item():
            return None
        return self.optimizer.step()

    @run_eagerly
    def _fused_step(self, grad_scale: Tensor | None, found_inf: Tensor):
        """Torch's fused step with its AMP hand-off: divide by ``grad_scale`` (when given),
        skip where ``found_inf``; set on the inner optimizer for this call only. Traced by
        torch.compile, the attributes would not reach the fused step: this runs eagerly
        (that step is one fused kernel already)."""
        inner = self.optimizer
        if grad_scale is not None:
            inner.grad_scale = grad_scale
        inner.found_inf = found_inf
        try:
            return inner.step()
        finally:
            inner.__dict__.pop("grad_scale", None)
            del inner.found_inf

    @run_eagerly
    def _track_tensor_norms(self, inv_scale: Tensor | None) -> None:
        """The pre-clip norm of each parameter's gradient into ``_tensor_norms`` (NaN where
        there is none). Eager under torch.compile: the buffer follows the parameter list."""
        params = self._params()
        if self._tensor_norms.numel() != len(params):
            self._tensor_norms = torch.full((len(params),), math.nan,
                                            dtype=self._step_state.last_norm.dtype,
                                            device=self._first_param_device())
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if not with_grad:
            self._tensor_norms.fill_(math.nan)
            return
        with torch.no_grad():
            # The per-tensor norms come from the backends' norm pass (one read).
            norms = tensor_norms([params[i].grad for i in with_grad], self._norm_type,
                                 backend=self.backend)
            norms = norms.to(device=self._tensor_norms.device, dtype=self._tensor_norms.dtype)
            if inv_scale is not None:
                norms = norms * inv_scale.to(norms.dtype)
            if len(with_grad) == len(params):
                self._tensor_norms.copy_(norms)
            else:
                self._tensor_norms.fill_(math.nan)
                index = torch.tensor(with_grad, device=norms.device)
                self._tensor_norms.index_copy_(0, index, norms)

    def _scaled_step(self, grads: list[Tensor], request: ScalerRequest):
        """One AMP step: unscale (unless done), clip, and skip the step on inf/NaN."""
        scale = request.scale
        if not grads:
            return self._scaled_step_without_grads(request)
        inv_scale = None if scale is None else _reciprocal_of_scale(scale)
        if self.track_tensor_norms:
            self._track_tensor_norms(inv_scale)
        if _is_per_tensor_rule(self._max_norm):
            return self._per_tensor_scaled_step(request)
        if self._folds_scale:
            return self._folded_step(grads, request)
        if inv_scale is not None and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients.")
        threshold = self._max_norm if self._threshold is None else self._threshold
        with torch.no_grad():
            stats = clip_norm_(grads, self._norm_type, threshold, inv_scale=inv_scale,
                               found_inf=None if inv_scale is not None else request.found_inf,
                               backend=self.backend, process_group=self.process_group)
            found_inf = self._found_inf(request, stats)
            self._record(stats[NORM], self._clip_coef(stats))
            skip = self._with_spike(found_inf)
        # A non-fused optimizer cannot skip on a device flag: read it, as torch does.
        if skip.item():
            return None
        return self.optimizer.step()

    def _scaled_step_without_grads(self, request: ScalerRequest):
        """An AMP step in which no parameter of this rank has a gradient. Sharded, the
        other ranks' reductions are still joined (the norm and the inf flag are the whole
        model's): no rank is left waiting in a collective, and every rank skips alike."""
        scale = request.scale
        params = self._params()
        if not distributed.involved(params, self.process_group):
            if request.found_inf_out is None and scale is not None:
                request.found_inf_out = torch.zeros((), dtype=torch.float32, device=scale.device)
            self._record(None)
            return self.optimizer.step()
        inv_scale = None if scale is None else _reciprocal_of_scale(scale)
        _, silent = distributed.grads_and_silent(params)
        with torch.no_grad():
            plan = distributed.plan([], self.process_group, silent_owners=silent)
            stats = distributed.norm_stats(plan, self._norm_type, math.inf, inv_scale,
                                           self.backend, request.found_inf)
            found_inf = self._found_inf(request, stats)
            self._record(stats[NORM])
        if found_inf.item():  # nothing of ours to step; the flag is the one host read
            return None
        return self.optimizer.step()

    def _per_tensor_scaled_step(self, request: ScalerRequest):
        """A per-tensor rule under a scaler: the rule clips unscaled gradients, so the
        scaler must have unscaled them (``scaler.unscale_(opt)``, or torch's own unscale)."""
        if request.scale is not None:
            raise RuntimeError(f"max_norm={type(self._max_norm).__name__}(...) clips each "
                               "unscaled gradient: call scaler.unscale_(opt) before "
                               "scaler.step(opt) (or use torch.amp.GradScaler with a "
                               "non-fused inner optimizer)")
        with torch.no_grad():
            self._record(self._max_norm.clip_(self._params(), backend=self.backend))
            skip = self._with_spike(request.found_inf.float())
        if self._folds_scale:
            return self._fused_step(None, skip)
        if skip.item():
            return None
        return self.optimizer.step()

    def _with_spike(self, found_inf: Tensor) -> Tensor:
        """The inner step's skip flag: inf/NaN, or a spike the guard skips. The scaler
        keeps only the inf/NaN flag, so a spike never backs off its scale."""
        if not self._skips_spikes():
            return found_inf
        return torch.maximum(found_inf, self._step_state.spike.to(found_inf.dtype))

    def _clip_coef(self, stats: Tensor) -> Tensor:
        """The clip factor alone (``stats[COEF]`` includes the AMP unscale)."""
        return clip_coefficient(stats[NORM], self._step_state.threshold.to(stats.dtype))

    # Traced by torch.compile, the attributes set on the inner optimizer would not reach
    # its fused step: this runs eagerly (that step is one fused kernel already).
    @run_eagerly
    def _folded_step(self, grads: list[Tensor], request: ScalerRequest):
        """One read: the norm of the unscaled grads and the inf flag. The fused step divides
        the grads by grad_scale = 1 / (inv_scale * clip_coef) and skips the update where
        found_inf (or a spike the guard skips) is set: nothing for us to write."""
        scale = request.scale
        inv_scale = None if scale is None else _reciprocal_of_scale(scale)
        max_norm = self._max_norm if self._threshold is None else math.inf
        with torch.no_grad():
            stats = norm_stats(grads, self._norm_type, max_norm, inv_scale, self.backend,
                               process_group=self.process_group, found_inf=request.found_inf)
            if self._threshold is not None:
                stats = with_device_threshold(stats, self._threshold, inv_scale)
            found_inf = self._found_inf(request, stats)
            self._record(stats[NORM], self._clip_coef(stats))
            skip = self._with_spike(found_inf)
        return self._fused_step(torch.reciprocal(stats[COEF]).float(), skip)

    @staticmethod
    def _found_inf(request: ScalerRequest, stats: Tensor) -> Tensor:
        if request.found_inf is not None:
            return request.found_inf.float()
        found_inf = stats[FOUND_INF]
        if found_inf.dtype != torch.float32:
            found_inf = found_inf.float()
        request.found_inf_out = found_inf
        return found_inf

    def _step_with_closure(self, closure: Callable[[], Any]):
        def clipped_closure():
            loss = closure()
            with torch.no_grad():
                self._clip()
            return loss

        self._step_state.begin_closure()
        try:
            result = self.optimizer.step(clipped_closure)
        finally:
            self._step_state.end_closure()
        return result

    def _record(self, norm: Tensor | None, coef: Tensor | None = None) -> None:
        """Record the step; the spike guard judges it here unless the threshold did."""
        state = self._step_state
        if norm is not None and self._guard is not None and self._threshold is None:
            state.judge(norm)
        state.record(norm, coef, varies=self._threshold is not None)

    def _record_stats(self, stats: Tensor) -> None:
        """:meth:`_record` from the clip's stats (no AMP: ``stats[COEF]`` is the clip factor)."""
        if self._guard is not None and self._threshold is None:
            self._step_state.judge(stats[NORM])
        self._step_state.record_stats(stats, varies=self._threshold is not None)


def _check_health_settings(history, spike_guard, vanishing) -> None:
    if not (isinstance(history, int) and not isinstance(history, bool) and history >= 0):
        raise ValueError(f"history must be an integer >= 0 (how many norms to keep), got "
                         f"{history!r}; for example history=1024")
    if spike_guard is not None and not isinstance(spike_guard, SpikeGuard):
        raise TypeError(f"spike_guard must be a gradclip.SpikeGuard or None, got "
                        f"{type(spike_guard).__name__}; for example spike_guard=gradclip.SpikeGuard()")
    value = float(vanishing)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"vanishing must be a finite number >= 0, got {vanishing!r}; "
                         "for example vanishing=1e-5")


__all__ = ["ClippedOptimizer"]
