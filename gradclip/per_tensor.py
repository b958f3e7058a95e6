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

from .backends import dispatch
from .backends.base import NORM, clip_coefficient, stats_dtype
from .functional import TensorOrTensors, _as_list, check_max_norm, check_norm_type

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
    parameters = _as_list(parameters)
    max_norm = check_max_norm(max_norm)
    norm_type = check_norm_type(norm_type)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    with torch.no_grad():
        if not error_if_nonfinite:
            return dispatch.clip_per_tensor_(grads, norm_type, max_norm, backend)
        norms = dispatch.tensor_norms(grads, norm_type, backend)
        if not bool(norms.isfinite().all()):
            bad = int((~norms.isfinite()).nonzero()[0])
            raise RuntimeError(
                f"The norm of order {norm_type} of gradient {bad} (of those that exist) is "
                f"{float(norms[bad])}, so it cannot be clipped; no gradient was changed. Set "
                "`error_if_nonfinite=False` to scale by the non-finite norm anyway, as torch does")
        dispatch.scale_per_tensor_(grads, clip_coefficient(norms, max_norm), backend)
    return norms


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
    parameters = _as_list(parameters)
    clip_factor = _check_nonnegative(clip_factor, "clip_factor", "clip_factor=0.01")
    eps = _check_nonnegative(eps, "eps", "eps=1e-3")
    norm_type = check_norm_type(norm_type)
    params = _params_with_grads(parameters)
    if not params:
        return torch.tensor(0.0)
    with torch.no_grad():
        return dispatch.agc_([p.detach() for p in params], [p.grad for p in params], clip_factor,
                             eps, norm_type, backend)


class PerTensor:
    r"""Clip rule: each gradient to its own norm (Keras' ``clipnorm``), for
    ``ClippedOptimizer(opt, max_norm=gradclip.PerTensor(1.0))``.

    Args:
        max_norm (float): the largest norm allowed for each gradient, >= 0.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0

    Example::

        >>> opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...                                 max_norm=gradclip.PerTensor(1.0))
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = check_max_norm(max_norm)
        self.norm_type = check_norm_type(norm_type)

    def clip_(self, params: list[Tensor], *, backend: str = "auto") -> Tensor:
        """Clip the ``.grad`` of ``params`` in place; returns the global norm of the gradients
        before clipping (0-d, computed from the per-tensor norms, no host sync)."""
        norms = clip_grad_norm_per_tensor_(params, self.max_norm, self.norm_type, backend=backend)
        return _global_norm(norms, self.norm_type)

    def state_dict(self) -> dict:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def load_state_dict(self, state: dict) -> None:
        self.__init__(state["max_norm"], state["norm_type"])

    def __repr__(self) -> str:
        return f"PerTensor(max_norm={self.max_norm}, norm_type={self.norm_type})"


Exclude = Iterable[Tensor] | Callable[[Tensor], bool] | None


class AGC:
    r"""Clip rule: adaptive gradient clipping (see :func:`adaptive_clip_grad_`), for
    ``ClippedOptimizer(opt, max_norm=gradclip.AGC(...))``.

    Args:
        clip_factor (float): the largest ratio of unit gradient norm to unit weight norm,
            >= 0. Default: 0.01
        eps (float): the smallest weight norm used, >= 0. Default: 1e-3
        exclude (iterable of Tensors, or callable, optional): parameters not to clip, or a
            predicate ``exclude(param) -> bool``. The NFNets practice is to exclude the final
            classifier layer: ``exclude=model.fc.parameters()`` (timm's ResNets:
            ``model.get_classifier().parameters()``). Excluded gradients are not written but
            count in the norm that ``clip_`` returns.
        norm_type (float): order of the norms, > 0; ``inf`` for the max norm. Default: 2.0

    Example::

        >>> rule = gradclip.AGC(clip_factor=0.01, exclude=model.fc.parameters())
        >>> opt = gradclip.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=rule)
    """

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, exclude: Exclude = None,
                 norm_type: float = 2.0):
        self.clip_factor = _check_nonnegative(clip_factor, "clip_factor", "clip_factor=0.01")
        self.eps = _check_nonnegative(eps, "eps", "eps=1e-3")
        self.norm_type = check_norm_type(norm_type)
        self._predicate, self._excluded = None, []
        if callable(exclude):
            self._predicate = exclude
        elif exclude is not None:
            if isinstance(exclude, Tensor):
                exclude = [exclude]
            self._excluded = list(exclude)  # kept alive, so that their ids stay theirs
            bad = next((e for e in self._excluded if not isinstance(e, Tensor)), None)
            if bad is not None:
                raise TypeError("exclude must be parameters (tensors) or a predicate "
                                f"param -> bool, got an element of type {type(bad).__name__}; "
                                "for example exclude=model.fc.parameters()")
        self._excluded_ids = {id(p) for p in self._excluded}

    def excludes(self, param: Tensor) -> bool:
        """Whether ``param`` is left unclipped."""
        if self._predicate is not None:
            return bool(self._predicate(param))
        return id(param) in self._excluded_ids

    def clip_(self, params: list[Tensor], *, backend: str = "auto") -> Tensor:
        """Clip the ``.grad`` of ``params`` (but the excluded ones) in place; returns the global
        norm of all their gradients before clipping (0-d, from the unit norms, no host sync)."""
        params = _params_with_grads(_as_list(params))
        clipped = [p for p in params if not self.excludes(p)]
        kept = [p.grad for p in params if self.excludes(p)]
        if not clipped:
            norm = torch.tensor(0.0)
        else:
            norm = adaptive_clip_grad_(clipped, self.clip_factor, self.eps, self.norm_type,
                                       backend=backend)
        if not kept:
            return norm
        with torch.no_grad():
            rest = dispatch.norm_stats(kept, self.norm_type, math.inf, None, backend)[NORM]
        if not clipped:
            return rest
        dtype = stats_dtype([norm, rest])
        both = torch.stack([norm.to(dtype), rest.to(device=norm.device, dtype=dtype)])
        return torch.linalg.vector_norm(both, self.norm_type)

    def state_dict(self) -> dict:
        return {"clip_factor": self.clip_factor, "eps": self.eps, "norm_type": self.norm_type}

    def load_state_dict(self, state: dict) -> None:
        self.clip_factor = _check_nonnegative(state["clip_factor"], "clip_factor", "clip_factor=0.01")
        self.eps = _check_nonnegative(state["eps"], "eps", "eps=1e-3")
        self.norm_type = check_norm_type(state["norm_type"])

    def __repr__(self) -> str:
        excluded = ("a predicate" if self._predicate is not None
                    else f"{len(self._excluded)} parameters")
        return (f"AGC(clip_factor={self.clip_factor}, eps={self.eps}, norm_type={self.norm_type}, "
                f"exclude={excluded})")


__all__ = ["AGC", "PerTensor", "adaptive_clip_grad_", "clip_grad_norm_per_tensor_", "tensor_norms"]
