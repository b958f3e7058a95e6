"""What each backend runs in each mode, over the buffers of one workload.

Modes (the data is set up so each one does what its name says):

- ``norm``: the global norm alone (torch: ``torch._foreach_norm``, as in docs/performance.md).
- ``no-clip``: ``clip_grad_norm_`` with gradients of norm 0.5 and ``max_norm`` 1: nothing to
  clip, the common case.
- ``clip``: the same with gradients of norm 4: every call scales.
- ``amp``: AMP unscale then clip, on gradients scaled by the loss scale (2**16; unscaled norm
  0.5). torch: ``_amp_foreach_non_finite_check_and_unscale_`` (what ``GradScaler.unscale_``
  runs) then ``clip_grad_norm_``; gradclip: ``clip_grads_`` with ``inv_scale`` (one fused path).
- ``amp-adamw``: a whole AMP optimizer step with ``AdamW(fused=True)``, eager. torch:
  ``scaler.unscale_``, ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``; gradclip:
  ``ClippedOptimizer`` and ``gradclip.GradScaler``, ``scaler.step``, ``scaler.update``.
- ``amp-step``: a whole AMP step with an optimizer whose step does nothing, eager: the
  unscale, clip and scaler bookkeeping alone. torch: ``scaler.unscale_``,
  ``clip_grad_norm_``, ``scaler.step``, ``scaler.update``; gradclip: ``ClippedOptimizer`` and
  ``gradclip.GradScaler``, ``scaler.step``, ``scaler.update``.
- ``adamw``: torch's fused AdamW step alone (the baseline the ``amp-adamw`` rows add to).
- ``adamw-scaled``: the same step with ``grad_scale`` and ``found_inf`` set, as AMP hands
  them to a fused optimizer (it then also writes the unscaled gradients back).

- ``per-tensor``: each gradient clipped to its own norm (``clip_grad_norm_per_tensor_``,
  ``max_norm`` 1, gradients of global norm 0.5): nothing to clip. torch, which has no such
  function: ``_foreach_norm``, the factors, ``_foreach_mul_``.
- ``all-tensors``: the same with ``max_norm`` 0: every tensor is written (factor 0).
- ``agc``: adaptive gradient clipping (``adaptive_clip_grad_``, clip_factor 0.01) with
  weights of unit elements and gradients 1e-3 of them: nothing to clip. torch: timm's
  ``adaptive_clip_grad`` (a row is skipped when timm is not installed).
- ``agc-all``: the same with gradients as large as the weights: every unit is clipped.

AMP modes run on float32 gradients only (AMP keeps float32 master gradients). ``torch``
below is ``torch.nn.utils`` itself; gradclip's pure-torch backend is ``reference``.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import gradclip
from gradclip.backends import dispatch

from .workloads import Workload, fill_grads_, make_grads

MAX_NORM = 1.0
LOSS_SCALE = 2.0 ** 16


@dataclass(frozen=True)
class Mode:
    key: str
    grad_norm: float        # norm of the (unscaled) gradients the mode is timed on
    amp: bool               # gradients multiplied by LOSS_SCALE; fp32 only
    mutates: bool           # the call changes the gradients: restore them before each sample
    methods: tuple[str, ...]
    floor_passes: tuple[int, int]   # (reads, read/writes) of the gradient bytes the ideal path needs
    torch_only: bool = False        # a baseline: torch's own step, no gradclip path
    weighted: bool = False          # AGC: the weights hold unit normal values, and
                                    # grad_norm is the gradients' scale relative to them


MODES: dict[str, Mode] = {m.key: m for m in (
    Mode("norm", 0.5, False, False, ("graph", "eager", "host"), (1, 0)),
    Mode("no-clip", 0.5, False, False, ("graph", "eager", "host"), (1, 0)),
    Mode("clip", 4.0, False, True, ("graph", "eager", "host"), (1, 1)),
    Mode("amp", 0.5, True, True, ("graph", "eager", "host"), (1, 1)),
    Mode("amp-step", 0.5, True, True, ("eager", "host"), (1, 1)),
    # The ideal AMP step: one read for the norm, then the fused AdamW step (it reads the
    # gradients and reads and writes parameters and both moments).
    Mode("amp-adamw", 0.5, True, True, ("eager", "host"), (2, 3)),
    Mode("adamw", 0.5, False, False, ("eager", "host"), (1, 3), torch_only=True),
    Mode("adamw-scaled", 0.5, False, False, ("eager", "host"), (1, 3), torch_only=True),
    Mode("per-tensor", 0.5, False, False, ("graph", "eager", "host"), (1, 0)),
    Mode("all-tensors", 0.5, False, True, ("graph", "eager", "host"), (1, 1)),
    # AGC's floor also reads the weights: counted as a second read of the gradient bytes.
    Mode("agc", 1e-3, False, False, ("graph", "eager", "host"), (2, 0), weighted=True),
    Mode("agc-all", 1.0, False, True, ("graph", "eager", "host"), (2, 1), weighted=True),
)}
# max_norm of the per-tensor modes; AGC's clip factor
_PER_TENSOR_MAX_NORM = {"per-tensor": MAX_NORM, "all-tensors": 0.0}
AGC_CLIP_FACTOR = 0.01

# Passes each kind of path makes over the gradient bytes, by the pass model of
# docs/performance.md: (reads, read/writes); None leaves GB/s blank. The keys of each kind
# are the modes it has a path for. "fused" is gradclip's cuda and triton backends.
_PASSES = {
    "torch": {"norm": (1, 0), "no-clip": (1, 1), "clip": (1, 1), "amp": (1, 2),
              "amp-step": (1, 2), "amp-adamw": (2, 5), "adamw": (1, 3), "adamw-scaled": (0, 4),
              # timm's AGC makes temporaries per tensor: no pass count is claimed
              "per-tensor": (1, 1), "all-tensors": (1, 1), "agc": None, "agc-all": None},
    "fused": {"norm": (1, 0), "no-clip": (1, 0), "clip": (1, 1), "amp": (1, 1),
              "amp-step": (1, 1), "amp-adamw": (2, 3),
              "per-tensor": (1, 0), "all-tensors": (1, 1), "agc": (2, 0), "agc-all": (2, 1)},
    # gradclip's reference backend: its passes depend on the device and on the data (it is
    # being reworked, issue 9 item 7), so no count is claimed and GB/s stays blank.
    "reference": dict.fromkeys(("norm", "no-clip", "clip", "amp", "amp-step", "amp-adamw",
                                "per-tensor", "all-tensors", "agc", "agc-all")),
    # apex / TransformerEngine as Megatron uses them: the host reads the factor and skips the
    # scale kernel when it is 1.
    "multi-tensor": {"norm": (1, 0), "no-clip": (1, 0), "clip": (1, 1), "amp": (1, 1)},
}


class Unsupported(Exception):
    """This backend has no path for this mode (or cannot run it here); the message says why."""


class Buffers:
    """The gradients of one workload and dtype on one device, and parameters holding them.

    Parameters are views into one buffer whose values nothing reads (clipping reads
    ``.grad`` only); paths that step an optimizer build their own (:meth:`fresh_params`).
    """

    def __init__(self, workload: Workload, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.workload, self.dtype, self.device, self.seed = workload, dtype, device, seed
        self.flat, self.grads = make_grads(workload, dtype, device)
        self._saved: torch.Tensor | None = None
        self._params_flat, views = make_grads(workload, dtype, device)
        self.params = views
        for p, g in zip(self.params, self.grads):
            p.grad = g
        self.max_norm = MAX_NORM
        self.inv_scale = torch.full((), 1.0 / LOSS_SCALE, dtype=torch.float32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.mode: Mode | None = None

    @property
    def nbytes(self) -> int:
        return self.workload.nbytes(self.dtype)

    def load(self, mode: Mode) -> None:
        """Fill the gradients with the data ``mode`` is timed on (same seed every time)."""
        scale = LOSS_SCALE if mode.amp else 1.0
        if mode.weighted:
            unit = math.sqrt(self.workload.numel)  # the global norm of unit normal values
            fill_grads_(self._params_flat, self.params, unit, self.seed + 1)
            scale = unit
        fill_grads_(self.flat, self.grads, mode.grad_norm * scale, self.seed)
        if mode.mutates:
            if self._saved is None:
                self._saved = torch.empty_like(self.flat)
            self._saved.copy_(self.flat)
        self.mode = mode

    def reset(self) -> Callable[[], None] | None:
        """Restores the gradients of the loaded mode, for modes whose calls change them."""
        if not self.mode.mutates:
            return None
        saved, flat = self._saved, self.flat
        return lambda: flat.copy_(saved)

    def fresh_params(self) -> list[torch.nn.Parameter]:
        """Separate parameters (copies of the gradients' random values) whose ``.grad`` are
        the gradients: for paths that step an optimizer."""
        params = []
        for g in self.grads:
            p = torch.nn.Parameter(g.detach().clone())
            p.grad = g
            params.append(p)
        return params


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: isolates the unscale and clip work of a step."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})

    def step(self, closure=None):
        return None


def _scaler(device: torch.device, cls=None):
    cls = cls or torch.amp.GradScaler
    # A fixed scale: growth would change the data's scale over thousands of samples.
    scaler = cls(device.type, init_scale=LOSS_SCALE, growth_interval=2 ** 30)
    scaler.scale(torch.ones((), device=device))  # creates the scale tensor, as a loss would
    return scaler


def _torch_path(b: Buffers, mode: str) -> Callable[[], object]:
    clip = torch.nn.utils.clip_grad_norm_
    if mode == "norm":
        return lambda: torch._foreach_norm(b.grads)
    if mode in _PER_TENSOR_MAX_NORM:
        max_norm = _PER_TENSOR_MAX_NORM[mode]

        def clip_each():
            norms = torch._foreach_norm(b.grads)
            torch._foreach_mul_(b.grads, [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms])
        return clip_each
    if mode in ("agc", "agc-all"):
        try:
            from timm.utils.agc import adaptive_clip_grad
        except ImportError as error:
            raise Unsupported(f"timm is not installed ({error}): pip install timm") from None
        return lambda: adaptive_clip_grad(b.params, AGC_CLIP_FACTOR)
    if mode in ("no-clip", "clip"):
        return lambda: clip(b.params, b.max_norm, foreach=True)
    if mode == "amp":
        def unscale_and_clip():
            torch._amp_foreach_non_finite_check_and_unscale_(b.grads, b.found_inf, b.inv_scale)
            clip(b.params, b.max_norm, foreach=True)
        return unscale_and_clip
    params = b.fresh_params()
    if mode == "amp-step":
        optimizer = _NoStep(params)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    if mode == "adamw":
        return optimizer.step
    if mode == "adamw-scaled":
        ones = torch.ones((), device=b.device)
        zero = torch.zeros((), device=b.device)

        def scaled_step():
            optimizer.grad_scale, optimizer.found_inf = ones, zero
            optimizer.step()
            del optimizer.grad_scale, optimizer.found_inf
        return scaled_step
    scaler = _scaler(b.device)

    def amp_step():
        scaler.unscale_(optimizer)
        clip(params, b.max_norm, foreach=True)
        scaler.step(optimizer)
        scaler.update()
    return amp_step


def _gradclip_path(name: str) -> Callable[[Buffers, str], Callable[[], object]]:
    def path(b: Buffers, mode: str) -> Callable[[], object]:
        if mode == "norm":
            return lambda: gradclip.get_total_norm(b.grads, backend=name)
        if mode in ("no-clip", "clip"):
            return lambda: gradclip.clip_grad_norm_(b.params, b.max_norm, backend=name)
        if mode == "amp":
            return lambda: dispatch.clip_grads_(b.grads, 2.0, b.max_norm, b.inv_scale, backend=name)
        if mode in _PER_TENSOR_MAX_NORM:
            max_norm = _PER_TENSOR_MAX_NORM[mode]
            return lambda: gradclip.clip_grad_norm_per_tensor_(b.params, max_norm, backend=name)
        if mode in ("agc", "agc-all"):
            return lambda: gradclip.adaptive_clip_grad_(b.params, AGC_CLIP_FACTOR, backend=name)
        if mode in ("amp-step", "amp-adamw"):
            params = b.fresh_params()
            inner = (_NoStep(params) if mode == "amp-step"
                     else torch.optim.AdamW(params, lr=1e-4, fused=True))
            optimizer = gradclip.ClippedOptimizer(inner, b.max_norm, backend=name)
            scaler = _scaler(b.device, gradclip.GradScaler)

            def amp_step():
                scaler.step(optimizer)
                scaler.update()
            return amp_step
        raise Unsupported(f"{mode} is measured for torch only")
    return path


def _multi_tensor_path(load: Callable[[], tuple]) -> Callable[[Buffers, str], Callable[[], object]]:
    """apex's or TransformerEngine's l2norm and scale kernels, as Megatron-LM uses them."""

    def path(b: Buffers, mode: str) -> Callable[[], object]:
        applier, l2norm, scale, unscale_l2norm = load()
        noop = torch.zeros(1, dtype=torch.int32, device=b.device)
        if mode == "norm":
            return lambda: applier(l2norm, noop, [b.grads], False)
        if mode in ("no-clip", "clip"):
            def clip():
                norm, _ = applier(l2norm, noop, [b.grads], False)
                coef = b.max_norm / (norm.item() + 1e-6)  # the host sync these libraries need
                if coef < 1.0:
                    applier(scale, noop, [b.grads, b.grads], coef)
            return clip
        if mode == "amp":
            def unscale_and_clip():
                norm, _ = applier(unscale_l2norm, noop, [b.grads], b.inv_scale, False)
                coef = min(1.0, b.max_norm / (norm.item() + 1e-6)) * b.inv_scale.item()
                applier(scale, noop, [b.grads, b.grads], coef)
            return unscale_and_clip
        raise Unsupported(f"{mode}: no fused optimizer path is benchmarked for this library")
    return path


def _load_apex():
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier
    return (multi_tensor_applier, amp_C.multi_tensor_l2norm, amp_C.multi_tensor_scale,
            amp_C.multi_tensor_unscale_l2norm)


def _load_te():
    from transformer_engine.pytorch import optimizers as te
    return (te.multi_tensor_applier, te.multi_tensor_l2norm, te.multi_tensor_scale,
            te.multi_tensor_unscale_l2norm)


@dataclass
class Backend:
    """A benchmarked implementation: torch, a gradclip backend, apex or TransformerEngine."""

    name: str
    kind: str                # key of _PASSES
    build: Callable[[Buffers, str], Callable[[], object]] | None
    skipped: str | None = None   # why it cannot run here
    note: str = ""

    def passes(self, mode: str) -> tuple[int, int] | None:
        return _PASSES[self.kind][mode]

    def graph_ok(self, mode: str) -> bool:
        # The multi-tensor libraries take the clip factor as a host float: a sync per call.
        return self.kind != "multi-tensor" or mode == "norm"

    def path(self, b: Buffers, mode: str) -> Callable[[], object]:
        if mode not in _PASSES[self.kind]:
            raise Unsupported(f"no {mode} path for {self.name}")
        return self.build(b, mode)


# "torch" is torch.nn.utils itself; cuda, triton and reference are gradclip's backends.
BACKEND_NAMES = ("torch", "cuda", "triton", "reference", "apex", "te")


def cases(workloads, dtypes, modes, backends, methods):
    """(workload, dtype, mode, backend, method) to time, in run order: AMP modes and the
    AdamW baselines on fp32 only, the AdamW baselines for torch only, each mode with the
    timing methods it has (``cpu`` stands for all)."""
    for w in workloads:
        for dtype in dtypes:
            for mode_key in modes:
                mode = MODES[mode_key]
                if (mode.amp or mode.torch_only) and dtype != "fp32":
                    continue
                for backend in backends:
                    if mode.torch_only and backend != "torch":
                        continue
                    for method in methods:
                        if method == "cpu" or method in mode.methods:
                            yield w, dtype, mode_key, backend, method


def select_backends(names: list[str], device: torch.device) -> list[Backend]:
    """The requested backends, each either ready (loaded, built) or skipped with its reason."""
    chosen = []
    for name in names:
        if name == "torch":
            chosen.append(Backend("torch", "torch", _torch_path, note=f"torch.nn.utils, {torch.__version__}"))
        elif name in ("cuda", "triton", "reference"):
            chosen.append(_gradclip_backend(name, device))
        elif name in ("apex", "te"):
            chosen.append(_library_backend(name, device))
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKEND_NAMES)}")
    return chosen


def _gradclip_backend(name: str, device: torch.device) -> Backend:
    kind = "reference" if name == "reference" else "fused"
    try:
        status = dispatch.get_backend(name).status()
    except Exception as error:  # a module that fails to import must not stop the other rows
        return Backend(name, kind, None, skipped=f"cannot import: {type(error).__name__}: {error}")
    if not status.available:
        return Backend(name, kind, None, skipped=status.reason)
    if device.type == "cpu" and name != "reference":
        return Backend(name, kind, None,
                       skipped="CPU run: the bench runs the fused backends on CUDA devices only")
    started = time.perf_counter()
    try:
        dispatch.resolve(name, device)
    except Exception as error:  # a failed build or load must not stop the other rows
        return Backend(name, kind, None, skipped=f"cannot load: {error}")
    note = f"gradclip backend {name!r}, loaded in {time.perf_counter() - started:.1f} s"
    return Backend(name, kind, _gradclip_path(name), note=note)


def _library_backend(name: str, device: torch.device) -> Backend:
    loader = _load_apex if name == "apex" else _load_te
    if device.type != "cuda":
        return Backend(name, "multi-tensor", None, skipped="CUDA only")
    try:
        loader()
    except Exception as error:
        return Backend(name, "multi-tensor", None, skipped=f"not importable: {error}")
    return Backend(name, "multi-tensor", _multi_tensor_path(loader),
                   note="multi_tensor_l2norm + multi_tensor_scale (host reads the factor)")


def release() -> None:
    """Free what a path held on the GPU (optimizer state, graphs) before the next one
    allocates. Nothing to do on the CPU, where a full collection costs more than it frees."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
