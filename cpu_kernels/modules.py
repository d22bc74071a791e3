"""nn.Modules over the kernels, to stand in a model for nn.Linear and nn.Embedding (inference on the CPU)."""
import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Blocks
from .linear import linear, pack


class Linear(nn.Module):
    """x [..., K] -> [..., N] by the numba kernel. weight: fp32 [N, K] (kept as the Parameter `weight`, so state
    dicts are unchanged) or Blocks (`blocks`; the module then has no fp32 weight)."""

    def __init__(self, weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.blocks = weight if isinstance(weight, Blocks) else None
        self.out_features = weight.shape[0]
        self.weight = None if self.blocks is not None else (
            weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight))
        self.bias = bias
        # the kernel's arrays, made once: the Blocks' own tensors, or an interleaved copy of an fp32 weight (frozen:
        # inference only; training takes F.linear over `weight`)
        self.packed = pack(weight)

    def forward(self, x):
        if self.blocks is None and (x.is_cuda or torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.weight, self.bias)
        out = linear(x, self.weight if self.blocks is None else self.blocks, self.packed)
        return out if self.bias is None else out + self.bias


class Embedding(nn.Module):
    """Token ids [...] -> rows [..., K] of a block-quantized table, dequantized on lookup (the exact values)."""

    def __init__(self, blocks: Blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, ids):
        return self.blocks.dequantize(ids)
