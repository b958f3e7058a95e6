"""The reference backend: pure torch, on any device. It defines what correct means.

It computes what ``torch.nn.utils.clip_grad_norm_`` computes (per-tensor norms with
``torch._foreach_norm``, then the norm of those norms), except that 16-bit tensors are
reduced in float32 and the result stays float32. It is also what ``auto`` runs on the
CPU, so it moves no more bytes than it must there:

- CPU tensors: the host decides (there is no device to synchronise with). The inf/NaN
  flag costs an extra pass only when the norm is not finite (a finite norm proves every
  element finite), and ``scale_`` by exactly 1 touches nothing: a step with nothing to
  clip is one read, against torch's read plus read/write.
- Other devices: everything stays on the device. The flag takes an extra 1-norm and
  inf-norm pass, and ``scale_`` multiplies even by 1 (every value is kept; NaN payloads
  may change). The fused backends are the fast path there.

Under AMP the norm is of the unscaled gradients, unscaled before the power is taken (a
scale of 2**16 would otherwise overflow an 8-norm of ordinary gradients): in batches of
bounded size, each tensor is multiplied by ``inv_scale`` into a temporary, in float32 for
16-bit tensors, as torch's ``unscale_`` would for float32 ones, and its norm taken. On
the CPU that costs temporaries only when the cheaper ``|inv_scale| * norm(scaled)`` is
not finite (see ``_total_norm``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (
    EPS,
    Backend,
    BackendStatus,
    agc_result,
    aliasing,
    check_dtypes,
    check_writable,
    clip_coefficient,
    coef_of,
    distinct_entries,
    host_clip_coefficient,
    group_by_dtype,
    largest_unclipped_norm,
    stats_dtype,
)

_ACCUMULATE_IN = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_WIDE = {torch.float64, torch.complex128}
_UNSCALE_BATCH_ELEMENTS = 1 << 24  # bounds the temporaries of the AMP norm (64 MiB in float32)


def _decides_on_host(device: torch.device) -> bool:
    """CPU tensors, outside a traced graph: a Python branch on a value costs nothing."""
    return device.type == "cpu" and not torch.compiler.is_compiling()


Groups = dict  # dtype -> tensors of that dtype, from group_by_dtype


def _per_tensor_norms(groups: Groups, norm_type: float, dtype: torch.dtype, device: torch.device,
                      inv_scale: Tensor | None = None) -> Tensor:
    """Norms of each tensor (times ``inv_scale``) as one ``dtype`` vector, each reduced in
    float32 (float64 for float64 inputs; complex tensors in their real precision). Empty
    tensors add nothing to any norm, and torch's inf norm refuses them; the leading zero
    keeps the vector non-empty. One dtype and a p-norm (the usual call) is torch's own
    vector: one stack of the norms, as ``clip_grad_norm_`` makes it."""
    if len(groups) == 1 and not math.isinf(norm_type):
        (dtype_in, group), = groups.items()
        return torch.stack(_group_norms(dtype_in, group, norm_type, inv_scale)).to(dtype)
    parts = [torch.zeros(1, dtype=dtype, device=device)]
    for dtype_in, group in groups.items():
        if math.isinf(norm_type):
            group = [t for t in group if t.numel() > 0]
            if not group:
                continue
        # One stack per dtype group (its norms share a dtype), one cast: per-norm casts
        # cost more than the norms of small tensors.
        parts.append(torch.stack(_group_norms(dtype_in, group, norm_type, inv_scale)).to(dtype))
    return torch.cat(parts)


def _group_norms(dtype_in: torch.dtype, group: list[Tensor], norm_type: float,
                 inv_scale: Tensor | None) -> list[Tensor]:
    """The norm of each tensor of one dtype group (none empty for the inf norm)."""
    accumulate = _ACCUMULATE_IN.get(dtype_in)
    if inv_scale is None:
        return list(torch._foreach_norm(group, norm_type, dtype=accumulate))
    norms = []
    for batch in _bounded_batches(group):
        if accumulate is not None:
            batch = [t.to(accumulate) for t in batch]
        norms.extend(torch._foreach_norm(torch._foreach_mul(batch, inv_scale.to(batch[0].dtype)),
                                         norm_type))
    return norms


def tensor_norms_in_order(tensors: list[Tensor], norm_type: float, dtype: torch.dtype,
                          inv_scale: Tensor | None = None) -> Tensor:
    """The norm of each tensor (times ``inv_scale``), in input order, as one ``dtype``
    vector on the first tensor's device; 0 for empty tensors. All on one device."""
    device = tensors[0].device
    groups = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    if len(groups) == 1 and not (math.isinf(norm_type) and any(t.numel() == 0 for t in tensors)):
        # One dtype: the group is the input, in order.
        (_, dtype_in), = groups
        return torch.stack(_group_norms(dtype_in, tensors, norm_type, inv_scale)).to(dtype)
    # Reassembled in input order by a stack of 0-d norms: no index tensor to copy from the
    # host (a CUDA graph could not capture that copy).
    in_order: list[Tensor | None] = [None] * len(tensors)
    for (_, dtype_in), ([group], indices) in groups.items():
        if math.isinf(norm_type):
            # torch's inf norm refuses empty tensors; their norm is 0.
            kept = [(t, i) for t, i in zip(group, indices) if t.numel() > 0]
            group, indices = [t for t, _ in kept], [i for _, i in kept]
        if group:
            norms = torch.stack(_group_norms(dtype_in, group, norm_type, inv_scale)).to(dtype)
            for i, norm in zip(indices, norms.unbind()):
                in_order[i] = norm
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.stack([zero if n is None else n for n in in_order])


