"""Clipping each gradient on its own: per tensor (Keras ``clipnorm``) and unit-wise
relative to the weights (adaptive gradient clipping, AGC: Brock et al. 2021; timm).

Both need one norm per tensor (or per unit); every backend computes them in the same read
as the global norm (``docs/design.md`` §4), so a clip costs one read of the gradients
(AGC: of the weights and the gradients) plus a read/write of only what it clips, and
never synchronises with the host. The functions take ``parameters`` as torch's
``clip_grad_norm_`` does; the rule classes :class:`PerTensor` and :class:`AGC` are what
``ClippedOptimizer(opt, max_norm=...)`` takes for the same clips (``docs/design.md`` §3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from . import pipeline
from .backends import dispatch
from .backends.base import NORM, clip_coefficient, distinct_entries, stats_dtype
from .functional import TensorOrTensors, _as_list, check_max_norm, check_norm_type
from .rules import LocalClip, LocalRule, register_rule

_GRAD_EPS = 1e-6  # timm's floor on a unit's gradient norm in the AGC factor


def _check_nonnegative(value, name: str, example: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}; for example {example}") from None
    if math.isnan(number) or number < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}; for example {example}")
    return number


def _params_with_grads(parameters: list[Tensor]) -> list[Tensor]:
    return [p for p in parameters if p.grad is not None]


def _global_norm(norms: Tensor, norm_type: float) -> Tensor:
    """The norm of all gradients from their per-tensor (or per-unit) norms; 0 for none."""
    if norms.numel() == 0:
        return torch.zeros((), dtype=norms.dtype, device=norms.device)
    return torch.linalg.vector_norm(norms, norm_type)


def tensor_norms(tensors: TensorOrTensors, norm_type: float = 2.0, *, backend: str = "auto") -> Tensor:
    r"""The norm of each tensor, in one read of all of them.

    Args:
        tensors (Tensor or iterable of Tensors): the tensors, on any devices and of any
            float dtypes.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

    Returns:
        A 1-d tensor with one norm per input tensor, in input order, float32 (float64 if
        any tensor is float64), on the first tensor's device: 0 for an empty tensor, NaN
        for one that holds a NaN. Empty for no tensors.

    Example::

        >>> norms = gradclip.tensor_norms([p.grad for p in model.parameters()])
        >>> worst = norms.argmax()   # the layer whose gradient is largest
    """
    tensors = _as_list(tensors)
    norm_type = check_norm_type(norm_type)
    if not tensors:
        return torch.zeros(0)
    with torch.no_grad():
        return dispatch.tensor_norms(tensors, norm_type, backend)


def clip_grad_norm_per_tensor_(parameters: TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                               error_if_nonfinite: bool = False, *, backend: str = "auto") -> Tensor:
    r"""Clip the gradient of each parameter to its own norm, in place (Keras' ``clipnorm``).

    Each gradient is multiplied by ``min(1, max_norm / (norm + 1e-6))`` of its own norm,
    torch's formula applied per tensor. The fused backends read every gradient once and
    then read and write only the gradients whose factor is not 1; nothing synchronises
    with the host.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to clip;
            parameters without a gradient are ignored.
        max_norm (float): the largest norm allowed for each gradient, >= 0.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): raise ``RuntimeError``, before touching any gradient,
            if any norm is NaN or inf (costs a host synchronisation). Default: False
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

    Returns:
        The norms of the gradients before clipping, a 1-d float32 tensor (float64 if any
        gradient is float64), one per parameter that has a gradient, in order.

    Example::

        >>> loss.backward()
        >>> norms = gradclip.clip_grad_norm_per_tensor_(model.parameters(), max_norm=1.0)
        >>> optimizer.step()
    """
    rule = PerTensor(max_norm, norm_type)
    params = _params_with_grads(_as_list(parameters))
    if not params:
        return torch.zeros(0)
    with torch.no_grad():
        clipped = pipeline.clip_([p.grad for p in params], rule.norm_type, rule, params=params,
                                 error_if_nonfinite=error_if_nonfinite, backend=backend)
    return clipped.tensor_norms


def adaptive_clip_grad_(parameters: TensorOrTensors, clip_factor: float = 0.01, eps: float = 1e-3,
                        norm_type: float = 2.0, *, backend: str = "auto") -> Tensor:
    r"""Adaptive gradient clipping (AGC), unit-wise, in place; timm's ``adaptive_clip_grad``.

    A unit is a whole tensor when ``ndim <= 1``, else one slice along the first dimension
    (one output row of a Linear weight, one output channel of a conv). A unit whose
    gradient norm reaches ``max(weight_norm, eps) * clip_factor`` is scaled to it, by
    ``max / max(grad_norm, 1e-6)``; other units are left alone. The fused backends read
    each weight and each gradient once, for all tensors of all dtypes in one launch, and
    write only the units they clip; nothing synchronises with the host.

    AGC is usually not applied to the final classifier layer (Brock et al.): pass only the
    other parameters, e.g. ``[p for n, p in model.named_parameters() if not n.startswith("fc.")]``,
    or use :class:`AGC` with ``exclude=``.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to clip,
            measured against the parameters' own values; those without a gradient are
            ignored.
        clip_factor (float): the largest ratio of gradient norm to weight norm, >= 0.
            Default: 0.01
        eps (float): the smallest weight norm used, >= 0, so that units with zero weights
            (fresh biases) still get updates. Default: 1e-3
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

    Returns:
        The norm of all gradients before clipping (0-d, float32, float64 if any gradient
        is float64); ``tensor(0.)`` when no parameter has a gradient. timm returns nothing.

    Example::

        >>> loss.backward()
        >>> gradclip.adaptive_clip_grad_(model.parameters(), clip_factor=0.01)
        >>> optimizer.step()
    """
    rule = AGC(clip_factor, eps, norm_type=norm_type)
    params = _params_with_grads(_as_list(parameters))
    if not params:
        return torch.tensor(0.0)
    with torch.no_grad():
        return pipeline.clip_([p.grad for p in params], rule.norm_type, rule, params=params,
                              backend=backend).norm


@register_rule
class PerTensor(LocalRule):
    r"""Clip rule: each gradient to its own norm (Keras' ``clipnorm``), for
    ``ClippedOptimizer(opt, max_norm=gradclip.PerTensor(1.0))`` and
    ``gradclip.clip_grad_norm_(params, gradclip.PerTensor(1.0))`` (which return the global
    pre-clip norm; :func:`clip_grad_norm_per_tensor_` returns each gradient's).

    A gradient listed twice (a parameter given twice, or two parameters sharing one
    ``.grad``) is clipped once.

    Args:
        max_norm (float): the largest norm allowed for each gradient, >= 0.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0

    Example::

        >>> opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                 max_norm=gradclip.PerTensor(1.0))
    """

    uses_tensor_norms = True

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = check_norm_type(norm_type)

    def config(self) -> dict:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def reported_threshold(self) -> float:
        return self.max_norm

    def clip_measured_(self, params, grads, norms, inv_scale, skip, backend) -> LocalClip:
        if norms is None:  # one fused op: the norms, then only the clipped gradients written
            norms = dispatch.clip_per_tensor_(grads, self.norm_type, self.max_norm, backend)
            coefs = clip_coefficient(norms, self.max_norm)
        else:
            coefs = clip_coefficient(norms, self.max_norm)
            factors = coefs if inv_scale is None else coefs * inv_scale.to(coefs).reshape(())
            if skip is not None:  # an inf/NaN step under AMP: written by nobody, skipped
                factors = torch.where(skip.reshape(()) != 0, torch.ones_like(factors), factors)
            dispatch.scale_per_tensor_(grads, factors, backend)
        # Each distinct gradient once in the global norm (it is clipped once), as AGC's.
        kept = distinct_entries(grads)
        distinct = norms if kept is None else norms[kept]
        return LocalClip(_global_norm(distinct, self.norm_type), _smallest(coefs), norms)

    def clip_(self, params: list[Tensor], *, backend: str = "auto") -> Tensor:
        """Clip the ``.grad`` of ``params`` in place; returns the global norm of the gradients
        before clipping (0-d, computed from the per-tensor norms, no host sync)."""
        norms = clip_grad_norm_per_tensor_(params, self.max_norm, self.norm_type, backend=backend)
        return _global_norm(norms, self.norm_type)

    def state_dict(self) -> dict:
        return {"rule": "PerTensor", "config": self.config(), **self.config()}

    def load_state_dict(self, state: dict) -> None:
        config = state.get("config", state)
        self.__init__(config["max_norm"], config["norm_type"])


def _smallest(coefs: Tensor) -> Tensor:
    """The smallest factor (1 for no tensor); NaN if one is NaN."""
    if coefs.numel() == 0:
        return torch.ones((), dtype=coefs.dtype, device=coefs.device)
    return coefs.amin()


Exclude = Iterable[Tensor] | torch.nn.Module | Callable[[Tensor], bool] | None


@register_rule
class AGC(LocalRule):
    r"""Clip rule: adaptive gradient clipping (see :func:`adaptive_clip_grad_`), for
    ``ClippedOptimizer(opt, max_norm=gradclip.AGC(...))`` and
    ``gradclip.clip_grad_norm_(params, gradclip.AGC(...))``.

    Under AMP the gradients are unscaled first (one read/write pass, as torch's
    ``unscale_``), since a unit's factor compares its unscaled gradient with its weights.

    Args:
        clip_factor (float): the largest ratio of unit gradient norm to unit weight norm,
            >= 0. Default: 0.01
        eps (float): the smallest weight norm used, >= 0. Default: 1e-3
        exclude (module, iterable of Tensors, or callable, optional): parameters not to
            clip (a module: its parameters), or a predicate ``exclude(param) -> bool``. The
            NFNets practice is to exclude the final classifier layer: ``exclude=model.fc``
            (timm's ResNets: ``model.get_classifier()``). Excluded gradients are not
            written but count in the global norm.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0

    Example::

        >>> rule = gradclip.AGC(clip_factor=0.01, exclude=model.fc)
        >>> opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=rule)
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Exclude = None,
                 norm_type: float = 2.0):
        self.clip_factor = _check_nonnegative(clip_factor, "clip_factor", "clip_factor=0.01")
        self.eps = _check_nonnegative(eps, "eps", "eps=1e-3")
        self.norm_type = check_norm_type(norm_type)
        self._predicate, self._excluded = None, []
        if isinstance(exclude, torch.nn.Module):
            exclude = list(exclude.parameters())
        if callable(exclude):
            self._predicate = exclude
        elif exclude is not None:
            if isinstance(exclude, Tensor):
                exclude = [exclude]
            self._excluded = list(exclude)  # kept alive, so that their ids stay theirs
            bad = next((e for e in self._excluded if not isinstance(e, Tensor)), None)
            if bad is not None:
                raise TypeError("exclude must be a module, parameters (tensors) or a predicate "
                                f"param -> bool, got an element of type {type(bad).__name__}; "
                                "for example exclude=model.fc")
        self._excluded_ids = {id(p) for p in self._excluded}

    def config(self) -> dict:
        return {"clip_factor": self.clip_factor, "eps": self.eps, "norm_type": self.norm_type}

    def reported_threshold(self) -> float:
        return math.nan  # each unit has its own

    def excludes(self, param: Tensor) -> bool:
        """Whether ``param`` is left unclipped."""
        if self._predicate is not None:
            return bool(self._predicate(param))
        return id(param) in self._excluded_ids

    def clip_measured_(self, params, grads, norms, inv_scale, skip, backend) -> LocalClip:
        if inv_scale is not None:
            dispatch.scale_(grads, inv_scale.reshape(1), None if skip is None else skip.reshape(1),
                            backend)
        chosen = [i for i, p in enumerate(params) if not self.excludes(p)]
        kept = [grads[i] for i, p in enumerate(params) if self.excludes(p)]
        parts, smallest = [], None
        if chosen:
            norm, smallest = dispatch.agc_([params[i].detach() for i in chosen],
                                           [grads[i] for i in chosen], self.clip_factor, self.eps,
                                           self.norm_type, backend).unbind()
            parts.append(norm)
        if kept:
            stats = dispatch.norm_stats(kept, self.norm_type, math.inf, None, backend)
            parts.append(stats[NORM])
        dtype = stats_dtype(parts)
        device = parts[0].device
        norm = parts[0] if len(parts) == 1 else torch.linalg.vector_norm(
            torch.stack([t.to(device=device, dtype=dtype) for t in parts]), self.norm_type)
        if smallest is None:
            smallest = torch.ones((), dtype=norm.dtype, device=norm.device)
        return LocalClip(norm, smallest.to(norm.dtype), None)

    def clip_(self, params: list[Tensor], *, backend: str = "auto") -> Tensor:
        """Clip the ``.grad`` of ``params`` (but the excluded ones) in place; returns the global
        norm of all their gradients before clipping (0-d, from the unit norms, no host sync)."""
        params = _params_with_grads(_as_list(params))
        if not params:
            return torch.tensor(0.0)
        with torch.no_grad():
            return pipeline.clip_([p.grad for p in params], self.norm_type, self, params=params,
                                  backend=backend).norm

    def state_dict(self) -> dict:
        return {"rule": "AGC", "config": self.config(), **self.config()}

    def load_state_dict(self, state: dict) -> None:
        config = state.get("config", state)
        self.clip_factor = _check_nonnegative(config["clip_factor"], "clip_factor", "clip_factor=0.01")
        self.eps = _check_nonnegative(config["eps"], "eps", "eps=1e-3")
        self.norm_type = check_norm_type(config["norm_type"])

    def __repr__(self) -> str:
        excluded = ("a predicate" if self._predicate is not None
                    else f"{len(self._excluded)} parameters")
        return (f"AGC(clip_factor={self.clip_factor}, eps={self.eps}, norm_type={self.norm_type}, "
                f"exclude={excluded})")


__all__ = ["AGC", "PerTensor", "adaptive_clip_grad_", "clip_grad_norm_per_tensor_", "tensor_norms"]
