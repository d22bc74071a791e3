"""Attention of a short step (T <= MAX_T queries) over a cache, on the CPU (numba), reading keys and values in place:
a contiguous cache, a strided view of one, or the blocks of a paged pool through their block table.

Shapes: q [B, Hq, T, D] fp32; the G = Hq / Hkv query heads of kv head h are folded into R = G * T rows, so each key
and value is read once for all of them. Keys and values are rows of D floats of one 2-D array K, V [N, D]: slot s of
row b, kv head h is row base[b, s // block] + (s % block) * slot_stride + h * head_stride. Query t of row b sees the
slots s < limits[b, t] (a prefix: decode, verification and chain-drafting steps).

Work is split over (row, kv head, span of keys) (prange); each span keeps a running max m, sum l and output
acc [R, D] (online softmax, tiles of TILE keys), prefetching the key and value rows AHEAD slots on; spans are merged
by rescaling with exp(m_span - m). exp is a degree-7 polynomial after Cody-Waite range reduction (relative error
within 6 fp32 units of roundoff, 3.6e-7), so the loop vectorises. Only the summation order and exp's
last bits differ from torch's SDPA (tests/test_attention_kernel.py bounds both against float64).
Measured against SDPA: benchmarks/results/kernels-cpu.md (attention rows).
"""
import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

MAX_T = 8  # longer steps (prefill chunks, wide trees) stay on SDPA, whose GEMMs win there
# One row of a contiguous cache with fewer keys stays on SDPA too: its lower call overhead wins while the keys fit
# in the CPU's caches, and the kernel wins once they stream from memory (benchmarks/results/kernels-cpu.md:
# attention at 64, 2K, 4K and 8K keys; `ar` decode at 2K and 8K). Batches always take the kernel: SDPA attends every
# row over the longest row's keys, the kernel each row over its own (kernels-cpu.md: `ar` at B = 4 and 8, 1K keys;
# batch-mixed-cpu-paged.md: rows of 512 to 8K keys), as a paged cache always does (SDPA would need its blocks
# gathered first).
MIN_KEYS = 4096
TILE, AHEAD, SPAN = 64, 16, 512  # keys per softmax tile; prefetch distance (slots); most keys per work item
NONE = np.float32(-3e38)  # running max before any key (finite, so the kernel may assume no infinities)
LN2_HI, LN2_LO, LOG2E = np.float32(0.693359375), np.float32(-2.12194440e-4), np.float32(1.4426950408889634)


