"""The op contract every backend implements.

A backend works on the tensors of one device, of any mix of float16, bfloat16, float32
and float64, and provides two ops:

``norm_stats(tensors, norm_type, max_norm, inv_scale) -> stats``
    Reads every tensor once and returns ``stats``, a 1-d tensor of 3 elements on the
    tensors' device: float64 if any input is float64, float32 otherwise.

    - ``stats[NORM]``: the p-norm of all elements of all tensors seen as one vector, of
      ``x * inv_scale`` when ``inv_scale`` is given (the norm of the unscaled gradients
      under AMP). Accumulated in float32 (float64 for float64 inputs) whatever the
      input dtype. ``norm_type`` is a float > 0 or ``inf``. NaN if any element is NaN.
    - ``stats[COEF]``: the factor to multiply the tensors by,
      ``inv_scale * min(1, max_norm * (1 / (norm + 1e-6)))``, computed as torch does
      (a NaN norm gives a NaN factor, as ``torch.clamp`` keeps NaN). ``max_norm=inf``
      gives 1 for every finite norm.
    - ``stats[FOUND_INF]``: 1.0 if any input element is inf or NaN, else 0.0 (the
      ``found_inf`` of ``torch.amp.GradScaler``, tested on the scaled values).

``scale_(tensors, scale, found_inf) -> None``
    Multiplies every tensor in place by the one-element device tensor ``scale``, unless
    ``scale`` is exactly 1 or ``found_inf`` (optional, one element) is nonzero: then no
    tensor is touched, bit for bit. Fused backends decide this on the device, so that the
    common no-clip step costs no memory traffic and no host synchronisation; the
    reference backend decides on the host for CPU tensors (nothing to synchronise with)
    and elsewhere multiplies by 1, which keeps every value but not NaN payloads.
    Every backend bumps the autograd version counter of the tensors it may write, as
    torch's in-place ops do.

``clamp_(tensors, clip_value) -> None``
    Clamps every tensor in place to ``[-clip_value, clip_value]``.

Per-tensor and unit-wise ops (``gradclip/per_tensor.py`` calls them):

``norm_stats_per_tensor(tensors, norm_type, max_norm, inv_scale) -> (stats, norms)``
    ``norm_stats`` and, from the same read, ``norms``: a 1-d tensor of ``len(tensors)``
    elements (stats' dtype, in input order), the p-norm of each tensor (times
    ``inv_scale``), 0 for an empty tensor, NaN for one holding a NaN.

``scale_per_tensor_(tensors, coefs) -> None``
    Multiplies ``tensors[i]`` in place by ``coefs[i]`` (a 1-d device tensor); a tensor
    whose factor is exactly 1 is not touched (fused backends do not even read it).

``clip_per_tensor_(tensors, norm_type, max_norm) -> norms``
    Clips every tensor to its own norm: ``tensors[i] *= min(1, max_norm / (norms[i] + 1e-6))``
    with torch's rounding; returns the pre-clip ``norms``.

``agc_(params, grads, clip_factor, eps, norm_type) -> result``
    Adaptive gradient clipping, unit-wise (a unit is the whole tensor for ``ndim <= 1``,
    else one slice ``[i]`` along the first dim): where ``‖g_u‖ >= max(‖w_u‖, eps) *
    clip_factor`` the unit's gradient is scaled by ``max / max(‖g_u‖, 1e-6)``; other units
    are not written. Norms and factors are computed in float32 (float64 when any gradient
    is float64). Returns ``[norm, smallest]`` (1-d, 2 elements): the norm of the distinct
    gradients before clipping (the norm of their units' norms) and the smallest factor of
    any unit (1 for none: whether anything was clipped, without a host read).

How every backend rounds a per-tensor or unit-wise rescale (so that the same factor gives
the same bits on every backend): a tensor that is not float64 is multiplied in float32 by
its factor rounded to float32, and the product is rounded once to the tensor's dtype; a
float64 tensor is multiplied in float64.

Inputs every op checks before it writes anything (a bad tensor late in the list leaves
every earlier one untouched): dtypes, devices, layouts, the shapes of AGC's pairs, and
memory. A tensor whose elements share memory (an expanded, stride-0 view) cannot be
written in place and raises, as torch's in-place ops do. The same tensor twice in a list
(a parameter listed twice, two parameters sharing one ``.grad``):

- the global ops keep torch's semantics: it counts twice in the norm, and ``scale_``
  multiplies it once per entry, in turn (as ``torch._foreach_mul_`` on the CPU);
- the per-tensor and unit-wise ops write each distinct tensor once (the first entry's
  factor; timm's loop clips it once too), and ``norms`` has an entry per position.

Tensors that overlap in memory without being the same tensor are taken by the global ops
as by torch (each entry in turn) and refused by the per-tensor ones, whose factors would
then depend on the order of writes.

A backend takes what it can: an op returns ``NotImplemented`` (before writing anything) for
input it does not take, and the dispatcher (:mod:`gradclip.backends.dispatch`) then runs the
reference backend's op instead. Nothing else falls back. ``clip_grads_`` and
``clip_per_tensor_`` compose the other ops unless a backend fuses them.

Neither op synchronises with the host. A backend may also offer ``clip_parameters_``,
which takes the parameters themselves and finds their ``.grad`` without a Python loop (the
per-tensor Python work dominates eager calls with thousands of tensors); it returns
``None`` for any input it does not take, and the caller then goes the general way.
"""

