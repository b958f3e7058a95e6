"""Gradient health, logged without a host synchronisation per step.

:func:`log_metrics` writes a ``ClippedOptimizer``'s norms and metrics to TensorBoard (a
``torch.utils.tensorboard.SummaryWriter``) or to any callable ``(name, value, step)``
(W&B's ``lambda n, v, s: wandb.log({n: v}, step=s)`` and the like). It reads the device
once every ``every`` steps and then writes every step's norm since its last write, from
the optimizer's norm history: exact, not a sample.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .step_state import COUNTER_NAMES

# How many history entries of each optimizer log_metrics has written: its own
# bookkeeping, kept out of the optimizer (whose step must not write Python attributes).
_logged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_METRICS = ("clip_coef", "max_norm", "mean", "std") + COUNTER_NAMES


def _writer(sink) -> Callable[[str, float, int], None]:
    add_scalar = getattr(sink, "add_scalar", None)
    if callable(add_scalar):
        return lambda name, value, step: add_scalar(name, value, global_step=step)
    if callable(sink):
        return sink
    raise TypeError(f"sink must be a SummaryWriter (anything with add_scalar) or a callable "
                    f"(name, value, step), got {type(sink).__name__}")


def log_metrics(opt, sink, step: int, every: int = 50, *,
                named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                top_k: int = 5, prefix: str = "gradclip/") -> int:
    r"""Every ``every`` steps, write what the optimizer recorded since the last write.

    Call it after every ``opt.step()``; on the steps it does not write it does nothing at
    all. On a writing step it makes one host copy, then writes to ``sink``:

    - ``{prefix}norm``: the pre-clip norm of every step since the previous write, each at
      its own step (from ``opt.norm_history()``, so the optimizer needs
      ``history >= every``);
    - the metrics of the last step (``opt.metrics()``): ``clip_coef``, ``max_norm``,
      ``mean``, ``std`` and the counters;
    - with ``track_tensor_norms=True``, the ``top_k`` largest per-tensor norms, as
      ``{prefix}tensor_norm/{name}`` (names from ``named_parameters``, else the
      parameter's position).

    Args:
        opt (ClippedOptimizer): built with ``history >= every``.
        sink: a ``torch.utils.tensorboard.SummaryWriter`` (its ``add_scalar``), or a
            callable ``(name, value, step)``.
        step (int): the step just taken, counted by the caller (the last step's norm is
            written at ``step``, the one before at ``step - 1``, and so on).
        every (int): write every this many steps, >= 1. Default: 50
        named_parameters (iterable of (str, Tensor), optional): names for the per-tensor
            norms, e.g. ``model.named_parameters()``.
        top_k (int): how many per-tensor norms to write. Default: 5
        prefix (str): put before every name. Default: ``"gradclip/"``

    Returns:
        The number of norms written (0 on the steps it skips).

    Example::

        >>> from torch.utils.tensorboard import SummaryWriter
        >>> writer = SummaryWriter("runs/exp")
        >>> opt = gradclip.ClippedOptimizer(torch.optim.AdamW(params), history=1024)
        >>> for step in range(1, 1001):
        ...     ...; opt.step()
        ...     gradclip.log_metrics(opt, writer, step, every=50)
    """
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    state = getattr(opt, "_step_state", None)
    if state is None:
        raise TypeError(f"opt must be a gradclip.ClippedOptimizer, got {type(opt).__name__}")
    if state.history_size < every:
        raise ValueError(f"log_metrics writes every step's norm from the history, which holds "
                         f"{state.history_size}; build the optimizer with history >= every "
                         f"({every}), e.g. ClippedOptimizer(..., history={max(1024, every)})")
    write = _writer(sink)
    if step % every:
        return 0
    metrics = opt.metrics()
    tensor_norms = opt.tensor_norms() if opt.track_tensor_norms else torch.zeros(0)
    written, ring, rest = state.snapshot([metrics[name] for name in _METRICS] + [tensor_norms])
    values = dict(zip(_METRICS, rest[:len(_METRICS)].tolist()))
    count = _write_norms(write, prefix, ring, written, _logged.get(opt, 0), step)
    _logged[opt] = written
    for name, value in values.items():
        write(prefix + name, value, step)
    if opt.track_tensor_norms:
        _write_top_tensor_norms(write, prefix, opt, rest[len(_METRICS):], named_parameters,
                                top_k, step)
    return count


def _write_norms(write, prefix: str, ring: Tensor, written: int, logged: int, step: int) -> int:
    """The norms recorded since ``logged``, each at its own step; those the ring no longer
    holds (more than ``history`` steps since the last write) are gone."""
    size = ring.numel()
    first = max(logged, written - size)
    norms = ring.tolist()
    for index in range(first, written):
        write(prefix + "norm", norms[index % size], step - (written - 1 - index))
    return written - first


def _write_top_tensor_norms(write, prefix, opt, norms: Tensor, named_parameters, top_k, step):
    names = [str(i) for i in range(norms.numel())]
    if named_parameters is not None:
        position = {id(p): i for i, p in enumerate(opt._params())}
        for name, p in named_parameters:
            if id(p) in position:
                names[position[id(p)]] = name
    ranked = sorted((v, n) for v, n in zip(norms.tolist(), names) if not math.isnan(v))
    for value, name in reversed(ranked[-top_k:] if top_k > 0 else []):
        write(f"{prefix}tensor_norm/{name}", value, step)


__all__ = ["log_metrics"]
