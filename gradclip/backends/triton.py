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
    stats_dtype,
)
from .reference import ReferenceBackend

# The kernels' HAS_<NAME> flags per dtype, and element sizes by dtype code.
_CODE_NAMES = (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16),
               ("F64", torch.float64))
_ELEMENT_SIZES = tuple(dtype.itemsize for dtype, _ in sorted(DTYPE_CODES.items(), key=lambda kv: kv[1]))
# norm kinds and pointwise ops as in triton_kernels (NORM_2.., SCALE, CLAMP)
_NORM_2, _NORM_1, _NORM_INF, _NORM_P = 0, 1, 2, 3
_SCALE, _CLAMP = 0, 1
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
    held: bool = False           # used in a graph capture: never freed


@dataclass
class _State:
    """Tables cached per backend configuration (the ops of torch.library share one)."""

    config: TritonConfig | None
    tables: OrderedDict = field(default_factory=OrderedDict)
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

    # -- launches -----------------------------------------------------------------------

    def _norm(self, table: _Table, device, norm_type, max_norm, inv_scale) -> Tensor:
        kernels = _load_kernels()
        import triton.language as tl

        norm_type = float(norm_type)
        if norm_type == 2.0:
            kind = _NORM_2
        elif norm_type == 1.0:
            kind = _NORM_1
        elif math.isinf(norm_type):
            kind = _NORM_INF
        else:
            kind = _NORM_P
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
                    _float_bits(float(max_norm)), _float_bits(norm_type) if kind == _NORM_P else 0,
                    ACC=tl.float64 if table.acc_dtype == torch.float64 else tl.float32,
                    NORM_KIND=kind, HAS_SCALE=inv_scale is not None, **table.present,
                    BLOCK=config.block, FIN_BLOCK=triton_next_pow2(grid), num_warps=config.num_warps)
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
                      scale_programs)

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
            state.tables.clear()
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

@torch.library.custom_op("gradclip_triton::norm_stats", mutates_args=())
def _norm_stats_op(tensors: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return _OPS_BACKEND.norm_stats(tensors, norm_type, max_norm, inv_scale)


@_norm_stats_op.register_fake
def _norm_stats_fake(tensors, norm_type, max_norm, inv_scale):
    return tensors[0].new_empty(3, dtype=stats_dtype(tensors))


@torch.library.custom_op("gradclip_triton::scale_", mutates_args=("tensors",))
def _scale_op(tensors: list[Tensor], scale: Tensor, found_inf: Tensor | None) -> None:
    _OPS_BACKEND.scale_(tensors, scale, found_inf)


@_scale_op.register_fake
def _scale_fake(tensors, scale, found_inf):
    return None


@torch.library.custom_op("gradclip_triton::clip_grads_", mutates_args=("grads",))
def _clip_grads_op(grads: list[Tensor], norm_type: float, max_norm: float,
                   inv_scale: Tensor | None) -> Tensor:
    return _OPS_BACKEND.clip_grads_(grads, norm_type, max_norm, inv_scale)


@_clip_grads_op.register_fake
def _clip_grads_fake(grads, norm_type, max_norm, inv_scale):
    return grads[0].new_empty(3, dtype=stats_dtype(grads))


@torch.library.custom_op("gradclip_triton::clamp_", mutates_args=("tensors",))
def _clamp_op(tensors: list[Tensor], clip_value: float) -> None:
    _OPS_BACKEND.clamp_(tensors, clip_value)


@_clamp_op.register_fake
def _clamp_fake(tensors, clip_value):
    return None
