"""Drop-in replacements for ``torch.nn.utils``' gradient clipping functions.

Same positional and keyword arguments and the same results as torch, plus a keyword-only
``backend``. Differences, all deliberate:

- The returned norm is float32 (float64 if any gradient is float64) even for bfloat16 or
  float16 gradients; torch rounds it to the gradients' dtype.
- Arguments torch accepts but mishandles raise ``ValueError``: a negative or NaN
  ``max_norm`` (torch would flip or NaN every gradient), a negative or NaN
  ``clip_value``, a ``norm_type`` that is NaN or not positive.
- ``foreach`` is accepted for compatibility and changes nothing: every backend already
  processes all tensors of a device together.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from . import distributed
from .backends import dispatch
from .backends.base import FOUND_INF, NORM, clip_coefficient, coef_of, found_inf_of

TensorOrTensors = Tensor | Iterable[Tensor]


def _as_list(tensors: TensorOrTensors, *, warn_if_empty_generator: bool = False) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        return [tensors]
    is_generator = isinstance(tensors, types.GeneratorType)
    tensors = list(tensors)
    if warn_if_empty_generator and is_generator and not tensors:
        # stacklevel 3: this function, the public function, then the caller's line.
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return tensors


def _grads(parameters: list[Tensor]) -> list[Tensor]:
    return [p.grad for p in parameters if p.grad is not None]


def _as_float(value, name: str, hint: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}; {hint}") from None


def check_max_norm(max_norm) -> float:
    """``max_norm`` as a float; NaN or negative values raise ``ValueError``."""
    value = _as_float(max_norm, "max_norm", "for example max_norm=1.0")
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm must be >= 0 (or inf to only measure), got {max_norm!r}; "
                         "a negative or NaN max_norm would flip or NaN every gradient")
    return value


def check_norm_type(norm_type) -> float:
    """``norm_type`` as a float; it must be > 0 (``inf`` and ``'inf'`` allowed)."""
    value = _as_float(norm_type, "norm_type", "use 2.0, 1.0 or float('inf')")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}; "
                         "use 2.0 for the Euclidean norm or float('inf') for the max norm")
    return value


def _raise_if_nonfinite(norm: Tensor, norm_type: float) -> None:
    if not torch.isfinite(norm).item():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped; no gradient was changed. To disable this "
            "error and scale the gradients by the non-finite norm anyway, as torch does, set "
            "`error_if_nonfinite=False`")


def _zero_norm() -> Tensor:
    # torch's value for "nothing to measure": a float32 zero on the CPU.
    return torch.tensor(0.0)


def clip_norm_(grads: list[Tensor], norm_type: float, max_norm: float | Tensor, *,
               inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
               error_if_nonfinite: bool = False, backend: str = "auto",
               process_group=None) -> Tensor:
    """The one global-norm clip behind :func:`clip_grad_norm_` and ``ClippedOptimizer``.

    Scales ``grads`` (non-empty) in place by ``stats[COEF]`` and returns ``stats``
    (:mod:`gradclip.backends.base`). ``inv_scale``: the grads are scaled by a GradScaler;
    the norm is of the unscaled grads, the factor unscales too, and nothing is written
    when an inf/NaN is found. ``found_inf``: a flag already known (the scaler unscaled);
    nothing is written when it is set. ``max_norm=inf`` only measures (and unscales).
    ``max_norm`` may be a one-element device tensor (a threshold a rule keeps on the
    device, such as ZClip's): the coefficient is then computed on the device between the
    norm pass and the rescale, with no host synchronisation.
    ``error_if_nonfinite`` reads the norm on the host and raises before any write.
    DTensor grads, or a ``process_group``: see :func:`clip_distributed_`.
    """
    if distributed.involved(grads, process_group):
        return clip_distributed_(distributed.plan(grads, process_group), norm_type, max_norm,
                                 inv_scale=inv_scale, found_inf=found_inf,
                                 error_if_nonfinite=error_if_nonfinite, backend=backend)
    if is_device_threshold(max_norm):
        return _clip_to_device_threshold_(grads, norm_type, max_norm, inv_scale, found_inf,
                                          error_if_nonfinite, backend)
    only_measures = math.isinf(max_norm) and inv_scale is None
    if error_if_nonfinite or only_measures or found_inf is not None:
        stats = dispatch.norm_stats(grads, norm_type, max_norm, inv_scale, backend)
        if error_if_nonfinite:
            _raise_if_nonfinite(stats[NORM], norm_type)
        if not only_measures:
            _rescale_(grads, stats, inv_scale, found_inf, backend)
        return stats
    return dispatch.clip_grads_(grads, norm_type, max_norm, inv_scale, backend)


def _rescale_(grads: list[Tensor], stats: Tensor, inv_scale: Tensor | None,
              found_inf: Tensor | None, backend: str) -> None:
    """Scale ``grads`` by ``stats[COEF]``, skipped on inf/NaN: the flag already known, else
    (under AMP) the one the norm pass found; without AMP a non-finite norm scales, as torch."""
    skip = found_inf
    if skip is None and inv_scale is not None:
        skip = found_inf_of(stats)
    dispatch.scale_(grads, coef_of(stats), skip, backend)


def is_device_threshold(max_norm) -> bool:
    """Whether ``max_norm`` is set on the device per step: a 0-d tensor, or a rule
    (:class:`gradclip.ZClip`, :class:`gradclip.AutoClip`: anything with ``threshold_``)."""
    return isinstance(max_norm, Tensor) or callable(getattr(max_norm, "threshold_", None))


def with_device_threshold(stats: Tensor, max_norm, inv_scale: Tensor | None) -> Tensor:
    """``stats`` measured with ``max_norm=inf``, with the coefficient of a threshold on the
    device: a 0-d tensor, or a rule whose ``threshold_(norm)`` sees this step's pre-clip
    norm (and updates its state). No host synchronisation."""
    norm = stats[NORM]
    threshold = max_norm if isinstance(max_norm, Tensor) else max_norm.threshold_(norm)
    threshold = threshold.reshape(()).to(device=norm.device, dtype=norm.dtype)
    coef = clip_coefficient(norm, threshold, None if inv_scale is None
                            else inv_scale.to(norm.device).reshape(()))
    return torch.stack([norm, coef.to(norm.dtype), stats[FOUND_INF]])


def _clip_to_device_threshold_(grads, norm_type, max_norm, inv_scale, found_inf,
                               error_if_nonfinite, backend) -> Tensor:
    stats = dispatch.norm_stats(grads, norm_type, math.inf, inv_scale, backend)
    if error_if_nonfinite:
        # Before the rule sees the norm: a raising step changes no state.
        _raise_if_nonfinite(stats[NORM], norm_type)
    stats = with_device_threshold(stats, max_norm, inv_scale)
    _rescale_(grads, stats, inv_scale, found_inf, backend)
    return stats


def clip_parameters_norm_(parameters: list[Tensor], norm_type: float, max_norm: float | Tensor, *,
                          error_if_nonfinite: bool = False, backend: str = "auto",
                          process_group=None) -> Tensor | None:
    """:func:`clip_norm_` over the ``.grad`` of ``parameters``; ``None`` if none has one.

    A backend's fast path finds the grads in C++ (it declines, with ``None``, what it
    cannot take); it does not read the norm on the host, so ``error_if_nonfinite`` goes
    the general way.
    """
    if distributed.involved(parameters, process_group):
        return _clip_sharded_parameters_(parameters, norm_type, max_norm, error_if_nonfinite,
                                         backend, process_group)[0]
    if not error_if_nonfinite and not is_device_threshold(max_norm):
        stats = dispatch.clip_parameters_(parameters, norm_type, max_norm, None, backend)
        if stats is not None:
            return stats
    grads = _grads(parameters)
    if not grads:
        return None
    return clip_norm_(grads, norm_type, max_norm, error_if_nonfinite=error_if_nonfinite,
                      backend=backend)


def _clip_sharded_parameters_(parameters, norm_type, max_norm, error_if_nonfinite, backend,
                              process_group) -> tuple[Tensor | None, distributed.Plan]:
    """:func:`clip_parameters_norm_` for DTensor parameters or a ``process_group``: the
    parameters without a gradient still join their reductions (no rank left waiting)."""
    grads, silent = distributed.grads_and_silent(parameters)
    plan = distributed.plan(grads, process_group, silent_owners=silent)
    if not plan.chains:
        return None, plan
    return clip_distributed_(plan, norm_type, max_norm, error_if_nonfinite=error_if_nonfinite,
                             backend=backend), plan


def clip_distributed_(plan: distributed.Plan, norm_type: float, max_norm, *,
                      inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
                      error_if_nonfinite: bool = False, backend: str = "auto") -> Tensor:
    """:func:`clip_norm_` of sharded gradients: the norm of the whole model, reduced over
    the plan's groups (:mod:`gradclip.distributed`), then each rank scales its local
    shards. Every rank gets the same ``stats``; ``error_if_nonfinite`` raises on every
    rank, after the reduction, so no rank is left in a collective. A ``found_inf`` given
    is replaced in place by the flag of all ranks."""
    stats = distributed.norm_stats(plan, norm_type, max_norm, inv_scale, backend, found_inf)
    if error_if_nonfinite:
        _raise_if_nonfinite(stats[NORM], norm_type)
    only_measures = (not is_device_threshold(max_norm) and math.isinf(max_norm)
                     and inv_scale is None)
    if plan.locals and not only_measures:
        _rescale_(plan.locals, stats, inv_scale, found_inf, backend)
    return stats


def norm_stats(grads: list[Tensor], norm_type: float, max_norm: float, inv_scale: Tensor | None,
               backend: str = "auto", *, process_group=None,
               found_inf: Tensor | None = None) -> Tensor:
    """``stats`` of ``grads`` without touching them (the backends' ``norm_stats``), reduced
    over ranks for DTensor grads or a ``process_group`` (``found_inf`` as in
    :func:`clip_distributed_`)."""
    if distributed.involved(grads, process_group):
        return distributed.norm_stats(distributed.plan(grads, process_group), norm_type,
                                      max_norm, inv_scale, backend, found_inf)
    return dispatch.norm_stats(grads, norm_type, max_norm, inv_scale, backend)


def get_total_norm(tensors: TensorOrTensors, norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                   backend: str = "auto", process_group=None) -> Tensor:
    r"""Compute the norm of all ``tensors`` together, as if concatenated into one vector.

    Drop-in for :func:`torch.nn.utils.get_total_norm`.

    Args:
        tensors (Tensor or iterable of Tensors): the tensors, on any devices and of any
            float dtypes.
        norm_type (float): order of the norm, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): raise ``RuntimeError`` if the norm is NaN or inf (this
            costs a host synchronisation). Default: False
        foreach (bool, optional): accepted for compatibility; has no effect.
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``
        process_group (ProcessGroup or list of (tensors, group) pairs, optional): the
            tensors on each rank are disjoint parts of one model over this group (ZeRO
            shards, pipeline stages); the norm is the whole model's, on every rank. Pairs
            name a group per tensor (tensor and expert parallelism). DTensors need none:
            they are reduced over their meshes. See ``docs/distributed.md``. Default: None

    Returns:
        The total norm as a 0-d float32 tensor (float64 if any tensor is float64) on the
        first tensor's device; ``tensor(0.)`` for no tensors. With DTensor tensors, a
        DTensor replicated on the first one's mesh whose value is the global norm on
        every rank (``full_tensor()``, ``to_local()`` and ``item()`` all give it).

    Example::

        >>> grads = [p.grad for p in model.parameters() if p.grad is not None]
        >>> norm = gradclip.get_total_norm(grads)
    """
    tensors = _as_list(tensors)
    norm_type = check_norm_type(norm_type)
    if distributed.involved(tensors, process_group):
        plan = distributed.plan(tensors, process_group)
        if not plan.chains:
            return _zero_norm()
        with torch.no_grad():
            norm = distributed.norm_stats(plan, norm_type, math.inf, None, backend)[NORM]
        if error_if_nonfinite:
            _raise_if_nonfinite(norm, norm_type)
        return distributed.as_returned_norm(norm, plan)
    if not tensors:
        return _zero_norm()
    with torch.no_grad():
        norm = dispatch.norm_stats(tensors, norm_type, math.inf, None, backend)[NORM]
    if error_if_nonfinite:
        _raise_if_nonfinite(norm, norm_type)
    return norm


def clip_grads_with_norm_(parameters: TensorOrTensors, max_norm: float, total_norm: Tensor,
                          foreach: bool | None = None, *, backend: str = "auto") -> None:
    r"""Scale the gradients by ``min(1, max_norm / (total_norm + 1e-6))``, in place.

    Drop-in for :func:`torch.nn.utils.clip_grads_with_norm_`. The factor is computed on
    the device; the fused backends leave the gradients untouched, without reading them,
    when it is exactly 1.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to scale.
        max_norm (float): the largest norm allowed, >= 0.
        total_norm (Tensor): the norm to clip by, e.g. from :func:`get_total_norm`.
        foreach (bool, optional): accepted for compatibility; has no effect.
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

    Example::

        >>> norm = gradclip.get_total_norm([p.grad for p in params])
        >>> gradclip.clip_grads_with_norm_(params, max_norm=1.0, total_norm=norm)
    """
    parameters = _as_list(parameters)
    max_norm = check_max_norm(max_norm)
    grads = distributed.local_tensors(_grads(parameters))
    if not grads:
        return
    if isinstance(total_norm, Tensor):
        total_norm = distributed.local_value(total_norm)
    else:
        total_norm = torch.tensor(_as_float(total_norm, "total_norm", "pass the tensor that "
                                            "get_total_norm returned"), device=grads[0].device)
    with torch.no_grad():
        dispatch.scale_(grads, clip_coefficient(total_norm, max_norm).reshape(1), None, backend)


def clip_grad_norm_(parameters: TensorOrTensors, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                    backend: str = "auto", process_group=None) -> Tensor:
    r"""Clip the global norm of the gradients of ``parameters`` to ``max_norm``, in place.

    Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: the gradients are multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))``. The fused backends read the gradients once
    and, when that factor is 1 (nothing to clip, the common case), write nothing; the
    factor never leaves the device, so there is no host synchronisation.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to clip;
            parameters without a gradient are ignored.
        max_norm (float or rule): the largest norm allowed, >= 0; or a rule that sets it
            each call on the device (:class:`gradclip.ZClip`, :class:`gradclip.AutoClip`).
        norm_type (float): order of the norm, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): raise ``RuntimeError``, before touching any gradient,
            if the norm is NaN or inf (costs a host synchronisation). Default: False
        foreach (bool, optional): accepted for compatibility; has no effect.
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``
        process_group (ProcessGroup or list of (parameters, group) pairs, optional): as in
            :func:`get_total_norm`; each rank scales its own gradients (or DTensor local
            shards) by the factor of the whole model's norm. Default: None

    Returns:
        The total norm of the gradients before clipping, a 0-d float32 tensor (float64
        if any gradient is float64) on the gradients' device; with DTensor gradients, a
        DTensor replicated on the first one's mesh, as :func:`get_total_norm` returns.

    Example::

        >>> loss.backward()
        >>> norm = gradclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> optimizer.step()
    """
    parameters = _as_list(parameters, warn_if_empty_generator=True)
    if not is_device_threshold(max_norm):
        max_norm = check_max_norm(max_norm)
    norm_type = check_norm_type(norm_type)
    if distributed.involved(parameters, process_group):
        with torch.no_grad():
            stats, plan = _clip_sharded_parameters_(parameters, norm_type, max_norm,
                                                    error_if_nonfinite, backend, process_group)
        return _zero_norm() if stats is None else distributed.as_returned_norm(stats[NORM], plan)
    with torch.no_grad():
        stats = clip_parameters_norm_(parameters, norm_type, max_norm,
                                      error_if_nonfinite=error_if_nonfinite, backend=backend)
    return _zero_norm() if stats is None else stats[NORM]


def clip_grad_value_(parameters: TensorOrTensors, clip_value: float,
                     foreach: bool | None = None, *, backend: str = "auto") -> None:
    r"""Clamp the gradients of ``parameters`` to ``[-clip_value, clip_value]``, in place.

    Drop-in for :func:`torch.nn.utils.clip_grad_value_`.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to clamp.
        clip_value (float): the largest magnitude allowed, >= 0.
        foreach (bool, optional): accepted for compatibility; has no effect.
        backend (str): ``"auto"``, ``"cuda"``, ``"triton"`` or ``"reference"``. Default: ``"auto"``

    Example::

        >>> gradclip.clip_grad_value_(model.parameters(), clip_value=0.5)
    """
    parameters = _as_list(parameters)
    value = _as_float(clip_value, "clip_value", "for example clip_value=1.0")
    if math.isnan(value) or value < 0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value!r}; a negative value "
                         "would swap the clamp bounds and set every gradient to it")
    grads = distributed.local_tensors(_grads(parameters))
    if grads:
        with torch.no_grad():
            dispatch.clamp_(grads, value, backend)


__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]
