"""Attention of a short step (T <= MAX_T queries) over a cache, on the CPU (numba), reading keys and values in place:
a contiguous cache, a strided view of one, or the blocks of a paged pool through their block table; and a cache's
whole step in one call (_step: RoPE of the queries and keys, the new keys and values written into their slots, the
last query kept, then attention), so that a layer's step costs one call, not a dozen torch operations around one.

Shapes: q [B, Hq, T, D] fp32; the G = Hq / Hkv query heads of kv head h are folded into R = G * T rows, so each key
and value is read once for all of them. Keys and values are rows of D floats of one 2-D array K, V [N, D]: slot s of
row b, kv head h is row base[b, s // block] + (s % block) * slot_stride + h * head_stride. Query t of row b sees the
slots s < limits[b, t] (a prefix: decode, verification and chain-drafting steps).

Work is split over (row, kv head, span of keys) (prange); each span keeps a running max m, sum l and output
acc [R, D] (online softmax, tiles of TILE keys), prefetching the key and value rows AHEAD slots on; spans are merged
by rescaling with exp(m_span - m). A tile is three loop nests: scores p [rows, keys] (dot products along D for a
few rows; for more, 8 keys at a time against a vector lane per row, so no sum is reduced across a vector), the
softmax along the keys, and acc += p v for 4 rows at a time with their sums in registers, so a verify step's
extra rows cost arithmetic, not more passes over acc. exp is a degree-7 polynomial after Cody-Waite range
reduction (relative error within 6 fp32 units of roundoff, 3.6e-7), so the loops vectorise. Only the summation
order and exp's last bits differ from torch's SDPA (tests/test_attention_kernel.py bounds both against float64).
Measured against SDPA: benchmarks/results/kernels-cpu.md (attention rows).
"""
import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

VERSION = 5  # bumped when the kernel's speed, or which steps take it, changes (step costs keyed by it go stale)
MAX_T = 8  # longer steps (prefill chunks, wide trees) stay on SDPA, whose GEMMs win there
# Shorter steps take the kernel at any number of keys: a cache's step is one call (_step: RoPE, cache writes and
# attention), where SDPA's path costs about ten torch operations a layer around it (benchmarks/results/
# kernels-cpu.md: step ms against step ms, SDPA, from 64 keys to 8K; `ar` decode at 2K and 8K). Batches gain the
# most: SDPA attends every row over the longest row's keys, the kernel each row over its own (kernels-cpu.md: `ar`
# at B = 4 and 8; batch-mixed-cpu-paged.md: rows of 512 to 8K keys), and a paged cache's blocks are read in place.
TILE, AHEAD, SPAN = 64, 16, 2048  # keys per softmax tile; prefetch distance (slots); most keys per work item
# (spans stream longer runs of keys and merge less; two work items per thread are kept where the keys allow)
DOT_ROWS = 8  # folded query rows up to which scores are dot products along D (decode steps: G rows); past it, a
# vector lane per row (verify steps). In side runs I did not commit, lanes were slower at 3 rows, faster at 21.
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


