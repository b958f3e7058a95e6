"""The backends (``reference``, ``cuda``, ``triton``) and the dispatcher that picks one.

:mod:`gradclip.backends.base` holds the op contract, :mod:`gradclip.backends.dispatch`
the one place that chooses a backend; its public names are re-exported here.
"""

from . import dispatch
from .base import Backend, BackendStatus, BackendUnavailableError
from .dispatch import (
    BACKENDS,
    available_backends,
    clamp_,
    clip_grads_,
    get_backend,
    norm_stats,
    requested_backend,
    resolve,
    scale_,
)

__all__ = ["BACKENDS", "Backend", "BackendStatus", "BackendUnavailableError", "available_backends",
           "clamp_", "clip_grads_", "dispatch", "get_backend", "norm_stats",
           "requested_backend", "resolve", "scale_"]