def _bounded_batches(tensors: list[Tensor]):
    """``tensors`` in consecutive batches of at most ``_UNSCALE_BATCH_ELEMENTS`` elements
    (or one tensor, when it alone is larger)."""
    batch, size = [], 0
    for t in tensors:
        if batch and size + t.numel() > _UNSCALE_BATCH_ELEMENTS:
            yield batch
            batch, size = [], 0
        batch.append(t)
        size += t.numel()
    if batch:
        yield batch


def _nan_and_inf_flags(groups: Groups, dtype: torch.dtype,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """Whether any element is NaN, and whether any is inf: NaN survives a sum, inf a max.

    A norm alone cannot tell: finite values can overflow a sum of squares to inf.
    """
    sums = _per_tensor_norms(groups, 1.0, dtype, device).sum()
    maxima = _per_tensor_norms(groups, math.inf, dtype, device).amax()
    return sums.isnan(), maxima.isinf()


def _total_norm(groups: Groups, norm_type: float, dtype: torch.dtype, device: torch.device,
                inv_scale: Tensor | None) -> Tensor:
    """The norm of all tensors, of the unscaled values when ``inv_scale`` is given.

    On the CPU the unscaled norm is first taken as ``|inv_scale| * norm(scaled)``, which
    needs no temporaries and, for the power-of-two scales of a GradScaler, is bitwise what
    unscaling first gives; only when that is not finite (an overflow of the scaled power
    sum, or a real inf/NaN) is it redone unscaling first.
    """
    if inv_scale is not None and _decides_on_host(device):
        norms = _per_tensor_norms(groups, norm_type, dtype, device)
        norm = torch.linalg.vector_norm(norms, norm_type) * inv_scale.abs()
        if bool(norm.isfinite()):
            return norm
    norms = _per_tensor_norms(groups, norm_type, dtype, device, inv_scale)
    return torch.linalg.vector_norm(norms, norm_type)


def _stats_of(norm: Tensor, groups: Groups, max_norm: float, inv_scale: Tensor | None,
              dtype: torch.dtype, device: torch.device) -> Tensor:
    """``stats`` from the total norm: the inf/NaN flag costs passes only when the norm
    may hide one (always off the CPU, where the host cannot look)."""
    if _decides_on_host(device) and bool(norm.isfinite()):
        found_inf = torch.zeros((), dtype=dtype)
    else:
        has_nan, has_inf = _nan_and_inf_flags(groups, dtype, device)
        # Not every max reduction propagates NaN; the contract says it must.
        norm = torch.where(has_nan, math.nan, norm)
        found_inf = (has_nan | has_inf).to(dtype)
    coef = clip_coefficient(norm, max_norm, inv_scale)
    return torch.stack([norm, coef, found_inf])


def unit_norms(t: Tensor, norm_type: float) -> Tensor:
    """AGC's unit-wise norms: of the whole tensor for ``ndim <= 1`` (shape ``(1,)``), else of
    each slice along the first dim (shape ``(t.shape[0],)``); float32 accumulation (float64
    for float64), 0 for empty units."""
    rows = t.reshape(1, -1) if t.ndim <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    accumulate = _ACCUMULATE_IN.get(t.dtype)
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=accumulate or t.dtype, device=t.device)
    return torch.linalg.vector_norm(rows, norm_type, dim=1, dtype=accumulate)


def agc_coefficients(param_norms: Tensor, grad_norms: Tensor, clip_factor: float, eps: float) -> Tensor:
    """AGC's factor per unit: 1 below ``max(param_norm, eps) * clip_factor``, else
    ``max / max(grad_norm, 1e-6)`` (timm's rule; a NaN norm gives NaN, as there)."""
    limit = torch.clamp(param_norms, min=eps) * clip_factor
    scaled = limit / torch.clamp(grad_norms, min=EPS)
    return torch.where(grad_norms < limit, torch.ones_like(scaled), scaled)


