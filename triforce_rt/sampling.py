"""The distribution a decoding step draws from: temperature, then top-k, then top-p, applied to logits.

Speculation (issue #3) applies the same transform to drafter and verifier, so one function defines it.
"""
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def probs(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, top-k and top-p (fp32)."""
    logits = logits.float() / sp.temperature
    if 0 < sp.top_k < logits.shape[-1]:
        kth = logits.topk(sp.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if sp.top_p < 1.0:
        sorted_p, order = p.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > sp.top_p  # keep the smallest prefix whose mass reaches top_p
        p = p.masked_fill(drop.scatter(-1, order, drop), 0.0)
        p = p / p.sum(-1, keepdim=True)
    return p


def sample(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, V] logits -> [B] token ids: argmax when greedy, else a draw from probs()."""
    if sp.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probs(logits, sp), 1, generator=generator).squeeze(-1)
