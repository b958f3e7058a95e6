"""The ``triton`` backend: the fused ops as Triton kernels, with no build step.

A clip is two launches whatever the mix of dtypes: ``norm_kernel`` reads every gradient
once and finalises ``stats`` (norm, coefficient, found_inf) on the device, then
``pointwise_kernel`` rescales in place, or returns before touching memory when the
coefficient is exactly 1 (it also clamps, for ``clip_grad_value_``, in one pass).
Nothing synchronises with the host.

Both kernels read a chunk table (layout in :mod:`gradclip.backends.triton_kernels`) built
on the host in one pass over the tensors, copied to the device once and cached: a later
call with the same list (same data pointers, sizes, dtypes, device) reuses it and costs
only the key, four attribute reads per tensor. The table depends on nothing else, so a hit
is always valid, whichever tensors now live at those addresses.

CUDA graphs: a table first needed during capture is built from a host buffer kept
alive for the life of the process, allocated outside the graph's memory pool, and its
host-to-device copy is captured, so every replay rewrites it; it is copied again before
its first use outside the graph. Tables a graph uses are never evicted.

Without a GPU the kernels run in Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set before triton is imported: slow, for tests.

Tensors that are not dense (gaps or overlaps in memory, rare for gradients) go to the
reference backend, the whole call with them.
"""

from __future__ import annotations

import contextlib

import importlib.util
import math
import operator
import os
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from itertools import repeat

import torch
from torch import Tensor

from .base import (
    COEF,
    DTYPE_CODES,
    FOUND_INF,
    Backend,
    BackendStatus,
    BackendUnavailableError,
)
from . import fakes
from .reference import ReferenceBackend

# The kernels' HAS_<NAME> flags per dtype, and element sizes by dtype code.
_CODE_NAMES = (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16),
               ("F64", torch.float64))
_ELEMENT_SIZES = tuple(dtype.itemsize for dtype, _ in sorted(DTYPE_CODES.items(), key=lambda kv: kv[1]))
# norm kinds and pointwise ops as in triton_kernels (NORM_2.., SCALE, CLAMP)
_NORM_2, _NORM_1, _NORM_INF, _NORM_P = 0, 1, 2, 3
_SCALE, _CLAMP = 0, 1
# segment_kernel modes as in triton_kernels (NORMS, CLIP, AGC)
_SEGMENT_NORMS, _SEGMENT_CLIP, _SEGMENT_AGC = 0, 1, 2
_SEGMENT_BLOCK = 128         # units per segment_kernel program
_INTERPRETER_SEGMENT_BLOCK = 16
# The interpreter runs kernels in Python over shared state: one launch at a time.
_INTERPRETER_LOCK = threading.Lock()
_MAX_CACHED_TABLES = 8
_CONFIG_ENV = "GRADCLIP_TRITON_CONFIG"

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")


