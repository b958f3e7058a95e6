"""torchtitan: its trainers' gradient clipping with gradclip, in one line.

::

    import gradclip.integrations.torchtitan as gradclip_titan

    gradclip_titan.patch()     # before training; gradclip_titan.unpatch() restores torchtitan's

torchtitan's trainers clip with ``torchtitan.distributed.utils.clip_grad_norm_(parameters,
max_norm, norm_type, error_if_nonfinite, foreach, pp_mesh, ep_enabled)``, found on that
module at each step. ``patch()`` puts :func:`clip_grad_norm_` there (and wherever an
imported torchtitan module holds the original), with the same signature and the same
returned norm: a plain tensor holding the norm of the whole model, on every rank.

How the layouts map onto gradclip's distributed clip (``docs/distributed.md``):

- FSDP2, HSDP, tensor and context parallelism: the gradients are DTensors; each is reduced
  over the mesh dimensions that shard it, one all-reduce of three numbers per dimension.
- ``pp_mesh`` (pipeline stages): the group of ``pp_mesh`` is gradclip's ``process_group``:
  the stage norms are summed over it (max for the inf norm), as torchtitan does.
- ``ep_enabled`` (expert parallelism): torchtitan takes the experts' norm and the rest's
  separately (their DTensors are on different meshes, which torch's clip cannot stack)
  and combines them; gradclip takes DTensors on several meshes in one call, so the flag
  changes nothing.
- ``foreach`` is accepted and changes nothing (gradclip's backends take all tensors of a
  device together). ``error_if_nonfinite`` raises on every rank, after the reduction,
  before any gradient is written (torchtitan raises on the rank whose local norm is
  non-finite, leaving the others in the next collective).

The first clip through gradclip logs one INFO line on the ``gradclip`` logger.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable

import torch
from torch import Tensor

from .. import functional
from ._common import announce, check_backend, first_device, local_norm, require

# Supported versions: [minimum, below). Tested: see docs/integrations.md.
TORCHTITAN_VERSIONS = ("0.3.0", "0.4")

_NAME = "torchtitan"
_MODULE = "torchtitan.distributed.utils"
_FUNCTION = "clip_grad_norm_"
_SIGNATURE = ["parameters", "max_norm", "norm_type", "error_if_nonfinite", "foreach", "pp_mesh",
              "ep_enabled"]


class _Patch:
    """Where ``patch()`` put :func:`clip_grad_norm_` (the modules), what it replaced there,
    and the backend in force."""

    def __init__(self, original, modules: list, backend: str):
        self.original = original
        self.modules = modules
        self.backend = backend


_active: _Patch | None = None


@torch.no_grad()
def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None,
                    pp_mesh=None, ep_enabled: bool = False) -> Tensor:
    r"""``torchtitan.distributed.utils.clip_grad_norm_`` with gradclip's distributed clip.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose ``.grad`` to clip
            (DTensors or plain tensors).
        max_norm (float): the largest norm allowed, >= 0.
        norm_type (float): order of the norm, > 0; ``inf`` for the max norm. Default: 2.0
        error_if_nonfinite (bool): raise ``RuntimeError`` on every rank, before any
            gradient is written, if the norm is NaN or inf. Default: False
        foreach (bool, optional): accepted; changes nothing.
        pp_mesh (DeviceMesh, optional): the pipeline-parallel mesh; the stage norms are
            combined over its group. Default: None
        ep_enabled (bool): expert parallelism is on; changes nothing (gradclip takes the
            experts' mesh and the others in one call). Default: False

    Returns:
        The pre-clip norm of the whole model, a plain 0-d tensor, the same on every rank.
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    backend = "auto" if _active is None else _active.backend
    group = None if pp_mesh is None else pp_mesh.get_group()
    norm = functional.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                      backend=backend, process_group=group)
    announce(_NAME, f"{_MODULE}.{_FUNCTION}", backend, first_device(parameters))
    return local_norm(norm)


def _check_signature(original) -> None:
    found = list(inspect.signature(original).parameters)
    if found != _SIGNATURE:
        raise RuntimeError(
            f"{_MODULE}.{_FUNCTION} takes ({', '.join(found)}), not the ({', '.join(_SIGNATURE)}) "
            "gradclip's patch replaces; this torchtitan is not supported. Leave "
            "gradclip.integrations.torchtitan.patch() out to keep torchtitan's own clipping.")


def _holders(original) -> list:
    """The imported torchtitan modules that hold ``original`` under its name: the utils
    module, and any that imported the function by name before ``patch()``."""
    return [module for name, module in list(sys.modules.items())
            if (name == "torchtitan" or name.startswith("torchtitan.")) and module is not None
            and getattr(module, _FUNCTION, None) is original]


def patch(*, backend: str = "auto") -> None:
    """Make torchtitan's gradient clipping use gradclip.

    Call it once, before training, in every rank's process (each runs the training
    script). Calling it again only changes ``backend``.

    Args:
        backend (str): the gradclip backend, ``"auto"`` (the fastest that runs on the
            gradients' device) or a backend's name. Default: ``"auto"``

    Raises:
        ImportError: torchtitan is not installed.
        ValueError: ``backend`` names no backend.
        gradclip.BackendUnavailableError: ``backend`` cannot run here (``"cuda"`` without a
            GPU); the message says why.
        RuntimeError: the installed torchtitan is outside ``TORCHTITAN_VERSIONS``, or its
            ``clip_grad_norm_`` does not take the arguments the patch replaces.

    Example::

        >>> import gradclip.integrations.torchtitan as gradclip_titan
        >>> gradclip_titan.patch()
        >>> trainer = torchtitan.trainer.Trainer(config)   # as torchtitan's train.py does
        >>> trainer.train()                                # clips with gradclip
    """
    global _active
    check_backend(backend)
    if _active is not None:
        _active.backend = backend
        return
    require("torchtitan", *TORCHTITAN_VERSIONS, extra="torchtitan")
    import importlib

    utils = importlib.import_module(_MODULE)
    original = getattr(utils, _FUNCTION)
    _check_signature(original)
    modules = _holders(original)
    _active = _Patch(original, modules, backend)
    for module in modules:
        setattr(module, _FUNCTION, clip_grad_norm_)


def unpatch() -> None:
    """Restore torchtitan's own ``clip_grad_norm_``.

    Does nothing when not patched. Raises ``RuntimeError``, changing nothing, if something
    else replaced it after :func:`patch` (undo that first).
    """
    global _active
    if _active is None:
        return
    replaced = [module.__name__ for module in _active.modules
                if getattr(module, _FUNCTION, None) is not clip_grad_norm_]
    if replaced:
        raise RuntimeError(f"{replaced[0]}.{_FUNCTION} was replaced by something else after "
                           "gradclip's patch(); undo that replacement first, then call unpatch()")
    for module in _active.modules:
        setattr(module, _FUNCTION, _active.original)
    _active = None


def is_patched() -> bool:
    """Whether :func:`patch` is in force."""
    return _active is not None


__all__ = ["TORCHTITAN_VERSIONS", "clip_grad_norm_", "is_patched", "patch", "unpatch"]
