"""Hugging Face Accelerate and ``transformers.Trainer``: clip with gradclip in one line.

::

    import gradclip.integrations.huggingface as gradclip_hf

    gradclip_hf.patch()        # before training; gradclip_hf.unpatch() restores Accelerate's

After ``patch()``, ``Accelerator.clip_grad_norm_`` and ``Accelerator.clip_grad_value_``
clip with :func:`gradclip.clip_grad_norm_` and :func:`gradclip.clip_grad_value_`. The
``Trainer`` calls the first with ``TrainingArguments.max_grad_norm`` (and with ``inf``
to measure the logged ``grad_norm`` when clipping is off), so it clips with gradclip too;
so does any Accelerate loop that calls them. What stays the same:

- The semantics: the same arguments, the same returned pre-clip norm (a device tensor;
  the ``Trainer`` logs it as ``grad_norm``), the same clip factor.
- AMP: Accelerate's own ``unscale_gradients()`` runs first, exactly as before (fp16; with
  bf16 there is no scaler). Fusing the unscale into the clip would change which scaler
  state Accelerate's optimizer wrapper sees, so it is left to Accelerate.
- Layouts gradclip does not clip itself go to Accelerate's own code, unchanged: DeepSpeed
  (which clips inside its engine), FSDP (v1 and v2), XLA and Neuron, Megatron-LM,
  gradients that are DTensors (tensor parallelism) and ``norm_type=0``.
  Single-device runs and DDP on any device, where every gradient is a plain tensor
  already reduced across ranks, clip with gradclip.

Differences (those of gradclip's functions): the norm is float32 even for bfloat16 or
float16 gradients (pure 16-bit models), where torch rounds it to the gradients' dtype;
a negative or NaN ``max_grad_norm`` raises instead of flipping or NaN-ing the gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from .. import functional
from ._common import has_dtensor_grads, require

# Supported versions: [minimum, below). Tested: see docs/integrations.md.
ACCELERATE_VERSIONS = ("1.0.0", "2")
TRANSFORMERS_VERSIONS = ("4.46.0", "6")

# Accelerate's distributed types whose gradients are plain local tensors, already
# reduced across ranks when clip_grad_norm_ runs: single device and DDP on any device.
_PLAIN_GRADIENT_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA",
                         "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU")
# The methods replaced, with the parameters they must have for the replacement to fit.
_EXPECTED_SIGNATURES = {
    "clip_grad_norm_": ["self", "parameters", "max_norm", "norm_type"],
    "clip_grad_value_": ["self", "parameters", "clip_value"],
}


class _Patch:
    """What ``patch()`` replaced, and the settings the replacements read."""

    def __init__(self, accelerator_class: type, originals: dict, plain_types: frozenset, backend: str):
        self.accelerator_class = accelerator_class
        self.originals = originals
        self.plain_types = plain_types
        self.backend = backend


_active: _Patch | None = None


def _check_versions() -> None:
    require("accelerate", *ACCELERATE_VERSIONS, extra="hf")
    try:
        require("transformers", *TRANSFORMERS_VERSIONS, extra="hf")
    except ImportError:
        pass  # plain Accelerate loops need no transformers


def _check_signatures(accelerator_class: type) -> None:
    for name, expected in _EXPECTED_SIGNATURES.items():
        found = list(inspect.signature(getattr(accelerator_class, name)).parameters)
        if found != expected:
            raise RuntimeError(
                f"accelerate.Accelerator.{name} takes ({', '.join(found)}), not the "
                f"({', '.join(expected)}) gradclip's patch replaces; this Accelerate is not "
                "supported. Leave gradclip.integrations.huggingface.patch() out to keep "
                "Accelerate's own clipping.")
    if not callable(getattr(accelerator_class, "unscale_gradients", None)):
        raise RuntimeError("accelerate.Accelerator has no unscale_gradients(); this Accelerate "
                           "is not supported by gradclip.integrations.huggingface.patch()")


def _clips_here(accelerator, parameters: list) -> bool:
    """Whether gradclip clips these gradients, or Accelerate's own code does."""
    return (_active is not None
            and accelerator.distributed_type.name in _active.plain_types
            and not has_dtensor_grads(parameters))


