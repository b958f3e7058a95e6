"""The one place that chooses a backend.

``backend="auto"`` (the default everywhere) reads ``GRADCLIP_BACKEND`` and, if that is
unset or ``auto`` too, picks per device the fastest backend that runs there:
``cuda`` then ``triton`` then ``reference`` on CUDA devices, ``reference`` elsewhere.
``"torch"``, the reference backend's former name, is accepted for it. A backend
that ``auto`` tried and could not load (a failed build, say) is skipped with a warning.
A backend named explicitly, by argument or environment, must run or raise
:class:`BackendUnavailableError` saying why.

Above this module nothing knows which backend runs: callers use :func:`norm_stats`,
:func:`scale_` and :func:`clip_grads_`, which also split the tensors by device. Complex
tensors go to the reference backend (the only one that reduces ``|z|``) under ``auto``;
a fused backend named explicitly refuses them.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings

import torch
from torch import Tensor

from .base import (
    COMPLEX_DTYPES,
    FOUND_INF,
    NORM,
    SUPPORTED_DTYPES,
    Backend,
    BackendStatus,
    BackendUnavailableError,
    clip_coefficient,
    coef_of,
    found_inf_of,
    stats_dtype,
)
from .reference import ReferenceBackend

BACKENDS = ("cuda", "triton", "reference")
ALIASES = {"torch": "reference"}
ENV_VAR = "GRADCLIP_BACKEND"
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference")}
_MODULES = {"cuda": ("gradclip.backends.cuda", "CudaBackend"),
            "triton": ("gradclip.backends.triton", "TritonBackend")}

_instances: dict[str, Backend] = {"reference": ReferenceBackend()}
_import_errors: dict[str, str] = {}
_auto_choice: dict[torch.device, Backend] = {}


class _MissingBackend(Backend):
    """Stands in for a backend whose module cannot be imported here."""

    def __init__(self, name: str, reason: str):
        self.name, self._reason = name, reason

    def status(self) -> BackendStatus:
        return BackendStatus(False, self._reason)

    def supports(self, device: torch.device) -> bool:
        return False


def get_backend(name: str) -> Backend:
    """The backend object called ``name`` (one of :data:`BACKENDS`), created on first use."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend; choose one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))
    if name not in _instances:
        module_name, class_name = _MODULES[name]
        try:
            _instances[name] = getattr(importlib.import_module(module_name), class_name)()
        except ImportError as error:
            _instances[name] = _MissingBackend(name, f"cannot import {module_name}: {error}")
    return _instances[name]


def available_backends() -> dict[str, BackendStatus]:
    """Per backend, whether it can run here and, if not, why. Builds nothing."""
    return {name: get_backend(name).status() for name in BACKENDS}


