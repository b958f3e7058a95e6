"""Gradient health, logged without a host synchronisation per step.

:func:`log_metrics` writes a ``ClippedOptimizer``'s norms and metrics to TensorBoard (a
``torch.utils.tensorboard.SummaryWriter``) or to any callable ``(name, value, step)``
(W&B's ``lambda n, v, s: wandb.log({n: v}, step=s)`` and the like). It reads the device
once every ``every`` steps and then writes every step's norm since its last write, from
the optimizer's norm history: exact, not a sample.

Its bookkeeping lives here, in a weak dictionary keyed by the optimizer's step state
(a step must not write Python attributes: ``torch.compile`` drops them): how far each
sink was written, and which step each norm belongs to. The one number a resumed run
needs, how many norms every sink has been written, is the step state's ``logged``, saved
in the optimizer's state dict.
"""

from __future__ import annotations

import functools
import math
import numbers
import types
import warnings
import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from . import _checks
from .step_state import COUNTER_NAMES, StepState

_METRICS = ("clip_coef", "max_norm", "mean", "std") + COUNTER_NAMES
# Calls remembered per history slot: a call that records no norm (a step torch's
# GradScaler skips without calling opt.step()) takes a slot too.
_STAMPS_PER_NORM = 2


def _writer(sink) -> Callable[[str, float, int], None]:
    add_scalar = getattr(sink, "add_scalar", None)
    if callable(add_scalar):
        return lambda name, value, step: add_scalar(name, value, global_step=step)
    if callable(sink):
        return sink
    raise TypeError(f"sink must be a SummaryWriter (anything with add_scalar) or a callable "
                    f"(name, value, step), got {type(sink).__name__}")


def _sink_key(sink) -> tuple[tuple, tuple]:
    """What makes two ``sink`` arguments the same sink, and the objects whose ids the key
    holds (kept alive with the progress, so that no id is reused by another object).

    The same object; a bound method of the same object; a function with the same body,
    reading the same objects (through its closure, its defaults or its globals; numbers
    and tensors aside, such as a step count or the loss, new at every step): a lambda
    written anew at every call (in the loop, and again for the final flush) is one sink."""
    if isinstance(sink, functools.partial):
        key, keep = _sink_key(sink.func)
        bound_key, bound = _values_key((*sink.args, *sink.keywords.values()))
        return ("partial", key, tuple(sorted(sink.keywords)), bound_key), (*keep, *bound)
    if isinstance(sink, types.MethodType):
        return ("method", id(sink.__self__), id(sink.__func__)), (sink.__self__, sink.__func__)
    if isinstance(sink, types.FunctionType):
        read = [cell.cell_contents for cell in sink.__closure__ or () if _is_full(cell)]
        read += [*(sink.__defaults__ or ()), *(sink.__kwdefaults__ or {}).values()]
        read += [sink.__globals__[name] for name in sink.__code__.co_names
                 if name in sink.__globals__]
        values_key, keep = _values_key(read)
        return ("function", _code_key(sink.__code__), values_key), keep
    return ("object", id(sink)), (sink,)


