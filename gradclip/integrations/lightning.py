"""Lightning: ``Trainer(gradient_clip_val=...)`` clips with gradclip, through one callback.

::

    from gradclip.integrations.lightning import FusedGradientClipping

    trainer = lightning.Trainer(gradient_clip_val=1.0, callbacks=[FusedGradientClipping()])

The callback changes only its own trainer: at ``setup`` it points that trainer's precision
plugin's ``clip_grad_by_norm`` and ``clip_grad_by_value`` at :func:`gradclip.clip_grad_norm_`
and :func:`gradclip.clip_grad_value_`, and at ``teardown`` (or ``on_exception``, when
``fit`` raises) it puts Lightning's back. It runs in every process, whatever launched it
(``strategy="ddp"`` re-runs the script, ``"ddp_spawn"`` pickles the callback), so every
rank clips with gradclip. What stays the same:

- ``gradient_clip_val``, ``gradient_clip_algorithm`` (``"norm"`` or ``"value"``),
  ``LightningModule.configure_gradient_clipping`` and ``self.clip_gradients(...)`` in manual
  optimization all keep their meaning: they reach the plugin, which now calls gradclip.
  Lightning skips clipping for ``gradient_clip_val <= 0`` (its own test), as before.
- AMP: when the plugin has a ``GradScaler`` (``precision="16-mixed"`` on a GPU), Lightning's
  scaler unscales the gradients before the clip, as before, and Lightning's refusal to
  clip for an optimizer that unscales inside its own ``step`` (``_step_supports_amp_scaling``,
  e.g. ``AdamW(fused=True)``) stays: its gradients are still scaled. Without a scaler
  (``"bf16-mixed"``, and ``"16-mixed"`` on the CPU, which Lightning runs as bf16-mixed)
  there is nothing to unscale, so such an optimizer is clipped instead of refused.
- Where gradclip clips: one device, DDP, and DTensor gradients (``ModelParallelStrategy``:
  FSDP2, tensor parallelism, both), through gradclip's distributed clip. Any precision
  plugin whose class keeps Lightning's ``clip_gradients``, ``clip_grad_by_norm`` and
  ``clip_grad_by_value`` (the plain, mixed, ``*-true``, double plugins, and subclasses of
  them that override other methods).
- A plugin that overrides one of those methods clips its own way (FSDP v1's refuses norm
  clipping, DeepSpeed's clips in its engine), and XLA plugins run on XLA devices: the
  callback leaves them alone, with a :class:`~gradclip.integrations.FrameworkClipsWarning`
  saying which and why.

The first clip through gradclip logs one INFO line on the ``gradclip`` logger.
Differences (those of gradclip's functions): the norm is float32 even for 16-bit gradients
(``"16-true"``, ``"bf16-true"``), where torch computes the norm and the clip factor in the
gradients' dtype; a NaN ``gradient_clip_val`` raises ``ValueError`` instead of NaN-ing the
gradients. For ``lightning.Fabric`` use :mod:`gradclip.integrations.fabric`: Fabric never
calls a Trainer callback's ``setup``, so this callback would clip nothing there; it raises
``TypeError`` when ``fabric.setup()`` runs with it.
"""

from __future__ import annotations

import inspect
import types

from torch import Tensor

from .. import functional
from ._common import (
    LIGHTNING_VERSIONS,
    announce,
    check_backend,
    first_device,
    leave_to_framework,
    local_norm,
    require,
)

_NAME = "lightning"
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
from lightning.pytorch.plugins.precision import MixedPrecision, Precision, XLAPrecision  # noqa: E402

# Why a plugin that overrides a clipping method clips its own way, for Lightning's own.
_OWN_WAY = {
    "FSDPPrecision": "FSDP v1 (strategy='fsdp') holds flat parameter shards that torch's clip "
                     "cannot measure, so Lightning refuses norm clipping there (values it clips "
                     "with torch's clip); for FSDP2 use ModelParallelStrategy, which gradclip clips",
    "DeepSpeedPrecision": "DeepSpeed clips inside its engine (gradient_clipping in its config)",
}


def _check_signatures() -> None:
    for cls in (Precision, MixedPrecision):
        for name, expected in _EXPECTED_SIGNATURES.items():
            found = list(inspect.signature(getattr(cls, name)).parameters)
            if found != expected:
                raise RuntimeError(
                    f"lightning's {cls.__name__}.{name} takes ({', '.join(found)}), not the "
                    f"({', '.join(expected)}) FusedGradientClipping replaces; this Lightning is "
                    "not supported. Leave the callback out to keep Lightning's own clipping.")