@dataclass(frozen=True)
class TritonConfig:
    """Launch parameters. Block sizes are powers of two; chunks a power of two in between.

    ``programs`` fixes the grid (the interpreter); otherwise a grid is
    ``programs_per_sm * SMs``, capped at the number of chunks. Chunks are sized to give
    each norm program about ``chunks_per_program`` of them (balance against per-chunk
    overhead), within ``[max(block, scale_block), max_chunk]`` elements.
    ``GRADCLIP_TRITON_CONFIG="block=8192,num_warps=8"`` overrides fields of the default.
    """

    block: int = 4096
    num_warps: int = 8
    programs_per_sm: int = 4
    scale_block: int = 4096
    scale_num_warps: int = 8
    scale_programs_per_sm: int = 4
    chunks_per_program: int = 16
    max_chunk: int = 1 << 16
    programs: int = 0

    def __post_init__(self):
        for name in ("block", "scale_block", "max_chunk"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {value}")


INTERPRETER_CONFIG = TritonConfig(block=32, num_warps=1, scale_block=32, scale_num_warps=1,
                                  chunks_per_program=2, max_chunk=64, programs=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _config_from_env(base: TritonConfig) -> TritonConfig:
    text = os.environ.get(_CONFIG_ENV, "").strip()
    if not text:
        return base
    fields = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        if name not in TritonConfig.__dataclass_fields__ or not value.strip().isdigit():
            raise ValueError(f"{_CONFIG_ENV}={text!r}: {item!r} is not NAME=INTEGER with NAME one of "
                             + ", ".join(TritonConfig.__dataclass_fields__))
        fields[name] = int(value)
    return replace(base, **fields)


def _float_bits(value: float) -> int:
    """The IEEE float64 bits of ``value``: triton passes Python floats as float32."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _pow2_floor(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


def _is_dense(t: Tensor) -> bool:
    """No gaps, no overlaps: the elements fill ``numel`` consecutive slots from data_ptr."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


@dataclass
class _Table:
    """One gradient list's chunk table: host source, device copy, and grid sizes."""

    source: array                # the host buffer ``host`` views (never mutated)
    host: Tensor                 # int64 CPU: counter, bases, packed
    dev: Tensor                  # int64 device: the same, then the norm partial slots
    partials: Tensor             # view of dev: 2 * norm_programs slots of the stats dtype
    n_chunks: int
    present: dict                # HAS_F32 ... HAS_F64: which dtypes' loops to compile
    acc_dtype: torch.dtype
    norm_programs: int
    scale_programs: int
    numels: tuple = ()           # per tensor, for the per-tensor segments
    chunk: int = 0               # elements per full chunk
    held: bool = False           # used in a graph capture: never freed
    segments: Tensor | None = None  # int64 device: owner (n_chunks + 1), starts (tensors + 1)
    segments_source: array | None = None


@dataclass
class _AgcTable:
    """AGC's table: each chunk a piece of one unit (a row, or a tensor of ndim <= 1)."""

    source: array                # host: gbases, wbases, packed, owner (n + 1 each), starts
    dev: Tensor                  # int64 device copy
    n_chunks: int
    n_units: int
    present: dict
    acc_dtype: torch.dtype
    block: int
    programs: int
    held: bool = False

    def part(self, index: int) -> Tensor:
        """gbases, wbases, packed, owner (index 0..3): each n_chunks + 1 entries."""
        n = self.n_chunks + 1
        return self.dev[index * n:(index + 1) * n]

    @property
    def starts(self) -> Tensor:
        return self.dev[4 * (self.n_chunks + 1):]


@dataclass
class _State:
    """Tables cached per backend configuration (the ops of torch.library share one)."""

    config: TritonConfig | None
    tables: OrderedDict = field(default_factory=OrderedDict)
    agc_tables: OrderedDict = field(default_factory=OrderedDict)
    held: list = field(default_factory=list)
    sms: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_key: tuple | None = None
    last_table: _Table | None = None
    hits: int = 0
    misses: int = 0


_kernels = None


def _load_kernels():
    global _kernels
    if _kernels is None:
        from . import triton_kernels
        _kernels = triton_kernels
    return _kernels


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
        self._state = _State(config) if config is not None else _SHARED
        self._fallback = ReferenceBackend()

    # -- availability -------------------------------------------------------------------

    def status(self) -> BackendStatus:
        # Looking triton up costs 0.3-1 ms, and an explicit backend="triton" asks per call.
        # The answer changes only with TRITON_INTERPRET, so it is cached per its value.
        key = _interpreting()
        status = _STATUS_CACHE.get(key)
        if status is None:
            status = _STATUS_CACHE[key] = _find_status()
        return status

    def supports(self, device: torch.device) -> bool:
        # The interpreter reads the table's raw addresses on the host: CPU tensors only.
        return device.type == ("cpu" if _interpreting() else "cuda")

    def load(self) -> None:
        """Import (and so check) the kernels; raises BackendUnavailableError if triton fails."""
        try:
            kernels = _load_kernels()
        except Exception as error:  # any failure inside triton's import means unusable
            raise BackendUnavailableError(f"triton backend: importing triton failed: {error}") from error
        # triton.jit picks the interpreter when the kernels are defined, not when they run.
        interpreted = type(kernels.norm_kernel).__name__ == "InterpretedFunction"
        if interpreted != _interpreting():
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
        table = self._table(tensors)
        if table is None:
            return self._fallback.norm_stats(tensors, norm_type, max_norm, inv_scale)
        with _launching():
            return self._norm(table, tensors[0].device, norm_type, max_norm, inv_scale)

    def scale_(self, tensors, scale, found_inf=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.scale_(tensors, scale, found_inf)
        table = self._table(tensors)
        if table is None:
            return self._fallback.scale_(tensors, scale, found_inf)
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
        table = self._table(grads)
        if table is None:
            return self._fallback.clip_grads_(grads, norm_type, max_norm, inv_scale)
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
        table = self._table(tensors)
        if table is None:
            return self._fallback.clamp_(tensors, clip_value)
        with _launching():
            self._pointwise(table, tensors[0].device, _CLAMP, None, 0, None, 0,
                            clamp_bits=_float_bits(float(clip_value)))
        torch.autograd.graph.increment_version(tensors)

    # -- per-tensor and unit-wise ops ---------------------------------------------------
    # Per tensor: the norm pass with per-chunk partials, segment_kernel (norms, factors),
    # unit_scale_kernel (only the chunks whose factor is not 1). AGC: agc_norm_kernel
    # (weights and gradients, one read each), segment_kernel, unit_scale_kernel.

    def norm_stats_per_tensor(self, tensors, norm_type, max_norm, inv_scale=None):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.norm_stats_per_tensor(
                tensors, float(norm_type), float(max_norm), inv_scale)
        table = self._table(tensors)
        if table is None:
            return self._fallback.norm_stats_per_tensor(tensors, norm_type, max_norm, inv_scale)
        device = tensors[0].device
        with _launching():
            stats, norms, _ = self._per_tensor(table, device, norm_type, max_norm, inv_scale,
                                               _SEGMENT_NORMS)
        return stats, norms

    def scale_per_tensor_(self, tensors, coefs):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.scale_per_tensor_(tensors, coefs)
        table = self._table(tensors)
        if table is None:
            return self._fallback.scale_per_tensor_(tensors, coefs)
        device = tensors[0].device
        coefs = coefs.reshape(-1)
        if coefs.numel() != len(tensors):
            raise ValueError(f"coefs must have one element per tensor ({len(tensors)}), "
                             f"got {coefs.numel()}")
        with _launching():
            self._scale_units(table, device, coefs.to(device=device, dtype=table.acc_dtype))
        torch.autograd.graph.increment_version(tensors)

    def clip_per_tensor_(self, tensors, norm_type, max_norm):
        if torch.compiler.is_compiling():
            return torch.ops.gradclip_triton.clip_per_tensor_(tensors, float(norm_type),
                                                              float(max_norm))
        table = self._table(tensors)
        if table is None:
            return self._fallback.clip_per_tensor_(tensors, norm_type, max_norm)
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
        table = self._agc_table(params, grads)
        if table is None:
            return self._fallback.agc_(params, grads, clip_factor, eps, norm_type)
        device = grads[0].device
        with _launching():
            unit_norms = self._agc(table, device, float(clip_factor), float(eps), norm_type)
        torch.autograd.graph.increment_version(grads)
        return torch.linalg.vector_norm(unit_norms, norm_type)

    def _per_tensor(self, table: _Table, device, norm_type, max_norm, inv_scale, mode):
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

    def _scale_units(self, table: _Table, device, coefs: Tensor) -> None:
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

    def _segments(self, table: _Table, device) -> Tensor:
        """The table's owner and starts vectors, built on first use (device-resident)."""
        if table.segments is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "gradclip triton backend: the per-tensor index of this gradient list is new "
                    "during CUDA graph capture and cannot be uploaded inside a capture. Call the "
                    "per-tensor op once eagerly before capturing.")
            owner, starts = array("q"), array("q", [0])
            for index, numel in enumerate(table.numels):
                count = -(-numel // table.chunk)
                owner.extend(repeat(index, count))
                starts.append(starts[-1] + count)
            owner.append(0)  # padding, as the table's
            owner.extend(starts)
            host = torch.frombuffer(owner, dtype=torch.int64)
            segments = torch.empty(host.numel(), dtype=torch.int64, device=device)
            segments.copy_(host, non_blocking=True)
            table.segments_source, table.segments = owner, segments
        return table.segments

    def _agc(self, table: _AgcTable, device, clip_factor: float, eps: float, norm_type) -> Tensor:
        """AGC in three launches; returns the gradients' unit norms (before clipping)."""
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
        return norms

    def _agc_table(self, params: list[Tensor], grads: list[Tensor]) -> _AgcTable | None:
        """The cached AGC table of (params, grads); None if a tensor is not contiguous."""
        if not grads:
            raise ValueError("the triton backend needs at least one tensor")
        if not (all(map(_is_contiguous, grads)) and all(map(_is_contiguous, params))):
            return None  # rows of a non-contiguous tensor are not consecutive memory
        device = grads[0].device
        key = (device, tuple(map(_data_ptr, grads)), tuple(map(_data_ptr, params)),
               tuple(tuple(g.shape) for g in grads), tuple(map(_dtype_of, grads)),
               tuple(map(_dtype_of, params)))
        state = self._state
        with state.lock:
            table = state.agc_tables.get(key)
            if table is None:
                if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        "gradclip triton backend: this parameter list is new during CUDA graph "
                        "capture; call adaptive_clip_grad_ once eagerly before capturing.")
                table = state.agc_tables[key] = self._build_agc(device, key)
                while len(state.agc_tables) > _MAX_CACHED_TABLES:
                    _, old = state.agc_tables.popitem(last=False)
                    if old.held:
                        state.held.append(old)
            else:
                state.agc_tables.move_to_end(key)
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                table.held = True
        return table

    def _build_agc(self, device, key) -> _AgcTable:
        _, gptrs, wptrs, shapes, gdtypes, wdtypes = key
        config = self._config(device)
        chunk = config.max_chunk
        gbases, wbases, packed, owner, starts = (array("q") for _ in range(5))
        starts.append(0)
        unit = longest = 0
        for gptr, wptr, shape, gdtype, wdtype in zip(gptrs, wptrs, shapes, gdtypes, wdtypes):
            numel = math.prod(shape)
            rows = shape[0] if len(shape) > 1 else 1
            if rows == 0:
                continue
            width = numel // rows
            gcode, wcode = DTYPE_CODES[gdtype], DTYPE_CODES[wdtype]
            gsize, wsize = _ELEMENT_SIZES[gcode], _ELEMENT_SIZES[wcode]
            codes = wcode * 8 + gcode
            if width <= chunk:
                # One chunk per row (none for empty rows, whose norm is 0): C-level extends.
                count = rows if width else 0
                gbases.extend(range(gptr, gptr + count * width * gsize, width * gsize or 1))
                wbases.extend(range(wptr, wptr + count * width * wsize, width * wsize or 1))
                packed.extend(repeat(width * 64 + codes, count))
                owner.extend(range(unit, unit + count))
                starts.extend(range(starts[-1] + 1, starts[-1] + 1 + rows) if width
                              else repeat(starts[-1], rows))
                longest = max(longest, width)
            else:
                longest = chunk
                pieces = -(-width // chunk)
                for row in range(rows):
                    g0, w0 = gptr + row * width * gsize, wptr + row * width * wsize
                    gbases.extend(range(g0, g0 + pieces * chunk * gsize, chunk * gsize))
                    wbases.extend(range(w0, w0 + pieces * chunk * wsize, chunk * wsize))
                    packed.extend(repeat(chunk * 64 + codes, pieces - 1))
                    packed.append((width - (pieces - 1) * chunk) * 64 + codes)
                    owner.extend(repeat(unit + row, pieces))
                    starts.append(starts[-1] + pieces)
            unit += rows
        n_chunks = len(packed)
        source = array("q")
        for part in (gbases, wbases, packed, owner):
            source.extend(part)
            source.append(0)  # padding entry
        source.extend(starts)
        host = torch.frombuffer(source, dtype=torch.int64)
        dev = torch.empty(host.numel(), dtype=torch.int64, device=device)
        dev.copy_(host, non_blocking=True)
        present = {f"HAS_{name}": dtype in gdtypes or dtype in wdtypes for name, dtype in _CODE_NAMES}
        acc_dtype = torch.float64 if torch.float64 in gdtypes else torch.float32
        block = max(16, min(config.block, triton_next_pow2(max(longest, 1))))
        programs = max(1, min(self._grid_target(device, config.programs_per_sm), n_chunks))
        return _AgcTable(source, dev, n_chunks, unit, present, acc_dtype, block, programs)

    # -- launches -----------------------------------------------------------------------

    def _norm(self, table: _Table, device, norm_type, max_norm, inv_scale,
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
                    BLOCK=config.block, FIN_BLOCK=triton_next_pow2(grid), num_warps=config.num_warps,
                    PER_CHUNK=chunk_out is not None)
        except BaseException:
            # Programs that ran took tickets the last one never returned: without this,
            # every later launch on this table would finalise early from stale partials.
            table.dev[:1].zero_()
            raise
        return stats

    def _pointwise(self, table: _Table, device, op: int, scale: Tensor | None, scale_at: int,
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

    # -- the chunk table and its cache ----------------------------------------------------

    def _config(self, device: torch.device) -> TritonConfig:
        state = self._state
        if state.config is None:
            state.config = (INTERPRETER_CONFIG if device.type == "cpu"
                            else _config_from_env(TritonConfig()))
        return state.config

    def _table(self, tensors: list[Tensor]) -> _Table | None:
        """The cached table of ``tensors``, built on a miss; None if one is not dense."""
        if not tensors:
            raise ValueError("the triton backend needs at least one tensor")
        if not all(map(_is_contiguous, tensors)):
            if not all(_is_dense(t) for t in tensors):
                return None
        device = tensors[0].device
        ptrs = tuple(map(_data_ptr, tensors))
        numels = tuple(map(_numel, tensors))
        dtypes = tuple(map(_dtype_of, tensors))
        key = (device, ptrs, numels, dtypes)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        state = self._state
        with state.lock:
            # Training calls with the same list every step: compare with the last key
            # before hashing this one.
            if key == state.last_key:
                table = state.last_table
                state.hits += 1
            else:
                table = state.tables.get(key)
                if table is None:
                    if capturing:
                        raise RuntimeError(
                            "gradclip triton backend: this gradient list is new during CUDA graph "
                            "capture, and its table cannot be uploaded inside a capture. Call the "
                            "clip once eagerly before capturing (torch.cuda.graphs' usual warm-up "
                            "on a side stream does this; torch.compile's cudagraphs do it too).")
                    state.misses += 1
                    table = state.tables[key] = self._build(device, ptrs, numels, dtypes)
                    while len(state.tables) > _MAX_CACHED_TABLES:
                        _, old = state.tables.popitem(last=False)
                        if old.held:
                            state.held.append(old)
                else:
                    state.hits += 1
                    state.tables.move_to_end(key)
                state.last_key, state.last_table = key, table
            if capturing:
                table.held = True
        return table

    def _build(self, device, ptrs, numels, dtypes) -> _Table:
        config = self._config(device)
        norm_target = self._grid_target(device, config.programs_per_sm)
        chunk = _pow2_floor(sum(numels) // max(norm_target * config.chunks_per_program, 1))
        chunk = max(min(chunk, config.max_chunk), config.block, config.scale_block)
        # One pass over the tensors; each tensor's chunks are written by C-level extends
        # (no torch ops: on a busy host their thread pool costs more than the work).
        bases, packed = array("q", [0]), array("q")
        for ptr, numel, dtype in zip(ptrs, numels, dtypes):
            if numel == 0:
                continue
            code = DTYPE_CODES[dtype]
            step = chunk * _ELEMENT_SIZES[code]
            count = -(-numel // chunk)
            bases.extend(range(ptr, ptr + count * step, step))
            packed.extend(repeat(chunk * 8 + code, count - 1))
            packed.append((numel - (count - 1) * chunk) * 8 + code)
        n_chunks = len(packed)
        bases.append(0)
        bases.extend(packed)
        bases.append(0)
        host = torch.frombuffer(bases, dtype=torch.int64)

        acc_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        norm_programs = max(1, min(norm_target, n_chunks))
        scale_programs = max(1, min(self._grid_target(device, config.scale_programs_per_sm),
                                    n_chunks))
        dev = torch.empty(host.numel() + 2 * norm_programs, dtype=torch.int64, device=device)
        # No host sync: the copy is queued on the stream; ``host`` (and ``bases``, which it
        # views) live as long as the table.
        dev[:host.numel()].copy_(host, non_blocking=True)
        partials = dev[host.numel():].view(acc_dtype)[:2 * norm_programs]
        present = {f"HAS_{name}": dtype in dtypes for name, dtype in _CODE_NAMES}
        return _Table(bases, host, dev, partials, n_chunks, present, acc_dtype, norm_programs,
                      scale_programs, numels, chunk)

    def _grid_target(self, device, per_sm: int) -> int:
        config = self._state.config
        if config.programs:
            return config.programs
        sms = self._state.sms.get(device)
        if sms is None:
            sms = self._state.sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return sms * per_sm

    def cache_info(self) -> dict:
        """Table cache counters (for tests and benchmarks): hits, misses, entries, held."""
        state = self._state
        return {"hits": state.hits, "misses": state.misses, "entries": len(state.tables),
                "held": sum(t.held for t in state.tables.values()) + len(state.held)}

    def clear_cache(self) -> None:
        """Forget the cached tables (those a CUDA graph uses stay alive)."""
        state = self._state
        with state.lock:
            state.held.extend(t for t in state.tables.values() if t.held)
            state.held.extend(t for t in state.agc_tables.values() if t.held)
            state.tables.clear()
            state.agc_tables.clear()
            state.last_key = state.last_table = None


def _launching():
    """The interpreter lock when kernels run in Triton's interpreter (not re-entrant)."""
    return _INTERPRETER_LOCK if _interpreting() else contextlib.nullcontext()


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


def triton_next_pow2(n: int) -> int:
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
    if _interpreting():
        return BackendStatus(True, f"triton {version} interpreter on CPU tensors "
                                   "(TRITON_INTERPRET=1), slow: for tests")
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {version} on {torch.cuda.get_device_name()}")
    return BackendStatus(False, f"triton {version} is installed but there is no CUDA GPU; "
                                "set TRITON_INTERPRET=1 before importing triton to run its "
                                "kernels on the CPU (slowly, for tests)")


_SHARED = _State(None)
_OPS_BACKEND = TritonBackend()


# -- torch.library registration: lets torch.compile(fullgraph=True) trace through a clip ----
# The fakes are gradclip.backends.fakes, shared with the CUDA ops.

@torch.library.custom_op("gradclip_triton::norm_stats", mutates_args=())
def _norm_stats_op(tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return _OPS_BACKEND.norm_stats(tensors, norm_type, max_norm, inv_scale)


@torch.library.custom_op("gradclip_triton::scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    _OPS_BACKEND.scale_(tensors, scale, found_inf)


@torch.library.custom_op("gradclip_triton::clip_grads_", mutates_args=("grads",))
def _clip_grads_op(grads: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return _OPS_BACKEND.clip_grads_(grads, norm_type, max_norm, inv_scale)


@torch.library.custom_op("gradclip_triton::clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    _OPS_BACKEND.clamp_(tensors, clip_value)


@torch.library.custom_op("gradclip_triton::norm_stats_per_tensor", mutates_args=())
def _norm_stats_per_tensor_op(tensors: list[Tensor], norm_type: float, max_norm: float,
                              inv_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    return _OPS_BACKEND.norm_stats_per_tensor(tensors, norm_type, max_norm, inv_scale)


@torch.library.custom_op("gradclip_triton::scale_per_tensor_", mutates_args=("tensors",))
def _scale_per_tensor_op(tensors: list[Tensor], coefs: Tensor) -> None:
    _OPS_BACKEND.scale_per_tensor_(tensors, coefs)


@torch.library.custom_op("gradclip_triton::clip_per_tensor_", mutates_args=("tensors",))
def _clip_per_tensor_op(tensors: list[Tensor], norm_type: float, max_norm: float) -> Tensor:
    return _OPS_BACKEND.clip_per_tensor_(tensors, norm_type, max_norm)


@torch.library.custom_op("gradclip_triton::agc_", mutates_args=("grads",))
def _agc_op(params: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
            norm_type: float) -> Tensor:
    return _OPS_BACKEND.agc_(params, grads, clip_factor, eps, norm_type)


fakes.register_fakes("gradclip_triton")
