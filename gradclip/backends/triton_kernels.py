"""The Triton kernels of the ``triton`` backend; launched from :mod:`gradclip.backends.triton`.

Both kernels walk the same chunk table, a device-resident int64 buffer built once per
gradient list (see ``triton_tables.py``)::

    meta[0]                         counter: finished programs of the running norm launch
    meta[1 : 2 + n]                 base: byte address of each chunk's first element
    meta[2 + n : 3 + 2n]            packed: chunk length * 8 + dtype code

``n`` chunks plus one zero padding entry at the end of each array, so a program may
prefetch the entry after its last chunk. A chunk is at most ``CHUNK`` elements of one
tensor, starts at a multiple of ``CHUNK`` inside it and so is 16-byte aligned whenever
its tensor is; all 64-bit arithmetic is in the base address, offsets inside a chunk fit
in 32 bits. Program ``pid`` of ``G`` takes chunks ``pid, pid + G, ...``: a fixed
assignment, so every sum is done in the same order on every run.

Per-tensor and unit-wise norms (``tensor_norms``, per-tensor clipping, AGC) reuse that
walk: the norm pass also writes each chunk's partial to a vector (``PER_CHUNK``), and
``segment_kernel`` reduces the partials of each unit (a tensor, or an AGC row) in chunk
order, from a ``starts`` vector (the unit's first chunk; ``starts[u + 1]`` ends it), and
writes each unit's norm and clip factor. ``unit_scale_kernel`` then rescales the chunks
whose unit's factor is not 1, through an ``owner`` vector (each chunk's unit, or -1 for a
chunk no program writes).
"""

from __future__ import annotations

import triton
import triton.language as tl

# dtype codes in the chunk table (the low 3 bits of ``packed``; ``base.DTYPE_CODES``)
F32, BF16, F16, F64 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# norm kinds (``_NORM_*`` in triton.py): each its own inner loop
NORM_2, NORM_1, NORM_INF, NORM_P = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
# what ``pointwise_kernel`` does to each element (``_SCALE``, ``_CLAMP`` in triton.py)
SCALE, CLAMP = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _accumulate(x, acc, amax, s, p, ACC: tl.constexpr, NORM_KIND: tl.constexpr,
                HAS_SCALE: tl.constexpr):
    a = tl.abs(x.to(ACC))
    if NORM_KIND == NORM_INF:
        # The max norm is scaled once at the end; only the max of |x| is kept, with NaN.
        amax = _max_nan(amax, a)
    else:
        # amax only tells inf apart from a finite sum that overflowed; NaN shows in acc.
        amax = tl.maximum(amax, a)
        if HAS_SCALE:
            a = a * s
        if NORM_KIND == NORM_2:
            acc += a * a
        elif NORM_KIND == NORM_1:
            acc += a
        else:
            acc += tl.exp2(p * tl.log2(a))
    return acc, amax


