"""Small-M linear maps on the CPU (numba): out [M, N] = x [M, K] @ W[N, K]ᵀ for M = rows x tokens of a step,
each weight read from memory once for all M rows.

The weights are interleaved over LANES = 16 output rows (blocks.py), so the kernel's vectors run across output
rows: threads split the lane groups (prange); a group takes the x rows in one chunk of R = 1, 2, 4, 6 or 8 rows
(3, 5 and 7 rows are padded with copies of the last; past 8, chunks of 8) and keeps R x 2 vectors of LANES sums
(elements j and j + 16 of each block apart) in a scratch on the stack, which LLVM keeps in registers. Each weight
is dequantized once per chunk (once in a 7-token verify) and each x value broadcast once per group. Each block's
codes, scales and mins are prefetched AHEAD blocks before they are summed (without it the kernel streamed its
weights far below the memory's bandwidth).

The weight getter `weights` gives elements j and j + 16 of block b of the group's LANES rows in fp32: plain reads
for fp32, the exact dequantization for blocks; which one is fixed at compile time by the array types (an overload,
inlined in numba's IR: a cached callee is not inlined by LLVM, and a call per element stops vectorisation), so
every format gets its own machine code and numba's cache keeps it. The kernel is compiled with FMA contraction
only, never reassociation: every output is summed in the same order (blocks in turn, j = 0..15 in each, the two
halves added last) whatever M, its chunk or its neighbours, so a row's logits do not depend on the batch or the
step length; only that order differs from torch's.
"""
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .blocks import LANES, QK, Blocks, interleave

MAX_ROWS = 32  # past this many rows (prefill chunks) torch's GEMM over fp32 weights wins, dequantization included
CONTRACT = {"contract"}
AHEAD = 16  # blocks prefetched ahead of the one being summed


