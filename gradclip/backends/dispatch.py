"""The one place that chooses a backend, and the one place that falls back.

``backend="auto"`` (the default everywhere) reads ``GRADCLIP_BACKEND`` and, if that is
unset or ``auto`` too, picks per device the fastest backend that runs there:
``cuda`` then ``triton`` then ``reference`` on CUDA devices, ``reference`` elsewhere.
``"torch"``, the reference backend's former name, is accepted for it. A backend
that ``auto`` tried and could not load (a failed build, say) is skipped with a warning.
A backend named explicitly, by argument or environment, must run or raise
:class:`BackendUnavailableError` saying why.

Above this module nothing knows which backend runs: callers use the ops below, which also
split the tensors by device. A backend returns ``NotImplemented`` for input it does not
take (a tensor that is not dense, say); :func:`call` then runs the op of the one reference
backend. Complex tensors go to the reference backend (the only one that reduces ``|z|``)
under ``auto``; a fused backend named explicitly refuses them.
"""

from __future__ import annotations

import importlib
import math
import operator
import os
import warnings
from itertools import chain
from typing import NamedTuple

import torch
from torch import Tensor

from .base import (
    COMPLEX_DTYPES,
    FOUND_INF,
    NORM,
    Backend,
    BackendStatus,
    BackendUnavailableError,
    check_dtypes,
    check_writable,
    clip_coefficient,
    coef_of,
    distinct_entries,
    found_inf_of,
    stats_dtype,
)
from .reference import ReferenceBackend

BACKENDS = ("cuda", "triton", "reference")
ALIASES = {"torch": "reference"}
ENV_VAR = "GRADCLIP_BACKEND"
_ENV_KEY = os.environ.encodekey(ENV_VAR)
_layout_of = operator.attrgetter("layout")
_STRIDED = {torch.strided}
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference")}
_MODULES = {"cuda": ("gradclip.backends.cuda", "CudaBackend"),
            "triton": ("gradclip.backends.triton", "TritonBackend")}

# The one reference backend: what "reference" names, and what every other backend falls
# back to (call).
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
        # os.environ's own mapping, read without its three Python-level calls per lookup
        # (each clip asks): os.environ[...] = ... and monkeypatch.setenv update it too.
        raw = os.environ._data.get(_ENV_KEY)
        backend = "auto" if raw is None else os.fsdecode(raw).strip().lower() or "auto"
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


def call(backend: Backend, op: str, *args):
    """``backend``'s op ``op`` on ``args``, or the reference backend's when ``backend``
    returns ``NotImplemented`` (it writes nothing then): the only fallback there is."""
    result = getattr(backend, op)(*args)
    if result is NotImplemented:
        result = getattr(_instances["reference"], op)(*args)
    return result


class _Part(NamedTuple):
    """The tensors one backend call takes, and where they were in the input."""

    backend: Backend
    tensors: list[Tensor]
    positions: list[int] | None  # input positions of ``tensors``; None: the whole input
    is_complex: bool = False

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device


def _parts(tensors: list[Tensor], backend: str, what: str) -> list[_Part]:
    """The backend calls that ``tensors`` take: the whole list when its first tensor's
    backend accepts it as given (the common eager call: no Python work per tensor); else
    the list validated and split by device, complex tensors apart, each part in input
    order (a list on one device is one part, whatever its dtypes)."""
    if not tensors:
        return []
    first = tensors[0]
    chosen = None
    if isinstance(first, Tensor):
        chosen = resolve(backend, first.device)
        if chosen.accepts(tensors):
            return [_Part(chosen, tensors, None)]
    split = _split(tensors, what)
    if len(split) == 1:
        ((device, is_complex), _), = split.items()
        if chosen is None or is_complex:
            chosen = _part_backend(backend, device, is_complex)
        return [_Part(chosen, tensors, None, is_complex)]
    parts = []
    for (device, is_complex), index_lists in _split(tensors, what, with_indices=True).items():
        positions = index_lists[0] if len(index_lists) == 1 else sorted(chain(*index_lists))
        parts.append(_Part(_part_backend(backend, device, is_complex), [tensors[i] for i in positions],
                           positions, is_complex))
    return parts


def _all_strided(tensors: list[Tensor]) -> bool:
    if torch.compiler.is_compiling():  # Dynamo traces no attrgetter; the graph pays nothing
        return all(t.layout == torch.strided for t in tensors)
    return {*map(_layout_of, tensors)} == _STRIDED  # C-level loop: cheap for thousands


