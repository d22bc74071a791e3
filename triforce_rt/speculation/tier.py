"""A tier: a model, the cache it attends to, and its place in the sequence.

`pos` counts the tokens of the current sequence that sit in the cache. Every tier keeps pos <= len(seq) - 1:
the last token of a sequence is pending, fed by the next forward, which returns the distribution after it.
"""
import time
from dataclasses import dataclass

import torch

from .verify import verify_sample


@dataclass
class TierStats:
    name: str
    drafted: int = 0  # tokens this tier proposed to the tier above
    accepted: int = 0  # of those, the ones the tier above accepted
    rejected: int = 0  # verifications that rejected one of them (the drafts after a rejection are never examined)
    calls: int = 0  # forward calls
    seconds: float = 0.0  # time in those forwards


class Tier:
    def __init__(self, name: str, model, cache, gamma: int = 0, pos: int = 0):
        self.model, self.cache = model, cache
        self.gamma = gamma  # tokens drafted per verification by the tier above (0 for the target)
        self.pos = pos
        self.stats = TierStats(name)

    def feed(self, seq: list, last_only: bool = False) -> torch.Tensor:
        """Run seq[pos:] through the model; returns logits [T, V] (or [1, V]), row t predicting seq[pos + t + 1]."""
        device = self.model.embed_tokens.weight.device
        ids = torch.tensor([seq[self.pos :]], device=device)
        positions = torch.arange(self.pos, len(seq), device=device)[None]
        t0 = time.perf_counter()
        logits = self.model(ids, positions, self.cache, last_only=last_only)[0]
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.pos = len(seq)
        return logits

    def truncate(self, n: int) -> None:
        """Keep only the first n tokens of the sequence: a rollback, which moves a length and copies nothing."""
        if n < self.pos:
            self.cache.rollback(self.pos - n)
            self.pos = n

    def verify(self, draft, q, p, generator):
        """The sampling rule this tier applies to the drafts of the tier below (a test swaps it for a flawed one)."""
        return verify_sample(draft, q, p, generator)
