"""Small-M linear maps on the CPU (numba): out [M, N] = x [M, K] @ W[N, K]ᵀ for M = rows x tokens of a step,
each weight read from memory once for all M rows.

Threads split the output rows (prange over tiles of 4). A tile takes 4 input rows at a time (then single rows)
and keeps its 4 x 4 sums in registers, so each weight fetched serves 4 rows, and each input value 4 weight rows.
The weight getter `weights` gives elements j and j + 16 of block b of row n in fp32: plain reads for fp32, the
exact dequantization for blocks (blocks.py); which one is fixed at compile time by the array types (an overload),
so every format gets its own machine code and numba's cache keeps it. The getters are compiled without fastmath
(and d * q is exact, blocks.py), so their values are gguf's; the sums are compiled with reassociation and FMA,
so the summation order is all that differs from torch.
"""
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

from .blocks import QK, Blocks

SUMS = {"reassoc", "contract", "nsz"}
MAX_ROWS = 32  # past this many rows (prefill chunks) torch's GEMM over fp32 weights wins, dequantization included


def w_f32(codes, scale, low, n, b, j):  # codes: fp32 weights viewed [N, nb, 32]
    return codes[n, b, j], codes[n, b, j + 16]


def w_q8_0(codes, scale, low, n, b, j):
    return np.float32(codes[n, b, j]) * scale[n, b], np.float32(codes[n, b, j + 16]) * scale[n, b]


@njit(cache=True)
def _nibbles(c):  # byte -> (low, high) nibble as exact fp32 integers
    f = np.float32(c)
    hi = np.floor(f * np.float32(0.0625))
    return f - np.float32(16) * hi, hi


def w_q4_0(codes, scale, low, n, b, j):
    lo, hi = _nibbles(codes[n, b, j])
    return scale[n, b] * (lo - np.float32(8)), scale[n, b] * (hi - np.float32(8))


def w_q4_1(codes, scale, low, n, b, j):
    lo, hi = _nibbles(codes[n, b, j])
    return scale[n, b] * lo + low[n, b], scale[n, b] * hi + low[n, b]


def weights(codes, scale, low, n, b, j):
    """(w[n, 32 b + j], w[n, 32 b + j + 16]) in fp32, for the format the argument types name."""


@overload(weights, jit_options={"cache": True})
def _weights(codes, scale, low, n, b, j):
    if codes.dtype == types.float32:
        return w_f32
    if codes.dtype == types.int8:
        return w_q8_0
    return w_q4_0 if low is types.none else w_q4_1


