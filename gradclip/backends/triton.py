"""The ``triton`` backend: the fused ops as Triton kernels, with no build step.

A clip is two launches whatever the mix of dtypes: ``norm_kernel`` reads every gradient
once and finalises ``stats`` (norm, coefficient, found_inf) on the device, then
``pointwise_kernel`` rescales in place, or returns before touching memory when the
coefficient is exactly 1 (it also clamps, for ``clip_grad_value_``, in one pass).
Nothing synchronises with the host.

The backend is four modules, one job each: :mod:`~gradclip.backends.triton_config` (launch
parameters), :mod:`~gradclip.backends.triton_tables` (the chunk tables every kernel walks,
and their cache), :mod:`~gradclip.backends.triton_kernels` (the kernels), and this one: the
ops, their launches, and their registration with ``torch.library`` (``gradclip_triton::*``,
so that ``torch.compile(fullgraph=True)`` traces through a clip).

Without a GPU the kernels run in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is imported: slow, for tests.

What the kernels do not take, an op returns ``NotImplemented`` for, before writing
anything, and the dispatcher runs the reference backend instead: tensors that are not
dense (gaps or overlaps in memory, rare for gradients), and, for the ops that rescale
every entry, a list in which entries share memory (torch's semantics multiply a tensor
listed twice twice; the kernels would race).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import operator
import struct
import threading

import torch
from torch import Tensor

from . import dispatch, fakes
from .base import (COEF, FOUND_INF, Backend, BackendStatus, BackendUnavailableError, agc_result,
                   distinct_of)
from .triton_config import INTERPRETER_CONFIG, TritonConfig, interpreting
from .triton_tables import AgcTable, Table, TableCache, next_pow2

# norm kinds and pointwise ops as in triton_kernels (NORM_2.., SCALE, CLAMP)
_NORM_2, _NORM_1, _NORM_INF, _NORM_P = 0, 1, 2, 3
_SCALE, _CLAMP = 0, 1
# segment_kernel modes as in triton_kernels (NORMS, CLIP, AGC)
_SEGMENT_NORMS, _SEGMENT_CLIP, _SEGMENT_AGC = 0, 1, 2
_SEGMENT_BLOCK = 128         # units per segment_kernel program
_INTERPRETER_SEGMENT_BLOCK = 16
# The interpreter runs kernels in Python over shared state: one launch at a time.
_INTERPRETER_LOCK = threading.Lock()

_shape_of = operator.attrgetter("shape")
_kernels = None


def _load_kernels():
    global _kernels
    if _kernels is None:
        from . import triton_kernels
        _kernels = triton_kernels
    return _kernels


def _float_bits(value: float) -> int:
    """The IEEE float64 bits of ``value``: triton passes Python floats as float32."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