def _split(tensors: list[Tensor], what: str,
           with_indices: bool = False) -> dict[tuple[torch.device, bool], list[list[int] | None]]:
    """Per (device, complex), the input positions of its tensors, one list per dtype (with
    ``with_indices``; else None each); every tensor validated. torch's C++ grouping (the
    one torch's own clipping uses) keeps this cheap for thousands of tensors."""
    try:
        groups = torch._C._group_tensors_by_device_and_dtype([tensors], with_indices)
    except (TypeError, RuntimeError):  # a non-tensor, or None
        groups = None
    if groups is None or sum(len(g) for (g,), _ in groups.values()) != len(tensors):
        bad = next(t for t in tensors if not isinstance(t, Tensor))
        raise TypeError(f"{what} must be tensors, got {type(bad).__name__}")
    check_dtypes([dtype for _, dtype in groups], what)
    split: dict[tuple[torch.device, bool], list[list[int] | None]] = {}
    for (device, dtype), (_, indices) in groups.items():
        split.setdefault((device, dtype in COMPLEX_DTYPES), []).append(indices)
    if not _all_strided(tensors):
        layout = next(t.layout for t in tensors if t.layout is not torch.strided)
        raise RuntimeError(f"{what} with layout {layout} are not supported; gradclip clips "
                           "dense (strided) tensors only. Densify them with .to_dense() first.")
    return split


def _part_backend(backend: str, device: torch.device, is_complex: bool) -> Backend:
    if not is_complex:
        return resolve(backend, device)
    name = requested_backend(backend)
    if name not in ("auto", "reference"):
        raise TypeError(f"backend={name!r} does not clip complex tensors; only the reference "
                        "backend does (the norm of |z|, as torch). Use backend='auto' or 'reference'.")
    return _instances["reference"]


def _nonempty(parts: list[_Part], op: str) -> list[_Part]:
    if not parts:
        raise ValueError(f"{op} needs at least one tensor; got an empty list")
    return parts


def _check_before_writing(parts: list[_Part], what: str, per_tensor: bool = False) -> None:
    """What each part's backend checks before it writes, checked for all parts first: a
    bad tensor on the last device must not leave the first device's tensors written."""
    for part in parts:
        check_writable(part.tensors, what)
        if per_tensor:
            distinct_entries(part.tensors, what)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _combined_stats(stats: list[Tensor], first: torch.device, norm_type: float,
                    max_norm: float, inv_scale: Tensor | None) -> Tensor:
    """One ``stats`` from the parts' stats (each measured with ``max_norm=inf``), on
    ``first``: the norm of the parts' norms."""
    dtype = stats_dtype(stats)
    stats = torch.stack([s.to(device=first, dtype=dtype) for s in stats])
    norm = torch.linalg.vector_norm(stats[:, NORM], norm_type)
    norm = torch.where(stats[:, NORM].isnan().any(), math.nan, norm)
    inv = None if inv_scale is None else inv_scale.to(device=first, dtype=dtype).reshape(())
    return torch.stack([norm, clip_coefficient(norm, max_norm, inv), stats[:, FOUND_INF].amax()])


def _runs(positions: list[int]) -> list[tuple[int, int, int]]:
    """``positions`` (ascending) as runs of consecutive ones: (first position, offset, length)."""
    runs = []
    for offset, position in enumerate(positions):
        if runs and runs[-1][0] + runs[-1][2] == position:
            start, at, length = runs[-1]
            runs[-1] = (start, at, length + 1)
        else:
            runs.append((position, offset, 1))
    return runs


def _in_input_order(parts: list[_Part], values: list[Tensor], device: torch.device) -> Tensor:
    """One vector, in input order, from one vector per part (an element per tensor): one
    ``cat`` of slices, runs of consecutive positions. Built on the device from views, it
    needs no index tensor from the host (no copy to synchronise on; a CUDA graph can
    capture it)."""
    dtype = stats_dtype(values)
    values = [v.to(device=device, dtype=dtype) for v in values]
    pieces = sorted((start, k, offset, length) for k, part in enumerate(parts)
                    for start, offset, length in _runs(part.positions))
    return torch.cat([values[k][offset:offset + length] for _, k, offset, length in pieces])


