"""The reference backend: pure torch, on any device. It defines what correct means.

It computes what ``torch.nn.utils.clip_grad_norm_`` computes (per-tensor norms with
``torch._foreach_norm``, then the norm of those norms), except that 16-bit tensors are
reduced in float32 and the result stays float32. It moves more bytes than the fused
backends: an extra read for the inf/NaN flag, and a multiply even when nothing is clipped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Backend, BackendStatus, clip_coefficient, group_by_dtype, stats_dtype


def _per_tensor_norms(tensors: list[Tensor], norm_type: float, dtype: torch.dtype) -> Tensor:
    """Norms of each non-empty tensor, reduced in float32 (float64 for float64 inputs),
    as one ``dtype`` vector. Empty tensors add nothing to any norm, and torch's inf norm
    refuses them; the leading zero keeps the vector non-empty."""
    norms: list[Tensor] = [torch.zeros((), dtype=dtype, device=tensors[0].device)]
    nonempty = [t for t in tensors if t.numel() > 0]
    for dtype_in, group in group_by_dtype(nonempty).items():
        accumulate = None if dtype_in in (torch.float32, torch.float64) else torch.float32
        norms.extend(n.to(dtype) for n in torch._foreach_norm(group, norm_type, dtype=accumulate))
    return torch.stack(norms)


def _nan_and_inf_flags(tensors: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Whether any element is NaN, and whether any is inf: NaN survives a sum, inf a max.

    A norm alone cannot tell: finite values can overflow a sum of squares to inf.
    """
    sums = _per_tensor_norms(tensors, 1.0, dtype).sum()
    maxima = _per_tensor_norms(tensors, math.inf, dtype).amax()
    return sums.isnan(), maxima.isinf()


class ReferenceBackend(Backend):
    name = "torch"

    def status(self) -> BackendStatus:
        return BackendStatus(True, f"pure torch {torch.__version__}, any device (the reference)")

    def supports(self, device: torch.device) -> bool:
        return True

    def norm_stats(self, tensors, norm_type, max_norm, inv_scale=None):
        dtype = stats_dtype(tensors)
        device = tensors[0].device
        if inv_scale is not None:
            inv_scale = inv_scale.to(device=device, dtype=dtype).reshape(())
        norm = torch.linalg.vector_norm(_per_tensor_norms(tensors, norm_type, dtype), norm_type)
        has_nan, has_inf = _nan_and_inf_flags(tensors, dtype)
        # Not every max reduction propagates NaN; the contract says it must.
        norm = torch.where(has_nan, math.nan, norm)
        found_inf = (has_nan | has_inf).to(dtype)
        if inv_scale is not None:
            norm = norm * inv_scale.abs()
        coef = clip_coefficient(norm, max_norm, inv_scale)
        return torch.stack([norm, coef, found_inf])

    def scale_(self, tensors, scale, found_inf=None):
        factor = scale.reshape(())
        if found_inf is not None:
            factor = torch.where(found_inf.reshape(()) != 0, torch.ones_like(factor), factor)
        for group in group_by_dtype(tensors).values():
            torch._foreach_mul_(group, factor)
