"""The clip pipeline: measure, threshold, apply. Every public entry composes it.

- **measure** (:func:`measure`): the global norm of the gradients (of the unscaled ones
  under AMP), the inf/NaN flag and, when asked, each gradient's norm, in one read. The
  only place that asks whether the call is distributed (DTensors, ``process_group``), under
  AMP or per-tensor.
- **threshold**: what the norm is clipped to: a float, a :class:`~gradclip.rules.GlobalRule`
  given this step's norm, lowered by the spike guard's limit on a spike; or a
  :class:`~gradclip.rules.LocalRule`, which clips each gradient on its own.
- **apply**: the gradients scaled by ``clip factor x inv_scale`` (nothing written where the
  factor is 1 on the fused backends, nor on an inf/NaN step under AMP), or nothing written
  at all when a fused optimizer takes the factor as its ``grad_scale`` (``write=False``).

The fused one-launch clip (norm, factor and rescale in one backend call) is this pipeline's
fast path, taken when nothing comes between the measure and the apply: a float threshold,
no guard clip, no host check, no per-tensor norms, one process.

See ``docs/design.md``, "The clip pipeline".
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor

from . import distributed
from .backends import dispatch
from .backends.base import COEF, FOUND_INF, NORM, clip_coefficient
from .guard import SpikeGuard, Verdict
from .rules import GlobalRule, LocalRule

Threshold = float | Tensor | GlobalRule | LocalRule


@dataclass
class Measured:
    """What the measure step found.

    ``stats``: ``[norm, factor, found_inf]`` (``gradclip.backends.base``), the factor being
    that of the float threshold it was measured with (``inf``: 1), AMP unscale included.
    ``grads``: the local gradients the apply step writes, ``params`` their parameters
    (when known). ``tensor_norms``: each local gradient's pre-clip norm (unscaled), when
    asked. ``plan``: the distributed plan, or ``None`` in a single process. ``loss``: the
    step's loss as the spike guard sees it (the mean over the ranks when sharded).
    """

    stats: Tensor
    grads: list[Tensor]
    params: list[Tensor]
    tensor_norms: Tensor | None = None
    plan: distributed.Plan | None = None
    loss: Tensor | None = None

    @property
    def norm(self) -> Tensor:
        return self.stats[NORM]

    @property
    def found_inf(self) -> Tensor:
        return self.stats[FOUND_INF]


class Clipped:
    """What a clip did (0-d device tensors): ``norm`` (pre-clip), ``coef`` (the clip factor
    alone; the smallest one for a local rule), ``factor`` (what the gradients were, or are
    to be, multiplied by: ``coef`` x ``inv_scale``), ``found_inf`` (the AMP flag, the whole
    job's), ``threshold`` (in force: a 0-d tensor, or a float), ``verdict`` (the spike
    guard's), ``tensor_norms`` and ``plan`` as in :class:`Measured`.

    ``stats``: the backend's ``[norm, factor, found_inf]`` when the fused path made it;
    the fields it holds are then views of it, made only when read (a step that records
    the whole vector at once costs no op per field).
    """

    __slots__ = ("stats", "_norm", "_coef", "_factor", "_found_inf", "threshold", "verdict",
                 "tensor_norms", "plan")

    def __init__(self, stats: Tensor | None = None, *, norm: Tensor | None = None,
                 coef: Tensor | None = None, factor: Tensor | None = None,
                 found_inf: Tensor | None = None, threshold: Tensor | float = math.inf,
                 verdict: Verdict | None = None, tensor_norms: Tensor | None = None,
                 plan: distributed.Plan | None = None):
        self.stats, self._norm, self._coef, self._factor = stats, norm, coef, factor
        self._found_inf, self.threshold, self.verdict = found_inf, threshold, verdict
        self.tensor_norms, self.plan = tensor_norms, plan

    @property
    def norm(self) -> Tensor:
        return self.stats[NORM] if self._norm is None else self._norm

    @property
    def factor(self) -> Tensor:
        return self.stats[COEF] if self._factor is None else self._factor

    @property
    def coef(self) -> Tensor:
        return self.factor if self._coef is None else self._coef

    @property
    def found_inf(self) -> Tensor:
        return self.stats[FOUND_INF] if self._found_inf is None else self._found_inf

    @property
    def skip(self) -> Tensor | None:
        """The inner step must not run: the guard skips it (``None`` when no guard skips)."""
        return None if self.verdict is None else self.verdict.skip


def _is_fixed(threshold) -> bool:
    return isinstance(threshold, float)


_grad_of = operator.attrgetter("grad")


def grads_and_silent(parameters: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The ``.grad`` of ``parameters`` that have one, and the parameters without one.
    Eagerly with C-level maps (thousands of parameters notice a Python loop); traced by
    torch.compile as a comprehension (Dynamo does not trace ``attrgetter``)."""
    if torch.compiler.is_compiling():
        return ([p.grad for p in parameters if p.grad is not None],
                [p for p in parameters if p.grad is None])
    grads = list(map(_grad_of, parameters))
    # By identity: `None in grads` would compare each tensor with None through __eq__.
    if not any(map(operator.is_, grads, repeat(None))):
        return grads, []
    return ([g for g in grads if g is not None],
            [p for p, g in zip(parameters, grads) if g is None])


def _sharded(grads: list[Tensor], silent, process_group) -> bool:
    """Whether the norm is the whole job's, reduced over ranks (the one place that asks)."""
    return distributed.involved(grads or list(silent), process_group)


def measure(grads: list[Tensor], norm_type: float, *, hint: float = math.inf,
            inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
            params: list[Tensor] | None = None, silent: list[Tensor] = (),
            tensor_norms: bool = False, process_group=None, loss: Tensor | None = None,
            wants_loss: bool = False, backend: str = "auto") -> Measured | None:
    """The norm of ``grads`` (and of the whole job's when sharded), in one read.

    ``hint``: a float threshold whose factor the backend computes with the norm.
    ``inv_scale``: the gradients are scaled (AMP); the norm is of the unscaled ones.
    ``found_inf``: a flag a scaler already has (after ``unscale_``); it is reduced with
    the norm when sharded (overwritten in place with every rank's) and stands for the
    flag of this step. ``silent``: parameters without a gradient on this rank, whose
    reductions it still joins. ``tensor_norms``: also each gradient's norm. ``loss``:
    the step's loss, for a spike guard; with ``wants_loss`` (the same on every rank) and
    sharded gradients, it is averaged over the ranks in the norm's own all-reduces (a rank
    without one, a pipeline stage before the last, passes ``None``). ``None``: nothing
    to measure (no gradient, and no reduction to join).
    """
    params = [] if params is None else params
    if _sharded(grads, silent, process_group):
        if tensor_norms:
            raise ValueError(
                "per-tensor norms of sharded gradients (track_tensor_norms) are not "
                "supported: each rank holds only shards of its tensors. Track them without "
                "DTensor gradients or process_group")
        plan = distributed.plan(grads, process_group, silent_owners=silent)
        if wants_loss:
            loss = torch.zeros(0) if loss is None else _loss_tensor(loss)
        else:
            loss = None
        stats, loss = distributed.reduced_stats(plan, norm_type, hint, inv_scale, backend,
                                                found_inf, loss)
        return Measured(stats, plan.locals, params, None, plan, loss)
    if not grads:
        return None
    if tensor_norms:
        stats, norms = dispatch.norm_stats_per_tensor(grads, norm_type, hint, inv_scale, backend)
    else:
        stats, norms = dispatch.norm_stats(grads, norm_type, hint, inv_scale, backend), None
    if found_inf is not None:
        stats = torch.stack([stats[NORM], stats[COEF],
                             found_inf.reshape(()).to(device=stats.device, dtype=stats.dtype)])
    return Measured(stats, grads, params, norms, None, loss)


def _loss_tensor(loss) -> Tensor:
    if not isinstance(loss, Tensor):
        loss = torch.tensor(float(loss))
    if loss.numel() != 1:
        raise ValueError(f"loss must have one element (the step's loss), got shape "
                         f"{tuple(loss.shape)}; pass loss.mean() or the reduced loss")
    return loss.detach().reshape(())


def raise_if_nonfinite(norm: Tensor, norm_type: float) -> None:
    """The ``error_if_nonfinite`` check: one host read, before anything is written."""
    if not torch.isfinite(norm).item():
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped; no gradient was changed. To disable this "
            "error and scale the gradients by the non-finite norm anyway, as torch does, set "
            "`error_if_nonfinite=False`")


