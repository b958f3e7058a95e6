"""Hugging Face Accelerate and ``transformers.Trainer``: clip with gradclip in one line.

::

    import gradclip.integrations.huggingface as gradclip_hf

    gradclip_hf.patch()        # before training; gradclip_hf.unpatch() restores Accelerate's

After ``patch()``, ``Accelerator.clip_grad_norm_`` and ``Accelerator.clip_grad_value_``
clip with :func:`gradclip.clip_grad_norm_` and :func:`gradclip.clip_grad_value_`. The
``Trainer`` calls the first with ``TrainingArguments.max_grad_norm`` (and with ``inf``
to measure the logged ``grad_norm`` when clipping is off), so it clips with gradclip too;
so does any Accelerate loop that calls them. transformers 5's ``Trainer`` measures
gradients that live on several device meshes (tensor parallelism with FSDP2, experts)
in a method of its own, ``Trainer._mixed_mesh_grad_norm``; ``patch()`` points that at
gradclip too, which takes DTensors on several meshes in one call.

What stays the same:

- The semantics: the same arguments, the same returned pre-clip norm (a plain device
  tensor, as Accelerate returns; the ``Trainer`` logs it as ``grad_norm``), the same
  clip factor.
- AMP: Accelerate's own ``unscale_gradients()`` runs first, exactly as before (fp16; with
  bf16 there is no scaler). Fusing the unscale into the clip would change which scaler
  state Accelerate's optimizer wrapper sees, so it is left to Accelerate.
- Where gradclip clips: one device, DDP on any device, FSDP2 and any DTensor gradients
  (tensor parallelism, a model ``fully_shard``-ed by hand): gradclip's distributed clip,
  one all-reduce of three numbers per mesh dimension that shards the gradients.
- Where Accelerate keeps its own code, with a :class:`~gradclip.integrations.FrameworkClipsWarning`
  (once per reason) saying why: DeepSpeed (it clips inside its engine), FSDP v1 (flat
  parameters, clipped by ``FullyShardedDataParallel.clip_grad_norm_``), XLA, Megatron-LM,
  and ``norm_type=0``.

The first clip through gradclip logs one INFO line on the ``gradclip`` logger.
Differences (those of gradclip's functions): the norm is float32 even for bfloat16 or
float16 gradients (pure 16-bit models), where torch rounds it to the gradients' dtype. A
negative or NaN ``max_norm`` passed to ``accelerator.clip_grad_norm_`` raises
``ValueError`` instead of flipping or NaN-ing the gradients; the ``Trainer`` never passes
one: ``max_grad_norm <= 0`` or NaN turns its clipping off (its own ``> 0`` test), and it
then only measures ``grad_norm``, through gradclip.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

from .. import functional
from ._common import announce, check_backend, first_device, leave_to_framework, local_norm, require

# Supported versions: [minimum, below). Tested: see docs/integrations.md.
ACCELERATE_VERSIONS = ("1.0.0", "2")
TRANSFORMERS_VERSIONS = ("4.46.0", "6")

_NAME = "huggingface"
# Accelerate's distributed types whose gradients are plain local tensors already reduced
# across ranks (single device, DDP on any device), or DTensors, which gradclip reduces.
_GRADCLIP_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_MLU", "MULTI_SDAA",
                   "MULTI_MUSA", "MULTI_XPU", "MULTI_HPU")
# Why Accelerate keeps its own clipping, per distributed type (anything else: generic).
_ACCELERATE_CLIPS = {
    "DEEPSPEED": "DeepSpeed clips inside its engine (gradient_clipping in its config); "
                 "Accelerate only returns the engine's norm, and gradclip does not replace it",
    "FSDP": "FSDP v1 holds flat parameter shards and clips them with "
            "FullyShardedDataParallel.clip_grad_norm_, which gradclip does not replace "
            "(FSDP2, fsdp_version=2, clips with gradclip)",
    "XLA": "on XLA devices Accelerate all-reduces the gradients itself before clipping; "
           "gradclip leaves XLA to it",
    "MEGATRON_LM": "Megatron-LM shards plain tensors over groups of its own and clips in its "
                   "optimizer (the plugin's gradient_clipping); gradclip leaves it to Megatron",
}
_NORM_TYPE_ZERO = ("norm_type=0 counts the gradients whose norm is nonzero, which is not a "
                   "norm gradclip computes; Accelerate's own code counts them")
# The methods replaced, with the parameters they must have for the replacement to fit.
_EXPECTED_SIGNATURES = {
    "clip_grad_norm_": ["self", "parameters", "max_norm", "norm_type"],
    "clip_grad_value_": ["self", "parameters", "clip_value"],
}
_TRAINER_METHOD = "_mixed_mesh_grad_norm"
_TRAINER_SIGNATURE = ["self", "model", "max_norm"]


class _Patch:
    """What ``patch()`` replaced ((owner, name) -> original), and the backend in force."""

    def __init__(self, originals: dict, replacements: dict, backend: str):
        self.originals = originals
        self.replacements = replacements
        self.backend = backend


_active: _Patch | None = None


def _check_versions() -> bool:
    """Raise for an unsupported Accelerate or transformers; whether transformers is installed."""
    require("accelerate", *ACCELERATE_VERSIONS, extra="hf")
    try:
        require("transformers", *TRANSFORMERS_VERSIONS, extra="hf")
    except ImportError:
        return False  # plain Accelerate loops need no transformers
    return True


def _parameter_names(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def _check_signatures(accelerator_class: type) -> None:
    for name, expected in _EXPECTED_SIGNATURES.items():
        found = _parameter_names(getattr(accelerator_class, name))
        if found != expected:
            raise RuntimeError(
                f"accelerate.Accelerator.{name} takes ({', '.join(found)}), not the "
                f"({', '.join(expected)}) gradclip's patch replaces; this Accelerate is not "
                "supported. Leave gradclip.integrations.huggingface.patch() out to keep "
                "Accelerate's own clipping.")
    if not callable(getattr(accelerator_class, "unscale_gradients", None)):
        raise RuntimeError("accelerate.Accelerator has no unscale_gradients(); this Accelerate "
                           "is not supported by gradclip.integrations.huggingface.patch()")


def _trainer_target() -> dict:
    """``{(Trainer, name): original}`` for the Trainer's mixed-mesh norm where this
    transformers has one (5.x); older ones clip through the Accelerator only."""
    from transformers import Trainer

    original = Trainer.__dict__.get(_TRAINER_METHOD)
    if original is None:
        return {}
    if _parameter_names(original) != _TRAINER_SIGNATURE:
        raise RuntimeError(
            f"transformers.Trainer.{_TRAINER_METHOD} takes ({', '.join(_parameter_names(original))}), "
            f"not the ({', '.join(_TRAINER_SIGNATURE)}) gradclip's patch replaces; this "
            "transformers is not supported. Leave gradclip.integrations.huggingface.patch() out "
            "to keep the Trainer's own clipping.")
    return {(Trainer, _TRAINER_METHOD): original}


def _why_accelerate_clips(accelerator, norm_type) -> str | None:
    """``None`` when gradclip clips this call, else why Accelerate's own code does."""
    if float(norm_type) == 0:
        return _NORM_TYPE_ZERO
    kind = accelerator.distributed_type.name
    if kind in _GRADCLIP_TYPES or (kind == "FSDP" and getattr(accelerator, "is_fsdp2", False)):
        return None
    return _ACCELERATE_CLIPS.get(kind, f"Accelerate's distributed type {kind} clips in its own "
                                       "way, which gradclip does not replace")