def requested_backend(backend: str = "auto") -> str:
    """The backend name in force: the argument, else ``$GRADCLIP_BACKEND``, else ``auto``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto' or 'reference', got {type(backend).__name__}")
    backend = ALIASES.get(backend, backend)
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        backend = ALIASES.get(backend, backend)
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is not a backend; set it to 'auto', "
                             + ", ".join(repr(b) for b in BACKENDS) + " or unset it")
    elif backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not a backend; choose one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS))
    return backend


def resolve(backend: str, device: torch.device) -> Backend:
    """The backend that will run tensors of ``device`` for the request ``backend``."""
    name = requested_backend(backend)
    if name == "auto":
        chosen = _auto_choice.get(device)
        if chosen is None:
            chosen = _auto_choice[device] = _choose_automatically(device)
        return chosen
    chosen = get_backend(name)
    status = chosen.status()
    if not status.available:
        raise BackendUnavailableError(f"backend={name!r} cannot run here: {status.reason}. "
                                      "Use backend='auto' to fall back to what can run.")
    if not chosen.supports(device):
        raise BackendUnavailableError(f"backend={name!r} does not run tensors on {device}; "
                                      "use backend='reference' or 'auto' for them.")
    _load(chosen)
    return chosen


def _choose_automatically(device: torch.device) -> Backend:
    for name in _AUTO_ORDER.get(device.type, ("reference",)):
        candidate = get_backend(name)
        if not (candidate.status().available and candidate.supports(device)):
            continue
        try:
            _load(candidate)
        except BackendUnavailableError as error:
            warnings.warn(f"gradclip: backend {name!r} could not be loaded, falling back: {error}",
                          RuntimeWarning, stacklevel=4)
            continue
        return candidate
    return _instances["reference"]


def _load(backend: Backend) -> None:
    load = getattr(backend, "load", None)
    if load is not None:
        load()


_Part = tuple[torch.device, bool]  # (device, complex): the tensors one backend call takes


def _split(tensors: list[Tensor], what: str) -> dict[_Part, list[Tensor]]:
    """The tensors by device, and within a device real apart from complex; each part in
    dtype groups. Unsupported tensors raise.

    torch's C++ grouping (the one torch's own clipping uses) keeps this cheap for thousands
    of tensors.
    """
    return {part: group for part, (group, _) in _split_indexed(tensors, what, False).items()}


def _split_indexed(tensors: list[Tensor], what: str,
                   with_indices: bool = True) -> dict[_Part, tuple[list[Tensor], list[int]]]:
    """:func:`_split`, each part with the input positions of its tensors."""
    try:
        groups = torch._C._group_tensors_by_device_and_dtype([tensors], with_indices)
    except (TypeError, RuntimeError):  # a non-tensor, or None
        groups = None
    if groups is None or sum(len(g) for (g,), _ in groups.values()) != len(tensors):
        bad = next(t for t in tensors if not isinstance(t, Tensor))
        raise TypeError(f"{what} must be tensors, got {type(bad).__name__}")
    parts: dict[_Part, tuple[list[Tensor], list[int]]] = {}
    for (device, dtype), ([group], indices) in groups.items():
        if dtype not in SUPPORTED_DTYPES and dtype not in COMPLEX_DTYPES:
            raise TypeError(f"{what} of dtype {dtype} are not supported; gradclip clips "
                            "float16, bfloat16, float32 and float64 tensors (and complex "
                            "ones on the reference backend).")
        members, positions = parts.setdefault((device, dtype in COMPLEX_DTYPES), ([], []))
        members.extend(group)
        positions.extend(indices or ())
    strided = torch.strided
    if not all(t.layout is strided for t in tensors):
        layout = next(t.layout for t in tensors if t.layout is not strided)
        raise RuntimeError(f"{what} with layout {layout} are not supported; gradclip clips "
                           "dense (strided) tensors only. Densify them with .to_dense() first.")
    return parts


def _resolve_part(backend: str, part: _Part) -> Backend:
    device, is_complex = part
    if not is_complex:
        return resolve(backend, device)
    name = requested_backend(backend)
    if name not in ("auto", "reference"):
        raise TypeError(f"backend={name!r} does not clip complex tensors; only the reference "
                        "backend does (the norm of |z|, as torch). Use backend='auto' or 'reference'.")
    return _instances["reference"]


def _taken_whole(tensors: list[Tensor], backend: str) -> Backend | None:
    """The first tensor's backend if it takes the whole list as given, else None.

    The common call (one device, a list the backend checks in C++) then skips the per-tensor
    Python work of :func:`_split`.
    """
    first = tensors[0] if tensors else None
    if not isinstance(first, Tensor):
        return None
    chosen = resolve(backend, first.device)
    return chosen if chosen.accepts(tensors) else None


def norm_stats(tensors: list[Tensor], norm_type: float, max_norm: float,
               inv_scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``stats`` (see :mod:`gradclip.backends.base`) over tensors on any devices.

    With several devices the result lives on the first tensor's device.
    """
    whole = _taken_whole(tensors, backend)
    if whole is not None:
        return whole.norm_stats(tensors, norm_type, max_norm, inv_scale)
    parts = _split(tensors, "tensors")
    if len(parts) == 1:
        (part, group), = parts.items()
        return _resolve_part(backend, part).norm_stats(group, norm_type, max_norm, inv_scale)
    return _combine_parts(parts, tensors[0].device, norm_type, max_norm, inv_scale, backend)


def _combine_parts(parts: dict[_Part, list[Tensor]], first: torch.device, norm_type: float,
                   max_norm: float, inv_scale: Tensor | None, backend: str) -> Tensor:
    """One ``stats`` from the stats of each part, on ``first``: the norm of the parts' norms."""
    stats = [_resolve_part(backend, part).norm_stats(
                 group, norm_type, math.inf, None if inv_scale is None else inv_scale.to(part[0])
             ).to(first) for part, group in parts.items()]
    dtype = stats_dtype(stats)
    stats = torch.stack(stats).to(dtype)
    norm = torch.linalg.vector_norm(stats[:, NORM], norm_type)
    norm = torch.where(stats[:, NORM].isnan().any(), math.nan, norm)
    inv = None if inv_scale is None else inv_scale.to(device=first, dtype=dtype).reshape(())
    return torch.stack([norm, clip_coefficient(norm, max_norm, inv), stats[:, FOUND_INF].amax()])