def _why_lightning_clips(plugin: Precision) -> str | None:
    """``None`` when the plugin's clipping is Lightning's call of torch's clip, which
    gradclip replaces; else why the plugin keeps its own."""
    cls = type(plugin)
    if isinstance(plugin, XLAPrecision):
        return (f"{cls.__name__} runs on XLA devices, where Lightning's own clip runs; the "
                "callback leaves it alone")
    overridden = [name for name, ours in (("clip_gradients", (Precision.clip_gradients,
                                                             MixedPrecision.clip_gradients)),
                                          ("clip_grad_by_norm", (Precision.clip_grad_by_norm,)),
                                          ("clip_grad_by_value", (Precision.clip_grad_by_value,)))
                  if getattr(cls, name) not in ours]
    if not overridden:
        return None
    why = _OWN_WAY.get(cls.__name__, "the callback replaces only Lightning's own clipping methods")
    return (f"{cls.__name__} overrides {' and '.join(overridden)}, so it clips its own way: "
            f"{why}. The callback leaves it alone.")


_NOT_FOR_FABRIC = (
    "FusedGradientClipping is a lightning.Trainer callback: Fabric never calls its setup, so "
    "it would leave fabric.clip_gradients to torch. For Fabric, pass "
    "gradclip.integrations.fabric.FabricGradientClipping() in Fabric(callbacks=[...]).")


class FusedGradientClipping(Callback):
    r"""Makes its trainer's ``gradient_clip_val`` clip with gradclip.

    Add it to the trainer's callbacks; remove it to go back to Lightning's own clipping.
    The trainer's clipping settings are unchanged: with ``gradient_clip_val=None`` (or 0)
    nothing is clipped, as before. A ``lightning.Trainer`` callback only: for
    ``lightning.Fabric``, use :class:`gradclip.integrations.fabric.FabricGradientClipping`.

    Args:
        backend (str): the gradclip backend, ``"auto"`` (the fastest that runs on the
            gradients' device) or a backend's name. Default: ``"auto"``

    Attributes:
        last_norm (Tensor or None): the pre-clip norm of the last clip by norm in this
            process, a plain device tensor (no host synchronisation; the global norm
            with DTensor gradients), for logging.

    Raises:
        ValueError: ``backend`` names no backend.
        gradclip.BackendUnavailableError: ``backend`` cannot run here (``"cuda"`` without
            a GPU); the message says why.
        RuntimeError: at construction, when the installed Lightning is outside
            ``LIGHTNING_VERSIONS`` or its precision plugins lack the replaced methods.

    Example::

        >>> trainer = lightning.Trainer(max_steps=100, gradient_clip_val=1.0,
        ...                             callbacks=[FusedGradientClipping()])
        >>> trainer.fit(model, data)
    """

    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)
        _check_signatures()
        self.last_norm: Tensor | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.install(trainer.precision_plugin)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.uninstall(trainer.precision_plugin)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Lightning skips teardown when fit raises: restore here, or the trainer keeps gradclip.
        self.uninstall(trainer.precision_plugin)

    def on_after_setup(self, fabric=None, module=None) -> None:
        """Fabric's hook after ``fabric.setup()`` (a Trainer never calls it): refuse,
        rather than clip nothing."""
        raise TypeError(_NOT_FOR_FABRIC)

    def on_after_optimizer_step(self, strategy=None, optimizer=None) -> None:
        """Fabric's hook after each optimizer step (a Trainer never calls it): refuse where
        ``fabric.setup_module()`` left ``on_after_setup`` uncalled."""
        raise TypeError(_NOT_FOR_FABRIC)

    def install(self, plugin: Precision) -> bool:
        """Point ``plugin``'s clipping at gradclip; returns whether it did (the callback's
        ``setup`` calls this). A plugin that clips its own way is left alone, with a
        :class:`~gradclip.integrations.FrameworkClipsWarning` saying why."""
        if _SAVED_ATTR in plugin.__dict__:
            return True
        reason = _why_lightning_clips(plugin)
        if reason is not None:
            leave_to_framework(_NAME, reason)
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
            # No scaler (bf16-mixed): nothing to unscale, and MixedPrecision's refusal of
            # optimizers that unscale in their step does not apply.
            base = Precision.clip_gradients
        return base(plugin, optimizer, clip_val, gradient_clip_algorithm)

    def _clip_grad_by_norm(self, plugin, optimizer, clip_val) -> None:
        parameters = list(plugin.main_params(optimizer))
        norm = functional.clip_grad_norm_(parameters, clip_val, backend=self.backend)
        self.last_norm = local_norm(norm)
        announce(_NAME, f"{type(plugin).__name__}.clip_grad_by_norm", self.backend,
                 first_device(parameters))

    def _clip_grad_by_value(self, plugin, optimizer, clip_val) -> None:
        parameters = list(plugin.main_params(optimizer))
        functional.clip_grad_value_(parameters, clip_val, backend=self.backend)
        announce(_NAME, f"{type(plugin).__name__}.clip_grad_by_value", self.backend,
                 first_device(parameters))


__all__ = ["LIGHTNING_VERSIONS", "FusedGradientClipping"]