from __future__ import annotations

import functools
import math
import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

NORM, COEF, FOUND_INF = 0, 1, 2
EPS = 1e-6
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Complex gradients are clipped by the reference backend only (the norm of |z|, as torch).
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
# The dtype code of each supported dtype in the fused kernels' tensor tables (Triton's
# chunk table and the CUDA extension's TensorTable use the same codes; tests pin both).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def coef_of(stats: Tensor) -> Tensor:
    """``stats[COEF]`` as a one-element view: the ``scale`` argument of ``scale_``."""
    return stats[COEF:COEF + 1]


def found_inf_of(stats: Tensor) -> Tensor:
    """``stats[FOUND_INF]`` as a one-element view: the ``found_inf`` argument of ``scale_``."""
    return stats[FOUND_INF:FOUND_INF + 1]


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and if not, why (and what to do about it)."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.reason


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here."""


class Backend:
    """Base class of the backends; see the module docstring for the contract.

    Every op returns ``NotImplemented`` here: a backend overrides what it takes, and the
    dispatcher runs the reference backend's op for the rest.
    """

    name: str = "?"

    def status(self) -> BackendStatus:
        """Whether this backend can run here (cheap: never builds or compiles)."""
        raise NotImplementedError

    def accepts(self, tensors: list[Tensor]) -> bool:
        """Whether the ops take ``tensors`` whole, as given: all on one device this backend
        runs, of supported dtypes and layouts. Backends that can tell without a Python loop
        over the tensors say so; for the others (the default) the dispatch validates the
        list and splits it by device first, which costs Python time per tensor."""
        return False

    def supports(self, device: torch.device) -> bool:
        """Whether this backend runs tensors of ``device`` (given ``status()`` is available)."""
        raise NotImplementedError

    def norm_stats(self, tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None = None) -> Tensor:
        return NotImplemented

    def scale_(self, tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None = None) -> None:
        return NotImplemented

    def clip_grads_(self, grads: list[Tensor], norm_type: float, max_norm: float,
                    inv_scale: Tensor | None = None) -> Tensor:
        """Norm, then rescale by ``stats[COEF]``; returns ``stats``.

        With ``inv_scale`` (AMP) the rescale is skipped when an inf/NaN was found: the
        optimizer step is skipped then, and the gradients are left as they were.
        Without it, a non-finite norm rescales by NaN, exactly as torch does.
        """
        stats = self.norm_stats(grads, norm_type, max_norm, inv_scale)
        if stats is NotImplemented:
            return NotImplemented
        skip = found_inf_of(stats) if inv_scale is not None else None
        if self.scale_(grads, coef_of(stats), skip) is NotImplemented:
            return NotImplemented
        return stats

    def clamp_(self, tensors: list[Tensor], clip_value: float) -> None:
        return NotImplemented

    def norm_stats_per_tensor(self, tensors: list[Tensor], norm_type: float, max_norm: float,
                              inv_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return NotImplemented

    def scale_per_tensor_(self, tensors: list[Tensor], coefs: Tensor) -> None:
        return NotImplemented

    def clip_per_tensor_(self, tensors: list[Tensor], norm_type: float, max_norm: float) -> Tensor:
        """Per-tensor norms, then each tensor scaled by its own factor; returns the norms."""
        result = self.norm_stats_per_tensor(tensors, norm_type, math.inf)
        if result is NotImplemented:
            return NotImplemented
        norms = result[1]
        if self.scale_per_tensor_(tensors, clip_coefficient(norms, max_norm)) is NotImplemented:
            return NotImplemented
        return norms

    def agc_(self, params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
             norm_type: float) -> Tensor:
        return NotImplemented

    def clip_parameters_(self, params: list[Tensor], norm_type: float, max_norm: float,
                         inv_scale: Tensor | None = None) -> Tensor | None:
        """``clip_grads_`` over the ``.grad`` of ``params``, or ``None`` if not offered."""
        return None


def group_by_dtype(tensors: list[Tensor]) -> dict[torch.dtype, list[Tensor]]:
    """The tensors (of one device) split by dtype, each group in input order (foreach ops
    take one dtype). torch's C++ grouping: a Python loop costs ~1 us per tensor."""
    groups = torch._C._group_tensors_by_device_and_dtype([tensors], False)
    return {dtype: group for (_, dtype), ([group], _) in groups.items()}


