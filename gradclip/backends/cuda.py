"""The CUDA backend: the Python face of the C++/CUDA extension in ``csrc/``.

The ops are declared once, in C++ (``torch.ops.gradclip.norm_stats``, ``scale_``,
``clamp_``, ``clip_grads_``, and the per-tensor ``norm_stats_per_tensor``,
``scale_per_tensor_``, ``clip_per_tensor_``, ``agc_``); this module calls them and registers their fake
implementations (:mod:`gradclip.backends.fakes`, shared with the Triton ops), so that
``torch.compile`` can trace them and CUDA graphs capture them.
Eager calls first offer the list to the extension's pybind11 fast path of the same op (the
same C++ function without the dispatcher's per-tensor boxing), which reads the gradients of
a whole parameter list in C++; what it does not take goes to the op.

Finding, building and loading the extension is :mod:`gradclip.backends.cuda_build`'s job;
it knows nothing of this module.
"""

from __future__ import annotations

import threading

import torch

from . import cuda_build, fakes
from .base import Backend, BackendStatus, BackendUnavailableError

# What the extension's fast paths return for a list they do not take.
_NOT_TAKEN = NotImplemented


def _probe() -> BackendStatus:
    if torch.version.cuda is None:
        return BackendStatus(False, f"this torch ({torch.__version__}) is built without CUDA; "
                                    "install a CUDA build of torch")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device is visible (torch.cuda.is_available() is False)")
    if cuda_build.loaded_module() is not None:
        return BackendStatus(True, "CUDA extension loaded")
    if cuda_build.prebuilt_available():
        return BackendStatus(True, f"prebuilt CUDA extension {cuda_build.PREBUILT_NAME}")
    problem = cuda_build.build_problem()
    if problem is not None:
        return BackendStatus(False, f"no prebuilt CUDA extension, and {problem}")
    return BackendStatus(True, f"CUDA extension JIT-built on first use with {cuda_build.find_nvcc()} "
                               "(1-2 min once, then cached)")


class CudaBackend(Backend):
    """Fused multi-tensor kernels: one read for the norm, a rescale that moves nothing
    when the coefficient is 1, all tensors of all float dtypes of a device per launch."""

    name = "cuda"

    def __init__(self) -> None:
        self._status: BackendStatus | None = None
        self._error: str | None = None
        self._ext = None
        self._lock = threading.Lock()

    def status(self) -> BackendStatus:
        if self._error is not None:
            return BackendStatus(False, self._error)
        if self._status is None:
            self._status = _probe()
        return self._status

    def supports(self, device: torch.device) -> bool:
        return torch.device(device).type == "cuda"

    def load(self) -> None:
        """Load (JIT-building if needed) the extension; raises ``BackendUnavailableError``."""
        if self._ext is not None:
            return
        with self._lock:
            if self._ext is not None:
                return
            if self._error is not None:
                raise BackendUnavailableError(self._error)
            try:
                self._ext = cuda_build.load_extension()
            except BackendUnavailableError as error:
                self._error = str(error)
                raise

    def _module(self):
        if self._ext is None:
            self.load()
        return self._ext

    def accepts(self, tensors):
        # Checked in C++; compiled code splits the list in Python and calls the ops.
        return not torch.compiler.is_compiling() and self._module().accepts(tensors)

    def _run(self, op: str, *args):
        """Op ``op``: eagerly through the extension's fast path when it takes the list,
        else (compiled code, tensor subclasses, CPU tensors) through the dispatcher."""
        ext = self._module()
        if not torch.compiler.is_compiling():
            result = getattr(ext, op)(*args)
            if result is not _NOT_TAKEN:
                return result
        return getattr(torch.ops.gradclip, op)(*args)

    def norm_stats(self, tensors, norm_type, max_norm, inv_scale=None):
        return self._run("norm_stats", tensors, float(norm_type), float(max_norm), inv_scale)

    def scale_(self, tensors, scale, found_inf=None):
        self._run("scale_", tensors, scale, found_inf)

    def clamp_(self, tensors, clip_value):
        self._run("clamp_", tensors, float(clip_value))

    def clip_grads_(self, grads, norm_type, max_norm, inv_scale=None):
        return self._run("clip_grads_", grads, float(norm_type), float(max_norm), inv_scale)

    # Per-tensor ops: through the dispatcher (no fast path). The norms come from the norm
    # kernel's read (per-block parts per tensor, reduced in block order); agc_ is one
    # kernel per launch table, a warp per unit (weight and gradient rows read once).

    def norm_stats_per_tensor(self, tensors, norm_type, max_norm, inv_scale=None):
        self._module()
        return tuple(torch.ops.gradclip.norm_stats_per_tensor(tensors, float(norm_type),
                                                              float(max_norm), inv_scale))

    def scale_per_tensor_(self, tensors, coefs):
        self._module()
        torch.ops.gradclip.scale_per_tensor_(tensors, coefs)

    def clip_per_tensor_(self, tensors, norm_type, max_norm):
        self._module()
        return torch.ops.gradclip.clip_per_tensor_(tensors, float(norm_type), float(max_norm))

    def agc_(self, params, grads, clip_factor, eps, norm_type):
        self._module()
        return torch.ops.gradclip.agc_(params, grads, float(clip_factor), float(eps), float(norm_type))

    def clip_parameters_(self, params, norm_type, max_norm, inv_scale=None):
        # Reads .grad in C++: eager calls only (None: the caller goes the general way).
        if torch.compiler.is_compiling():
            return None
        stats = self._module().clip_parameters_(params, float(norm_type), float(max_norm), inv_scale)
        return None if stats is _NOT_TAKEN else stats


_fakes_registered = False


def register_fakes() -> None:
    """Register the fake implementations; the ops must exist (the extension loaded).

    Called at import when the ops exist, and by ``cuda_build`` once it loads the extension
    (the hook below). The C++ library names this module (``set_python_module``), so torch
    imports it when it needs a fake implementation of an op loaded by other means.
    """
    global _fakes_registered
    if _fakes_registered:
        return
    fakes.register_fakes("gradclip")
    _fakes_registered = True


def _ops_defined() -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw("gradclip::norm_stats", "")
    except RuntimeError:
        return False
    return True


if _ops_defined():
    register_fakes()
else:
    cuda_build.when_loaded(register_fakes)