def global_coefficient(norm: Tensor, threshold: float | Tensor | GlobalRule,
                       clip_limit: Tensor | None = None,
                       accept: Tensor | None = None) -> tuple[Tensor, Tensor | float]:
    """The clip factor of ``norm`` and the threshold in force: a float, a 0-d tensor, or
    a rule's (which sees this norm, and learns from it only where ``accept``), lowered to
    the spike guard's ``clip_limit`` (inf unless the step is a spike)."""
    if isinstance(threshold, GlobalRule):
        threshold = threshold.threshold_(norm, accept)
    if isinstance(threshold, Tensor):
        threshold = threshold.reshape(()).to(device=norm.device, dtype=norm.dtype)
    if clip_limit is not None:
        threshold = torch.minimum(torch.as_tensor(threshold, dtype=norm.dtype, device=norm.device),
                                  clip_limit.to(norm.dtype))
    return clip_coefficient(norm, threshold), threshold


def rescale_(grads: list[Tensor], factor: Tensor, skip: Tensor | None, backend: str) -> None:
    """The apply step of a global clip: ``grads *= factor`` on the device, nothing written
    where ``factor`` is exactly 1 (fused backends) or ``skip`` is set."""
    if grads:
        dispatch.scale_(grads, factor.reshape(1), None if skip is None else skip.reshape(1),
                        backend)


