"""What the integrations share: the version gate and the test for gradients gradclip takes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import metadata

import torch


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "2.6.0rc1" -> (2, 6, 0)."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise RuntimeError(f"cannot read the version string {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def require(distribution: str, minimum: str, below: str, extra: str) -> str:
    """The installed version of ``distribution``; raise unless ``minimum <= version < below``.

    ``extra`` is the gradclip extra that installs a supported version, named in the error.
    """
    try:
        installed = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        raise ImportError(f"gradclip's integration needs {distribution} >= {minimum}, < {below}, "
                          f"which is not installed; pip install 'gradclip[{extra}]'") from None
    if not _release(minimum) <= _release(installed) < _release(below):
        raise RuntimeError(
            f"gradclip's integration supports {distribution} >= {minimum}, < {below}; "
            f"{installed} is installed. Install a supported version "
            f"(pip install '{distribution}>={minimum},<{below}'), or leave the integration "
            "out and keep the framework's own clipping.")
    return installed


def has_dtensor_grads(parameters: Iterable[torch.Tensor]) -> bool:
    """Whether any gradient is a DTensor (FSDP2, tensor parallelism).

    gradclip's fused paths read local tensors: a DTensor's norm needs the reduction over
    its mesh that the framework's own code does, so such calls stay with it.
    """
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p.grad, DTensor) for p in parameters)