def _gathered(values: Tensor, positions: list[int], device: torch.device) -> Tensor:
    """``values[positions]`` on ``device``, from slices (no index tensor from the host)."""
    runs = _runs(positions)
    if len(runs) == 1:
        start, _, length = runs[0]
        return values[start:start + length].to(device)
    return torch.cat([values[start:start + length] for start, _, length in runs]).to(device)


def norm_stats(tensors: list[Tensor], norm_type: float, max_norm: float,
               inv_scale: Tensor | None = None, backend: str = "auto") -> Tensor:
    """``stats`` (see :mod:`gradclip.backends.base`) over tensors on any devices.

    With several devices the result lives on the first tensor's device.
    """
    parts = _nonempty(_parts(tensors, backend, "tensors"), "norm_stats")
    if len(parts) == 1:
        return call(parts[0].backend, "norm_stats", parts[0].tensors, norm_type, max_norm, inv_scale)
    stats = [call(p.backend, "norm_stats", p.tensors, norm_type, math.inf, _on(inv_scale, p.device))
             for p in parts]
    return _combined_stats(stats, tensors[0].device, norm_type, max_norm, inv_scale)


def scale_(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None = None,
           backend: str = "auto") -> None:
    """Multiply ``tensors`` by ``scale`` on the device unless it is 1 or ``found_inf`` is set."""
    parts = _parts(tensors, backend, "tensors")
    if len(parts) > 1:
        _check_before_writing(parts, "tensors")
    for p in parts:
        call(p.backend, "scale_", p.tensors, scale.to(p.device), _on(found_inf, p.device))


def clip_grads_(grads: list[Tensor], norm_type: float, max_norm: float,
                inv_scale: Tensor | None = None, backend: str = "auto", *,
                params: list[Tensor] | None = None) -> Tensor:
    """Norm and rescale (see ``Backend.clip_grads_``); returns ``stats``. ``params``: the
    gradients' parameters, for a backend whose fast path reads ``.grad`` itself
    (``Backend.clip_parameters_``), tried first."""
    parts = _nonempty(_parts(grads, backend, "gradients"), "clip_grads_")
    if len(parts) == 1:
        chosen = parts[0].backend
        if params is not None and inv_scale is None and _reads_parameters(chosen):
            stats = chosen.clip_parameters_(params, norm_type, max_norm, None)
            if stats is not None:
                return stats
        return call(chosen, "clip_grads_", parts[0].tensors, norm_type, max_norm, inv_scale)
    _check_before_writing(parts, "gradients")
    stats = _combined_stats(
        [call(p.backend, "norm_stats", p.tensors, norm_type, math.inf, _on(inv_scale, p.device))
         for p in parts], grads[0].device, norm_type, max_norm, inv_scale)
    skip = found_inf_of(stats) if inv_scale is not None else None
    for p in parts:
        call(p.backend, "scale_", p.tensors, coef_of(stats).to(p.device), _on(skip, p.device))
    return stats


def clamp_(tensors: list[Tensor], clip_value: float, backend: str = "auto") -> None:
    """Clamp ``tensors`` in place to ``[-clip_value, clip_value]``."""
    parts = _parts(tensors, backend, "gradients")
    if any(p.is_complex for p in parts):
        raise TypeError("clip_grad_value_ does not take complex gradients: complex numbers "
                        "have no order to clamp by (torch refuses them too). Clip their norm "
                        "with clip_grad_norm_ instead.")
    if len(parts) > 1:
        _check_before_writing(parts, "gradients")
    for p in parts:
        call(p.backend, "clamp_", p.tensors, clip_value)


def _reads_parameters(backend: Backend) -> bool:
    return type(backend).clip_parameters_ is not Backend.clip_parameters_


# -- per-tensor and unit-wise ops (gradclip/per_tensor.py) -------------------------------

def norm_stats_per_tensor(tensors: list[Tensor], norm_type: float, max_norm: float,
                          inv_scale: Tensor | None = None,
                          backend: str = "auto") -> tuple[Tensor, Tensor]:
    """``(stats, norms)``: :func:`norm_stats` and each tensor's norm, in input order, from
    the same read (see ``Backend.norm_stats_per_tensor``). With several devices both live
    on the first tensor's device."""
    parts = _nonempty(_parts(tensors, backend, "tensors"), "norm_stats_per_tensor")
    if len(parts) == 1:
        return tuple(call(parts[0].backend, "norm_stats_per_tensor", parts[0].tensors, norm_type,
                          max_norm, inv_scale))
    results = [call(p.backend, "norm_stats_per_tensor", p.tensors, norm_type, math.inf,
                    _on(inv_scale, p.device)) for p in parts]
    first = tensors[0].device
    stats = _combined_stats([s for s, _ in results], first, norm_type, max_norm, inv_scale)
    return stats, _in_input_order(parts, [n for _, n in results], first)