def _original(owner: type, name: str):
    if _active is None:
        raise RuntimeError(f"gradclip's {owner.__name__}.{name} was called after unpatch(); "
                           "call gradclip.integrations.huggingface.patch() again")
    return _active.originals[(owner, name)]


def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
    """``Accelerator.clip_grad_norm_`` as patched by gradclip: unscale (fp16 AMP), then
    :func:`gradclip.clip_grad_norm_`; returns the pre-clip norm as a plain tensor.
    Layouts gradclip does not clip go to Accelerate's own method, with a warning."""
    from accelerate import Accelerator

    parameters = list(parameters)
    reason = None if _active is None else _why_accelerate_clips(self, norm_type)
    if _active is None or reason is not None:
        if reason is not None:
            leave_to_framework(_NAME, reason)
        return _original(Accelerator, "clip_grad_norm_")(self, parameters, max_norm, norm_type)
    self.unscale_gradients()
    norm = functional.clip_grad_norm_(parameters, max_norm, norm_type, backend=_active.backend)
    announce(_NAME, "accelerate.Accelerator.clip_grad_norm_", _active.backend, first_device(parameters))
    return local_norm(norm)


def clip_grad_value_(self, parameters, clip_value):
    """``Accelerator.clip_grad_value_`` as patched by gradclip: unscale (fp16 AMP), then
    :func:`gradclip.clip_grad_value_`. Layouts gradclip does not clip go to Accelerate."""
    from accelerate import Accelerator

    parameters = list(parameters)
    reason = None if _active is None else _why_accelerate_clips(self, 2)
    if _active is None or reason is not None:
        if reason is not None:
            leave_to_framework(_NAME, reason)
        return _original(Accelerator, "clip_grad_value_")(self, parameters, clip_value)
    self.unscale_gradients()
    functional.clip_grad_value_(parameters, clip_value, backend=_active.backend)
    announce(_NAME, "accelerate.Accelerator.clip_grad_value_", _active.backend, first_device(parameters))