def agc_result(unit_norms: Tensor, unit_coefs: Tensor, norm_type: float) -> Tensor:
    """What ``agc_`` returns: ``[the norm of the units' norms, the smallest factor]`` (1
    for no unit; NaN if a factor is NaN)."""
    smallest = torch.cat([unit_coefs.new_ones(1), unit_coefs]).amin()
    return torch.stack([torch.linalg.vector_norm(unit_norms, norm_type), smallest])


def stats_dtype(tensors: list[Tensor]) -> torch.dtype:
    """float64 if any tensor is float64 (or complex128), else float32: the dtype of ``norm_stats``."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t.dtype in wide for t in tensors) else torch.float32


def clip_coefficient(norm: Tensor, max_norm: float, inv_scale: Tensor | None = None) -> Tensor:
    """``inv_scale * min(1, max_norm / (norm + 1e-6))`` with torch's rounding and NaN rules.

    torch evaluates ``max_norm / t`` as ``t.reciprocal() * max_norm``; doing the same keeps
    the coefficient bit-identical to ``torch.nn.utils.clip_grad_norm_`` for float32 norms.
    """
    coef = torch.clamp(torch.reciprocal(norm + EPS) * max_norm, max=1.0)
    if inv_scale is not None:
        coef = coef * inv_scale.to(coef.dtype)
    return coef


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as a Python float; past
    float32's range, inf (as a float32 tensor's arithmetic rounds it)."""
    return ctypes.c_float(x).value


def host_clip_coefficient(norm: float, max_norm: float, dtype: torch.dtype) -> float:
    """:func:`clip_coefficient` of a norm the host holds, with the same bits: each float32
    step computed in float64 and rounded to float32, which for +, * and / of float32
    operands is the correctly rounded float32 result (53 >= 2 x 24 + 2 bits of precision),
    so that the CPU can skip the four small ops of the tensor form."""
    if dtype == torch.float64:
        return min((1.0 / (norm + EPS)) * max_norm, 1.0) if norm == norm else norm
    r = _float32
    if norm != norm:
        return norm
    coef = r(r(1.0 / r(r(norm) + r(EPS))) * r(max_norm))
    return coef if coef < 1.0 or coef != coef else 1.0


_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