@intrinsic
def _f32_bits(typingctx, i):
    """The float32 whose bits are the int32 i."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _prefetch(typingctx, arr, row):
    """Ask for the cache lines of arr[row] (arr: 2-D fp32, C order) ahead of their use."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        row_bytes = builder.mul(args[1], builder.extract_value(ary.strides, 0))
        start = builder.gep(builder.bitcast(ary.data, i8p), [row_bytes])
        size = builder.mul(builder.extract_value(ary.shape, 1), ir.Constant(i64, 4))
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), size, ir.Constant(i64, 64)) as (k, _):
            builder.call(fn, [builder.gep(start, [k]), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, row), codegen


@njit(inline="always", fastmath=True)
def _exp(x):
    """e^x for x <= 0 (x < -87 gives e^-87): 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by Taylor to r^7."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * LOG2E + np.float32(0.5))
    r = x - n * LN2_HI - n * LN2_LO
    p = np.float32(1 / 5040) * r + np.float32(1 / 720)
    p = p * r + np.float32(1 / 120)
    p = p * r + np.float32(1 / 24)
    p = p * r + np.float32(1 / 6)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1)
    p = p * r + np.float32(1)
    return p * _f32_bits((np.int32(n) + np.int32(127)) << 23)


@njit(inline="always")
def _row(base, b, s, block, so, sh, h):
    return base[b, s // block] + (s % block) * so + h * sh


@njit(parallel=True, fastmath=True, cache=True)
def _attend(q, K, V, base, so, sh, block, limits, threads, scale, out, width):
    """out [B, Hkv, R, D] for q [B, Hkv, R, D] (row r = g * T + t). width: a tuple of D items, so that D is a
    compile-time constant (len of its type) and the D-loops vectorise fully."""
    D = len(width)
    B, Hkv, R, _ = q.shape
    T = limits.shape[1]
    top = np.zeros(B, np.int64)  # keys of row b: the most any of its queries sees
    for b in range(B):
        for t in range(T):
            top[b] = max(top[b], limits[b, t])
    spans = -(-2 * threads // (B * Hkv))  # at least two work items per thread where the keys allow
    span = min(SPAN, max(TILE, -(-top.max() // spans // TILE) * TILE))
    ns = (top.max() + span - 1) // span
    items = B * Hkv * ns
    pm, pl = np.empty((items, R), np.float32), np.empty((items, R), np.float32)
    pa = np.empty((items, R, D), np.float32)
    for it in prange(items):
        b, h, c = it // (Hkv * ns), it // ns % Hkv, it % ns
        lo, hi = c * span, min(top[b], c * span + span)
        m, l = np.full(R, NONE, np.float32), np.zeros(R, np.float32)
        acc, p = np.zeros((R, D), np.float32), np.zeros((R, TILE), np.float32)
        for t0 in range(lo, hi, TILE):
            n = min(TILE, hi - t0)
            for i in range(n):  # scores p[r, i] = q_r . k_i / sqrt(D)
                k = _row(base, b, t0 + i, block, so, sh, h)
                if t0 + i + AHEAD < hi:
                    ahead = _row(base, b, t0 + i + AHEAD, block, so, sh, h)
                    _prefetch(K, ahead)
                    _prefetch(V, ahead)
                for r in range(R):
                    a = np.float32(0)
                    for d in range(D):
                        a += q[b, h, r, d] * K[k, d]
                    p[r, i] = a * scale
            for r in range(R):  # online softmax: p <- e^(p - m), acc and l rescaled to the new max
                vis = min(n, max(0, limits[b, r % T] - t0))
                top_r = NONE
                for i in range(vis):
                    top_r = max(top_r, p[r, i])
                new = max(m[r], top_r)
                alpha, s = _exp(m[r] - new), np.float32(0)
                for i in range(vis):
                    e = _exp(p[r, i] - new)
                    p[r, i] = e
                    s += e
                for i in range(vis, n):
                    p[r, i] = 0
                l[r], m[r] = l[r] * alpha + s, new
                for d in range(D):
                    acc[r, d] *= alpha
            for i in range(n):  # acc += p v
                v = _row(base, b, t0 + i, block, so, sh, h)
                for r in range(R):
                    e = p[r, i]
                    for d in range(D):
                        acc[r, d] += e * V[v, d]
        if ns == 1:
            for r in range(R):
                for d in range(D):
                    out[b, h, r, d] = acc[r, d] / l[r]
        else:
            pm[it], pl[it], pa[it] = m, l, acc
    if ns > 1:  # merge the spans of (b, h): weights e^(m_span - max)
        for bh in prange(B * Hkv):
            b, h = bh // Hkv, bh % Hkv
            for r in range(R):
                top_r = NONE
                for c in range(ns):
                    top_r = max(top_r, pm[bh * ns + c, r])
                total = np.float32(0)
                for d in range(D):
                    out[b, h, r, d] = 0
                for c in range(ns):
                    w = _exp(pm[bh * ns + c, r] - top_r)
                    total += w * pl[bh * ns + c, r]
                    for d in range(D):
                        out[b, h, r, d] += w * pa[bh * ns + c, r, d]
                for d in range(D):
                    out[b, h, r, d] /= total


def _run(q, K, V, base, slot_stride, head_stride, block, Hkv, limits) -> torch.Tensor:
    B, Hq, T, D = q.shape
    out = np.empty((B, Hkv, Hq // Hkv * T, D), np.float32)
    _attend(q.reshape(B, Hkv, -1, D).contiguous().numpy(), K.numpy(), V.numpy(), base, slot_stride, head_stride,
            block, limits.numpy(), numba.get_num_threads(), np.float32(1 / math.sqrt(D)), out, (0,) * D)
    return torch.from_numpy(out).view(B, Hq, T, D)


def attend_view(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limits: torch.Tensor) -> torch.Tensor | None:
    """Attention over k, v [B, Hkv, S, D], views whose slots are rows of D contiguous floats (a FullCache layer or
    a prefix of one), read in place: [B, Hq, T, D]; None when their strides do not allow it."""
    B, Hkv, S, D = k.shape
    if k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != D or k.stride(1) % D or k.stride(0) % D:
        return None
    sb, sh = k.stride(0) // D, k.stride(1) // D
    n = (B - 1) * sb + (Hkv - 1) * sh + S  # rows from the view's first slot to its last
    base = (np.arange(B, dtype=np.int64) * sb)[:, None]  # row b's slot 0 (a batch stride of 0 too)
    return _run(q, k.as_strided((n, D), (D, 1)), v.as_strided((n, D), (D, 1)), base, 1, sh, S, Hkv, limits)


def attend_blocks(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, table: torch.Tensor,
                  limits: torch.Tensor) -> torch.Tensor:
    """Attention over a paged pool's layer K, V [n_blocks, bs, Hkv, D] (contiguous) through table [B, blocks]
    (row b's slot s: block table[b, s // bs], offset s % bs), read in place: [B, Hq, T, D]."""
    n_blocks, bs, Hkv, D = K.shape
    return _run(q, K.view(-1, D), V.view(-1, D), table.numpy() * (bs * Hkv), Hkv, 1, bs, Hkv, limits)
