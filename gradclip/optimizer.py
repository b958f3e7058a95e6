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
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _checks, distributed, pipeline
from .backends import dispatch
from .backends.base import stats_dtype
from .eager import run_eagerly
from .functional import check_max_norm, check_norm_type
from .guard import SpikeGuard
from .rules import RULES, GlobalRule, LocalRule, rule_from_state
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


def _check_clip_setting(max_norm):
    """A float > 0 (``inf`` only measures), or a rule (global or local)."""
    if isinstance(max_norm, (GlobalRule, LocalRule)):
        return max_norm
    if isinstance(max_norm, Tensor):
        raise TypeError("max_norm must be a float or a rule (gradclip.ZClip, AutoClip, PerTensor, "
                        "AGC), got a tensor; a threshold that changes per step is a rule")
    value = check_max_norm(max_norm)
    if value == 0:
        raise ValueError("max_norm must be > 0, got 0; a max_norm of 0 would zero every gradient. "
                         "Use a positive threshold such as 1.0, or float('inf') to only measure the norm")
    return value


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


def _either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The float flag set where either flag is (``None``: no flag)."""
    if a is None or b is None:
        flag = a if b is None else b
        return None if flag is None else flag.float()
    return torch.maximum(a.float(), b.float())


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

    Loss spikes: ``opt.step(loss=loss)`` (or ``scaler.step(opt, loss=loss)``) hands the
    step's loss to a spike guard that watches it (``SpikeGuard(watch="loss")``).

    Checkpoints: :meth:`load_state_dict` keeps the settings this optimizer was built with
    (``max_norm`` and its rule, ``norm_type``, the guard, ``history``) and restores the
    saved state that fits them; what does not fit (another rule's state, a window of
    another size) is dropped with one warning naming it.

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
        norm_type (float, optional): order of the norm, > 0; ``inf`` for the max norm.
            Default: 2.0, or a local rule's own (``PerTensor(1.0, norm_type=...)``)
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
            (or loss) jumps above the recent ones, and skip non-finite steps with
            ``action="skip"``. Default: None
        vanishing (float): a norm below it counts in ``vanishing_steps``. Default: 1e-5
        track_tensor_norms (bool): keep each gradient's pre-clip norm
            (:meth:`tensor_norms`; from the clip's own read of the gradients). Default: False

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

    def __init__(self, optimizer: Optimizer, max_norm: float | GlobalRule | LocalRule = 1.0,
                 norm_type: float | None = None, *, error_if_nonfinite: bool = False,
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
        history = _checks.integer(history, "history", minimum=0, example="history=1024")
        vanishing = _checks.real(vanishing, "vanishing", example="vanishing=1e-5")
        _checks.check(vanishing >= 0, f"vanishing must be >= 0, got {vanishing!r}; "
                      "for example vanishing=1e-5")
        self.optimizer = optimizer
        # Sharded gradients: the norm is reduced over this group (gradclip.distributed).
        self.process_group = process_group
        self.track_tensor_norms = bool(track_tensor_norms)
        if self.track_tensor_norms:
            self._refuse_if_sharded("track_tensor_norms=True")
        # What a step updates lives on the device (see gradclip.step_state).
        self._step_state = StepState(self._first_param_device(), self._norm_dtype(), None,
                                     history=history, vanishing=vanishing)
        self._tensor_norms = torch.full((0,), math.nan, device=self._first_param_device())
        self._tensor_norm_slots: tuple[tuple[int, ...], Tensor] | None = None
        self._guard: SpikeGuard | None = None
        self._max_norm: float | GlobalRule | LocalRule = 1.0
        max_norm = _check_clip_setting(max_norm)
        if isinstance(max_norm, LocalRule):
            if norm_type is not None and check_norm_type(norm_type) != max_norm.norm_type:
                raise ValueError(f"norm_type={norm_type} differs from {max_norm!r}'s; a local rule "
                                 "clips with its own norm_type: set it on the rule only")
            norm_type = max_norm.norm_type
        self._norm_type = check_norm_type(2.0 if norm_type is None else norm_type)
        self._configure(max_norm, self._checked_guard(spike_guard))
        self.error_if_nonfinite = bool(error_if_nonfinite)
        self.backend = backend
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
    def max_norm(self) -> float | GlobalRule | LocalRule:
        """The threshold: a float, or the rule object that sets it each step."""
        return self._max_norm

    @max_norm.setter
    def max_norm(self, value: float | GlobalRule | LocalRule) -> None:
        self._configure(_check_clip_setting(value), self._guard)

    @property
    def spike_guard(self) -> SpikeGuard | None:
        """The spike guard (``None``: none); assignable between steps."""
        return self._guard

    @spike_guard.setter
    def spike_guard(self, guard: SpikeGuard | None) -> None:
        self._configure(self._max_norm, self._checked_guard(guard))

    @property
    def norm_type(self) -> float:
        return self._norm_type

    @norm_type.setter
    def norm_type(self, value: float) -> None:
        value = check_norm_type(value)
        if isinstance(self._max_norm, LocalRule) and value != self._max_norm.norm_type:
            raise ValueError(f"norm_type={value} differs from {self._max_norm!r}'s; a local rule "
                             "clips with its own norm_type: build it with the one you want")
        self._norm_type = value

    def _checked_guard(self, guard) -> SpikeGuard | None:
        if guard is not None and not isinstance(guard, SpikeGuard):
            raise TypeError(f"spike_guard must be a gradclip.SpikeGuard or None, got "
                            f"{type(guard).__name__}; for example spike_guard=gradclip.SpikeGuard()")
        return guard

    def _configure(self, max_norm, guard: SpikeGuard | None) -> None:
        """Install ``max_norm`` and ``guard`` together: what composes is checked here, once,
        and the step state told whether the threshold is fixed."""
        local = isinstance(max_norm, LocalRule)
        if local and guard is not None and guard.action == "clip":
            raise ValueError(f"spike_guard action='clip' clips the global norm, and max_norm="
                             f"{type(max_norm).__name__}(...) clips each tensor on its own "
                             "(per-tensor); use action='flag' or 'skip' with a local rule")
        if local:
            self._refuse_if_sharded(f"max_norm={type(max_norm).__name__}(...)")
            self._norm_type = max_norm.norm_type  # a local rule clips with its own
        for new, old in ((max_norm, self._max_norm), (guard, self._guard)):
            if new is not old and hasattr(new, "attach"):
                new.attach(self)
        for new, old in ((max_norm, self._max_norm), (guard, self._guard)):
            if new is not old and hasattr(old, "detach"):
                old.detach()
        if isinstance(max_norm, GlobalRule):
            max_norm.bind(self._first_param_device())
        self._max_norm, self._guard = max_norm, guard
        self._step_state.set_guard(guard)
        guard_clips = guard is not None and guard.action == "clip"
        fixed = isinstance(max_norm, float) and not guard_clips
        self._step_state.set_max_norm(max_norm if fixed else None)
        if local:
            self._step_state.threshold.fill_(max_norm.reported_threshold())

    def _refuse_if_sharded(self, what: str) -> None:
        params = self._params_now()
        if self.process_group is not None or distributed.has_dtensor(params):
            raise ValueError(f"{what} works on whole tensors, and this optimizer's gradients are "
                             "sharded (DTensor parameters or process_group): each rank holds only "
                             "parts of them. Use a global max_norm (a float, ZClip, AutoClip)")

    def _params_now(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- the optimizer interface ---------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None):
        """Clip the gradients of all parameter groups by their global norm, then step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss; its
                gradients are clipped after every evaluation.
            loss (Tensor, optional): this step's loss, for a spike guard that watches it.

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
        with torch.no_grad():
            clipped, folded = self._clip(request, loss)
        return self._inner_step(clipped, request, folded)

    @property
    def last_norm(self) -> Tensor:
        """The pre-clip norm of the unscaled gradients at the last step: a 0-d tensor on the
        first parameter's device, updated in place (0 before the first step, and after a
        step without gradients, as torch's norm of nothing)."""
        return self._step_state.last_norm

    def stats(self) -> dict[str, int]:
        """The counters as ints, read with one host synchronisation.

        ``steps``: calls of ``step()``; ``clipped_steps``: steps whose gradients were
        scaled down (norm above the threshold in force; with a local rule, any gradient
        or unit clipped); ``nonfinite_steps``: steps whose norm was inf or NaN (under
        AMP, the steps the scaler skipped); ``skipped_steps``: steps the spike guard kept
        from the inner optimizer (spikes, and non-finite norms, with ``action="skip"``);
        ``spike_steps``: steps it judged spikes (whatever its action);
        ``vanishing_steps``: steps whose norm was below ``vanishing``;
        ``regime_changes``: times the guard accepted a new level after
        ``max_consecutive`` spikes in a row. The last four are listed when the optimizer
        keeps a ``history`` or a ``spike_guard`` (:meth:`metrics` always has them). With
        ``torch.amp.GradScaler`` and a non-fused inner optimizer, torch skips inf/NaN
        steps without calling ``step()``; those are not counted (``gradclip.GradScaler``
        counts them). The same values as :meth:`metrics`' counters.
        """
        return self._step_state.stats()

    def metrics(self) -> dict[str, Tensor]:
        """The state of the last step, as 0-d device tensors: no host synchronisation.

        ``norm``: the pre-clip norm (``last_norm``); ``clip_coef``: the factor the
        gradients were scaled by (1 when not clipped; without the AMP unscale; with a local
        rule, the smallest factor of any gradient or unit); ``max_norm``: the threshold in
        force (a rule's threshold of that step, ``inf`` when it did not clip; a
        ``PerTensor``'s ``max_norm``; NaN for ``AGC``, whose threshold is per unit);
        ``mean``, ``std``: mean and standard deviation of the last ``window`` accepted
        norms (finite, not spikes; the spike guard's window when it watches the norm,
        else the last 100 with ``history`` or a guard; NaN when neither is set); and the
        counters of :meth:`stats` (int64).
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
        ``vanishing_steps``, ``regime_changes``), an int64 device tensor (no sync)."""
        return self._step_state.counters

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the wrapper's settings and state under the
        key ``"gradclip"`` (a plain optimizer's ``load_state_dict`` ignores it)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.optimizer.state_dict()
        rule = self._max_norm
        is_rule = not isinstance(rule, float)
        state_dict[_STATE_KEY] = {
            "max_norm": None if is_rule else rule,
            "rule_type": type(rule).__name__ if is_rule else None,
            "rule": rule.state_dict() if is_rule else None,
            "norm_type": self._norm_type,
            "error_if_nonfinite": self.error_if_nonfinite,
            "spike_guard": None if self._guard is None else self._guard.config(),
            "guard": None if self._guard is None else self._guard.state_dict(),
            **self._step_state.state_dict(),
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (or a plain optimizer's state dict, which
        leaves the wrapper's state as it is).

        The settings this optimizer was built with stand (``max_norm`` and its rule,
        ``norm_type``, ``error_if_nonfinite``, the spike guard, ``history``): the saved
        state that fits them is restored (the rule's if it is a rule of the same class
        and shape, the guard's windows if the same size, the norm history, as much as
        fits); what does not is dropped, with one warning naming it.
        """
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        own = state_dict.pop(_STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if own is not None:
            dropped = self._restore_rule(own) + self._restore_guard(own)
            dropped += self._step_state.load_state_dict(own)
            if dropped:
                warnings.warn("gradclip: the checkpoint was loaded with this optimizer's settings; "
                              "its state that does not fit them was dropped: " + "; ".join(dropped),
                              UserWarning, stacklevel=2)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _restore_rule(self, own: dict) -> list[str]:
        kind, saved = own.get("rule_type"), own.get("rule")
        current = self._max_norm
        if kind is None or saved is None:
            return []
        if kind == type(current).__name__:
            if current.restore_fitting(saved):
                return []
            return [f"the {kind}'s state (saved with {saved.get('config')}, which does not fit "
                    f"{current!r})"]
        if kind not in RULES:
            return [f"the state of an unknown rule {kind!r}"]
        if isinstance(current, LocalRule) or not issubclass(RULES[kind], GlobalRule):
            return []  # nothing saved that a step learned
        return [f"the {kind}'s state (this optimizer clips with max_norm={current!r})"]

    def _restore_guard(self, own: dict) -> list[str]:
        saved = own.get("guard")
        if saved is None and own.get("spike_guard") is not None and "window" in own:
            # A checkpoint of the previous layout: the guard's window was the wrapper's.
            saved = {"signals": ["norm"], "consecutive": torch.zeros((), dtype=torch.int64),
                     "windows": {"values": torch.as_tensor(own["window"]).reshape(1, -1),
                                 "count": torch.as_tensor(own["accepted"]).reshape(1)}}
        if saved is None:
            return []
        if self._guard is None:
            return ["the spike guard's windows (this optimizer has no spike_guard)"]
        return [f"the spike guard's {part}" for part in self._guard.load_state_dict(saved)]

    def __getstate__(self) -> dict[str, Any]:
        keep = ("optimizer", "_max_norm", "_norm_type", "error_if_nonfinite", "backend",
                "process_group", "_folds_scale", "_step_state", "_guard", "track_tensor_norms",
                "_tensor_norms")
        return {key: self.__dict__[key] for key in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._params_key, self._flat_params = (), []
        self._tensor_norm_slots = None
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
        return stats_dtype(self._params_now())

    def _params(self) -> list[Tensor]:
        """All parameters, as one list rebuilt only when the groups change (a step would
        otherwise build it anew for thousands of parameters)."""
        groups = self.optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if key != self._params_key:
            self._flat_params = [p for g in groups for p in g["params"]]
            self._params_key = key
        return self._flat_params

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

    def _clip(self, request: ScalerRequest | None,
              loss: Tensor | None) -> tuple[pipeline.Clipped | None, bool]:
        """The clip pipeline for this step (measure, threshold, apply) and the recording of
        what it did; returns it, and whether the factor is left to the fused inner step."""
        params = self._params()
        grads, silent = pipeline.grads_and_silent(params)
        inv_scale = found_inf = None
        if request is not None:
            inv_scale = None if request.scale is None else _reciprocal_of_scale(request.scale)
            found_inf = request.found_inf
        local = isinstance(self._max_norm, LocalRule)
        folded = request is not None and self._folds_scale and not local
        if inv_scale is not None and not folded and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients.")
        clipped = pipeline.clip_(
            grads, self._norm_type, self._max_norm, params=params, silent=silent,
            inv_scale=inv_scale, found_inf=found_inf, guard=self._guard, loss=loss,
            error_if_nonfinite=self.error_if_nonfinite and request is None,
            tensor_norms=self.track_tensor_norms, write=not folded,
            process_group=self.process_group, backend=self.backend)
        self._record(clipped, inv_scale is not None)
        if self.track_tensor_norms:
            self._keep_tensor_norms(params, clipped)
        if request is not None and request.found_inf is None:
            request.found_inf_out = self._found_inf_out(clipped, request)
        return clipped, folded

    def _record(self, clipped: pipeline.Clipped | None, scaled: bool) -> None:
        state = self._step_state
        if clipped is None:
            state.record(None)
            return
        varies = not isinstance(clipped.threshold, float) or isinstance(self._max_norm, LocalRule)
        if clipped.stats is not None and not varies and not scaled:
            state.record_stats(clipped.stats, verdict=clipped.verdict)  # one copy: norm, coef
            return
        if varies and isinstance(clipped.threshold, Tensor):
            state.threshold.copy_(clipped.threshold)
        state.record(clipped.norm, clipped.coef, varies=varies, verdict=clipped.verdict)

    @staticmethod
    def _found_inf_out(clipped: pipeline.Clipped | None, request: ScalerRequest) -> Tensor:
        """The inf/NaN flag the scaler records for ``update()`` (float32)."""
        if clipped is None:
            return torch.zeros((), dtype=torch.float32, device=request.scale.device)
        return clipped.found_inf.float()

    def _inner_step(self, clipped: pipeline.Clipped | None, request: ScalerRequest | None,
                    folded: bool):
        """Step, skip, or hand the factor to a fused inner step. The step is skipped on an
        inf/NaN flag under AMP and where the spike guard skips; a fused inner optimizer
        skips on the device (its ``found_inf``), any other reads the flag (as torch's
        GradScaler does)."""
        amp_flag = None
        if request is not None:
            amp_flag = request.found_inf if request.found_inf is not None else request.found_inf_out
        skip = _either(amp_flag, None if clipped is None else clipped.skip)
        if folded:
            grad_scale = None if clipped is None else torch.reciprocal(clipped.factor).float()
            return self._fused_step(grad_scale, skip if skip is not None else
                                    torch.zeros((), device=self._first_param_device()))
        if skip is None:
            return self.optimizer.step()
        if self._folds_scale:
            return self._fused_step(None, skip)
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
    def _keep_tensor_norms(self, params: list[Tensor], clipped: pipeline.Clipped | None) -> None:
        """Each parameter's pre-clip gradient norm into ``_tensor_norms`` (NaN where there
        is none), from the clip's own read. Eager under torch.compile: the slots follow the
        parameter list. The slots of the gradients are a device index built once per
        layout of gradients, so a step copies nothing from the host."""
        if self._tensor_norms.numel() != len(params):
            self._tensor_norms = torch.full((len(params),), math.nan,
                                            dtype=self._step_state.last_norm.dtype,
                                            device=self._first_param_device())
        if clipped is None or clipped.tensor_norms is None:
            self._tensor_norms.fill_(math.nan)
            return
        norms = clipped.tensor_norms.to(device=self._tensor_norms.device,
                                        dtype=self._tensor_norms.dtype)
        if norms.numel() == len(params):
            self._tensor_norms.copy_(norms)
            return
        with_grad = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if self._tensor_norm_slots is None or self._tensor_norm_slots[0] != with_grad:
            self._tensor_norm_slots = (with_grad,
                                       torch.tensor(with_grad, device=self._tensor_norms.device))
        self._tensor_norms.fill_(math.nan)
        self._tensor_norms.index_copy_(0, self._tensor_norm_slots[1], norms)

    def _step_with_closure(self, closure: Callable[[], Any]):
        def clipped_closure():
            loss = closure()
            with torch.no_grad():
                self._clip(None, None)
            return loss

        self._step_state.begin_closure()
        try:
            result = self.optimizer.step(clipped_closure)
        finally:
            self._step_state.end_closure()
        return result


__all__ = ["ClippedOptimizer"]