def tensor_norms(tensors: list[Tensor], norm_type: float, backend: str = "auto") -> Tensor:
    """The norm of each tensor, in input order (the ``norms`` of :func:`norm_stats_per_tensor`)."""
    return norm_stats_per_tensor(tensors, norm_type, math.inf, None, backend)[1]


def clip_per_tensor_(grads: list[Tensor], norm_type: float, max_norm: float,
                     backend: str = "auto") -> Tensor:
    """Clip each gradient to its own norm (``Backend.clip_per_tensor_``); returns the norms."""
    parts = _nonempty(_parts(grads, backend, "gradients"), "clip_per_tensor_")
    if len(parts) == 1:
        return call(parts[0].backend, "clip_per_tensor_", parts[0].tensors, norm_type, max_norm)
    _check_before_writing(parts, "gradients", per_tensor=True)
    norms = [call(p.backend, "clip_per_tensor_", p.tensors, norm_type, max_norm) for p in parts]
    return _in_input_order(parts, norms, grads[0].device)


def scale_per_tensor_(tensors: list[Tensor], coefs: Tensor, backend: str = "auto") -> None:
    """Multiply ``tensors[i]`` by ``coefs[i]`` in place, skipping factors of exactly 1."""
    parts = _parts(tensors, backend, "tensors")
    if len(parts) == 1:
        call(parts[0].backend, "scale_per_tensor_", parts[0].tensors, coefs.to(parts[0].device))
        return
    coefs = coefs.reshape(-1)
    if coefs.numel() != len(tensors):
        raise ValueError(f"coefs must have one element per tensor ({len(tensors)}), got {coefs.numel()}")
    _check_before_writing(parts, "tensors", per_tensor=True)
    for p in parts:
        call(p.backend, "scale_per_tensor_", p.tensors, _gathered(coefs, p.positions, p.device))


def agc_(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
         norm_type: float, backend: str = "auto") -> Tensor:
    """Adaptive gradient clipping (``Backend.agc_``) of ``grads[i]`` against ``params[i]``;
    returns ``[norm, smallest]`` on the first gradient's device: the norm of the distinct
    gradients before clipping (a gradient given twice is clipped, and counted, once) and the
    smallest factor applied (1 when nothing clipped)."""
    if len(params) != len(grads):
        raise ValueError(f"agc_ takes one parameter per gradient, got {len(params)} parameters "
                         f"for {len(grads)} gradients")
    for i, (w, g) in enumerate(zip(params, grads)):
        if w.shape != g.shape or w.device != g.device:
            raise ValueError(f"gradient {i} of shape {tuple(g.shape)} on {g.device} does not match "
                             f"its parameter of shape {tuple(w.shape)} on {w.device}")
    check_dtypes({w.dtype for w in params}, "parameters")
    parts = _nonempty(_parts(grads, backend, "gradients"), "agc_")
    if len(parts) == 1:
        return call(parts[0].backend, "agc_", params, parts[0].tensors, clip_factor, eps, norm_type)
    _check_before_writing(parts, "gradients", per_tensor=True)
    results = [call(p.backend, "agc_", [params[i] for i in p.positions], p.tensors, clip_factor,
                    eps, norm_type) for p in parts]
    dtype = stats_dtype(results)
    first = grads[0].device
    results = torch.stack([r.to(device=first, dtype=dtype) for r in results])
    return torch.stack([torch.linalg.vector_norm(results[:, 0], norm_type), results[:, 1].amin()])


__all__ = ["BACKENDS", "Backend", "BackendStatus", "BackendUnavailableError", "agc_",
           "available_backends", "call", "clamp_", "clip_grads_",
           "clip_per_tensor_", "get_backend", "norm_stats", "norm_stats_per_tensor",
           "requested_backend", "resolve", "scale_", "scale_per_tensor_", "tensor_norms"]
