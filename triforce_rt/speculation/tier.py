"""A tier: a model, the cache it attends to, and its place in each sequence of the batch.

`pos[b]` counts the tokens of row b's sequence that sit in the cache. Every tier keeps pos[b] <= len(seq_b) - 1:
the last token of a sequence is pending, fed by the next forward, which returns the distribution after it.
"""
import time
from dataclasses import dataclass

import torch

from cuda_graphs import StepGraphs

from .verify import verify_sample


@dataclass
class TierStats:
    name: str
    drafted: int = 0  # tokens this tier proposed to the tier that verified them
    accepted: int = 0  # of those, the ones the tier above accepted
    rejected: int = 0  # verifications that rejected one of them (the drafts after a rejection are never examined)
    calls: int = 0  # forward calls (one per batch step)
    seconds: float = 0.0  # time in those forwards


def ragged(ids: list, positions: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per batch row, token ids and their positions (lists) -> ids, positions [B, T], T the longest row.
    A shorter row is padded by repeating its last token at its last position: the pad rewrites that cache slot
    with the same values and its outputs equal the last real token's, so no cache needs to know about padding."""
    T = max(map(len, ids))
    pad = lambda rows: [r + r[-1:] * (T - len(r)) for r in rows]
    return torch.tensor(pad(ids), device=device), torch.tensor(pad(positions), device=device)


class Tier:
    def __init__(self, name: str, model, cache, gamma: int = 0, pos: list | None = None):
        self.model, self.cache = model, cache
        self.gamma = gamma  # tokens drafted per verification by the tier above (0 for the target)
        self.pos = list(pos or [0])
        self.stats = TierStats(name)
        # The forward of a step. Where the model asks for graphs its cache runs in static mode (fixed shapes, no host
        # syncs) and each (B, T) is replayed as a CUDA graph on cuda, or run eagerly elsewhere. Streaming weights or
        # KV from the host (copy-stream events across forwards) cannot be captured: such a tier runs eagerly.
        graphs = model.runtime.graphs_allowed(cache, model.rope.dynamic)
        self.step = StepGraphs(lambda ids, positions: model.hidden(ids, positions, cache), graphs)
        cache.static = graphs

    def feed(self, tokens, need: list) -> torch.Tensor:
        """Run each row's tokens past pos[b] (tokens: the hierarchy's buffers) through the model, all rows in one
        forward. Returns the logits [Σ need, V] of each row's last need[b] tokens, row after row: row i of a row's
        block predicts the token after its sequence's first len - need[b] + i + 1 tokens."""
        device = self.model.device
        new = [tokens.buf[b, p : tokens.n[b]].tolist() for b, p in enumerate(self.pos)]
        ids, positions = ragged(new, [list(range(p, p + len(n))) for p, n in zip(self.pos, new)], device)
        b = torch.tensor([r for r, n in enumerate(need) for _ in range(n)], device=device)
        t = torch.tensor([len(toks) - n + i for toks, n in zip(new, need) for i in range(n)], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = self.step(ids, positions)  # [B, T, D]
            self.hidden = x[b, t]  # [Σ need, D]: a recurrent draft head below anchors on these (speculation/head.py)
            logits = self.model.score(self.hidden)  # [Σ need, V]: only the rows asked for reach the head
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.pos = tokens.n.tolist()
        return logits

    def truncate(self, row: int, n: int) -> None:
        """Keep only the first n tokens of row's sequence: a rollback, which moves a count and copies nothing."""
        self.pos[row] = min(self.pos[row], n)

    def keep(self, rows: list) -> None:
        self.pos = [self.pos[r] for r in rows]
        self.cache.keep(rows)
        self.step.reset()  # the cache's tensors were replaced

    def join(self, other: "Tier") -> None:
        """Append the rows of other (the same tier kind, built for sequences that join the batch)."""
        self.pos += other.pos
        self.cache.join(other.cache)
        self.step.reset()

    def verify(self, drafts, q, p, generator):
        """The sampling rule this tier applies to the drafts of the tier below (a test swaps it for a flawed one)."""
        return verify_sample(drafts, q, p, generator)