def _factors_for(t: Tensor, factors: Tensor) -> Tensor:
    """``factors`` (per unit of ``t``, along its first dim, or one for all of it) as the
    operand of ``t.mul_``, so that the product is taken in float32 (float64 for float64
    tensors) and rounded once: a 0-d operand of a dimensioned tensor would be rounded to a
    16-bit tensor's dtype first (on the GPU), a float64 one would widen the product."""
    factors = factors.to(torch.float64 if t.dtype in _WIDE else torch.float32)
    return factors.reshape((-1,) + (1,) * (t.ndim - 1)) if t.ndim else factors.reshape(())


def _agc_tensor_(w: Tensor, g: Tensor, clip_factor: float, eps: float, norm_type: float,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """AGC of one tensor in place, the factor in ``dtype``; returns its grad's unit norms
    (before clipping) and the units' factors."""
    grad_norms = unit_norms(g, norm_type).to(dtype)
    coefs = agc_coefficients(unit_norms(w, norm_type).to(dtype), grad_norms, clip_factor, eps)
    if _decides_on_host(g.device) and not bool((coefs != 1.0).any()):
        return grad_norms, coefs
    g.mul_(_factors_for(g, coefs))
    return grad_norms, coefs


def _factor_for(stats: Tensor, dtype: torch.dtype, group: list[Tensor]) -> Tensor | list[Tensor]:
    """``stats[COEF]`` as the contract's rounding rule multiplies a group of ``dtype`` by
    it: in the stats' precision when that is the tensors' (a 0-d view: torch's foreach
    multiply by a Python scalar makes a temporary per tensor); else in float32 by the
    factor rounded to float32, one (1,)-shaped float32 operand per tensor (a 0-d one would
    be rounded to a 16-bit tensor's dtype first; a 0-d tensor takes a 0-d one, which has
    its priority in type promotion), each product rounded once."""
    if dtype == stats.dtype:
        return stats[1]
    factor = stats[1:2].to(torch.float32)
    scalar = factor.reshape(())
    return [factor if t.ndim else scalar for t in group]


class ReferenceBackend(Backend):
    """Pure torch on any device: takes every input the contract allows, complex included."""

    name = "reference"

    def status(self) -> BackendStatus:
        return BackendStatus(True, f"pure torch {torch.__version__}, any device (the reference)")

    def supports(self, device: torch.device) -> bool:
        return True

    def norm_stats(self, tensors, norm_type, max_norm, inv_scale=None):
        groups = group_by_dtype(tensors)
        dtype = torch.float64 if groups.keys() & _WIDE else torch.float32  # base.stats_dtype
        device = tensors[0].device
        if inv_scale is not None:
            inv_scale = inv_scale.to(device=device, dtype=dtype).reshape(())
        norm = _total_norm(groups, norm_type, dtype, device, inv_scale)
        return _stats_of(norm, groups, max_norm, inv_scale, dtype, device)

    def clip_grads_(self, grads, norm_type, max_norm, inv_scale=None):
        if inv_scale is not None or not _decides_on_host(grads[0].device):
            return super().clip_grads_(grads, norm_type, max_norm, inv_scale)
        # The CPU, where the host decides: a norm at or below the largest one whose factor
        # is exactly 1 (torch's formula) needs no factor and no write; its stats are known.
        groups = group_by_dtype(grads)
        check_dtypes(groups)
        dtype = torch.float64 if groups.keys() & _WIDE else torch.float32
        norm = _total_norm(groups, norm_type, dtype, grads[0].device, None)
        value = norm.item()
        if value <= largest_unclipped_norm(max_norm, dtype):  # False for NaN, and inf above
            return torch.tensor([value, 1.0, 0.0], dtype=dtype)
        if not math.isfinite(value):
            stats = _stats_of(norm, groups, max_norm, None, dtype, grads[0].device)
            self.scale_(grads, coef_of(stats))
            return stats
        # A finite norm: every element is finite (no flag to look for), and the factor,
        # torch's to the bit, is below 1: computed and applied from the host.
        stats = torch.tensor([value, host_clip_coefficient(value, max_norm, dtype), 0.0],
                             dtype=dtype)
        check_writable(grads)
        for dtype_in, group in groups.items():
            torch._foreach_mul_(group, _factor_for(stats, dtype_in, group))
        return stats

    def scale_(self, tensors, scale, found_inf=None):
        factor = scale.reshape(())
        if _decides_on_host(factor.device):
            if factor.item() == 1.0 or (found_inf is not None and found_inf.item() != 0):
                return  # nothing is written: nothing to check
        elif found_inf is not None:
            factor = torch.where(found_inf.reshape(()) != 0, torch.ones_like(factor), factor)
        check_writable(tensors)
        groups = group_by_dtype(tensors)
        check_dtypes(groups)
        groups = groups.values()
        if not _decides_on_host(factor.device) and not _apart(tensors):
            # torch's multi-tensor kernels would race on a tensor listed twice; one by one,
            # each entry multiplies in turn, as torch's foreach loop does on the CPU.
            groups = [[t] for t in tensors]
        for group in groups:
            torch._foreach_mul_(group, factor)

    def clamp_(self, tensors, clip_value):
        check_writable(tensors)
        groups = group_by_dtype(tensors)
        check_dtypes(groups)
        for group in groups.values():
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)

    def norm_stats_per_tensor(self, tensors, norm_type, max_norm, inv_scale=None):
        dtype, device = stats_dtype(tensors), tensors[0].device
        if inv_scale is not None:
            inv_scale = inv_scale.to(device=device, dtype=dtype).reshape(())
        norms = tensor_norms_in_order(tensors, norm_type, dtype, inv_scale)
        norm = torch.linalg.vector_norm(norms, norm_type)
        stats = _stats_of(norm, group_by_dtype(tensors), max_norm, inv_scale, dtype, device)
        return stats, norms

    def clip_per_tensor_(self, tensors, norm_type, max_norm):
        check_writable(tensors)
        kept = distinct_entries(tensors)
        # The norms alone: the global stats would cost a reduction and a host read here.
        norms = tensor_norms_in_order(tensors, norm_type, stats_dtype(tensors))
        _scale_entries_(tensors, clip_coefficient(norms, max_norm), kept)
        return norms

    def scale_per_tensor_(self, tensors, coefs):
        coefs = coefs.reshape(-1)
        if coefs.numel() != len(tensors):
            raise ValueError(f"coefs must have one element per tensor ({len(tensors)}), "
                             f"got {coefs.numel()}")
        check_writable(tensors)
        _scale_entries_(tensors, coefs, distinct_entries(tensors))

    def agc_(self, params, grads, clip_factor, eps, norm_type):
        if len(params) != len(grads):
            raise ValueError(f"agc_ takes one parameter per gradient, got {len(params)} parameters "
                             f"for {len(grads)} gradients")
        for i, (w, g) in enumerate(zip(params, grads)):
            if w.shape != g.shape:
                raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but its parameter has "
                                 f"shape {tuple(w.shape)}; pass each parameter with its own gradient")
        check_dtypes({t.dtype for t in params}, "params")
        check_dtypes({t.dtype for t in grads}, "grads")
        check_writable(grads, "grads")
        kept = distinct_entries(grads, "grads")
        if kept is not None:  # each gradient clipped once, against its first entry's weight
            params, grads = [params[i] for i in kept], [grads[i] for i in kept]
        dtype = stats_dtype(grads)
        norms, coefs = zip(*(_agc_tensor_(w, g, clip_factor, eps, norm_type, dtype)
                             for w, g in zip(params, grads)))
        return agc_result(torch.cat(norms), torch.cat(coefs), norm_type)