def _mixed_mesh_grad_norm(self, model, max_norm):
    """``transformers.Trainer._mixed_mesh_grad_norm`` as patched by gradclip: the norm of
    gradients on several device meshes (and plain tensors) in one gradclip call, clipped
    unless ``max_norm`` is inf; returns it as a plain tensor, as the Trainer's does."""
    if _active is None:
        from transformers import Trainer

        return _original(Trainer, _TRAINER_METHOD)(self, model, max_norm)
    parameters = list(model.parameters())
    norm = functional.clip_grad_norm_(parameters, max_norm, backend=_active.backend)
    announce(_NAME, f"transformers.Trainer.{_TRAINER_METHOD}", _active.backend, first_device(parameters))
    return local_norm(norm)


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
        ValueError: ``backend`` names no backend.
        gradclip.BackendUnavailableError: ``backend`` cannot run here (``"cuda"`` without a
            GPU); the message says why.
        RuntimeError: the installed Accelerate or transformers is outside the supported
            versions (``ACCELERATE_VERSIONS``, ``TRANSFORMERS_VERSIONS``), or the methods
            the patch replaces do not take the arguments it expects.

    Example::

        >>> import gradclip.integrations.huggingface as gradclip_hf
        >>> gradclip_hf.patch()
        >>> trainer = transformers.Trainer(model, TrainingArguments(max_grad_norm=1.0), ...)
        >>> trainer.train()          # clips with gradclip, logs the same grad_norm
        >>> gradclip_hf.unpatch()    # Accelerate's own clipping again
    """
    global _active
    check_backend(backend)
    if _active is not None:
        _active.backend = backend
        return
    has_transformers = _check_versions()
    from accelerate import Accelerator

    _check_signatures(Accelerator)
    originals = {(Accelerator, name): Accelerator.__dict__[name] for name in _EXPECTED_SIGNATURES}
    if has_transformers:
        originals.update(_trainer_target())
    replacements = {"clip_grad_norm_": clip_grad_norm_, "clip_grad_value_": clip_grad_value_,
                    _TRAINER_METHOD: _mixed_mesh_grad_norm}
    _active = _Patch(originals, {key: replacements[key[1]] for key in originals}, backend)
    for (owner, name), replacement in _active.replacements.items():
        setattr(owner, name, replacement)


def unpatch() -> None:
    """Restore Accelerate's (and the Trainer's) own clipping methods.

    Does nothing when not patched. Raises ``RuntimeError``, changing nothing, if something
    else replaced those methods after :func:`patch` (undo that first).
    """
    global _active
    if _active is None:
        return
    replaced = [f"{owner.__module__}.{owner.__name__}.{name}"
                for (owner, name), ours in _active.replacements.items()
                if owner.__dict__.get(name) is not ours]
    if replaced:
        raise RuntimeError(
            f"{replaced[0]} was replaced by something else after gradclip's patch(); undo "
            "that replacement first, then call unpatch()")
    for (owner, name), original in _active.originals.items():
        setattr(owner, name, original)
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
