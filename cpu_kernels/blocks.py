"""GGUF block-quantized weights, kept as blocks and read by the kernels (linear.py) without an fp32 copy.

A GGUF row of K weights is nb = K/32 blocks; each block has an fp16 scale d (Q4_1 also an fp16 min m) and 32
codes q. Element j of block b (0 <= j < 32) is, exactly as gguf.dequantize computes it in fp32:
  Q8_0: w = d * q                   q int8
  Q4_0: w = d * (q - 8)             q 4 bits: byte j < 16 of the block holds element j (low nibble) and j + 16
  Q4_1: w = d * q + m               q 4 bits, packed as Q4_0
d * q is exact in fp32 (an 11-bit fp16 mantissa times an integer of at most 8 bits), so w has at most one
rounding, in + m, whether or not a compiler fuses it into an FMA.

Stored interleaved over LANES rows, the layout the kernel reads with one vector per lane group: row n = g * LANES + l
is lane l of group g, and codes [G, nb, C, LANES] (C = 16 bytes of nibbles, or 32 int8), scale and low [G, nb,
LANES] in fp32 (fp16 -> fp32 is exact; 4 bytes more a block than the file's fp16). N is padded to whole groups by
repeating row N - 1 (the kernel's extra outputs are dropped).
"""
from dataclasses import dataclass

import numpy as np
import torch

QK = 32  # values per block, in every format here
LANES = 16  # rows interleaved: one 512-bit vector of fp32 (kernels' lane groups)
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # a block's bytes in a GGUF file
FORMATS = tuple(BLOCK_BYTES)


def interleave(a: torch.Tensor) -> torch.Tensor:
    """[N, nb, ...] rows -> [G, nb, ..., LANES], N padded to G * LANES with copies of the last row."""
    pad = -a.shape[0] % LANES
    if pad:
        a = torch.cat([a, a[-1:].expand(pad, *a.shape[1:])])
    a = a.reshape(-1, LANES, *a.shape[1:])
    return a.permute(0, *range(2, a.dim()), 1).contiguous()


@dataclass
class Blocks:
    """One weight matrix [n, K] in blocks, interleaved (module docstring): codes [G, nb, 16 | 32, LANES] (uint8 |
    int8), scale [G, nb, LANES], low [G, nb, LANES] (Q4_1) or None; all CPU tensors."""
    fmt: str
    n: int
    codes: torch.Tensor
    scale: torch.Tensor
    low: torch.Tensor | None

    @classmethod
    def from_rows(cls, fmt: str, codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None) -> "Blocks":
        """From rows as a file holds them: codes [N, nb, 16 | 32], scale and low [N, nb] fp32."""
        return cls(fmt, codes.shape[0], interleave(codes), interleave(scale), None if low is None else interleave(low))

    @classmethod
    def from_gguf(cls, fmt: str, raw: np.ndarray, K: int) -> "Blocks":
        """raw: uint8 [N, K / 32 * BLOCK_BYTES[fmt]], a GGUF tensor's rows as stored."""
        if fmt not in BLOCK_BYTES:
            raise ValueError(f"block format {fmt} is not read by the kernels (read: {', '.join(FORMATS)})")
        if K % QK:
            raise ValueError(f"a {fmt} row of {K} values is not whole blocks of {QK}")
        blk = np.ascontiguousarray(raw).reshape(raw.shape[0], K // QK, BLOCK_BYTES[fmt])
        half = lambda at: torch.from_numpy(blk[:, :, at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32))
        codes = blk[:, :, 4 if fmt == "Q4_1" else 2:].copy()
        return cls.from_rows(fmt, torch.from_numpy(codes.view(np.int8) if fmt == "Q8_0" else codes), half(0),
                             half(2) if fmt == "Q4_1" else None)

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str) -> "Blocks":
        """fp32 [N, K] -> Blocks of fmt, by gguf's quantizer (bit for bit ggml's reference rounding)."""
        import gguf

        raw = gguf.quants.quantize(w.detach().float().cpu().numpy(), gguf.GGMLQuantizationType[fmt])
        return cls.from_gguf(fmt, raw, w.shape[1])

    @property
    def shape(self) -> tuple:
        return self.n, self.codes.shape[1] * QK

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in (self.codes, self.scale, self.low) if a is not None)

    def row_arrays(self, index: torch.Tensor | None = None) -> tuple:
        """Rows index [n] (None: every row) as a file holds them: codes [n, nb, 16 | 32], scale [n, nb], low [n, nb]
        or None."""
        if index is None:  # [G, nb, ..., LANES] -> [G, LANES, nb, ...] -> rows
            pick = lambda a: None if a is None else a.movedim(-1, 1).reshape(-1, *a.shape[1:-1])[:self.n]
        else:
            g, lane = index // LANES, index % LANES
            pick = lambda a: None if a is None else a[g, ..., lane]  # advanced indices around slices: [n, nb, ...]
        return pick(self.codes), pick(self.scale), pick(self.low)

    def rows(self, index: torch.Tensor) -> "Blocks":
        """Rows index [n] (a permutation or a shard), as Blocks."""
        return Blocks.from_rows(self.fmt, *self.row_arrays(index))

    def dequantize(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 [n, K] (or the rows index [...] -> [..., K]): the values gguf.dequantize gives. The embedding
        lookup of a block-quantized table, and the reference the kernels are tested against."""
        codes, scale, low = self.row_arrays(None if index is None else index.reshape(-1))
        d = scale[..., None]  # [n, nb, 1]
        if self.fmt == "Q8_0":
            w = codes.float() * d
        else:
            q = torch.cat((codes & 15, codes >> 4), dim=-1).float()  # [n, nb, 32]: elements j, then j + 16
            w = d * (q - 8) if self.fmt == "Q4_0" else d * q + low[..., None]
        return w.reshape(*(index.shape if index is not None else (-1,)), self.shape[1])