@triton.jit
def _chunk_norm(base, length, s, p, ELEM: tl.constexpr, ACC: tl.constexpr,
                NORM_KIND: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """(partial, max |x|) of one chunk: full blocks unmasked, then one masked tail."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    amax = tl.zeros([BLOCK], ACC)
    n_full = (length // BLOCK).to(tl.int32)
    ptr = base.to(tl.pointer_type(ELEM))
    if (base % 16) == 0:
        # 16-byte vector loads need the alignment proven; a view at an odd offset
        # takes the other branch. The hint marks the op that makes the pointer, so
        # this branch makes its own.
        aligned = tl.multiple_of(base.to(tl.pointer_type(ELEM)), 16)
        for b in range(n_full):
            x = tl.load(aligned + b * BLOCK + offs)
            acc, amax = _accumulate(x, acc, amax, s, p, ACC, NORM_KIND, HAS_SCALE)
    else:
        for b in range(n_full):
            x = tl.load(ptr + b * BLOCK + offs)
            acc, amax = _accumulate(x, acc, amax, s, p, ACC, NORM_KIND, HAS_SCALE)
    if n_full * BLOCK < length:
        tail = n_full * BLOCK + offs
        x = tl.load(ptr + tail, mask=tail < length, other=0.0)
        acc, amax = _accumulate(x, acc, amax, s, p, ACC, NORM_KIND, HAS_SCALE)
    if NORM_KIND == NORM_INF:
        top = tl.reduce(amax, 0, _max_nan)
        return top, top
    return tl.sum(acc, 0), tl.max(amax, 0)


@triton.jit
def _combine(total, big, t, m, NORM_KIND: tl.constexpr):
    if NORM_KIND == NORM_INF:
        total = _max_nan(total, t)
    else:
        total += t
        big = tl.maximum(big, m)
    return total, big


@triton.jit
def _keep(t, c, chunk_ptr, PER_CHUNK: tl.constexpr):
    if PER_CHUNK:
        tl.store(chunk_ptr + c, t)


@triton.jit(do_not_specialize=["n_chunks", "max_norm_bits", "p_bits"])
def norm_kernel(meta_ptr, n_chunks, partial_ptr, stats_ptr, scale_ptr, max_norm_bits, p_bits,
                chunk_ptr, ACC: tl.constexpr, NORM_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
                HAS_F64: tl.constexpr, BLOCK: tl.constexpr, FIN_BLOCK: tl.constexpr,
                PER_CHUNK: tl.constexpr = False):
    """stats = (norm, clip coefficient, found_inf) of every chunk, in one launch.

    Reads each gradient byte once and writes nothing per element (with ``PER_CHUNK``, one
    partial per chunk to ``chunk_ptr``, for the per-tensor norms). Each program writes its
    partial (sum of |x|^p, or max |x|) and its max |x| to ``partial_ptr``, then takes a
    ticket from the counter; the program holding the last ticket reduces the partials in
    program order, writes ``stats`` and resets the counter for the next launch. Integer
    atomics only: the result is bitwise identical from run to run.
    """
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    zero = tl.zeros((), ACC)
    s = zero + 1.0
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(ACC)
    p = p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    bases = meta_ptr + 1
    packs = meta_ptr + 2 + n_chunks
    total = zero
    big = zero
    next_base = tl.load(bases + pid)
    next_pack = tl.load(packs + pid)
    for c in range(pid, n_chunks, G):
        base = next_base
        packed = next_pack
        # Prefetch the next chunk's entry (the padding entry after the last) so its
        # latency hides behind this chunk.
        nxt = tl.minimum(c + G, n_chunks)
        next_base = tl.load(bases + nxt)
        next_pack = tl.load(packs + nxt)
        length = packed >> 3
        code = packed & 7
        if HAS_F32:
            if code == F32:
                t, m = _chunk_norm(base, length, s, p, tl.float32, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                _keep(t, c, chunk_ptr, PER_CHUNK)
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_BF16:
            if code == BF16:
                t, m = _chunk_norm(base, length, s, p, tl.bfloat16, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                _keep(t, c, chunk_ptr, PER_CHUNK)
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_F16:
            if code == F16:
                t, m = _chunk_norm(base, length, s, p, tl.float16, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                _keep(t, c, chunk_ptr, PER_CHUNK)
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_F64:
            if code == F64:
                t, m = _chunk_norm(base, length, s, p, tl.float64, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                _keep(t, c, chunk_ptr, PER_CHUNK)
                total, big = _combine(total, big, t, m, NORM_KIND)
    tl.store(partial_ptr + pid, total)
    tl.store(partial_ptr + G + pid, big)
    tl.debug_barrier()
    ticket = tl.atomic_add(meta_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == G - 1:
        idx = tl.arange(0, FIN_BLOCK)
        live = idx < G
        parts = tl.load(partial_ptr + idx, mask=live, other=0.0, cache_modifier=".cg")
        bigs = tl.load(partial_ptr + G + idx, mask=live, other=0.0, cache_modifier=".cg")
        if NORM_KIND == NORM_INF:
            total = tl.reduce(parts, 0, _max_nan)
            found = total != total
            found = found | (total == float("inf"))
        else:
            total = tl.sum(parts, 0)
            found = total != total
            found = found | (tl.max(bigs, 0) == float("inf"))
        norm = _finish_norm(total, s, p, ACC, NORM_KIND, HAS_SCALE)
        # torch: clamp(reciprocal(norm + 1e-6) * max_norm, max=1); NaN survives the clamp.
        eps = tl.full((), 1e-6, ACC)
        one = zero + 1.0
        if ACC == tl.float32:
            inv = tl.div_rn(one, norm + eps)
        else:
            inv = one / (norm + eps)
        coef = inv * max_norm_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        coef = tl.where(coef > 1.0, one, coef)
        if HAS_SCALE:
            coef = coef * s
        tl.store(stats_ptr, norm)
        tl.store(stats_ptr + 1, coef)
        tl.store(stats_ptr + 2, tl.where(found, one, zero))
        tl.store(meta_ptr, 0)


@triton.jit
def _round(y, ELEM: tl.constexpr, EXACT_BF16: tl.constexpr):
    """``y`` rounded to ``ELEM`` to nearest even (the GPU's conversion does it natively;
    the interpreter truncates to bfloat16, so there it is done on the bits)."""
    if EXACT_BF16 and ELEM == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(y != y, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y.to(ELEM)


@triton.jit
def _apply(x, c, OP: tl.constexpr):
    """``x * c`` (SCALE) or ``x`` clamped to ``[-c, c]`` (CLAMP, NaN kept, as torch.clamp)."""
    y = x.to(c.dtype)
    if OP == CLAMP:
        return tl.where(y != y, y, tl.minimum(tl.maximum(y, -c), c))
    return y * c


@triton.jit
def _chunk_apply(base, length, c, OP: tl.constexpr, ELEM: tl.constexpr, BLOCK: tl.constexpr,
                 EXACT_BF16: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    n_full = (length // BLOCK).to(tl.int32)
    ptr = base.to(tl.pointer_type(ELEM))
    if (base % 16) == 0:
        aligned = tl.multiple_of(base.to(tl.pointer_type(ELEM)), 16)
        for b in range(n_full):
            at = aligned + b * BLOCK + offs
            tl.store(at, _round(_apply(tl.load(at), c, OP), ELEM, EXACT_BF16))
    else:
        for b in range(n_full):
            at = ptr + b * BLOCK + offs
            tl.store(at, _round(_apply(tl.load(at), c, OP), ELEM, EXACT_BF16))
    if n_full * BLOCK < length:
        tail = n_full * BLOCK + offs
        live = tail < length
        x = tl.load(ptr + tail, mask=live, other=0.0)
        tl.store(ptr + tail, _round(_apply(x, c, OP), ELEM, EXACT_BF16), mask=live)


@triton.jit(do_not_specialize=["n_chunks", "clamp_bits"])
def pointwise_kernel(meta_ptr, n_chunks, scale_ptr, found_ptr, clamp_bits, SCALE_AT: tl.constexpr,
                     FOUND_AT: tl.constexpr, HAS_FOUND: tl.constexpr, OP: tl.constexpr,
                     HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
                     HAS_F64: tl.constexpr, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    """One in-place pass over every chunk, in float32 (float64 for float64).

    SCALE: multiply by ``scale_ptr[SCALE_AT]``. When the factor is exactly 1, or
    ``found_ptr[FOUND_AT]`` is set, every program returns after two scalar loads and the
    gradients are not touched. CLAMP: clamp to ``[-v, v]``, ``v`` the float64 whose bits
    are ``clamp_bits``; reads and writes each byte once (torch's foreach clamp: twice).
    """
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    if OP == CLAMP:
        c = clamp_bits.to(tl.int64).to(tl.float64, bitcast=True)
        run = c == c
    else:
        c = tl.load(scale_ptr + SCALE_AT)
        run = c != 1.0
        if HAS_FOUND:
            run = run & (tl.load(found_ptr + FOUND_AT) == 0)
    if run:
        c32 = c.to(tl.float32)
        c64 = c.to(tl.float64)
        bases = meta_ptr + 1
        packs = meta_ptr + 2 + n_chunks
        next_base = tl.load(bases + pid)
        next_pack = tl.load(packs + pid)
        for k in range(pid, n_chunks, G):
            base = next_base
            packed = next_pack
            nxt = tl.minimum(k + G, n_chunks)
            next_base = tl.load(bases + nxt)
            next_pack = tl.load(packs + nxt)
            length = packed >> 3
            code = packed & 7
            if HAS_F32:
                if code == F32:
                    _chunk_apply(base, length, c32, OP, tl.float32, BLOCK, EXACT_BF16)
            if HAS_BF16:
                if code == BF16:
                    _chunk_apply(base, length, c32, OP, tl.bfloat16, BLOCK, EXACT_BF16)
            if HAS_F16:
                if code == F16:
                    _chunk_apply(base, length, c32, OP, tl.float16, BLOCK, EXACT_BF16)
            if HAS_F64:
                if code == F64:
                    _chunk_apply(base, length, c64, OP, tl.float64, BLOCK, EXACT_BF16)


# -- per-tensor and unit-wise norms ------------------------------------------------------

# what ``segment_kernel`` writes per unit (``_SEGMENT_*`` in triton.py)
NORMS, CLIP, AGC = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _finish_norm(total, s, p, ACC: tl.constexpr, NORM_KIND: tl.constexpr, HAS_SCALE: tl.constexpr):
    """A norm from its power sum (or max |x|), as ``norm_kernel`` finalises the total."""
    if NORM_KIND == NORM_INF:
        norm = total
        if HAS_SCALE:
            norm = total * tl.abs(s)
    elif NORM_KIND == NORM_2:
        if ACC == tl.float32:
            norm = tl.sqrt_rn(total)
        else:
            norm = tl.sqrt(total)
    elif NORM_KIND == NORM_1:
        norm = total
    else:
        norm = tl.exp2(tl.log2(total) / p)
    return norm


@triton.jit
def _divide(a, b, ACC: tl.constexpr):
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _at_least(x, floor):
    """max(x, floor) that keeps NaN, as ``torch.clamp(min=)``."""
    return tl.where(x != x, x, tl.maximum(x, floor))


@triton.jit
def _sum_units(part_ptr, start, count, longest, ACC: tl.constexpr, NORM_KIND: tl.constexpr,
               BLOCK_U: tl.constexpr):
    """Per unit, the partials of its chunks combined in chunk order (deterministic)."""
    total = tl.zeros([BLOCK_U], ACC)
    for j in range(longest):
        v = tl.load(part_ptr + start + j, mask=j < count, other=0.0)
        if NORM_KIND == NORM_INF:
            total = _max_nan(total, v)
        else:
            total += v
    return total


@triton.jit(do_not_specialize=["n_units", "max_norm_bits", "p_bits", "factor_bits", "eps_bits"])
def segment_kernel(starts_ptr, n_units, part_ptr, wpart_ptr, norms_ptr, coef_ptr, scale_ptr,
                   max_norm_bits, p_bits, factor_bits, eps_bits, ACC: tl.constexpr,
                   NORM_KIND: tl.constexpr, HAS_SCALE: tl.constexpr, MODE: tl.constexpr,
                   BLOCK_U: tl.constexpr):
    """Each unit's norm from its chunks' partials (a few bytes per chunk, no tensor data).

    NORMS: writes ``norms[u]``. CLIP: also torch's factor ``min(1, max_norm / (norm +
    1e-6))`` to ``coef[u]``. AGC: ``part_ptr`` holds the gradients' partials and
    ``wpart_ptr`` the weights'; writes the gradient norm and timm's factor: 1 below
    ``max(weight_norm, eps) * factor``, else that limit over ``max(grad_norm, 1e-6)``.
    """
    pid = tl.program_id(0)
    units = pid.to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    live = units < n_units
    start = tl.load(starts_ptr + units, mask=live, other=0)
    count = tl.load(starts_ptr + units + 1, mask=live, other=0) - start
    longest = tl.max(count, 0)
    zero = tl.zeros([BLOCK_U], ACC)
    one = zero + 1.0
    s = tl.zeros((), ACC) + 1.0
    if HAS_SCALE:
        s = tl.load(scale_ptr).to(ACC)
    p = p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    total = _sum_units(part_ptr, start, count, longest, ACC, NORM_KIND, BLOCK_U)
    norm = _finish_norm(total, s, p, ACC, NORM_KIND, HAS_SCALE)
    tl.store(norms_ptr + units, norm, mask=live)
    if MODE == CLIP:
        max_norm = max_norm_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        coef = _divide(one, norm + 1e-6, ACC) * max_norm
        coef = tl.where(coef > 1.0, one, coef)  # NaN stays NaN, as torch.clamp
        tl.store(coef_ptr + units, coef, mask=live)
    if MODE == AGC:
        wtotal = _sum_units(wpart_ptr, start, count, longest, ACC, NORM_KIND, BLOCK_U)
        wnorm = _finish_norm(wtotal, s, p, ACC, NORM_KIND, False)
        factor = factor_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        eps = eps_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
        limit = _at_least(wnorm, eps) * factor
        coef = _divide(limit, _at_least(norm, zero + 1e-6), ACC)
        coef = tl.where(norm < limit, one, coef)
        tl.store(coef_ptr + units, coef, mask=live)


@triton.jit
def _partial_of(base, length, code, p, ACC: tl.constexpr, NORM_KIND: tl.constexpr,
                HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
                HAS_F64: tl.constexpr, BLOCK: tl.constexpr):
    """The partial (sum of |x|^p, or max |x|) of one chunk of any dtype."""
    one = tl.zeros((), ACC) + 1.0
    t = tl.zeros((), ACC)
    if HAS_F32:
        if code == F32:
            t, _ = _chunk_norm(base, length, one, p, tl.float32, ACC, NORM_KIND, False, BLOCK)
    if HAS_BF16:
        if code == BF16:
            t, _ = _chunk_norm(base, length, one, p, tl.bfloat16, ACC, NORM_KIND, False, BLOCK)
    if HAS_F16:
        if code == F16:
            t, _ = _chunk_norm(base, length, one, p, tl.float16, ACC, NORM_KIND, False, BLOCK)
    if HAS_F64:
        if code == F64:
            t, _ = _chunk_norm(base, length, one, p, tl.float64, ACC, NORM_KIND, False, BLOCK)
    return t


@triton.jit(do_not_specialize=["n_chunks", "p_bits"])
def agc_norm_kernel(gbases_ptr, wbases_ptr, packs_ptr, n_chunks, gpart_ptr, wpart_ptr, p_bits,
                    ACC: tl.constexpr, NORM_KIND: tl.constexpr, HAS_F32: tl.constexpr,
                    HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr, HAS_F64: tl.constexpr,
                    BLOCK: tl.constexpr):
    """AGC's norm pass: reads each gradient and each weight byte once, writes two partials
    per chunk (a chunk is a piece of one unit; ``packed`` = length * 64 + weight dtype
    code * 8 + gradient dtype code), for all tensors of all dtypes in one launch."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    p = p_bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)
    for k in range(pid, n_chunks, G):
        packed = tl.load(packs_ptr + k)
        length = packed >> 6
        g = _partial_of(tl.load(gbases_ptr + k), length, packed & 7, p, ACC, NORM_KIND,
                        HAS_F32, HAS_BF16, HAS_F16, HAS_F64, BLOCK)
        w = _partial_of(tl.load(wbases_ptr + k), length, (packed >> 3) & 7, p, ACC, NORM_KIND,
                        HAS_F32, HAS_BF16, HAS_F16, HAS_F64, BLOCK)
        tl.store(gpart_ptr + k, g)
        tl.store(wpart_ptr + k, w)


