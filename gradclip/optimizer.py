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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backends import dispatch
from .backends.base import COEF, FOUND_INF, NORM, stats_dtype
from .functional import check_max_norm, check_norm_type, clip_norm_, clip_parameters_norm_
from .step_state import COUNTER_NAMES, StepState

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
        max_norm (float): the largest global norm allowed, > 0; ``float('inf')`` only
            measures the norm (``last_norm``) and never scales the gradients. Default: 1.0
        norm_type (float): order of the norm, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): without a grad scaler, raise ``RuntimeError`` before
            touching the gradients when their norm is NaN or inf (costs a host
            synchronisation per step). Under AMP inf/NaN steps are expected: they are
            skipped and counted, never raised. Default: False
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

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

    def __init__(self, optimizer: Optimizer, max_norm: float = 1.0, norm_type: float = 2.0, *,
                 error_if_nonfinite: bool = False, backend: str = "auto"):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                            "build the optimizer first, e.g. "
                            "ClippedOptimizer(torch.optim.AdamW(model.parameters()), max_norm=1.0)")
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError("optimizer is already a ClippedOptimizer; set its max_norm or "
                            "norm_type instead of wrapping it twice")
        dispatch.requested_backend(backend)
        self.optimizer = optimizer
        # What a step updates lives on the device (see gradclip.step_state).
        self._step_state = StepState(self._first_param_device(), self._norm_dtype(),
                                     _check_positive_max_norm(max_norm))
        self.max_norm = max_norm
        self.norm_type = norm_type
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
    def max_norm(self) -> float:
        return self._max_norm

    @max_norm.setter
    def max_norm(self, value: float) -> None:
        self._max_norm = _check_positive_max_norm(value)
        self._step_state.set_max_norm(self._max_norm)

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
            return self._step_with_closure(closure)
        if request is not None:
            return self._scaled_step(self._grads(), request)
        with torch.no_grad():
            self._clip()
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
        scaled down (norm above ``max_norm``); ``nonfinite_steps``: steps whose norm was
        inf or NaN (under AMP, the steps the scaler skipped). With ``torch.amp.GradScaler``
        and a non-fused inner optimizer, torch skips inf/NaN steps without calling
        ``step()``; those are not counted (``gradclip.GradScaler`` counts them).
        """
        return self._step_state.stats()

    @property
    def counters(self) -> Tensor:
        """``[steps, clipped_steps, nonfinite_steps]``, an int64 device tensor (no sync)."""
        return self._step_state.counters

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, plus the wrapper's settings and counters
        under the key ``"gradclip"`` (a plain optimizer's ``load_state_dict`` ignores it)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.optimizer.state_dict()
        state_dict[_STATE_KEY] = {
            "max_norm": self._max_norm,
            "norm_type": self._norm_type,
            "error_if_nonfinite": self.error_if_nonfinite,
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
            self.max_norm = own["max_norm"]
            self.norm_type = own["norm_type"]
            self.error_if_nonfinite = bool(own["error_if_nonfinite"])
            self._step_state.load_state_dict(own)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        keep = ("optimizer", "_max_norm", "_norm_type", "error_if_nonfinite", "backend",
                "_folds_scale", "_step_state")
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
        stats = clip_parameters_norm_(self._params(), self._norm_type, self._max_norm,
                                      error_if_nonfinite=self.error_if_nonfinite,
                                      backend=self.backend)
        self._record(None if stats is None else stats[NORM])

    def _scaled_step(self, grads: list[Tensor], request: ScalerRequest):
        """One AMP step: unscale (unless done), clip, and skip the step on inf/NaN."""
        scale = request.scale
        if not grads:
            if request.found_inf_out is None and scale is not None:
                request.found_inf_out = torch.zeros((), dtype=torch.float32, device=scale.device)
            self._record(None)
            return self.optimizer.step()
        if self._folds_scale:
            return self._folded_step(grads, request)
        inv_scale = None if scale is None else _reciprocal_of_scale(scale)
        if inv_scale is not None and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients.")
        with torch.no_grad():
            stats = clip_norm_(grads, self._norm_type, self._max_norm, inv_scale=inv_scale,
                               found_inf=None if inv_scale is not None else request.found_inf,
                               backend=self.backend)
            found_inf = self._found_inf(request, stats)
            self._record(stats[NORM])
        # A non-fused optimizer cannot skip on a device flag: read it, as torch does.
        if found_inf.item():
            return None
        return self.optimizer.step()

    # Traced by torch.compile, the attributes set on the inner optimizer would not reach
    # its fused step: this runs eagerly (that step is one fused kernel already).
    @torch.compiler.disable
    def _folded_step(self, grads: list[Tensor], request: ScalerRequest):
        """One read: the norm of the unscaled grads and the inf flag. The fused step divides
        the grads by grad_scale = 1 / (inv_scale * clip_coef) and skips the update where
        found_inf is set: nothing for us to write."""
        scale = request.scale
        inv_scale = None if scale is None else _reciprocal_of_scale(scale)
        with torch.no_grad():
            stats = dispatch.norm_stats(grads, self._norm_type, self._max_norm, inv_scale,
                                        self.backend)
            found_inf = self._found_inf(request, stats)
            self._record(stats[NORM])
        inner = self.optimizer
        inner.grad_scale = torch.reciprocal(stats[COEF]).float()
        inner.found_inf = found_inf
        try:
            return inner.step()
        finally:
            del inner.grad_scale, inner.found_inf

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

    def _record(self, norm: Tensor | None) -> None:
        self._step_state.record(norm)


__all__ = ["ClippedOptimizer"]