def _apart(tensors: list[Tensor]) -> bool:
    """Whether no two tensors share memory (a multi-tensor kernel may take them together)."""
    return aliasing(tensors) is None


def _scale_entries_(tensors: list[Tensor], coefs: Tensor, kept: list[int] | None) -> None:
    """``tensors[i] *= coefs[i]`` for the entries ``kept`` (all if None); on the CPU the host
    leaves out the factors of exactly 1 (nothing to synchronise with)."""
    if _decides_on_host(coefs.device):
        factors = coefs.tolist()
        kept = [i for i in (range(len(tensors)) if kept is None else kept) if factors[i] != 1.0]
        if not kept:
            return
    _mul_each_(tensors, coefs, kept)


def _mul_each_(tensors: list[Tensor], coefs: Tensor, positions: list[int] | None) -> None:
    """``tensors[i] *= coefs[i]`` for each ``i`` of ``positions`` (all if None), rounded as the
    contract says (base.py): in float32 (float64 for float64 tensors), rounded once. The
    factors are views of ``coefs``: no host read, no index tensor."""
    narrow = coefs.to(torch.float32).reshape(-1, 1).unbind()
    wide = coefs.reshape(-1, 1).unbind() if coefs.dtype == torch.float64 else narrow
    if positions is None:
        positions = range(len(tensors))
    else:
        tensors = [tensors[i] for i in positions]
    groups = torch._C._group_tensors_by_device_and_dtype([tensors], True)
    check_dtypes([dtype for _, dtype in groups])
    for (_, dtype), ([group], indices) in groups.items():
        factors = wide if dtype in _WIDE else narrow
        # A (1,)-shaped float operand makes the product float32 (a 0-d one would be rounded
        # to a 16-bit tensor's dtype first, on the GPU); a 0-d tensor takes a 0-d operand,
        # of the same priority in type promotion, so its product is float32 too.
        torch._foreach_mul_(group, [factors[positions[j]] if t.ndim else factors[positions[j]].reshape(())
                                    for t, j in zip(group, indices)])