def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
    """``Accelerator.clip_grad_norm_`` as patched by gradclip: unscale (fp16 AMP), then
    :func:`gradclip.clip_grad_norm_`; returns the pre-clip norm. Layouts gradclip does
    not clip go to Accelerate's own method."""
    parameters = list(parameters)
    if float(norm_type) == 0 or not _clips_here(self, parameters):
        return _original("clip_grad_norm_")(self, parameters, max_norm, norm_type)
    self.unscale_gradients()
    return functional.clip_grad_norm_(parameters, max_norm, norm_type, backend=_active.backend)


def clip_grad_value_(self, parameters, clip_value):
    """``Accelerator.clip_grad_value_`` as patched by gradclip: unscale (fp16 AMP), then
    :func:`gradclip.clip_grad_value_`. Layouts gradclip does not clip go to Accelerate."""
    parameters = list(parameters)
    if not _clips_here(self, parameters):
        return _original("clip_grad_value_")(self, parameters, clip_value)
    self.unscale_gradients()
    functional.clip_grad_value_(parameters, clip_value, backend=_active.backend)


_REPLACEMENTS = {"clip_grad_norm_": clip_grad_norm_, "clip_grad_value_": clip_grad_value_}


def _original(name: str):
    if _active is None:
        raise RuntimeError(f"gradclip's Accelerator.{name} was called after unpatch(); "
                           "call gradclip.integrations.huggingface.patch() again")
    return _active.originals[name]


def patch(*, backend: str = "auto") -> None:
    """Make ``accelerate.Accelerator`` (and so ``transformers.Trainer``) clip with gradclip.

    Call it once, before training; in a multi-process run (``accelerate launch``,
    ``torchrun``) every process runs the script, so every process patches. Calling it again
    only changes ``backend``.

    Args:
        backend (str): the gradclip backend for every clip, ``"auto"`` (the fastest that
            runs on the gradients' device) or a backend's name. Default: ``"auto"``

    Raises:
        ImportError: Accelerate is not installed.
        RuntimeError: the installed Accelerate or transformers is outside the supported
            versions (``ACCELERATE_VERSIONS``, ``TRANSFORMERS_VERSIONS``), or its
            ``Accelerator`` does not have the methods the patch replaces.

    Example::

        >>> import gradclip.integrations.huggingface as gradclip_hf
        >>> gradclip_hf.patch()
        >>> trainer = transformers.Trainer(model, TrainingArguments(max_grad_norm=1.0), ...)
        >>> trainer.train()          # clips with gradclip, logs the same grad_norm
        >>> gradclip_hf.unpatch()    # Accelerate's own clipping again
    """
    global _active
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
    if _active is not None:
        _active.backend = backend
        return
    _check_versions()
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    _check_signatures(Accelerator)
    originals = {name: Accelerator.__dict__[name] for name in _REPLACEMENTS}
    plain_types = frozenset(name for name in _PLAIN_GRADIENT_TYPES if name in DistributedType.__members__)
    _active = _Patch(Accelerator, originals, plain_types, backend)
    for name, replacement in _REPLACEMENTS.items():
        setattr(Accelerator, name, replacement)


def unpatch() -> None:
    """Restore Accelerate's own ``clip_grad_norm_`` and ``clip_grad_value_``.

    Does nothing when not patched. Raises ``RuntimeError``, changing nothing, if something
    else replaced those methods after :func:`patch` (undo that first).
    """
    global _active
    if _active is None:
        return
    accelerator_class = _active.accelerator_class
    replaced = [name for name, ours in _REPLACEMENTS.items() if accelerator_class.__dict__.get(name) is not ours]
    if replaced:
        raise RuntimeError(
            f"accelerate.Accelerator.{replaced[0]} was replaced by something else after gradclip's "
            "patch(); undo that replacement first, then call unpatch()")
    for name, original in _active.originals.items():
        setattr(accelerator_class, name, original)
    _active = None


def is_patched() -> bool:
    """Whether :func:`patch` is in force."""
    return _active is not None


@contextmanager
def patched(*, backend: str = "auto") -> Iterator[None]:
    """:func:`patch` for the duration of a ``with`` block, then :func:`unpatch`; a patch
    that was already in force when the block began stays in force after it."""
    already = is_patched()
    previous_backend = _active.backend if already else None
    patch(backend=backend)
    try:
        yield
    finally:
        if already and _active is not None:
            _active.backend = previous_backend
        else:
            unpatch()


__all__ = ["ACCELERATE_VERSIONS", "TRANSFORMERS_VERSIONS", "is_patched", "patch", "patched", "unpatch"]
