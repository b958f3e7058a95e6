"""The Triton backend's chunk tables, built on the host once per gradient list, and their cache.

A table (layout in :mod:`gradclip.backends.triton_kernels`) is built in one pass over the
tensors, copied to the device once and cached: a later call with the same list (same
data pointers, sizes, dtypes) reuses it and costs only the key, four attribute reads per
tensor. The table depends on nothing else, so a hit is always valid, whichever tensors now
live at those addresses (device pointers are unique across devices, so the key needs no
device per tensor). Whatever a table says about its tensors' memory (which entries are the
same tensor) is known from the key too, and cached with it.

CUDA graphs: a table first needed during capture cannot be uploaded inside the capture and
raises; tables a graph uses are never evicted.
"""

from __future__ import annotations

import math
import operator
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import repeat

import torch
from torch import Tensor

from .base import DTYPE_CODES, Aliasing, aliasing, distinct_entries
from .triton_config import TritonConfig, default_config

# The kernels' HAS_<NAME> flags per dtype, and element sizes by dtype code.
CODE_NAMES = (("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16),
              ("F64", torch.float64))
ELEMENT_SIZES = tuple(dtype.itemsize for dtype, _ in sorted(DTYPE_CODES.items(), key=lambda kv: kv[1]))
MAX_CACHED_TABLES = 8

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_is_contiguous = Tensor.is_contiguous
_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")


def pow2_floor(n: int) -> int:
    return 1 << max(n, 1).bit_length() - 1


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def is_dense(t: Tensor) -> bool:
    """No gaps, no overlaps: the elements fill ``numel`` consecutive slots from data_ptr."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _present(*dtype_sets) -> dict:
    return {f"HAS_{name}": any(dtype in dtypes for dtypes in dtype_sets) for name, dtype in CODE_NAMES}


@dataclass
class Table:
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
    shared: Aliasing | None = None  # entries that are the same tensor, or overlap
    held: bool = False           # used in a graph capture: never freed
    segments: Tensor | None = None  # int64 device: owner (n_chunks + 1), starts (tensors + 1)
    segments_source: array | None = None


@dataclass
class AgcTable:
    """AGC's table: each chunk a piece of one unit (a row, or a tensor of ndim <= 1) of a
    distinct gradient (a gradient listed twice is clipped once)."""

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


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_tensors(tensors: list[Tensor], device: torch.device, what: str) -> None:
    """Dtypes and devices of a list a table is built for (once per table: a hit has the
    same dtypes, and device pointers are unique across devices)."""
    for i, t in enumerate(tensors):
        if t.dtype not in DTYPE_CODES:
            raise TypeError(f"triton backend: {what}[{i}] has dtype {t.dtype}; supported are "
                            "float16, bfloat16, float32 and float64")
        if t.device != device:
            raise ValueError(f"triton backend: {what}[{i}] is on {t.device} but {what}[0] is on "
                             f"{device}; pass the tensors of one device per call")


@dataclass
class TableCache:
    """Tables cached per backend configuration (the ops of torch.library share one)."""

    config_override: TritonConfig | None
    tables: OrderedDict = field(default_factory=OrderedDict)
    agc_tables: OrderedDict = field(default_factory=OrderedDict)
    held: list = field(default_factory=list)
    sms: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_key: tuple | None = None
    last_table: Table | None = None
    hits: int = 0
    misses: int = 0
    resolved: TritonConfig | None = None

    def config(self, device: torch.device) -> TritonConfig:
        if self.resolved is None:
            self.resolved = self.config_override or default_config(device.type)
        return self.resolved

    def grid_target(self, device: torch.device, per_sm: int) -> int:
        config = self.config(device)
        if config.programs:
            return config.programs
        sms = self.sms.get(device)
        if sms is None:
            sms = self.sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
        return sms * per_sm

    # -- the chunk table of a list ---------------------------------------------------------

    def table(self, tensors: list[Tensor]) -> Table | None:
        """The cached table of ``tensors``, built on a miss; None if one is not dense."""
        if not tensors:
            raise ValueError("the triton backend needs at least one tensor")
        if not all(map(_is_contiguous, tensors)):
            if not all(is_dense(t) for t in tensors):
                return None
        device = tensors[0].device
        ptrs = tuple(map(_data_ptr, tensors))
        numels = tuple(map(_numel, tensors))
        dtypes = tuple(map(_dtype_of, tensors))
        key = (device, ptrs, numels, dtypes)
        capturing = _capturing(device)
        with self.lock:
            # Training calls with the same list every step: compare with the last key
            # before hashing this one.
            if key == self.last_key:
                table = self.last_table
                self.hits += 1
            else:
                table = self.tables.get(key)
                if table is None:
                    if capturing:
                        raise RuntimeError(
                            "gradclip triton backend: this gradient list is new during CUDA graph "
                            "capture, and its table cannot be uploaded inside a capture. Call the "
                            "clip once eagerly before capturing (torch.cuda.graphs' usual warm-up "
                            "on a side stream does this; torch.compile's cudagraphs do it too).")
                    _check_tensors(tensors, device, "tensors")
                    self.misses += 1
                    table = self.tables[key] = self._build(device, ptrs, numels, dtypes, tensors)
                    self._evict(self.tables)
                else:
                    self.hits += 1
                    self.tables.move_to_end(key)
                self.last_key, self.last_table = key, table
            if capturing:
                table.held = True
        return table

    def _evict(self, tables: OrderedDict) -> None:
        while len(tables) > MAX_CACHED_TABLES:
            _, old = tables.popitem(last=False)
            if old.held:
                self.held.append(old)

    def _build(self, device, ptrs, numels, dtypes, tensors) -> Table:
        config = self.config(device)
        norm_target = self.grid_target(device, config.programs_per_sm)
        chunk = pow2_floor(sum(numels) // max(norm_target * config.chunks_per_program, 1))
        chunk = max(min(chunk, config.max_chunk), config.block, config.scale_block)
        # One pass over the tensors; each tensor's chunks are written by C-level extends
        # (no torch ops: on a busy host their thread pool costs more than the work).
        bases, packed = array("q", [0]), array("q")
        for ptr, numel, dtype in zip(ptrs, numels, dtypes):
            if numel == 0:
                continue
            code = DTYPE_CODES[dtype]
            step = chunk * ELEMENT_SIZES[code]
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
        scale_programs = max(1, min(self.grid_target(device, config.scale_programs_per_sm), n_chunks))
        dev = torch.empty(host.numel() + 2 * norm_programs, dtype=torch.int64, device=device)
        # No host sync: the copy is queued on the stream; ``host`` (and ``bases``, which it
        # views) live as long as the table.
        dev[:host.numel()].copy_(host, non_blocking=True)
        partials = dev[host.numel():].view(acc_dtype)[:2 * norm_programs]
        return Table(bases, host, dev, partials, n_chunks, _present(dtypes), acc_dtype, norm_programs,
                     scale_programs, numels, chunk, aliasing(tensors))

    def segments(self, table: Table, device: torch.device) -> Tensor:
        """The table's owner and starts vectors, built on first use (device-resident).
        ``owner[k]`` is chunk k's tensor, or -1 for the chunks of a later entry of a tensor
        listed twice: the per-tensor rescale writes each tensor once."""
        if table.segments is None:
            if _capturing(device):
                raise RuntimeError(
                    "gradclip triton backend: the per-tensor index of this gradient list is new "
                    "during CUDA graph capture and cannot be uploaded inside a capture. Call the "
                    "per-tensor op once eagerly before capturing.")
            first = table.shared.first if table.shared is not None else range(len(table.numels))
            owner, starts = array("q"), array("q", [0])
            for index, numel in enumerate(table.numels):
                count = -(-numel // table.chunk)
                owner.extend(repeat(index if first[index] == index else -1, count))
                starts.append(starts[-1] + count)
            owner.append(0)  # padding, as the table's
            owner.extend(starts)
            host = torch.frombuffer(owner, dtype=torch.int64)
            segments = torch.empty(host.numel(), dtype=torch.int64, device=device)
            segments.copy_(host, non_blocking=True)
            table.segments_source, table.segments = owner, segments
        return table.segments

    # -- AGC's table ------------------------------------------------------------------------

    def agc_table(self, params: list[Tensor], grads: list[Tensor]) -> AgcTable | None:
        """The cached AGC table of (params, grads); None if a tensor is not contiguous."""
        if not grads:
            raise ValueError("the triton backend needs at least one tensor")
        if not (all(map(_is_contiguous, grads)) and all(map(_is_contiguous, params))):
            return None  # rows of a non-contiguous tensor are not consecutive memory
        device = grads[0].device
        key = (device, tuple(map(_data_ptr, grads)), tuple(map(_data_ptr, params)),
               tuple(map(tuple, map(_shape_of, grads))), tuple(map(_dtype_of, grads)),
               tuple(map(_dtype_of, params)))
        capturing = _capturing(device)
        with self.lock:
            table = self.agc_tables.get(key)
            if table is None:
                if capturing:
                    raise RuntimeError(
                        "gradclip triton backend: this parameter list is new during CUDA graph "
                        "capture; call adaptive_clip_grad_ once eagerly before capturing.")
                _check_tensors(grads, device, "grads")
                _check_tensors(params, device, "params")
                kept = distinct_entries(grads, "grads")
                table = self.agc_tables[key] = self._build_agc(device, key, kept)
                self._evict(self.agc_tables)
            else:
                self.agc_tables.move_to_end(key)
            if capturing:
                table.held = True
        return table

    def _build_agc(self, device, key, kept: list[int] | None) -> AgcTable:
        _, gptrs, wptrs, shapes, gdtypes, wdtypes = key
        entries = list(zip(gptrs, wptrs, shapes, gdtypes, wdtypes))
        if kept is not None:  # a gradient listed twice is clipped once, by its first entry
            entries = [entries[i] for i in kept]
        config = self.config(device)
        chunk = config.max_chunk
        gbases, wbases, packed, owner, starts = (array("q") for _ in range(5))
        starts.append(0)
        unit = longest = 0
        for gptr, wptr, shape, gdtype, wdtype in entries:
            numel = math.prod(shape)
            rows = shape[0] if len(shape) > 1 else 1
            if rows == 0:
                continue
            width = numel // rows
            gcode, wcode = DTYPE_CODES[gdtype], DTYPE_CODES[wdtype]
            gsize, wsize = ELEMENT_SIZES[gcode], ELEMENT_SIZES[wcode]
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
        acc_dtype = torch.float64 if torch.float64 in gdtypes else torch.float32
        block = max(16, min(config.block, next_pow2(max(longest, 1))))
        programs = max(1, min(self.grid_target(device, config.programs_per_sm), n_chunks))
        return AgcTable(source, dev, n_chunks, unit, _present(gdtypes, wdtypes), acc_dtype, block,
                        programs)

    # -- bookkeeping ------------------------------------------------------------------------

    def info(self) -> dict:
        """hits, misses, entries, held (tables a CUDA graph uses)."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.tables),
                "held": sum(t.held for t in self.tables.values()) + len(self.held)}

    def clear(self) -> None:
        """Forget the cached tables (those a CUDA graph uses stay alive)."""
        with self.lock:
            self.held.extend(t for t in self.tables.values() if t.held)
            self.held.extend(t for t in self.agc_tables.values() if t.held)
            self.tables.clear()
            self.agc_tables.clear()
            self.last_key = self.last_table = None