def _is_full(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a variable not assigned yet
        return False
    return True


def _values_key(values) -> tuple[tuple, tuple]:
    """Strings by value; numbers and tensors (a step count, the loss: new at every step)
    not at all; other objects by identity."""
    key, keep = [], []
    for value in values:
        if isinstance(value, (str, bytes)) or value is None:
            key.append(value)
        elif not isinstance(value, (numbers.Number, Tensor)):
            key.append(id(value))
            keep.append(value)
    return tuple(key), tuple(keep)


def _code_key(code: types.CodeType) -> tuple:
    """A function's body, wherever it is written (a code object's equality includes its
    line numbers)."""
    consts = tuple(_code_key(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return (code.co_code, consts, code.co_names, code.co_varnames, code.co_freevars,
            code.co_argcount, code.co_kwonlyargcount)


class _Progress:
    """log_metrics' bookkeeping for one optimizer (its step state)."""

    def __init__(self, state: StepState):
        # Where a sink seen for the first time starts: what every sink had been written
        # when the state was built or loaded (0 for a new run).
        self.start = state.logged
        self.set_logged = state.logged
        self.sinks: dict[tuple, list] = {}  # key -> [norms written, step of the last write]
        self.kept: dict[tuple, tuple] = {}
        # The norm count at each call of log_metrics, on the device (a copy per call, no
        # host read), and each call's step, on the host: which step recorded which norm.
        self.counts = torch.zeros(_STAMPS_PER_NORM * state.history_size, dtype=torch.int64,
                                  device=state._written.device)
        self.steps = [0] * self.counts.numel()
        self.calls = 0

    def stamp(self, state: StepState, step: int) -> None:
        """Remember the norm count at this call: a norm first counted at the call of step
        ``s`` was recorded by that step."""
        size = len(self.steps)
        last = (self.calls - 1) % size
        if self.calls and step < self.steps[last]:
            self.calls = 0  # the caller's steps went back (a restarted count): start over
        if self.calls and step == self.steps[last]:
            slot = last  # another sink, or a flush, at the same step
        else:
            slot = self.calls % size
            self.calls += 1
        self.steps[slot] = step
        self.counts[slot].copy_(state._written)

    def stamps(self, counts: list[float]) -> list[tuple[int, int]]:
        """(step, norm count) of the remembered calls, oldest first: the latest calls
        whose counts never go down (an earlier call with a larger count was made before
        an earlier state was loaded)."""
        size = len(self.steps)
        kept = min(self.calls, size)
        slots = [(self.calls - kept + k) % size for k in range(kept)]
        ordered = [(self.steps[s], int(counts[s])) for s in slots]
        first = len(ordered) - 1
        while first > 0 and ordered[first - 1][1] <= ordered[first][1]:
            first -= 1
        return ordered[first:]


# One _Progress per step state; the state (not the optimizer) so that a rebuilt state
# starts afresh.
_progress: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _progress_of(state: StepState) -> _Progress:
    progress = _progress.get(state)
    if progress is None or state.logged != progress.set_logged:
        # New, or load_state_dict() set another logged: what was written before no longer
        # says what is written now.
        progress = _progress[state] = _Progress(state)
    return progress


def log_metrics(opt, sink, step: int, every: int = 50, *, flush: bool = False,
                named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                top_k: int = 5, prefix: str = "gradclip/") -> int:
    r"""Every ``every`` steps, write what the optimizer recorded since the last write.

    Call it after every ``opt.step()`` (with ``torch.amp.GradScaler``, after every
    ``scaler.step(opt)``, even one the scaler skips), and once more with ``flush=True``
    when the run ends. On the steps it does not write it only notes, on the device, how
    many norms were recorded so far (no host read). On a writing step it makes one host
    copy, then writes to ``sink``:

    - ``{prefix}norm``: the pre-clip norm of every step since this sink's previous write,
      each at its own step (from ``opt.norm_history()``, so the optimizer needs
      ``history >= every``);
    - the metrics of the last step (``opt.metrics()``): ``clip_coef``, ``max_norm``,
      ``mean``, ``std`` and the counters;
    - with ``track_tensor_norms=True``, the ``top_k`` largest per-tensor norms, as
      ``{prefix}tensor_norm/{name}`` (names from ``named_parameters``, else the
      parameter's position).

    What each sink has been written is kept per sink: two sinks (TensorBoard and W&B)
    each get every norm. A sink is the same sink when it is the same object, a bound
    method of the same object, or a function with the same body reading the same objects
    (numbers and tensors it reads aside): a lambda written anew in the loop, and again
    for the flush, is one sink. How many norms every sink has been written
    is saved in ``opt.state_dict()``: after ``opt.load_state_dict()``, the norms written
    before the checkpoint are not written again, those recorded after its last write are
    (a checkpoint saved by a gradclip that kept no such count: its whole history is
    written again).

    A norm is written at the step of the first call that saw it recorded. A step that
    records no norm writes none: with ``torch.amp.GradScaler`` and an inner optimizer
    that is not ``fused=True``, torch skips an inf/NaN step without calling
    ``opt.step()``, and nothing is measured (``gradclip.GradScaler`` records that step's
    inf norm). Norms recorded before this process's first call (those a checkpoint
    brought back) are counted back one step each from that call; so are those of steps
    this function was not called after.

    Args:
        opt (ClippedOptimizer): built with ``history >= every``.
        sink: a ``torch.utils.tensorboard.SummaryWriter`` (its ``add_scalar``), or a
            callable ``(name, value, step)``.
        step (int): the step just taken, counted by the caller.
        every (int): write every this many steps, >= 1. Default: 50
        flush (bool): write now, whatever ``step`` is: at the end of the run, the norms
            after the last multiple of ``every``. Default: False
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
        >>> gradclip.log_metrics(opt, writer, step, flush=True)   # steps 951-1000
    """
    every = _checks.integer("every", every, "for example every=50", minimum=1)
    step = _checks.integer("step", step, "pass the step just taken, counted from 1", minimum=0)
    if not isinstance(flush, bool):
        raise TypeError(f"flush must be True or False, got {flush!r}")
    state = getattr(opt, "_step_state", None)
    if not isinstance(state, StepState):
        raise TypeError(f"opt must be a gradclip.ClippedOptimizer, got {type(opt).__name__}")
    if state.history_size < every:
        raise ValueError(f"log_metrics writes every step's norm from the history, which holds "
                         f"{state.history_size}; build the optimizer with history >= every "
                         f"({every}), e.g. ClippedOptimizer(..., history={max(1024, every)})")
    write = _writer(sink)
    key, keep = _sink_key(sink)
    progress = _progress_of(state)
    progress.stamp(state, step)
    if step % every and not flush:
        return 0

    metrics = opt.metrics()
    tensor_norms = opt.tensor_norms() if opt.track_tensor_norms else torch.zeros(0)
    written, ring, rest = state.snapshot([metrics[name] for name in _METRICS] + [tensor_norms,
                                                                                 progress.counts])
    sink_progress = progress.sinks.get(key)
    done, last_step = sink_progress if sink_progress is not None else (progress.start, None)
    if done > written:
        # An earlier checkpoint was loaded (one whose count equals the last one set, or
        # _progress_of would have started afresh): the norms since it are new.
        done = min(progress.start, written)
    if done == written and last_step == step:
        return 0  # a flush right after this step's write: nothing new
    values = rest[:len(_METRICS)].tolist()
    tensor_values = rest[len(_METRICS):len(rest) - progress.counts.numel()]
    stamps = progress.stamps(rest[len(rest) - progress.counts.numel():].tolist())
    count = _write_norms(write, prefix, ring, done, written, stamps,
                         warn=sink_progress is not None or progress.start > 0)
    for name, value in zip(_METRICS, values):
        write(prefix + name, value, step)
    if opt.track_tensor_norms:
        _write_top_tensor_norms(write, prefix, opt, tensor_values, named_parameters, top_k, step)

    progress.sinks[key] = [written, step]
    progress.kept[key] = keep
    state.logged = progress.set_logged = min(n for n, _ in progress.sinks.values())
    return count


def _write_norms(write, prefix: str, ring: Tensor, done: int, written: int,
                 stamps: list[tuple[int, int]], warn: bool) -> int:
    """The norms ``done`` to ``written`` (counted over the run), each at the step of the
    first stamp whose count includes it, less one step per later norm that stamp saw.
    Those the ring no longer holds are gone."""
    size = ring.numel()
    first = max(done, written - size)
    if warn and first > done:
        warnings.warn(f"log_metrics: {first - done} norms were recorded since this sink's last "
                      f"write and are no longer in the history ({size} norms); call it after "
                      "every step, or build the optimizer with a larger history", stacklevel=3)
    norms = ring.tolist()
    j = 0
    for index in range(first, written):
        while stamps[j][1] <= index:
            j += 1
        stamp_step, stamp_count = stamps[j]
        write(prefix + "norm", norms[index % size], stamp_step - (stamp_count - 1 - index))
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