def clip_(grads: list[Tensor], norm_type: float, threshold: Threshold, *,
          params: list[Tensor] | None = None, silent: list[Tensor] = (),
          inv_scale: Tensor | None = None, found_inf: Tensor | None = None,
          guard: SpikeGuard | None = None, loss: Tensor | None = None,
          error_if_nonfinite: bool = False, tensor_norms: bool = False, write: bool = True,
          process_group=None, backend: str = "auto") -> Clipped | None:
    """Measure, threshold and apply, for ``grads``; ``None`` when there is nothing to
    measure (no gradient, and no sharded reduction for ``silent`` parameters to join).

    ``threshold``: a float (``inf`` only measures, and only unscales under AMP), a 0-d
    device tensor, a global rule or a local rule. ``params``: the gradients' parameters
    (a local rule's weights; the fused fast path reads ``.grad`` from them). ``guard``,
    ``loss``: the spike guard judges the step (its limit lowers the threshold with
    ``action="clip"``; with ``action="skip"`` a skipped step teaches the rule nothing).
    ``write=False``: nothing is written; the caller hands ``factor`` to a fused optimizer.
    Nothing reads the host except ``error_if_nonfinite``'s check, before any write.
    """
    if isinstance(threshold, LocalRule):
        return _clip_locally_(grads, norm_type, threshold, params=params, silent=silent,
                              inv_scale=inv_scale, found_inf=found_inf, guard=guard, loss=loss,
                              error_if_nonfinite=error_if_nonfinite, tensor_norms=tensor_norms,
                              process_group=process_group, backend=backend)
    fixed = _is_fixed(threshold)
    guard_clips = guard is not None and guard.action == "clip"
    if (fixed and write and not guard_clips and not error_if_nonfinite and found_inf is None
            and not tensor_norms):
        clipped = _fused_clip_(grads, norm_type, threshold, params, silent, inv_scale,
                               process_group, backend)
        if clipped is not None:
            if guard is not None:
                clipped.verdict = guard.judge_(clipped.norm, loss)
            return clipped
    m = measure(grads, norm_type, hint=threshold if fixed else math.inf, inv_scale=inv_scale,
                found_inf=found_inf, params=params, silent=silent, tensor_norms=tensor_norms,
                process_group=process_group, loss=loss, wants_loss=_wants_loss(guard),
                backend=backend)
    if m is None:
        return None
    if error_if_nonfinite:
        # Before the guard and the rule see the norm: a raising step changes no state.
        raise_if_nonfinite(m.norm, norm_type)
    verdict = None if guard is None else guard.judge_(m.norm, m.loss)
    accept = None if verdict is None or verdict.skip is None else ~verdict.skip
    limit = None if verdict is None else verdict.clip_limit
    only_measures = fixed and math.isinf(threshold) and inv_scale is None and limit is None
    if fixed and limit is None and inv_scale is None:
        coef = factor = m.stats[COEF]  # the backend's, from the norm pass
    else:
        coef, threshold = global_coefficient(m.norm, threshold, limit, accept)
        factor = coef if inv_scale is None else coef * inv_scale.to(coef.dtype).reshape(())
    amp = inv_scale is not None or found_inf is not None
    skip = m.found_inf if amp else None
    if write and not only_measures:
        rescale_(m.grads, factor, skip, backend)
    return Clipped(norm=m.norm, coef=coef, factor=factor, found_inf=m.found_inf,
                   threshold=threshold, verdict=verdict, tensor_norms=m.tensor_norms, plan=m.plan)