def scale_(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None = None,
           backend: str = "auto") -> None:
    """Multiply ``tensors`` by ``scale`` on the device unless it is 1 or ``found_inf`` is set."""
    whole = _taken_whole(tensors, backend)
    if whole is not None:
        device = tensors[0].device
        whole.scale_(tensors, scale.to(device), None if found_inf is None else found_inf.to(device))
        return
    _scale_parts(_split(tensors, "tensors"), scale, found_inf, backend)


def _scale_parts(parts: dict[_Part, list[Tensor]], scale: Tensor, found_inf: Tensor | None,
                 backend: str) -> None:
    for part, group in parts.items():
        device = part[0]
        skip = None if found_inf is None else found_inf.to(device)
        _resolve_part(backend, part).scale_(group, scale.to(device), skip)


def clip_grads_(grads: list[Tensor], norm_type: float, max_norm: float,
                inv_scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """Norm and rescale (see ``Backend.clip_grads_``); returns ``stats``."""
    whole = _taken_whole(grads, backend)
    if whole is not None:
        return whole.clip_grads_(grads, norm_type, max_norm, inv_scale)
    parts = _split(grads, "gradients")
    if len(parts) == 1:
        (part, group), = parts.items()
        return _resolve_part(backend, part).clip_grads_(group, norm_type, max_norm, inv_scale)
    stats = _combine_parts(parts, grads[0].device, norm_type, max_norm, inv_scale, backend)
    # The parts are known: scale them without splitting the list again.
    _scale_parts(parts, coef_of(stats), found_inf_of(stats) if inv_scale is not None else None,
                 backend)
    return stats


def clamp_(tensors: list[Tensor], clip_value: float, backend: str = "auto") -> None:
    """Clamp ``tensors`` in place to ``[-clip_value, clip_value]``."""
    whole = _taken_whole(tensors, backend)
    if whole is not None:
        whole.clamp_(tensors, clip_value)
        return
    for (device, is_complex), group in _split(tensors, "gradients").items():
        if is_complex:
            raise TypeError("clip_grad_value_ does not take complex gradients: complex numbers "
                            "have no order to clamp by (torch refuses them too). Clip their norm "
                            "with clip_grad_norm_ instead.")
        resolve(backend, device).clamp_(group, clip_value)


def clip_parameters_(params: list, norm_type: float, max_norm: float,
                     inv_scale: Tensor | None = None, backend: str = "auto") -> Tensor | None:
    """The backend's fast path over ``params`` (``stats``), or ``None``: use :func:`clip_grads_`."""
    if not params or not isinstance(params[0], Tensor):
        return None
    return resolve(backend, params[0].device).clip_parameters_(params, norm_type, max_norm, inv_scale)


# -- per-tensor and unit-wise ops (gradclip/per_tensor.py) -------------------------------

def norm_stats_per_tensor(tensors: list[Tensor], norm_type: float, max_norm: float,
                          inv_scale: Tensor | None = None,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(stats, norms)``: :func:`norm_stats` and each tensor's norm, in input order, from
    the same read (see ``Backend.norm_stats_per_tensor``). With several devices both live
    on the first tensor's device."""
    whole = _taken_whole(tensors, backend)
    if whole is not None:
        return whole.norm_stats_per_tensor(tensors, norm_type, max_norm, inv_scale)
    parts = _split_indexed(tensors, "tensors")
    if len(parts) == 1:
        (part, (group, positions)), = parts.items()
        stats, norms = _resolve_part(backend, part).norm_stats_per_tensor(
            group, norm_type, max_norm, inv_scale)
        return stats, _in_input_order([(norms, positions)], len(tensors))
    first = tensors[0].device
    results = [(_resolve_part(backend, part).norm_stats_per_tensor(
                    group, norm_type, math.inf, None if inv_scale is None else inv_scale.to(part[0])),
                positions) for part, (group, positions) in parts.items()]
    dtype = stats_dtype([stats for (stats, _), _ in results])
    norms = _in_input_order([(n.to(device=first, dtype=dtype), p) for (_, n), p in results],
                            len(tensors))
    stats = torch.stack([s.to(device=first, dtype=dtype) for (s, _), _ in results])
    norm = torch.linalg.vector_norm(stats[:, NORM], norm_type)
    norm = torch.where(stats[:, NORM].isnan().any(), math.nan, norm)
    inv = None if inv_scale is None else inv_scale.to(device=first, dtype=dtype).reshape(())
    stats = torch.stack([norm, clip_coefficient(norm, max_norm, inv), stats[:, FOUND_INF].amax()])
    return stats, norms


def _in_input_order(pieces: list[tuple[Tensor, list[int]]], count: int) -> Tensor:
    """One vector from per-part vectors and the input positions of their elements."""
    if len(pieces) == 1 and pieces[0][1] == list(range(count)):
        return pieces[0][0]
    first = pieces[0][0]
    dtype = stats_dtype([values for values, _ in pieces])
    out = torch.empty(count, dtype=dtype, device=first.device)
    for values, positions in pieces:
        out[torch.tensor(positions, device=first.device)] = values.to(device=first.device, dtype=dtype)
    return out


def tensor_norms(tensors: list[Tensor], norm_type: float, backend: str = "auto") -> Tensor:
    """The norm of each tensor, in input order (the ``norms`` of :func:`norm_stats_per_tensor`)."""
    return norm_stats_per_tensor(tensors, norm_type, math.inf, None, backend)[1]


def clip_per_tensor_(grads: list[Tensor], norm_type: float, max_norm: float,
                     backend: str = "auto") -> Tensor:
    """Clip each gradient to its own norm (``Backend.clip_per_tensor_``); returns the norms."""
    whole = _taken_whole(grads, backend)
    if whole is not None:
        return whole.clip_per_tensor_(grads, norm_type, max_norm)
    pieces = [(_resolve_part(backend, part).clip_per_tensor_(group, norm_type, max_norm), positions)
              for part, (group, positions) in _split_indexed(grads, "gradients").items()]
    return _in_input_order(pieces, len(grads))


def scale_per_tensor_(tensors: list[Tensor], coefs: Tensor, backend: str = "auto") -> None:
    """Multiply ``tensors[i]`` by ``coefs[i]`` in place, skipping factors of exactly 1."""
    whole = _taken_whole(tensors, backend)
    if whole is not None:
        whole.scale_per_tensor_(tensors, coefs.to(tensors[0].device))
        return
    for part, (group, positions) in _split_indexed(tensors, "tensors").items():
        part_coefs = coefs.to(part[0])[torch.tensor(positions, device=part[0])]
        _resolve_part(backend, part).scale_per_tensor_(group, part_coefs)


def agc_(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
         norm_type: float, backend: str = "auto") -> Tensor:
    """Adaptive gradient clipping (``Backend.agc_``) of ``grads[i]`` against ``params[i]``;
    returns the norm of all gradients before clipping, on the first gradient's device."""
    for w, g in zip(params, grads):
        if w.shape != g.shape or w.device != g.device:
            raise ValueError(f"a gradient of shape {tuple(g.shape)} on {g.device} does not match "
                             f"its parameter of shape {tuple(w.shape)} on {w.device}")
    whole = _taken_whole(grads, backend)
    if whole is not None and whole.accepts(params):
        return whole.agc_(params, grads, clip_factor, eps, norm_type)
    first = grads[0].device
    norms = []
    for part, (group, positions) in _split_indexed(grads, "gradients").items():
        weights = [params[i] for i in positions]
        norms.append(_resolve_part(backend, part).agc_(weights, group, clip_factor, eps, norm_type))
    dtype = stats_dtype(norms)
    return torch.linalg.vector_norm(torch.stack([n.to(device=first, dtype=dtype) for n in norms]),
                                    norm_type)


__all__ = ["BACKENDS", "Backend", "BackendStatus", "BackendUnavailableError", "available_backends",
           "agc_", "clamp_", "clip_grads_", "clip_parameters_", "clip_per_tensor_", "get_backend",
           "norm_stats", "norm_stats_per_tensor", "requested_backend", "resolve", "scale_",
           "scale_per_tensor_", "tensor_norms"]
