"""``GradScaler``: ``torch.amp.GradScaler`` that lets a ``ClippedOptimizer`` unscale, check
for inf/NaN and clip in the passes it needs, and no more.

For every other optimizer it is ``torch.amp.GradScaler``, unchanged. For a
:class:`~gradclip.ClippedOptimizer`, ``step()`` does not unscale the gradients (a
read/write pass) or run torch's separate inf check (another one): it hands the wrapper
the scale, the wrapper reads the gradients once for the norm of the unscaled gradients
and the inf/NaN flag together, and the scaler records that flag for ``update()``, which
then backs off or grows the scale exactly as torch's would.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

from .optimizer import SCALER_REQUEST_ATTR, ClippedOptimizer, ScalerRequest

# Some torch versions give step() a return_found_inf keyword; honour it where it exists.
_HAS_RETURN_FOUND_INF = "return_found_inf" in inspect.signature(torch.amp.GradScaler.step).parameters


class GradScaler(torch.amp.GradScaler):
    r"""Drop-in for :class:`torch.amp.GradScaler` (same arguments, same state dict).

    With a :class:`~gradclip.ClippedOptimizer`, ``scaler.step(opt)`` costs one read of the
    gradients plus one read/write (the unscale and clip factor, skipped on inf/NaN), or
    one read alone when the inner optimizer was built with ``fused=True``; torch's path
    costs up to five passes. A manual ``scaler.unscale_(opt)`` before ``scaler.step(opt)``
    still works (the gradients are then unscaled by torch, and only clipped by the wrapper).

    Example::

        >>> scaler = gradclip.GradScaler("cuda")
        >>> opt = gradclip.ClippedOptimizer(torch.optim.AdamW(params, fused=True), max_norm=1.0)
        >>> with torch.autocast("cuda", dtype=torch.float16):
        ...     loss = model(x).sum()
        >>> scaler.scale(loss).backward()
        >>> scaler.step(opt)
        >>> scaler.update()
    """

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any):
        if not (self._enabled and isinstance(optimizer, ClippedOptimizer)):
            return super().step(optimizer, *args, **kwargs)
        return_found_inf = kwargs.pop("return_found_inf", False) if _HAS_RETURN_FOUND_INF else False
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if GradScaler is enabled.")
        scale, _ = self._check_scale_growth_tracker("step")
        optimizer_state = self._per_optimizer_states[id(optimizer)]
        stage = optimizer_state["stage"]
        if stage is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")

        if stage is OptState.UNSCALED:
            flags = [t.to(scale.device, non_blocking=True)
                     for t in optimizer_state["found_inf_per_device"].values()]
            found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
            for flag in flags:
                found_inf = found_inf + flag
            request = ScalerRequest(None, found_inf)
        else:
            request = ScalerRequest(scale, None)

        setattr(optimizer, SCALER_REQUEST_ATTR, request)
        try:
            retval = optimizer.step(*args, **kwargs)
        finally:
            optimizer.__dict__.pop(SCALER_REQUEST_ATTR, None)

        if stage is OptState.READY:
            found_inf = request.found_inf_out
            if found_inf is None:
                found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
            optimizer_state["found_inf_per_device"] = {found_inf.device: found_inf}
        else:
            # After a manual unscale_: the flags' sum, which a sharded clip replaced in
            # place by the flag of all ranks, so that update() backs off alike everywhere.
            optimizer_state["found_inf_per_device"] = {request.found_inf.device: request.found_inf}
        optimizer_state["stage"] = OptState.STEPPED
        if return_found_inf:
            return retval, request.found_inf if stage is OptState.UNSCALED else found_inf
        return retval


__all__ = ["GradScaler"]