def _wants_loss(guard: SpikeGuard | None) -> bool:
    return guard is not None and guard.watches_loss


def _fused_clip_(grads, norm_type, threshold: float, params, silent, inv_scale, process_group,
                 backend) -> Clipped | None:
    """Norm, factor and rescale in one backend call (``None``: sharded or nothing to
    measure; go the general way). A float ``inf`` without AMP only measures."""
    if not grads or _sharded(grads, silent, process_group):
        return None
    if math.isinf(threshold) and inv_scale is None:
        stats = dispatch.norm_stats(grads, norm_type, threshold, None, backend)
    else:
        stats = dispatch.clip_grads_(grads, norm_type, threshold, inv_scale, backend,
                                     params=params)
    coef = None if inv_scale is None else clip_coefficient(stats[NORM], threshold)
    return Clipped(stats, coef=coef, threshold=threshold)


def _clip_locally_(grads, norm_type, rule: LocalRule, *, params, silent, inv_scale, found_inf,
                   guard, loss, error_if_nonfinite, tensor_norms, process_group,
                   backend) -> Clipped:
    """A local rule: each gradient (or unit) clipped on its own. Measured first only when
    something needs the global flag or the norms before the clip (AMP, the host check,
    the guard, tracked per-tensor norms); otherwise the rule's fused op measures too."""
    if norm_type != rule.norm_type:
        raise ValueError(f"norm_type={norm_type} differs from the rule's, {rule!r}: the rule "
                         "clips with its own norm_type; pass the same one (or leave the default)")
    if params is None:
        raise TypeError(f"{type(rule).__name__} clips the gradients of parameters: pass the "
                        "parameters, not their gradients")
    if _sharded(grads, silent, process_group):
        raise ValueError(f"{type(rule).__name__} clips each gradient by its own norm, and a sharded "
                         "gradient's norm is spread over ranks: per-tensor clipping of DTensor "
                         "gradients or over a process_group is not supported. Use a global "
                         "max_norm (a float, ZClip, AutoClip)")
    if not grads:
        return None
    amp = inv_scale is not None or found_inf is not None
    m = None
    if amp or error_if_nonfinite or guard is not None or tensor_norms:
        m = measure(grads, norm_type, inv_scale=inv_scale, found_inf=found_inf, params=params,
                    silent=silent, tensor_norms=tensor_norms or rule.uses_tensor_norms,
                    process_group=process_group, loss=loss, backend=backend)
        if error_if_nonfinite:
            raise_if_nonfinite(m.norm, norm_type)
    verdict = None if guard is None else guard.judge_(m.norm, m.loss)
    skip = m.found_inf if amp else None
    local = rule.clip_measured_(params, grads, None if m is None else m.tensor_norms,
                                inv_scale, skip, backend)
    norm = local.norm if m is None else m.norm
    found = torch.zeros((), dtype=norm.dtype, device=norm.device) if m is None else m.found_inf
    factor = local.smallest if inv_scale is None else local.smallest * inv_scale.reshape(())
    threshold = rule.reported_threshold()
    return Clipped(norm=norm, coef=local.smallest, factor=factor, found_inf=found,
                   threshold=threshold, verdict=verdict,
                   tensor_norms=local.tensor_norms if m is None else m.tensor_norms)


__all__ = ["Clipped", "Measured", "clip_", "global_coefficient", "grads_and_silent", "measure",
           "raise_if_nonfinite", "rescale_"]