class TritonBackend(Backend):
    """The fused ops in Triton; see the module docstring.

    Args:
        config (TritonConfig, optional): launch parameters; by default
            :data:`INTERPRETER_CONFIG` on the CPU and ``TritonConfig()`` (overridden by
            ``$GRADCLIP_TRITON_CONFIG``) on a GPU. A backend with its own config keeps
            its own table cache and runs eagerly; under ``torch.compile`` the registered
            ops run with the default one.
    """

    name = "triton"

    def __init__(self, config: TritonConfig | None = None):
        self._tables = TableCache(config) if config is not None else _SHARED

    # -- availability -------------------------------------------------------------------

    def status(self) -> BackendStatus:
        # Looking triton up costs 0.3-1 ms, and an explicit backend="triton" asks per call.
        # The answer changes only with TRITON_INTERPRET, so it is cached per its value.
        key = interpreting()
        status = _STATUS_CACHE.get(key)
        if status is None:
            status = _STATUS_CACHE[key] = _find_status()
        return status

    def supports(self, device: torch.device) -> bool:
        # The interpreter reads the table's raw addresses on the host: CPU tensors only.
        return device.type == ("cpu" if interpreting() else "cuda")

    def load(self) -> None:
        """Import (and so check) the kernels; raises BackendUnavailableError if triton fails."""
        try:
            kernels = _load_kernels()
        except Exception as error:  # any failure inside triton's import means unusable
            raise BackendUnavailableError(f"triton backend: importing triton failed: {error}") from error
        # triton.jit picks the interpreter when the kernels are defined, not when they run.
        interpreted = type(kernels.norm_kernel).__name__ == "InterpretedFunction"
        if interpreted != interpreting():
            raise BackendUnavailableError(
                "triton backend: TRITON_INTERPRET changed after the kernels were defined "
                f"(they run {'in' if interpreted else 'without'} the interpreter); set it "
                "before gradclip.backends.triton_kernels is first imported")

    # -- the ops ------------------------------------------------------------------------
    # Eager calls launch directly (the custom ops below cost dispatcher time); traced
    # calls go through the ops, whose fakes describe the outputs.

    def norm_stats(self, tensors, norm_type, max_norm, inv_scale=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.norm_stats(tensors, float(norm_type), float(max_norm),
                                                        inv_scale)
        table = self._tables.table(tensors)
        if table is None:
            return NotImplemented
        with _launching():
            return self._norm(table, tensors[0].device, norm_type, max_norm, inv_scale)

    def scale_(self, tensors, scale, found_inf=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.scale_(tensors, scale, found_inf)
        table = self._every_entry(tensors)
        if table is None:
            return NotImplemented
        device = tensors[0].device
        scale = _one_element(scale, device, "scale")
        found = None if found_inf is None else _one_element(found_inf, device, "found_inf")
        with _launching():
            self._pointwise(table, device, _SCALE, scale, 0, found, 0)
        torch.autograd.graph.increment_version(tensors)

    def clip_grads_(self, grads, norm_type, max_norm, inv_scale=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.clip_grads_(grads, float(norm_type), float(max_norm),
                                                         inv_scale)
        table = self._every_entry(grads)
        if table is None:
            return NotImplemented
        device = grads[0].device
        with _launching():
            stats = self._norm(table, device, norm_type, max_norm, inv_scale)
            found = stats if inv_scale is not None else None
            self._pointwise(table, device, _SCALE, stats, COEF, found, FOUND_INF)
        torch.autograd.graph.increment_version(grads)
        return stats

    def clamp_(self, tensors, clip_value):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.clamp_(tensors, float(clip_value))
        table = self._every_entry(tensors)
        if table is None:
            return NotImplemented
        with _launching():
            self._pointwise(table, tensors[0].device, _CLAMP, None, 0, None, 0,
                            clamp_bits=_float_bits(float(clip_value)))
        torch.autograd.graph.increment_version(tensors)

    def _every_entry(self, tensors: list[Tensor]) -> Table | None:
        """The table of a list whose every entry a rescale writes, or None when the kernels
        do not take it: not dense, or entries that share memory (a race in the kernels)."""
        table = self._tables.table(tensors)
        return None if table is None or table.shared is not None else table

    # -- per-tensor and unit-wise ops ---------------------------------------------------
    # Per tensor: the norm pass with per-chunk partials, segment_kernel (norms, factors),
    # unit_scale_kernel (only the chunks whose factor is not 1, each tensor once). AGC:
    # agc_norm_kernel (weights and gradients, one read each), segment_kernel,
    # unit_scale_kernel.

    def norm_stats_per_tensor(self, tensors, norm_type, max_norm, inv_scale=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.norm_stats_per_tensor(
                tensors, float(norm_type), float(max_norm), inv_scale)
        table = self._tables.table(tensors)
        if table is None:
            return NotImplemented
        device = tensors[0].device
        with _launching():
            stats, norms, _ = self._per_tensor(table, device, norm_type, max_norm, inv_scale,
                                               _SEGMENT_NORMS)
        return stats, norms

    def scale_per_tensor_(self, tensors, coefs):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.scale_per_tensor_(tensors, coefs)
        coefs = coefs.reshape(-1)
        if coefs.numel() != len(tensors):
            raise ValueError(f"coefs must have one element per tensor ({len(tensors)}), "
                             f"got {coefs.numel()}")
        table = self._tables.table(tensors)
        if table is None:
            return NotImplemented
        distinct_of(table.shared)  # refuses overlaps; a tensor listed twice is scaled once
        device = tensors[0].device
        with _launching():
            self._scale_units(table, device, coefs.to(device=device, dtype=table.acc_dtype))
        torch.autograd.graph.increment_version(tensors)

    def clip_per_tensor_(self, tensors, norm_type, max_norm):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.clip_per_tensor_(tensors, float(norm_type),
                                                              float(max_norm))
        table = self._tables.table(tensors)
        if table is None:
            return NotImplemented
        distinct_of(table.shared)
        device = tensors[0].device
        with _launching():
            _, norms, coefs = self._per_tensor(table, device, norm_type, max_norm, None,
                                               _SEGMENT_CLIP)
            self._scale_units(table, device, coefs)
        torch.autograd.graph.increment_version(tensors)
        return norms

    def agc_(self, params, grads, clip_factor, eps, norm_type):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.agc_(params, grads, float(clip_factor), float(eps),
                                                  float(norm_type))
        _check_pairs(params, grads)
        table = self._tables.agc_table(params, grads)
        if table is None:
            return NotImplemented
        device = grads[0].device
        with _launching():
            unit_norms, unit_coefs = self._agc(table, device, float(clip_factor), float(eps),
                                               norm_type)
        torch.autograd.graph.increment_version(grads)
        return agc_result(unit_norms, unit_coefs, norm_type)

    # -- launches -----------------------------------------------------------------------

    def _norm(self, table: Table, device, norm_type, max_norm, inv_scale,
              chunk_out: Tensor | None = None) -> Tensor:
        kernels = _load_kernels()
        import triton.language as tl

        kind = _norm_kind(norm_type)
        stats = torch.empty(3, dtype=table.acc_dtype, device=device)
        if inv_scale is not None:
            inv_scale = _one_element(inv_scale, device, "inv_scale")
        config = self._config(device)
        grid = table.norm_programs
        try:
            with _on_device(device):
                kernels.norm_kernel[(grid,)](
                    table.dev, table.n_chunks, table.partials, stats,
                    stats if inv_scale is None else inv_scale,
                    _float_bits(float(max_norm)), _p_bits(norm_type, kind),
                    stats if chunk_out is None else chunk_out,
                    ACC=tl.float64 if table.acc_dtype == torch.float64 else tl.float32,
                    NORM_KIND=kind, HAS_SCALE=inv_scale is not None, **table.present,
                    BLOCK=config.block, FIN_BLOCK=next_pow2(grid), num_warps=config.num_warps,
                    PER_CHUNK=chunk_out is not None)
        except BaseException:
            # Programs that ran took tickets the last one never returned: without this,
            # every later launch on this table would finalise early from stale partials.
            table.dev[:1].zero_()
            raise
        return stats

    def _pointwise(self, table: Table, device, op: int, scale: Tensor | None, scale_at: int,
                   found: Tensor | None, found_at: int, clamp_bits: int = 0) -> None:
        kernels = _load_kernels()
        config = self._config(device)
        with _on_device(device):
            kernels.pointwise_kernel[(table.scale_programs,)](
                table.dev, table.n_chunks, table.dev if scale is None else scale,
                table.dev if found is None else found, clamp_bits,
                SCALE_AT=scale_at, FOUND_AT=found_at, HAS_FOUND=found is not None, OP=op,
                **table.present, BLOCK=config.scale_block, EXACT_BF16=device.type == "cpu",
                num_warps=config.scale_num_warps)

    def _per_tensor(self, table: Table, device, norm_type, max_norm, inv_scale, mode):
        """(stats, norms, factors): one norm pass writing per-chunk partials, then the
        per-tensor reduce; ``factors`` is None unless ``mode`` is CLIP."""
        segments = self._segments(table, device)
        chunk_out = torch.empty(max(table.n_chunks, 1), dtype=table.acc_dtype, device=device)
        stats = self._norm(table, device, norm_type, max_norm, inv_scale, chunk_out)
        n_tensors = len(table.numels)
        norms = torch.empty(n_tensors, dtype=table.acc_dtype, device=device)
        coefs = torch.empty_like(norms) if mode == _SEGMENT_CLIP else None
        scale = None if inv_scale is None else _one_element(inv_scale, device, "inv_scale")
        self._reduce_units(device, segments[table.n_chunks + 1:], n_tensors, chunk_out, chunk_out,
                           norms, coefs, scale, table.acc_dtype, norm_type, mode,
                           max_norm=float(max_norm))
        return stats, norms, coefs

    def _reduce_units(self, device, starts, n_units, parts, wparts, norms, coefs, scale, acc_dtype,
                      norm_type, mode, max_norm=math.inf, factor=0.0, eps=0.0) -> None:
        kernels = _load_kernels()
        import triton.language as tl

        kind = _norm_kind(norm_type)
        block = _INTERPRETER_SEGMENT_BLOCK if device.type == "cpu" else _SEGMENT_BLOCK
        with _on_device(device):
            kernels.segment_kernel[(-(-n_units // block),)](
                starts, n_units, parts, wparts, norms, norms if coefs is None else coefs,
                norms if scale is None else scale, _float_bits(max_norm), _p_bits(norm_type, kind),
                _float_bits(factor), _float_bits(eps),
                ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32, NORM_KIND=kind,
                HAS_SCALE=scale is not None, MODE=mode, BLOCK_U=block)

    def _scale_units(self, table: Table, device, coefs: Tensor) -> None:
        segments = self._segments(table, device)
        n = table.n_chunks
        self._launch_unit_scale(device, table.dev[1:n + 2], table.dev[n + 2:2 * n + 3],
                                segments[:n + 1], n, coefs, 3, table.present,
                                table.scale_programs)

    def _launch_unit_scale(self, device, bases, packs, owner, n_chunks, coefs, len_shift, present,
                           programs) -> None:
        if n_chunks == 0:
            return
        kernels = _load_kernels()
        config = self._config(device)
        with _on_device(device):
            kernels.unit_scale_kernel[(programs,)](
                bases, packs, owner, n_chunks, coefs, LEN_SHIFT=len_shift, **present,
                BLOCK=config.scale_block, EXACT_BF16=device.type == "cpu",
                num_warps=config.scale_num_warps)

    def _agc(self, table: AgcTable, device, clip_factor: float, eps: float,
             norm_type) -> tuple[Tensor, Tensor]:
        """AGC in three launches; returns the gradients' unit norms (before clipping) and
        the units' factors."""
        kernels = _load_kernels()
        import triton.language as tl

        kind = _norm_kind(norm_type)
        acc = tl.float64 if table.acc_dtype == torch.float64 else tl.float32
        n = max(table.n_chunks, 1)
        parts = torch.empty(2 * n, dtype=table.acc_dtype, device=device)
        gparts, wparts = parts[:n], parts[n:]
        config = self._config(device)
        if table.n_chunks:
            with _on_device(device):
                kernels.agc_norm_kernel[(table.programs,)](
                    table.part(0), table.part(1), table.part(2), table.n_chunks, gparts, wparts,
                    _p_bits(norm_type, kind), ACC=acc, NORM_KIND=kind, **table.present,
                    BLOCK=table.block, num_warps=config.num_warps)
        norms = torch.empty(table.n_units, dtype=table.acc_dtype, device=device)
        coefs = torch.empty_like(norms)
        if table.n_units:
            self._reduce_units(device, table.starts, table.n_units, gparts, wparts, norms, coefs,
                               None, table.acc_dtype, norm_type, _SEGMENT_AGC, factor=clip_factor,
                               eps=eps)
        self._launch_unit_scale(device, table.part(0), table.part(2), table.part(3),
                                table.n_chunks, coefs, 6, table.present, table.programs)
        return norms, coefs

    # -- the table cache ----------------------------------------------------------------

    def _config(self, device: torch.device) -> TritonConfig:
        return self._tables.config(device)

    def _segments(self, table: Table, device) -> Tensor:
        return self._tables.segments(table, device)

    def cache_info(self) -> dict:
        """Table cache counters (for tests and benchmarks): hits, misses, entries, held."""
        return self._tables.info()

    def clear_cache(self) -> None:
        """Forget the cached tables (those a CUDA graph uses stay alive)."""
        self._tables.clear()


def _check_pairs(params: list[Tensor], grads: list[Tensor]) -> None:
    """AGC's pairs, before anything is read or written: one weight of the same shape per
    gradient (dtypes and devices are checked when a table is built)."""
    if len(params) != len(grads):
        raise ValueError(f"agc_ takes one parameter per gradient, got {len(params)} parameters "
                         f"for {len(grads)} gradients")
    if not all(map(operator.eq, map(_shape_of, params), map(_shape_of, grads))):
        i = next(i for i, (w, g) in enumerate(zip(params, grads)) if w.shape != g.shape)
        raise ValueError(f"grads[{i}] has shape {tuple(grads[i].shape)} but its parameter has "
                         f"shape {tuple(params[i].shape)}; pass each parameter with its own gradient")


def _launching():
    """The interpreter lock when kernels run in Triton's interpreter (not re-entrant)."""
    return _INTERPRETER_LOCK if interpreting() else contextlib.nullcontext()


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device.index)
    return contextlib.nullcontext()


def _one_element(t: Tensor, device: torch.device, name: str) -> Tensor:
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(t.shape)}")
    return t if t.device == device else t.to(device)


def _norm_kind(norm_type) -> int:
    norm_type = float(norm_type)
    if norm_type == 2.0:
        return _NORM_2
    if norm_type == 1.0:
        return _NORM_1
    if math.isinf(norm_type):
        return _NORM_INF
    return _NORM_P


def _p_bits(norm_type, kind: int) -> int:
    return _float_bits(float(norm_type)) if kind == _NORM_P else 0


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _triton_version() -> str:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:
        return "(unknown version)"


_STATUS_CACHE: dict[bool, BackendStatus] = {}


def _find_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton; Linux with "
                                    "an NVIDIA or AMD GPU)")
    version = _triton_version()
    if interpreting():
        return BackendStatus(True, f"triton {version} interpreter on CPU tensors "
                                   "(TRITON_INTERPRET=1), slow: for tests")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {version} on {torch.cuda.get_device_name()}")
    return BackendStatus(False, f"triton {version} is installed but there is no CUDA GPU; "
                                "set TRITON_INTERPRET=1 before importing triton to run its "
                                "kernels on the CPU (slowly, for tests)")


_SHARED = TableCache(None)
_OPS_BACKEND = TritonBackend()


# -- torch.library registration: lets torch.compile(fullgraph=True) trace through a clip ----
# Each op runs the default backend, and the reference where it returns NotImplemented
# (dispatch.call); the fakes are gradclip.backends.fakes, shared with the CUDA ops.

@torch.library.custom_op("gradclip_triton::norm_stats", mutates_args=())
def _norm_stats_op(tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return dispatch.call(_OPS_BACKEND, "norm_stats", tensors, norm_type, max_norm, inv_scale)


@torch.library.custom_op("gradclip_triton::scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    dispatch.call(_OPS_BACKEND, "scale_", tensors, scale, found_inf)


@torch.library.custom_op("gradclip_triton::clip_grads_", mutates_args=("grads",))
def _clip_grads_op(grads: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return dispatch.call(_OPS_BACKEND, "clip_grads_", grads, norm_type, max_norm, inv_scale)


@torch.library.custom_op("gradclip_triton::clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    dispatch.call(_OPS_BACKEND, "clamp_", tensors, clip_value)


@torch.library.custom_op("gradclip_triton::norm_stats_per_tensor", mutates_args=())
def _norm_stats_per_tensor_op(tensors: list[Tensor], norm_type: float, max_norm: float,
                              inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    return dispatch.call(_OPS_BACKEND, "norm_stats_per_tensor", tensors, norm_type, max_norm,
                         inv_scale)


@torch.library.custom_op("gradclip_triton::scale_per_tensor_", mutates_args=("tensors",))
def _scale_per_tensor_op(tensors: list[Tensor], coefs: Tensor) -> None:
    dispatch.call(_OPS_BACKEND, "scale_per_tensor_", tensors, coefs)


@torch.library.custom_op("gradclip_triton::clip_per_tensor_", mutates_args=("tensors",))
def _clip_per_tensor_op(tensors: list[Tensor], norm_type: float, max_norm: float) -> Tensor:
    return dispatch.call(_OPS_BACKEND, "clip_per_tensor_", tensors, norm_type, max_norm)


@torch.library.custom_op("gradclip_triton::agc_", mutates_args=("grads",))
def _agc_op(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
            norm_type: float) -> Tensor:
    return dispatch.call(_OPS_BACKEND, "agc_", params, grads, clip_factor, eps, norm_type)


fakes.register_fakes("gradclip_triton")

__all__ = ["INTERPRETER_CONFIG", "TritonBackend", "TritonConfig"]