@njit(cache=True, fastmath=SUMS)
def _tile4(codes, scale, low, n, x, r, out):
    """out[r:r+4, n:n+4] = x[r:r+4] @ W[n:n+4]ᵀ (out and x padded to whole tiles)."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0)
    for b in range(codes.shape[1]):
        for j in range(16):
            k = b * QK + j
            x0, y0, x1, y1 = x[r, k], x[r, k + 16], x[r + 1, k], x[r + 1, k + 16]
            x2, y2, x3, y3 = x[r + 2, k], x[r + 2, k + 16], x[r + 3, k], x[r + 3, k + 16]
            lo, hi = weights(codes, scale, low, n, b, j)
            a00 += lo * x0 + hi * y0; a10 += lo * x1 + hi * y1; a20 += lo * x2 + hi * y2; a30 += lo * x3 + hi * y3
            lo, hi = weights(codes, scale, low, n + 1, b, j)
            a01 += lo * x0 + hi * y0; a11 += lo * x1 + hi * y1; a21 += lo * x2 + hi * y2; a31 += lo * x3 + hi * y3
            lo, hi = weights(codes, scale, low, n + 2, b, j)
            a02 += lo * x0 + hi * y0; a12 += lo * x1 + hi * y1; a22 += lo * x2 + hi * y2; a32 += lo * x3 + hi * y3
            lo, hi = weights(codes, scale, low, n + 3, b, j)
            a03 += lo * x0 + hi * y0; a13 += lo * x1 + hi * y1; a23 += lo * x2 + hi * y2; a33 += lo * x3 + hi * y3
    out[r, n], out[r, n + 1], out[r, n + 2], out[r, n + 3] = a00, a01, a02, a03
    out[r + 1, n], out[r + 1, n + 1], out[r + 1, n + 2], out[r + 1, n + 3] = a10, a11, a12, a13
    out[r + 2, n], out[r + 2, n + 1], out[r + 2, n + 2], out[r + 2, n + 3] = a20, a21, a22, a23
    out[r + 3, n], out[r + 3, n + 1], out[r + 3, n + 2], out[r + 3, n + 3] = a30, a31, a32, a33


@njit(cache=True, fastmath=SUMS)
def _tile1(codes, scale, low, n, x, r, out):
    """out[r, n:n+4] = x[r] @ W[n:n+4]ᵀ."""
    a0 = a1 = a2 = a3 = np.float32(0)
    for b in range(codes.shape[1]):
        for j in range(16):
            x0, y0 = x[r, b * QK + j], x[r, b * QK + j + 16]
            lo, hi = weights(codes, scale, low, n, b, j)
            a0 += lo * x0 + hi * y0
            lo, hi = weights(codes, scale, low, n + 1, b, j)
            a1 += lo * x0 + hi * y0
            lo, hi = weights(codes, scale, low, n + 2, b, j)
            a2 += lo * x0 + hi * y0
            lo, hi = weights(codes, scale, low, n + 3, b, j)
            a3 += lo * x0 + hi * y0
    out[r, n], out[r, n + 1], out[r, n + 2], out[r, n + 3] = a0, a1, a2, a3


@njit(parallel=True, cache=True)
def _linear(codes, scale, low, x, fours, out):
    """out [M', N'] for x [M', K]: the first `fours` rows of x in tiles of 4, the rest one by one. N' = N rounded
    up to 4: codes, scale and low have N' rows (the last tile's missing rows repeat row N - 1)."""
    for t in prange(codes.shape[0] // 4):
        for r in range(0, fours, 4):
            _tile4(codes, scale, low, t * 4, x, r, out)
        for r in range(fours, x.shape[0]):
            _tile1(codes, scale, low, t * 4, x, r, out)


def tiles(w) -> tuple:
    """(codes, scale, low) numpy arrays of fp32 [N, K] or Blocks (None where a format has none), rows padded to a
    multiple of 4 (a copy only then)."""
    arrays = [w.codes, w.scale, w.low] if isinstance(w, Blocks) else [w.detach().view(w.shape[0], -1, QK), None, None]
    pad = -w.shape[0] % 4
    return tuple(None if a is None else (torch.cat([a, a[-1:].expand(pad, *a.shape[1:])]) if pad else a).numpy()
                 for a in arrays)


def linear(x: torch.Tensor, w, packed: tuple | None = None) -> torch.Tensor:
    """x [..., K] fp32 CPU @ wᵀ -> [..., N] fp32. w: fp32 [N, K] (K a multiple of 32) or Blocks; packed: tiles(w),
    when the caller keeps it. More than MAX_ROWS rows go to torch (Blocks dequantized for the call)."""
    lead, K = x.shape[:-1], x.shape[-1]
    N = w.shape[0]
    x = x.reshape(-1, K)
    M = x.shape[0]
    if M > MAX_ROWS:
        return F.linear(x.float(), w.dequantize() if isinstance(w, Blocks) else w).view(*lead, N)
    rows = M + (-M % 4 if M % 4 >= 2 else 0)  # 2 or 3 rows past the fours: one padded tile beats singles
    if rows > M:
        x = torch.cat([x, x.new_zeros(rows - M, K)])
    codes, scale, low = packed or tiles(w)
    out = torch.empty(rows, codes.shape[0], dtype=torch.float32)
    _linear(codes, scale, low, x.float().contiguous().numpy(), rows - rows % 4, out.numpy())
    return out[:M, :N].view(*lead, N)