@intrinsic
def _stack(typingctx, shape):
    """A C-order fp32 array of the given compile-time shape (a UniTuple of tuples, e.g. (lanes, width) whose
    lengths are its sizes) on the stack, zeroed: a fixed-size scratch that LLVM keeps in registers."""
    dims = [len(t) for t in shape]
    count = math.prod(dims)

    def codegen(context, builder, signature, args):
        t = ir.ArrayType(ir.FloatType(), count)
        ptr = cgutils.alloca_once(builder, t)
        builder.store(ir.Constant(t, [0.0] * count), ptr)
        return builder.bitcast(ptr, ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(shape), codegen


# A tile's work is three loop nests, each its own function (compiled apart: LLVM kept their fixed-size scratch in
# registers only so); the scores come from one of two.
@njit(fastmath=True, cache=True)
def _scores_lanes(qt, K, V, rows, n, ahead, scale, p, lanes):
    """p[r, i] = q_r . k_i * scale for the n keys of rows and every row r < L (zero past R), qt [D, L] with a
    vector lane per row; prefetches K and V rows[i + AHEAD] for i + AHEAD < ahead. 8 keys at a time, each with
    one sum per lane (8 independent FMA chains); a last group of fewer keys repeats its last key."""
    D, L = qt.shape[0], len(lanes)
    for i0 in range(0, n, 8):
        for i in range(i0 + AHEAD, min(i0 + AHEAD + 8, ahead)):
            _prefetch(K, rows[i])
            _prefetch(V, rows[i])
        e = n - 1
        k0, k1, k2, k3 = rows[i0], rows[min(i0 + 1, e)], rows[min(i0 + 2, e)], rows[min(i0 + 3, e)]
        k4, k5, k6, k7 = rows[min(i0 + 4, e)], rows[min(i0 + 5, e)], rows[min(i0 + 6, e)], rows[min(i0 + 7, e)]
        s = carray(_stack(((0, 0, 0, 0, 0, 0, 0, 0), lanes)), (8, L))
        for d in range(D):
            x0, x1, x2, x3 = K[k0, d], K[k1, d], K[k2, d], K[k3, d]
            x4, x5, x6, x7 = K[k4, d], K[k5, d], K[k6, d], K[k7, d]
            for r in range(L):
                qv = qt[d, r]
                s[0, r] += x0 * qv
                s[1, r] += x1 * qv
                s[2, r] += x2 * qv
                s[3, r] += x3 * qv
                s[4, r] += x4 * qv
                s[5, r] += x5 * qv
                s[6, r] += x6 * qv
                s[7, r] += x7 * qv
        for j in range(min(8, n - i0)):
            for r in range(L):
                p[r, i0 + j] = s[j, r] * scale


@njit(fastmath=True, cache=True)
def _scores_dot(q, K, V, rows, n, ahead, scale, p, R):
    """As _scores_lanes for rows r < R only (p past R left as it is), q [L, D]: one dot product per row and key,
    vectorised along D."""
    D = q.shape[1]
    for i in range(n):
        if i + AHEAD < ahead:
            _prefetch(K, rows[i + AHEAD])
            _prefetch(V, rows[i + AHEAD])
        k = rows[i]
        for r in range(R):
            a = np.float32(0)
            for d in range(D):
                a += q[r, d] * K[k, d]
            p[r, i] = a * scale


@njit(fastmath=True, cache=True)
def _softmax(p, n, t0, lim, m, l, alpha, R):
    """Online softmax over a tile, row r < R at a time (vectorised along the keys): with the new max
    m' = max(m, p[r, i] for the keys i it sees), p[r] <- e^(p[r] - m') (0 for the keys it does not see),
    alpha = e^(m - m'), l <- l alpha + the sum of p[r]; m <- m'."""
    for r in range(R):
        vis = min(n, max(0, lim[r] - t0))
        top = m[r]
        for i in range(vis):
            top = max(top, p[r, i])
        s = np.float32(0)
        for i in range(vis):
            e = _exp(p[r, i] - top)
            p[r, i] = e
            s += e
        for i in range(vis, n):
            p[r, i] = 0
        alpha[r] = _exp(m[r] - top)
        l[r] = l[r] * alpha[r] + s
        m[r] = top


@njit(fastmath=True, cache=True)
def _pv(V, p, rows, n, r0, acc, alpha, width):
    """acc[r0 + j] <- acc[r0 + j] alpha[r0 + j] + sum_i p[r0 + j, i] V[rows[i]] for j < 4, i < n (the 4 rows' sums
    in registers; D = 4 len(width))."""
    D = len(width) * 4
    a = carray(_stack(((0, 0, 0, 0), width, (0, 0, 0, 0))), (4, D))
    for i in range(n):
        v = rows[i]
        e0, e1, e2, e3 = p[r0, i], p[r0 + 1, i], p[r0 + 2, i], p[r0 + 3, i]
        for d in range(D):
            x = V[v, d]
            a[0, d] += e0 * x
            a[1, d] += e1 * x
            a[2, d] += e2 * x
            a[3, d] += e3 * x
    for j in range(4):
        for d in range(D):
            acc[r0 + j, d] = acc[r0 + j, d] * alpha[r0 + j] + a[j, d]


@njit(fastmath=True, cache=True)
def _span(qt, K, V, base, so, sh, block, lim, b, h, lo, hi, scale, m, l, acc, width, lanes, R):
    """Keys lo .. hi - 1 of row b, kv head h, into the running max m [L], sum l [L] and output acc [L, D] of its R
    rows (online softmax, tiles of TILE keys; _attend's shapes): p [L, TILE] the tile's scores, then weights."""
    L = len(lanes)
    alpha, p = np.ones(L, np.float32), np.zeros((L, TILE), np.float32)  # rows past R stay 1 and 0
    rows = np.empty(TILE + AHEAD, np.int64)
    for t0 in range(lo, hi, TILE):
        n, ahead = min(TILE, hi - t0), min(TILE + AHEAD, hi - t0)
        blk, off = t0 // block, t0 % block  # rows[i]: the K, V row of key t0 + i, for the tile and AHEAD keys on
        for i in range(ahead):
            rows[i] = base[b, blk] + off * so + h * sh
            off += 1
            if off == block:
                blk, off = blk + 1, 0
        if R <= DOT_ROWS:
            _scores_dot(qt[b, h], K, V, rows, n, ahead, scale, p, R)
        else:
            _scores_lanes(qt[b, h], K, V, rows, n, ahead, scale, p, lanes)
        _softmax(p, n, t0, lim[b], m, l, alpha, R)
        for r0 in range(0, R, 4):  # rows past R (up to 3 of them) have weights 0
            _pv(V, p, rows, n, r0, acc, alpha, width)


@njit(cache=True)
def _fold(q, limits, Hkv, L):
    """q [B, Hq, T, D] -> qt, the R = G * T folded query rows of each kv head (row r = g * T + t: q[b, h * G + g,
    t]), zero past R: [B, Hkv, L, D] for R <= DOT_ROWS, else transposed, [B, Hkv, D, L]; and lim [B, L], the keys
    row r sees (limits[b, t]; none past R)."""
    B, Hq, T, D = q.shape
    G = Hq // Hkv
    dot = G * T <= DOT_ROWS
    qt = np.zeros((B, Hkv, L, D) if dot else (B, Hkv, D, L), np.float32)
    lim = np.zeros((B, L), np.int64)
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                for t in range(T):
                    r = g * T + t
                    lim[b, r] = limits[b, t]
                    for d in range(D):
                        if dot:
                            qt[b, h, r, d] = q[b, h * G + g, t, d]
                        else:
                            qt[b, h, d, r] = q[b, h * G + g, t, d]
    return qt, lim


@njit(inline="always")
def _attention(qt, lim, K, V, base, so, sh, block, threads, out, width, lanes):
    """out [B, Hkv, R, D] for the folded queries qt and their limits lim (_fold); _attend's arguments (threads:
    numba.get_num_threads(), passed in: called inside, it would keep numba from caching the kernel). Inlined
    into each parallel entry point (_attend, _step): its parallel loops must live there (linear.py's note on
    numba issue #8578)."""
    B, Hkv, R, D = out.shape
    L = len(lanes)
    scale = np.float32(1 / np.sqrt(D))
    top = np.zeros(B, np.int64)  # keys of row b: the most any of its queries sees
    for b in range(B):
        for r in range(R):
            top[b] = max(top[b], lim[b, r])
    spans = -(-2 * threads // (B * Hkv))  # at least two work items per thread where the keys allow
    span = min(SPAN, max(TILE, -(-top.max() // spans // TILE) * TILE))
    ns = (top.max() + span - 1) // span
    items = B * Hkv * ns
    pm, pl, pa = np.full((items, L), NONE, np.float32), np.zeros((items, L), np.float32), np.zeros((items, L, D),
                                                                                                  np.float32)
    for it in prange(items):
        b, h, c = it // (Hkv * ns), it // ns % Hkv, it % ns
        _span(qt, K, V, base, so, sh, block, lim, b, h, c * span, min(top[b], c * span + span), scale, pm[it],
              pl[it], pa[it], width, lanes, R)
    for bh in prange(B * Hkv):  # merge the spans of (b, h): weights e^(m_span - max)
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


@njit(parallel=True, fastmath=True, cache=True)
def _attend(q, K, V, base, so, sh, block, limits, threads, out, width, lanes):
    """out [B, Hkv, R, D] for the R = G * T folded queries of q [B, Hq, T, D] (_fold); limits [B, T]: query t sees
    the keys s < limits[b, t]. width and lanes: tuples of D / 4 and L items, so that D and L are compile-time
    constants in the tile functions (lengths of their types; a tuple of over 100 items cannot enter a parallel
    loop): L is R rounded up to whole vectors of 16 lanes."""
    qt, lim = _fold(q, limits, out.shape[1], len(lanes))
    _attention(qt, lim, K, V, base, so, sh, block, threads, out, width, lanes)


@njit(cache=True)
def _rotate(x, cos, sin, out):
    """out = x cos + (-x2, x1) sin per head (RoPE, half-split): x, out [B, H, T, D]; cos, sin [B, T, D]. The same
    three roundings per element as torch's form (no FMA contraction), so the same bits."""
    B, H, T, D = x.shape
    half = D // 2
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for d in range(half):
                    x1, x2 = x[b, h, t, d], x[b, h, t, d + half]
                    out[b, h, t, d] = x1 * cos[b, t, d] + -x2 * sin[b, t, d]
                    out[b, h, t, d + half] = x2 * cos[b, t, d + half] + x1 * sin[b, t, d + half]


@njit(cache=True)
def _write(q, k, v, K, V, base, so, sh, block, slots, last_q):
    """Slot slots[b, t] of row b, kv head h (the row of K, V that _attend reads for it) <- k, v [b, h, t];
    last_q [B, Hq, D] <- q [:, :, T - 1] (each row's last query)."""
    B, Hkv, T, D = k.shape
    for b in range(B):
        for t in range(T):
            s = slots[b, t]
            for h in range(Hkv):
                row = base[b, s // block] + (s % block) * so + h * sh
                for d in range(D):
                    K[row, d] = k[b, h, t, d]
                    V[row, d] = v[b, h, t, d]
        for h in range(q.shape[1]):
            for d in range(D):
                last_q[b, h, d] = q[b, h, T - 1, d]


@njit(parallel=True, fastmath=True, cache=True)
def _step(q, k, v, cos, sin, K, V, base, so, sh, block, slots, limits, threads, out, last_q, width, lanes):
    """A cache's whole attend() for a step, in one call: q [B, T, Hq, D], k, v [B, T, Hkv, D] before RoPE (C order, as
    the projections give them), cos, sin [B, T, D]; rotates q and k (_rotate: torch's bits), writes k, v into the
    slots [B, T] and the last query into last_q (_write), then attends as _attend (limits [B, T])."""
    q, k, v = q.transpose((0, 2, 1, 3)), k.transpose((0, 2, 1, 3)), v.transpose((0, 2, 1, 3))  # [B, H, T, D]
    qr, kr = np.empty(q.shape, np.float32), np.empty(k.shape, np.float32)
    _rotate(q, cos, sin, qr)
    _rotate(k, cos, sin, kr)
    _write(qr, kr, v, K, V, base, so, sh, block, slots, last_q)
    qt, lim = _fold(qr, limits, out.shape[1], len(lanes))
    _attention(qt, lim, K, V, base, so, sh, block, threads, out, width, lanes)


def _tiles(R: int, D: int) -> tuple:
    """width and lanes (_attend) for R folded query rows of D values."""
    return (0,) * (D // 4), (0,) * (-(-R // 16) * 16)


def _run(q, K, V, base, slot_stride, head_stride, block, Hkv, limits) -> torch.Tensor:
    B, Hq, T, D = q.shape
    out = np.empty((B, Hkv, Hq // Hkv * T, D), np.float32)
    _attend(_c(q), K.numpy(), V.numpy(), base, slot_stride, head_stride, block, _c(limits), numba.get_num_threads(),
            out, *_tiles(Hq // Hkv * T, D))
    return torch.from_numpy(out).view(q.shape)


def _c(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.numpy())  # one compiled layout per argument


class Step:
    """A cache's steps of one forward, one _step call per layer: what every layer shares, converted once (a cache's
    begin() makes it). cos, sin [B, T, D]; slots and limits [B, T] (the new tokens' slots, and the keys each query
    sees); K, V [layers, N, D]: each layer's keys and values as rows, slot s of row b, kv head h at row
    base[b, s // block] + (s % block) * slot_stride + h * head_stride; last_q [layers, B, Hq, D] for each row's last
    query (RetrievalCache.select), or None."""

    def __init__(self, cos, sin, slots, limits, K, V, base, slot_stride, head_stride, block, last_q=None):
        self.shared = (_c(cos), _c(sin), base, slot_stride, head_stride, block, _c(slots), _c(limits),
                       numba.get_num_threads())
        self.K, self.V = K.numpy(), V.numpy()
        self.last_q = None if last_q is None else last_q.numpy()
        self.B, self.T = slots.shape
        self.sizes = None  # shapes and tile tuples, from the first call's q

    @classmethod
    def view(cls, cos, sin, slots, limits, K, V, last_q=None) -> "Step":
        """Over a contiguous cache K, V [layers, B, Hkv, S, D]."""
        L, B, Hkv, S, D = K.shape
        base = (np.arange(B, dtype=np.int64) * (Hkv * S))[:, None]
        return cls(cos, sin, slots, limits, K.view(L, -1, D), V.view(L, -1, D), base, 1, S, S, last_q)

    @classmethod
    def blocks(cls, cos, sin, slots, limits, K, V, table, last_q=None) -> "Step":
        """Over a paged pool K, V [layers, n_blocks, bs, Hkv, D] (contiguous) through table [B, blocks] (row b's slot
        s: block table[b, s // bs], offset s % bs), the new tokens' blocks already held."""
        L, n_blocks, bs, Hkv, D = K.shape
        return cls(cos, sin, slots, limits, K.view(L, -1, D), V.view(L, -1, D), table.numpy() * (bs * Hkv), Hkv, 1,
                   bs, last_q)

    def __call__(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """q [B * T, Hq * D], k, v [B * T, Hkv * D] before RoPE (C order; or as [B, T, H, D]) -> [B, Hq, T, D]: RoPE,
        the writes of k, v and of the last query, and attention, in one call."""
        B, T, D = self.B, self.T, self.K.shape[2]
        if self.sizes is None:
            Hq, Hkv = q.size // (B * T * D), k.size // (B * T * D)
            R = Hq // Hkv * T
            self.sizes = ((B, Hkv, R, D), (B, T, Hq, D), (B, T, Hkv, D), (B, Hq, T, D), *_tiles(R, D))
        out_shape, q_shape, kv_shape, shape, width, lanes = self.sizes
        out = np.empty(out_shape, np.float32)  # [B, Hkv, G * T, D]: [B, Hq, T, D]
        last = np.empty(shape[:2] + (D,), np.float32) if self.last_q is None else self.last_q[layer]
        cos, sin, base, so, sh, block, slots, limits, threads = self.shared
        _step(q.reshape(q_shape), k.reshape(kv_shape), v.reshape(kv_shape), cos, sin, self.K[layer], self.V[layer],
              base, so, sh, block, slots, limits, threads, out, last, width, lanes)
        return out.reshape(shape)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The caches' attend() protocol: q [B, Hq, T, D], k, v [B, Hkv, T, D] (before RoPE) -> [B, Hq, T, D]."""
        return torch.from_numpy(self(layer, *(_c(t.transpose(1, 2)) for t in (q, k, v))))


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


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """attention.rotate for fp32 CPU tensors, in one call (a step's q and k: torch's form is 8 operations each);
    cos and sin broadcast over x's first axis as in torch (StreamingCache.fill_from rotates every layer at once)."""
    B, H, T, D = x.shape
    out = np.empty(x.shape, np.float32)
    _rotate(x.numpy(), cos.expand(B, T, D).numpy(), sin.expand(B, T, D).numpy(), out)
    return torch.from_numpy(out)
