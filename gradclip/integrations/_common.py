"""What the integrations share: the version gate, the early backend check, the norm they
return, and how they tell the user what clips (one INFO line, one warning per reason)."""

from __future__ import annotations

import logging
import re
import warnings
from importlib import metadata

import torch
from torch import Tensor

from ..backends import available_backends, requested_backend, resolve

logger = logging.getLogger("gradclip")

# Supported Lightning versions (Trainer and Fabric): [minimum, below). Tested: see
# docs/integrations.md.
LIGHTNING_VERSIONS = ("2.1.0", "3")


class FrameworkClipsWarning(UserWarning):
    """An integration left a clip to the framework's own code; the message says why.

    Each reason is warned once per process. Silence them all with
    ``warnings.filterwarnings("ignore", category=gradclip.integrations.FrameworkClipsWarning)``.
    """


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


def check_backend(backend: str) -> str:
    """``backend`` as given, once it is known to be able to run here.

    An integration calls this where the user names the backend (``patch()``, a callback's
    constructor), so that a wrong name or a backend that cannot run here (``"cuda"``
    without a GPU) raises there rather than at the first clip, after a forward and a
    backward. Which device the gradients will be on is not known yet: a backend that runs
    here but not on that device still raises at the first clip.

    Raises:
        TypeError: ``backend`` is not a string.
        ValueError: no backend has that name (nor ``$GRADCLIP_BACKEND``, under ``"auto"``).
        gradclip.BackendUnavailableError: the backend cannot run here; the message says why.
    """
    name = requested_backend(backend)
    if name != "auto":
        status = available_backends()[name]
        if not status.available:
            from ..backends import BackendUnavailableError

            raise BackendUnavailableError(
                f"backend={backend!r} cannot run here: {status.reason}. Pass backend='auto' "
                "(the fastest backend that runs on the gradients' device).")
    return backend


def _is_rank_zero() -> bool:
    """Whether this process speaks for the job: every rank runs the same integration, so
    one line from rank 0 says what all of them do."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


_announced: set[str] = set()
_warned: set[tuple[str, str]] = set()


def announce(integration: str, call: str, backend: str, device: torch.device) -> None:
    """Log, once per integration and process (rank 0 of a job), that gradclip clips the
    calls to ``call`` and with which backend."""
    if integration in _announced:
        return
    _announced.add(integration)
    if _is_rank_zero():
        chosen = resolve(backend, device).name
        logger.info("gradclip clips the gradients: %s goes to gradclip (integration %s, "
                    "backend %s on %s)", call, integration, chosen, device)


def leave_to_framework(integration: str, reason: str) -> None:
    """Warn, once per reason and process (rank 0 of a job), that a clip stays with the
    framework's own code, and why."""
    key = (integration, reason)
    if key in _warned:
        return
    _warned.add(key)
    if _is_rank_zero():
        warnings.warn(f"gradclip.integrations.{integration}: {reason}",
                      FrameworkClipsWarning, stacklevel=3)


def local_norm(norm: Tensor) -> Tensor:
    """gradclip's norm as a plain tensor: the local value of a replicated DTensor (the
    global norm on every rank), for frameworks whose own clip returns a plain tensor."""
    to_local = getattr(norm, "to_local", None)
    return norm if to_local is None else to_local()


def first_device(parameters) -> torch.device:
    """The device of the first gradient (a DTensor's is its local shard's), or the CPU."""
    for p in parameters:
        if p.grad is not None:
            return p.grad.device
    return torch.device("cpu")