@intrinsic
def _prefetch(typingctx, arr, g, b):
    """Ask for the cache lines of arr[g, b] (a C-order array of 3 or more dims: one block of one lane group) ahead
    of their use. An address past the array (the last blocks' lookahead) is only a hint: it never faults. arr None
    (a format without `low`): nothing."""
    def codegen(context, builder, signature, args):
        if signature.args[0] is types.none:
            return context.get_dummy_value()
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p, i32, i64 = ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        size = builder.extract_value(ary.strides, 1)  # bytes of arr[g, b]
        offset = builder.add(builder.mul(args[1], builder.extract_value(ary.strides, 0)), builder.mul(args[2], size))
        start = builder.gep(builder.bitcast(ary.data, i8p), [offset])
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), size, ir.Constant(i64, 64)) as (k, _):
            builder.call(fn, [builder.gep(start, [k]), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(arr, g, b), codegen


@intrinsic
def _stack_zeros(typingctx, chunk):
    """A pointer to len(chunk) * 2 * LANES fp32 zeros on the stack (a fixed size, so LLVM promotes it to
    registers)."""
    count = chunk.count * 2 * LANES

    def codegen(context, builder, signature, args):
        t = ir.ArrayType(ir.FloatType(), count)
        ptr = cgutils.alloca_once(builder, t)
        builder.store(ir.Constant(t, [0.0] * count), ptr)
        return builder.bitcast(ptr, ir.FloatType().as_pointer())
    return types.CPointer(types.float32)(chunk), codegen


@njit(inline="always")
def _nibbles(c):  # byte -> (low, high) nibble as exact fp32 integers
    f = np.float32(c)
    hi = np.floor(f * np.float32(0.0625))
    return f - np.float32(16) * hi, hi


def w_f32(codes, scale, low, g, b, j, l):  # codes: fp32 weights interleaved [G, nb, 32, LANES]
    return codes[g, b, j, l], codes[g, b, j + 16, l]


def w_q8_0(codes, scale, low, g, b, j, l):
    return np.float32(codes[g, b, j, l]) * scale[g, b, l], np.float32(codes[g, b, j + 16, l]) * scale[g, b, l]


def w_q4_0(codes, scale, low, g, b, j, l):
    lo, hi = _nibbles(codes[g, b, j, l])
    return scale[g, b, l] * (lo - np.float32(8)), scale[g, b, l] * (hi - np.float32(8))


def w_q4_1(codes, scale, low, g, b, j, l):
    lo, hi = _nibbles(codes[g, b, j, l])
    return scale[g, b, l] * lo + low[g, b, l], scale[g, b, l] * hi + low[g, b, l]


def weights(codes, scale, low, g, b, j, l):
    """(w[n, 32 b + j], w[n, 32 b + j + 16]) in fp32 for row n = g * LANES + l, in the format the types name."""


@overload(weights, inline="always")
def _weights(codes, scale, low, g, b, j, l):
    if codes.dtype == types.float32:
        return w_f32
    if codes.dtype == types.int8:
        return w_q8_0
    return w_q4_0 if low is types.none else w_q4_1


@njit(cache=True, fastmath=CONTRACT)
def _chunk(codes, scale, low, g, x, r, out, chunk):
    """out[r:r+R, group g's LANES columns] = x[r:r+R] @ W[group g]ᵀ, R = len(chunk) (a compile-time size);
    rows of x past its last are copies of the last."""
    R = len(chunk)
    last = x.shape[0] - 1
    acc = carray(_stack_zeros(chunk), (R, 2, LANES))  # [R, half, lane]
    for b in range(codes.shape[1]):
        _prefetch(codes, g, b + AHEAD)
        _prefetch(scale, g, b + AHEAD)
        _prefetch(low, g, b + AHEAD)
        for j in range(16):
            k = b * QK + j
            for l in range(LANES):
                w0, w1 = weights(codes, scale, low, g, b, j, l)
                for m in range(R):
                    i = min(r + m, last)
                    acc[m, 0, l] += w0 * x[i, k]
                    acc[m, 1, l] += w1 * x[i, k + 16]
    for m in range(R):
        for l in range(LANES):
            out[r + m, g * LANES + l] = acc[m, 0, l] + acc[m, 1, l]


# A chunk's rows, as the length of a tuple (compile-time). Globals, and g cast to int64: _group is inlined into loops
# where numba types a literal tuple and the loop index differently (prange: uint64 or int64), and each typing
# compiled (and cached) _chunk once more, three times as many compiles for the same machine code.
ROWS_1, ROWS_2, ROWS_4, ROWS_6, ROWS_8 = ((0,) * n for n in (1, 2, 4, 6, 8))


@njit(inline="always")
def _group(codes, scale, low, g, x, out):
    """Lane group g of out [M, G * LANES] for x [m, K], M = chunk_rows(m): one chunk of M rows, or (M > 8) chunks of
    8, the last of which may overlap the one before it (rows computed twice, to the same values)."""
    M, g = out.shape[0], np.int64(g)
    if M == 1:
        _chunk(codes, scale, low, g, x, 0, out, ROWS_1)
    elif M == 2:
        _chunk(codes, scale, low, g, x, 0, out, ROWS_2)
    elif M == 4:
        _chunk(codes, scale, low, g, x, 0, out, ROWS_4)
    elif M == 6:
        _chunk(codes, scale, low, g, x, 0, out, ROWS_6)
    else:
        r = 0
        while r < M:
            r = min(r, M - 8)
            _chunk(codes, scale, low, g, x, r, out, ROWS_8)
            r += 8


@njit(inline="always")
def _linear(codes, scale, low, x, out):
    """out [M, G * LANES] for x [m, K], M = chunk_rows(m), threads splitting the lane groups."""
    for g in prange(codes.shape[0]):
        _group(codes, scale, low, g, x, out)


def lone_row(codes):
    """Rows a single x row runs as, by the weights' format (codes' dtype)."""


@overload(lone_row, inline="always")
def _lone_row(codes):  # LLVM unrolls fp32 and Q8_0 1-row chunks into scalar code, and vectorises the 4-bit ones
    rows = 1 if codes.dtype == types.uint8 else 2
    return lambda codes: rows


@njit(cache=True)
def chunk_rows(m, codes):
    """Rows the kernel computes for m rows of x: a chunk size it is compiled for (1, 2, 4, 6, 8) or, past 8, m
    itself; rows past m repeat x's last row."""
    if m == 1:
        return lone_row(codes)
    return m if m > 8 else m + m % 2


@njit(inline="always")
def _out(codes, x):
    """A product's output [chunk_rows(m), G * LANES] for x [m, K]: rows past m and columns past N are padding."""
    return np.empty((chunk_rows(x.shape[0], codes), codes.shape[0] * LANES), np.float32)


@njit(parallel=True, cache=True, inline="always")
def _product(codes, scale, low, x):
    """x [m, K] (C order) @ Wᵀ, as _out."""
    out = _out(codes, x)
    _linear(codes, scale, low, x, out)
    return out


@njit(inline="always")
def _products2(a, b, x):
    """_product of maps a and b (codes, scale, low, ...) on one x, in one parallel loop over both maps' lane
    groups (one thread launch, and the threads share the work of both)."""
    oa, ob = _out(a[0], x), _out(b[0], x)
    Ga = a[0].shape[0]
    for g in prange(Ga + b[0].shape[0]):
        if g < Ga:
            _group(a[0], a[1], a[2], g, x, oa)
        else:
            _group(b[0], b[1], b[2], g - Ga, x, ob)
    return oa, ob


@njit(inline="always")
def _products3(a, b, c, x):
    """_products2 for three maps."""
    oa, ob, oc = _out(a[0], x), _out(b[0], x), _out(c[0], x)
    Ga, Gb = a[0].shape[0], b[0].shape[0]
    for g in prange(Ga + Gb + c[0].shape[0]):
        if g < Ga:
            _group(a[0], a[1], a[2], g, x, oa)
        elif g < Ga + Gb:
            _group(b[0], b[1], b[2], g - Ga, x, ob)
        else:
            _group(c[0], c[1], c[2], g - Ga - Gb, x, oc)
    return oa, ob, oc


def pack(w) -> tuple:
    """The kernel's arrays (codes, scale, low) for fp32 [N, K] (K a multiple of 32: an interleaved copy) or Blocks
    (their own tensors); None where a format has none."""
    if isinstance(w, Blocks):
        arrays = (w.codes, w.scale, w.low)
    else:
        arrays = (interleave(w.detach().float().reshape(w.shape[0], -1, QK)), None, None)
    return tuple(None if a is None else a.numpy() for a in arrays)


def linear(x: torch.Tensor, w, packed: tuple | None = None) -> torch.Tensor:
    """x [..., K] fp32 CPU @ wᵀ -> [..., N] fp32. w: fp32 [N, K] (K a multiple of 32) or Blocks; packed: pack(w),
    when the caller keeps it. More than MAX_ROWS rows go to torch (Blocks dequantized for the call). Decode steps
    make hundreds of these calls, so the wrapper stays in numpy (a few microseconds)."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = w.shape[0]
    xn = np.ascontiguousarray(x.detach().float().numpy().reshape(-1, K))
    M = xn.shape[0]
    if M > MAX_ROWS:
        return F.linear(x.float(), w.dequantize() if isinstance(w, Blocks) else w)
    return torch.from_numpy(_product(*(packed or pack(w)), xn)[:M, :N].reshape(*lead, N))


# A Llama-family block's work around attention, in two calls (attention_in, attention_out) of the kernel above:
# the per-call overhead of ~20 small torch operations and 7 wrapper calls a layer cost more than its Q4_1 weights'
# bytes. A map is (codes, scale, low, bias, n): pack(w), its bias [n] or None, and its n output rows.
# Every parallel loop is inlined into the entry point that runs it (_product, attention_in, attention_out): a
# cached serial function calling a parallel one is numba issue #8578 (open), and once jumped to a null address here.
# They live in this file because numba's cache of a caller holds its callees' code and is invalidated only by a
# change to the caller's own file. Elementwise sums stay in serial functions (_add): in a parallel function numba
# would make each one a parallel loop of its own, which costs more than it sums here.

@njit(cache=True)
def _add(a, b):
    """a [m, n] + b ([m, n] or [n])."""
    return a + b


def add_bias(out, bias):
    """out [m, n] + bias [n]; out itself for None."""


@overload(add_bias, inline="always")
def _add_bias(out, bias):
    if bias is types.none:
        return lambda out, bias: out
    return lambda out, bias: _add(out, bias)


@njit(inline="always")
def _rows(w, out, m):
    """A product's m rows and n columns [m, n], plus the map's bias."""
    return add_bias(out[:m, : w[4]], w[3])


@njit(inline="always")
def _map(w, x):
    """x [m, K] (C order) -> x Wᵀ + bias [m, n]."""
    return _rows(w, _product(w[0], w[1], w[2], x), x.shape[0])


@njit(cache=True, fastmath=CONTRACT)
def _rms_norm(x, w, eps):
    """x [m, K] -> w * (x / sqrt(mean(x²) + eps)) per row in fp32 (transformers' LlamaRMSNorm; summed in order)."""
    m, K = x.shape
    out = np.empty((m, K), np.float32)
    for i in range(m):
        s = np.float32(0)
        for k in range(K):
            s += x[i, k] * x[i, k]
        r = np.float32(1) / np.sqrt(s / np.float32(K) + eps)
        for k in range(K):
            out[i, k] = w[k] * (x[i, k] * r)
    return out


@njit(cache=True)
def _swiglu(g, u):
    """silu(g) u for g, u [m, n] -> [m, n] (C order)."""
    out = np.empty(g.shape, np.float32)
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            out[i, j] = g[i, j] / (np.float32(1) + np.exp(-g[i, j])) * u[i, j]
    return out


@njit(parallel=True, cache=True)
def attention_in(x, norm, eps, q, k, v):
    """A block's attention inputs: x [m, D] (C order) -> q, k, v [m, n] = maps q, k, v of rms_norm(x)."""
    h = _rms_norm(x, norm, eps)
    m = x.shape[0]
    oq, ok, ov = _products3(q, k, v, h)
    return _rows(q, oq, m), _rows(k, ok, m), _rows(v, ov, m)


@njit(parallel=True, cache=True)
def attention_out(x, a, o, norm, eps, gate, up, down):
    """The rest of the block: x [m, D] (C order, the block's input), a [m, Hq * hd] (C order, attention's output)
    -> y + down(silu(gate h) * up h) [m, D] with y = x + o(a), h = rms_norm(y)."""
    y = _add(x, _map(o, a))
    h = _rms_norm(y, norm, eps)
    og, ou = _products2(gate, up, h)
    m = x.shape[0]
    return _add(y, _map(down, _swiglu(_rows(gate, og, m), _rows(up, ou, m))))
