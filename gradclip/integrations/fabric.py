"""Lightning Fabric: ``fabric.clip_gradients(...)`` clips with gradclip, through one callback.

::

    from gradclip.integrations.fabric import FabricGradientClipping

    fabric = lightning.Fabric(callbacks=[FabricGradientClipping()])

In Fabric the strategy clips: ``fabric.clip_gradients(module, optimizer, max_norm=...)``
calls ``fabric.strategy.clip_gradients_norm`` (``clip_val=...``: ``clip_gradients_value``),
which lets the precision plugin unscale (fp16 AMP) and then calls torch's clip on the
plugin's ``main_params``. When ``fabric.setup(...)`` runs, the callback points that
Fabric's strategy's two methods at :func:`gradclip.clip_grad_norm_` and
:func:`gradclip.clip_grad_value_`; the plugin still unscales first. Nothing global
changes: other Fabric objects keep torch's clip. What stays the same:

- The arguments (``max_norm``, ``norm_type``, ``error_if_nonfinite``, which Fabric turns
  on by default and which reads the norm on the host, as torch's does; ``clip_val``),
  and the returned pre-clip norm: a plain tensor, or with DTensor gradients a DTensor
  replicated on their mesh whose ``full_tensor()``, ``to_local()`` and ``item()`` all
  give the global norm (torch's is a partial DTensor: use ``full_tensor()``).
- Where gradclip clips: one device, DDP, and DTensor gradients (``ModelParallelStrategy``:
  FSDP2, tensor parallelism, both), through gradclip's distributed clip; any precision.
- Where Fabric keeps its own clip, with a :class:`~gradclip.integrations.FrameworkClipsWarning`
  (once per reason) saying why: strategies with a clip of their own (FSDP v1's
  ``FullyShardedDataParallel.clip_grad_norm_``, DeepSpeed's engine), XLA strategies, and
  ``norm_type=0``.

The first clip through gradclip logs one INFO line on the ``gradclip`` logger.
``fabric.setup_module()`` and ``fabric.setup_optimizers()`` call no callback: after them,
call ``clipping.install(fabric)``, or the callback installs itself at the first optimizer
step and warns that the clips before it were torch's. The Trainer's callback,
:class:`gradclip.integrations.lightning.FusedGradientClipping`, raises ``TypeError`` in a
Fabric: Fabric never calls its ``setup``.
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

_NAME = "fabric"
_REPLACED = ("clip_gradients_norm", "clip_gradients_value")
# The attribute of a strategy that holds what the callback replaced on it.
_SAVED_ATTR = "_gradclip_saved_methods"
_EXPECTED_SIGNATURES = {
    "clip_gradients_norm": ["self", "module", "optimizer", "max_norm", "norm_type", "error_if_nonfinite"],
    "clip_gradients_value": ["self", "module", "optimizer", "clip_val"],
}

require("lightning", *LIGHTNING_VERSIONS, extra="lightning")

from lightning.fabric.strategies import (  # noqa: E402
    SingleDeviceXLAStrategy,
    Strategy,
    XLAFSDPStrategy,
    XLAStrategy,
)

# Why a strategy that overrides a clipping method clips its own way, for Fabric's own.
_OWN_WAY = {
    "FSDPStrategy": "FSDP v1 (strategy='fsdp') holds flat parameter shards, which Fabric clips "
                    "with FullyShardedDataParallel.clip_grad_norm_ (for FSDP2 use "
                    "ModelParallelStrategy, which gradclip clips)",
    "DeepSpeedStrategy": "DeepSpeed clips inside its engine (gradient_clipping in its config)",
}
_NORM_TYPE_ZERO = ("norm_type=0 counts the gradients whose norm is nonzero, which is not a "
                   "norm gradclip computes; torch's clip counts them")


def _check_signatures() -> None:
    for name, expected in _EXPECTED_SIGNATURES.items():
        found = list(inspect.signature(getattr(Strategy, name)).parameters)
        if found != expected:
            raise RuntimeError(
                f"lightning.fabric's Strategy.{name} takes ({', '.join(found)}), not the "
                f"({', '.join(expected)}) FabricGradientClipping replaces; this Lightning is "
                "not supported. Leave the callback out to keep Fabric's own clipping.")


def _why_fabric_clips(strategy: Strategy) -> str | None:
    """``None`` when the strategy clips with Fabric's call of torch's clip, which gradclip
    replaces; else why it keeps its own."""
    cls = type(strategy)
    if isinstance(strategy, (XLAStrategy, SingleDeviceXLAStrategy, XLAFSDPStrategy)):
        return (f"{cls.__name__} runs on XLA devices, where Fabric's own clip runs; the "
                "callback leaves it alone")
    overridden = [name for name in _REPLACED if getattr(cls, name) is not getattr(Strategy, name)]
    if not overridden:
        return None
    why = _OWN_WAY.get(cls.__name__, "the callback replaces only Fabric's own clipping methods")
    return (f"{cls.__name__} overrides {' and '.join(overridden)}, so it clips its own way: "
            f"{why}. The callback leaves it alone.")


class FabricGradientClipping:
    r"""Makes its Fabric's ``clip_gradients`` clip with gradclip.

    Pass it in ``lightning.Fabric(callbacks=[...])``; ``fabric.setup(...)`` installs it.
    ``fabric.clip_gradients(module, optimizer, max_norm=...)`` and ``clip_val=...`` keep
    their meaning and return value.

    Args:
        backend (str): the gradclip backend, ``"auto"`` (the fastest that runs on the
            gradients' device) or a backend's name. Default: ``"auto"``

    Attributes:
        last_norm (Tensor or None): the pre-clip norm of the last clip by norm in this
            process, a plain device tensor (the global norm with DTensor gradients).

    Raises:
        ValueError: ``backend`` names no backend.
        gradclip.BackendUnavailableError: ``backend`` cannot run here (``"cuda"`` without
            a GPU); the message says why.
        RuntimeError: at construction, when the installed Lightning is outside
            ``LIGHTNING_VERSIONS`` or Fabric's strategies lack the replaced methods.

    Example::

        >>> fabric = lightning.Fabric(callbacks=[FabricGradientClipping()])
        >>> model, optimizer = fabric.setup(model, optimizer)
        >>> fabric.backward(loss)
        >>> norm = fabric.clip_gradients(model, optimizer, max_norm=1.0)
    """

    def __init__(self, *, backend: str = "auto"):
        self.backend = check_backend(backend)
        _check_signatures()
        self.last_norm: Tensor | None = None

    # -- Fabric's hooks --------------------------------------------------------------------

    def on_after_setup(self, fabric, module=None) -> None:
        self.install(fabric)

    def on_after_optimizer_step(self, strategy, optimizer=None) -> None:
        """A step taken without ``fabric.setup()`` (``setup_module`` calls no hook): install
        now, and say that the clips before were torch's."""
        if _SAVED_ATTR in strategy.__dict__ or _why_fabric_clips(strategy) is not None:
            return
        self._install(strategy)
        leave_to_framework(_NAME, "the clips before the first optimizer step were torch's: "
                                  "FabricGradientClipping installs at fabric.setup(), and "
                                  "setup_module()/setup_optimizers() call no callback. Call "
                                  "clipping.install(fabric) after them.")

    # -- installing --------------------------------------------------------------------------

    def install(self, fabric) -> bool:
        """Point ``fabric``'s strategy's clipping at gradclip; returns whether it did
        (``fabric.setup()`` calls this through ``on_after_setup``). A strategy that clips
        its own way is left alone, with a warning saying why."""
        strategy = fabric.strategy
        if _SAVED_ATTR in strategy.__dict__:
            return True
        reason = _why_fabric_clips(strategy)
        if reason is not None:
            leave_to_framework(_NAME, reason)
            return False
        self._install(strategy)
        return True

    def _install(self, strategy: Strategy) -> None:
        setattr(strategy, _SAVED_ATTR, {name: strategy.__dict__[name] for name in _REPLACED
                                        if name in strategy.__dict__})
        strategy.clip_gradients_norm = types.MethodType(self._clip_gradients_norm, strategy)
        strategy.clip_gradients_value = types.MethodType(self._clip_gradients_value, strategy)

    def uninstall(self, fabric) -> None:
        """Give ``fabric``'s strategy back Fabric's clipping."""
        strategy = fabric.strategy
        saved = strategy.__dict__.pop(_SAVED_ATTR, None)
        if saved is None:
            return
        for name in _REPLACED:
            strategy.__dict__.pop(name, None)
        strategy.__dict__.update(saved)

    # -- the strategy's methods, bound to the strategy ---------------------------------------

    def _clip_gradients_norm(self, strategy, module, optimizer, max_norm, norm_type=2.0,
                             error_if_nonfinite=True) -> Tensor:
        if float(norm_type) == 0:
            leave_to_framework(_NAME, _NORM_TYPE_ZERO)
            return Strategy.clip_gradients_norm(strategy, module, optimizer, max_norm, norm_type,
                                                error_if_nonfinite)
        strategy.precision.unscale_gradients(optimizer)
        parameters = list(strategy.precision.main_params(optimizer))
        norm = functional.clip_grad_norm_(parameters, max_norm, norm_type,
                                          error_if_nonfinite=error_if_nonfinite, backend=self.backend)
        self.last_norm = local_norm(norm)
        announce(_NAME, f"{type(strategy).__name__}.clip_gradients_norm", self.backend,
                 first_device(parameters))
        return norm

    def _clip_gradients_value(self, strategy, module, optimizer, clip_val) -> None:
        strategy.precision.unscale_gradients(optimizer)
        parameters = list(strategy.precision.main_params(optimizer))
        functional.clip_grad_value_(parameters, clip_val, backend=self.backend)
        announce(_NAME, f"{type(strategy).__name__}.clip_gradients_value", self.backend,
                 first_device(parameters))


__all__ = ["LIGHTNING_VERSIONS", "FabricGradientClipping"]
