"""Lightning: ``Trainer(gradient_clip_val=...)`` clips with gradclip, through one callback.

::

    from gradclip.integrations.lightning import FusedGradientClipping

    trainer = lightning.Trainer(gradient_clip_val=1.0, callbacks=[FusedGradientClipping()])

The callback changes only its own trainer: at ``setup`` it points that trainer's precision
plugin's ``clip_grad_by_norm`` and ``clip_grad_by_value`` at :func:`gradclip.clip_grad_norm_`
and :func:`gradclip.clip_grad_value_`, and at ``teardown`` it puts Lightning's back. It runs
in every process, whatever launched it (``strategy="ddp"`` re-runs the script,
``"ddp_spawn"`` pickles the callback), so every rank clips with gradclip. What stays the same:

- ``gradient_clip_val``, ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``),
  ``LightningModule.configure_gradient_clipping`` and ``self.clip_gradients(...)`` in manual
  optimization all keep their meaning: they reach the plugin, which now calls gradclip.
- AMP: with ``precision="16-mixed"`` Lightning's scaler unscales the gradients before the
  clip, as before. Lightning refuses to clip for an optimizer that unscales inside its own
  ``step`` (``_step_supports_amp_scaling``, e.g. ``AdamW(fused=True)``), since its scaler has
  not unscaled them; under ``16-mixed`` that refusal stays. Under ``bf16-mixed`` there is
  no scaler and nothing to unscale, so such an optimizer is clipped instead of refused.
- Plugins whose clipping is their own stay untouched (FSDP, DeepSpeed, XLA; a warning says
  so), and gradients that are DTensors (``ModelParallelStrategy``) go to torch's clip.
  The plain, 16-bit (``*-true``), double and mixed plugins clip with gradclip, on one
  device or under DDP, where every gradient is a plain tensor already reduced across ranks.

Differences (those of gradclip's functions): the norm is float32 even for 16-bit gradients
(``"16-true"``, ``"bf16-true"``), where torch computes the norm and the clip factor in the
gradients' dtype; a negative or NaN clip value raises instead of corrupting the gradients.
"""

from __future__ import annotations

import inspect
import types

from torch import Tensor

from .. import functional
from ._common import has_dtensor_grads, require

# Supported versions: [minimum, below). Tested: see docs/integrations.md.
LIGHTNING_VERSIONS = ("2.1.0", "3")

_REPLACED = ("clip_gradients", "clip_grad_by_norm", "clip_grad_by_value")
# The attribute of a precision plugin that holds what the callback replaced on it.
_SAVED_ATTR = "_gradclip_saved_methods"
_EXPECTED_SIGNATURES = {
    "clip_grad_by_norm": ["self", "optimizer", "clip_val"],
    "clip_grad_by_value": ["self", "optimizer", "clip_val"],
    "clip_gradients": ["self", "optimizer", "clip_val", "gradient_clip_algorithm"],
}

require("lightning", *LIGHTNING_VERSIONS, extra="lightning")

from lightning.pytorch import Callback  # noqa: E402
from lightning.pytorch.plugins.precision import (  # noqa: E402
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)
from lightning.pytorch.utilities import rank_zero_warn  # noqa: E402


def _check_signatures() -> None:
    for cls in (Precision, MixedPrecision):
        for name, expected in _EXPECTED_SIGNATURES.items():
            found = list(inspect.signature(getattr(cls, name)).parameters)
            if found != expected:
                raise RuntimeError(
                    f"lightning's {cls.__name__}.{name} takes ({', '.join(found)}), not the "
                    f"({', '.join(expected)}) FusedGradientClipping replaces; this Lightning is "
                    "not supported. Leave the callback out to keep Lightning's own clipping.")


def _clips_like_torch(plugin: Precision) -> bool:
    """Whether the plugin's clipping is torch's plain clip of local gradients, which gradclip
    replaces, rather than clipping of its own (FSDP, DeepSpeed, XLA, custom subclasses)."""
    cls = type(plugin)
    if not (cls is Precision or isinstance(plugin, (MixedPrecision, HalfPrecision, DoublePrecision))):
        return False
    return (cls.clip_grad_by_norm is Precision.clip_grad_by_norm
            and cls.clip_grad_by_value is Precision.clip_grad_by_value
            and cls.clip_gradients in (Precision.clip_gradients, MixedPrecision.clip_gradients))


