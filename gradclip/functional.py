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

from . import distributed, pipeline
from .backends import dispatch
from .backends.base import clip_coefficient
from .rules import GlobalRule, LocalRule

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
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}; {hint}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}; {hint}") from None


def check_max_norm(max_norm) -> float:
    """``max_norm`` as a float; NaN or negative values raise ``ValueError``, a bool or a
    non-number ``TypeError``."""
    value = _as_float(max_norm, "max_norm", "for example max_norm=1.0")
    if math.isnan(value) or value < 0:
        raise ValueError(f"max_norm must be >= 0 (or inf to only measure), got {max_norm!r}; "
                         "a negative or NaN max_norm would flip or NaN every gradient")
    return value


def check_threshold(max_norm) -> float | Tensor | GlobalRule | LocalRule:
    """What the pipeline takes as a threshold: a float >= 0, a 0-d tensor (a threshold
    kept on the device), or a rule."""
    if isinstance(max_norm, (GlobalRule, LocalRule)):
        return max_norm
    if isinstance(max_norm, Tensor) and max_norm.numel() == 1:
        return max_norm
    return check_max_norm(max_norm)


def check_norm_type(norm_type) -> float:
    """``norm_type`` as a float; it must be > 0 (``inf`` and ``'inf'`` allowed)."""
    value = _as_float(norm_type, "norm_type", "use 2.0, 1.0 or float('inf')")
    if math.isnan(value) or value <= 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type!r}; "
                         "use 2.0 for the Euclidean norm or float('inf') for the max norm")
    return value


def _zero_norm() -> Tensor:
    # torch's value for "nothing to measure": a float32 zero on the CPU.
    return torch.tensor(0.0)


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
    with torch.no_grad():
        measured = pipeline.measure(tensors, norm_type, process_group=process_group,
                                    backend=backend)
    if measured is None or (measured.plan is not None and not measured.plan.chains):
        return _zero_norm()
    if error_if_nonfinite:
        pipeline.raise_if_nonfinite(measured.norm, norm_type)
    return _returned(measured.norm, measured.plan)


def _returned(norm: Tensor, plan: distributed.Plan | None) -> Tensor:
    """The norm as torch's functions return it (a DTensor for DTensor gradients)."""
    return norm if plan is None else distributed.as_returned_norm(norm, plan)


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
        pipeline.rescale_(grads, clip_coefficient(total_norm, max_norm), None, backend)


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
            each call on the device (:class:`gradclip.ZClip`, :class:`gradclip.AutoClip`;
            give it the same rule object every call: its state is the run's), or one that
            clips each gradient on its own (:class:`gradclip.PerTensor`,
            :class:`gradclip.AGC`; their own ``norm_type`` must agree with ``norm_type``).
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
        With a local rule, the norm of all gradients before it clipped them.

    Example::

        >>> loss.backward()
        >>> norm = gradclip.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> optimizer.step()
    """
    parameters = _as_list(parameters, warn_if_empty_generator=True)
    max_norm = check_threshold(max_norm)
    norm_type = check_norm_type(norm_type)
    grads, silent = pipeline.grads_and_silent(parameters)
    if not grads and parameters and isinstance(parameters[0], Tensor):
        # Nothing to clip, but a backend named explicitly must be able to run here.
        dispatch.resolve(backend, parameters[0].device)
    with torch.no_grad():
        clipped = pipeline.clip_(grads, norm_type, max_norm, params=parameters, silent=silent,
                                 error_if_nonfinite=error_if_nonfinite,
                                 process_group=process_group, backend=backend)
    if clipped is None or (clipped.plan is not None and not clipped.plan.chains):
        return _zero_norm()
    return _returned(clipped.norm, clipped.plan)


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