@functools.lru_cache(maxsize=256)
def largest_unclipped_norm(max_norm: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` norm whose clip coefficient is exactly 1 (torch's formula and
    rounding, as ``clip_coefficient``), so that "clipped" means what the rescale did.

    The coefficient falls as the norm grows, and so does it along the bit patterns of
    non-negative floats, which are ordered as integers: a binary search over those finds
    the boundary in at most 64 evaluations, whatever ``max_norm`` is.
    """
    finfo = torch.finfo(dtype)
    if math.isinf(max_norm) or max_norm >= finfo.max:
        return finfo.max
    as_int = _INT_VIEW[dtype]

    def clips(bits: int) -> bool:
        value = torch.tensor(bits, dtype=as_int).view(dtype)
        return bool(clip_coefficient(value, max_norm) < 1)

    low = 0  # +0.0: its coefficient is max_norm / 1e-6, clipped only for tiny max_norm
    if clips(low):
        return 0.0
    high = int(torch.tensor(finfo.max, dtype=dtype).view(as_int))
    while high - low > 1:  # invariant: clips(high) or high is the top; not clips(low)
        middle = (low + high) // 2
        if clips(middle):
            high = middle
        else:
            low = middle
    return float(torch.tensor(low, dtype=as_int).view(dtype))


def check_dtypes(dtypes, what: str = "tensors") -> None:
    """``TypeError`` for a dtype no backend clips (the dtypes of a list, e.g. the keys of
    :func:`group_by_dtype`), before anything is written."""
    for dtype in dtypes:
        if dtype not in SUPPORTED_DTYPES and dtype not in COMPLEX_DTYPES:
            raise TypeError(f"{what} of dtype {dtype} are not supported; gradclip clips "
                            "float16, bfloat16, float32 and float64 tensors (and complex "
                            "ones on the reference backend).")


# -- memory: what an op that writes in place must know about its tensors ------------------

_is_contiguous = Tensor.is_contiguous


def shares_memory_within(t: Tensor) -> bool:
    """Whether two elements of ``t`` are one location (a dimension of size > 1 with stride 0,
    as ``expand`` makes): torch's in-place ops refuse such a tensor, and so do ours."""
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))


def check_writable(tensors: list[Tensor], what: str = "tensors") -> None:
    """Raise ``RuntimeError`` for the first tensor whose elements share memory, before any
    write. Costs one contiguity test per tensor when none is expanded."""
    if all(map(_is_contiguous, tensors)):
        return
    for i, t in enumerate(tensors):
        if shares_memory_within(t):
            raise RuntimeError(
                f"{what}[{i}] (shape {tuple(t.shape)}, strides {t.stride()}) has elements that share "
                "memory, as an expanded or stride-0 view has; it cannot be written in place, and "
                f"no tensor was changed. Give it memory of its own, e.g. {what}[{i}] = "
                f"{what}[{i}].clone() (for a .grad: p.grad = p.grad.clone()).")


def byte_span(t: Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses of ``t``'s elements; ``(0, 0)`` when empty."""
    if t.numel() == 0:
        return 0, 0
    start = t.data_ptr()
    if _is_contiguous(t):
        return start, start + t.nbytes
    low = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride < 0)
    high = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if stride > 0)
    return start + low * t.element_size(), start + (high + 1) * t.element_size()


def _same_elements(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` (of one span) hold the very same elements in the same order."""
    if a.dtype != b.dtype or a.numel() != b.numel():
        return False
    return (a.shape == b.shape and a.stride() == b.stride()) or (_is_contiguous(a) and _is_contiguous(b))


@dataclass(frozen=True)
class Aliasing:
    """How the tensors of a list share memory (:func:`aliasing`)."""

    first: tuple[int, ...]          # per position, the first position of the same tensor
    overlap: tuple[int, int] | None  # two positions that overlap without being the same

    def distinct(self) -> list[int]:
        """The positions of the first entry of each distinct tensor, in order."""
        return [i for i, f in enumerate(self.first) if f == i]


def aliasing(tensors: list[Tensor]) -> Aliasing | None:
    """``None`` when no two tensors share memory (the usual case), else which entries are
    the same tensor and whether any two overlap otherwise. One sort of the byte spans.

    Traced code (``torch.compile``) has no addresses to compare: there it is ``None``.
    """
    if torch.compiler.is_compiling():
        return None
    spans = sorted((lo, hi, i) for i, (lo, hi) in enumerate(map(byte_span, tensors)) if hi > lo)
    first = list(range(len(tensors)))
    overlap = None
    reach, reach_at, head = 0, -1, None  # furthest end so far, who reaches it, cluster head
    for lo, hi, i in spans:
        if lo >= reach:
            head = (lo, hi, i)
        elif head[:2] == (lo, hi) and _same_elements(tensors[head[2]], tensors[i]):
            first[i] = head[2]
        elif overlap is None:
            overlap = (min(reach_at, i), max(reach_at, i))
        if hi > reach:
            reach, reach_at = hi, i
    if overlap is None and all(f == i for i, f in enumerate(first)):
        return None
    return Aliasing(tuple(first), overlap)


def distinct_entries(tensors: list[Tensor], what: str = "tensors") -> list[int] | None:
    """For the per-tensor ops: the positions of the distinct tensors (each tensor's first
    entry), or ``None`` when all are distinct; ``RuntimeError`` when two overlap in memory
    without being the same tensor."""
    return distinct_of(aliasing(tensors), what)


def distinct_of(shared: Aliasing | None, what: str = "tensors") -> list[int] | None:
    """:func:`distinct_entries` from an :func:`aliasing` already taken."""
    if shared is None:
        return None
    if shared.overlap is not None:
        i, j = shared.overlap
        raise RuntimeError(
            f"{what}[{i}] and {what}[{j}] overlap in memory without being the same tensor, so "
            "clipping each by its own factor has no one answer; no tensor was changed. Pass "
            "tensors with memory of their own (e.g. .clone() one of them).")
    return shared.distinct()
