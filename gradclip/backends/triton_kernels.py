"""The Triton kernels of the ``triton`` backend; launched from :mod:`gradclip.backends.triton`.

Both kernels walk the same chunk table, a device-resident int64 buffer built once per
gradient list (see ``triton.py``)::

    meta[0]                         counter: finished programs of the running norm launch
    meta[1 : 2 + n]                 base: byte address of each chunk's first element
    meta[2 + n : 3 + 2n]            packed: chunk length * 8 + dtype code

``n`` chunks plus one zero padding entry at the end of each array, so a program may
prefetch the entry after its last chunk. A chunk is at most ``CHUNK`` elements of one
tensor, starts at a multiple of ``CHUNK`` inside it and so is 16-byte aligned whenever
its tensor is; all 64-bit arithmetic is in the base address, offsets inside a chunk fit
in 32 bits. Program ``pid`` of ``G`` takes chunks ``pid, pid + G, ...``: a fixed
assignment, so every sum is done in the same order on every run.
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


@triton.jit(do_not_specialize=["n_chunks", "max_norm_bits", "p_bits"])
def norm_kernel(meta_ptr, n_chunks, partial_ptr, stats_ptr, scale_ptr, max_norm_bits, p_bits,
                ACC: tl.constexpr, NORM_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_F32: tl.constexpr, HAS_BF16: tl.constexpr, HAS_F16: tl.constexpr,
                HAS_F64: tl.constexpr, BLOCK: tl.constexpr, FIN_BLOCK: tl.constexpr):
    """stats = (norm, clip coefficient, found_inf) of every chunk, in one launch.

    Reads each gradient byte once and writes nothing per element. Each program writes its
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
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_BF16:
            if code == BF16:
                t, m = _chunk_norm(base, length, s, p, tl.bfloat16, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_F16:
            if code == F16:
                t, m = _chunk_norm(base, length, s, p, tl.float16, ACC, NORM_KIND, HAS_SCALE, BLOCK)
                total, big = _combine(total, big, t, m, NORM_KIND)
        if HAS_F64:
            if code == F64:
                t, m = _chunk_norm(base, length, s, p, tl.float64, ACC, NORM_KIND, HAS_SCALE, BLOCK)
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
            raw = tl.reduce(parts, 0, _max_nan)
            found = raw != raw
            found = found | (raw == float("inf"))
            norm = raw
            if HAS_SCALE:
                norm = raw * tl.abs(s)
        else:
            total = tl.sum(parts, 0)
            found = total != total
            found = found | (tl.max(bigs, 0) == float("inf"))
            if NORM_KIND == NORM_2:
                if ACC == tl.float32:
                    norm = tl.sqrt_rn(total)
                else:
                    norm = tl.sqrt(total)
            elif NORM_KIND == NORM_1:
                norm = total
            else:
                norm = tl.exp2(tl.log2(total) / p)
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