@triton.jit(do_not_specialize=["n_chunks"])
def unit_scale_kernel(bases_ptr, packs_ptr, owner_ptr, n_chunks, coef_ptr, LEN_SHIFT: tl.constexpr,
                      HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
                      HAS_F64: tl.constexpr, BLOCK: tl.constexpr, EXACT_BF16: tl.constexpr):
    """Multiplies each chunk in place by its unit's factor ``coef[owner[k]]``; a chunk whose
    factor is exactly 1 is neither read nor written (two scalar loads), nor is one whose
    owner is -1 (a later entry of a tensor listed twice: each tensor is written once, so
    no two programs write one element)."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    for k in range(pid, n_chunks, G):
        unit = tl.load(owner_ptr + k)
        c = tl.load(coef_ptr + tl.maximum(unit, 0))
        if (unit >= 0) & (c != 1.0):
            base = tl.load(bases_ptr + k)
            packed = tl.load(packs_ptr + k)
            length = packed >> LEN_SHIFT
            code = packed & 7
            if HAS_F32:
                if code == F32:
                    _chunk_apply(base, length, c.to(tl.float32), SCALE, tl.float32, BLOCK, EXACT_BF16)
            if HAS_BF16:
                if code == BF16:
                    _chunk_apply(base, length, c.to(tl.float32), SCALE, tl.bfloat16, BLOCK, EXACT_BF16)
            if HAS_F16:
                if code == F16:
                    _chunk_apply(base, length, c.to(tl.float32), SCALE, tl.float16, BLOCK, EXACT_BF16)
            if HAS_F64:
                if code == F64:
                    _chunk_apply(base, length, c.to(tl.float64), SCALE, tl.float64, BLOCK, EXACT_BF16)
