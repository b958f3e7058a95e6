"""The fake (meta) implementations of the eight ops, written once for both namespaces.

``torch.ops.gradclip.*`` (declared in C++, ``csrc/gradclip.cpp``) and
``torch.ops.gradclip_triton.*`` (``torch.library.custom_op`` in
:mod:`gradclip.backends.triton`) have the same schemas; ``torch.compile`` and
``FakeTensor`` learn the shapes and dtypes of their outputs from these functions. Each
checks what can be checked without data (``torch._check``) and returns empty tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import stats_dtype


def _stats_like(tensors: list[Tensor], op: str) -> Tensor:
    torch._check(len(tensors) > 0, lambda: f"{op}: the tensor list is empty")
    return tensors[0].new_empty((3,), dtype=stats_dtype(tensors))


def norm_stats(tensors: list[Tensor], norm_type: float, max_norm: float,
               inv_scale: Tensor | None) -> Tensor:
    return _stats_like(tensors, "norm_stats")


def scale_(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    torch._check(scale.numel() == 1, lambda: "scale_: scale must have one element")


def clamp_(tensors: list[Tensor], clip_value: float) -> None:
    return None


def clip_grads_(grads: list[Tensor], norm_type: float, max_norm: float,
                inv_scale: Tensor | None) -> Tensor:
    return _stats_like(grads, "clip_grads_")


def norm_stats_per_tensor(tensors: list[Tensor], norm_type: float, max_norm: float,
                          inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    stats = _stats_like(tensors, "norm_stats_per_tensor")
    return stats, stats.new_empty((len(tensors),))


def scale_per_tensor_(tensors: list[Tensor], coefs: Tensor) -> None:
    torch._check(coefs.numel() == len(tensors),
                 lambda: "scale_per_tensor_: coefs needs one element per tensor")


def clip_per_tensor_(tensors: list[Tensor], norm_type: float, max_norm: float) -> Tensor:
    return _stats_like(tensors, "clip_per_tensor_").new_empty((len(tensors),))


def agc_(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
         norm_type: float) -> Tensor:
    torch._check(len(params) == len(grads), lambda: "agc_: one parameter per gradient")
    return _stats_like(grads, "agc_").new_empty((2,))


FAKES = {"norm_stats": norm_stats, "scale_": scale_, "clamp_": clamp_, "clip_grads_": clip_grads_,
         "norm_stats_per_tensor": norm_stats_per_tensor, "scale_per_tensor_": scale_per_tensor_,
         "clip_per_tensor_": clip_per_tensor_, "agc_": agc_}


def register_fakes(namespace: str) -> None:
    """Register the fakes of every op of ``namespace`` (``gradclip`` or ``gradclip_triton``);
    the ops must be defined already. They count as registered by the caller's module: the
    C++ library names its module (``set_python_module``), and torch checks the two agree."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{name}", fake, _stacklevel=2)