class FusedGradientClipping(Callback):
    r"""Makes its trainer's ``gradient_clip_val`` clip with gradclip.

    Add it to the trainer's callbacks; remove it to go back to Lightning's own clipping.
    The trainer's clipping settings are unchanged: with ``gradient_clip_val=None`` (or 0)
    nothing is clipped, as before.

    Args:
        backend (str): the gradclip backend, ``"auto"`` (the fastest that runs on the
            gradients' device) or a backend's name. Default: ``"auto"``

    Attributes:
        last_norm (Tensor or None): the pre-clip norm of the last clip by norm in this
            process, a device tensor (no host synchronisation), for logging.

    Raises:
        RuntimeError: at construction, when the installed Lightning is outside
            ``LIGHTNING_VERSIONS`` or its precision plugins lack the replaced methods.

    Example::

        >>> trainer = lightning.Trainer(max_steps=100, gradient_clip_val=1.0,
        ...                             callbacks=[FusedGradientClipping()])
        >>> trainer.fit(model, data)
    """

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
        _check_signatures()
        self.backend = backend
        self.last_norm: Tensor | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.install(trainer.precision_plugin)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.uninstall(trainer.precision_plugin)

    def install(self, plugin: Precision) -> bool:
        """Point ``plugin``'s clipping at gradclip; returns whether it did (the callback's
        ``setup`` calls this). A plugin that clips in its own way is left alone, with a warning."""
        if _SAVED_ATTR in plugin.__dict__:
            return True
        if not _clips_like_torch(plugin):
            rank_zero_warn(f"FusedGradientClipping leaves {type(plugin).__name__} alone: it clips "
                           "gradients in its own way, which gradclip does not replace.")
            return False
        saved = {name: plugin.__dict__[name] for name in _REPLACED if name in plugin.__dict__}
        setattr(plugin, _SAVED_ATTR, saved)
        replacements = {"clip_gradients": self._clip_gradients,
                        "clip_grad_by_norm": self._clip_grad_by_norm,
                        "clip_grad_by_value": self._clip_grad_by_value}
        for name, method in replacements.items():
            setattr(plugin, name, types.MethodType(method, plugin))
        return True

    def uninstall(self, plugin: Precision) -> None:
        """Give ``plugin`` back Lightning's clipping (the callback's ``teardown`` calls this)."""
        saved = plugin.__dict__.pop(_SAVED_ATTR, None)
        if saved is None:
            return
        for name in _REPLACED:
            plugin.__dict__.pop(name, None)
        plugin.__dict__.update(saved)

    # -- the plugin's methods, bound to the plugin -------------------------------------

    def _clip_gradients(self, plugin, optimizer, clip_val=0.0, gradient_clip_algorithm="norm"):
        base = type(plugin).clip_gradients
        if base is MixedPrecision.clip_gradients and plugin.scaler is None:
            # bf16-mixed: no scaler, so nothing to unscale, and MixedPrecision's refusal
            # of optimizers that unscale in their step does not apply.
            base = Precision.clip_gradients
        return base(plugin, optimizer, clip_val, gradient_clip_algorithm)

    def _clip_grad_by_norm(self, plugin, optimizer, clip_val) -> None:
        parameters = list(plugin.main_params(optimizer))
        if has_dtensor_grads(parameters):
            return Precision.clip_grad_by_norm(plugin, optimizer, clip_val)
        self.last_norm = functional.clip_grad_norm_(parameters, clip_val, backend=self.backend)

    def _clip_grad_by_value(self, plugin, optimizer, clip_val) -> None:
        parameters = list(plugin.main_params(optimizer))
        if has_dtensor_grads(parameters):
            return Precision.clip_grad_by_value(plugin, optimizer, clip_val)
        functional.clip_grad_value_(parameters, clip_val, backend=self.backend)


__all__ = ["LIGHTNING_VERSIONS", "FusedGradientClipping"]
