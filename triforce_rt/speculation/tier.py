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

    def feed_tree(self, tokens, trees: list) -> torch.Tensor:
        """One forward over each row's pending token (the root, which must be the only token past pos[b]) and its
        tree's nodes, [(token, parent)] breadth-first (FullCache.begin_tree: node i of row b sits at position
        pos[b] + its depth, in the scratch slot pos[b] + 1 + i). Returns the logits [Σ (1 + n_b), V] row after row:
        after the root, then after each node. accept() then moves a row's accepted path to its true slots."""
        ids, positions, steps = [], [], []
        for b, tree in enumerate(trees):
            p = self.pos[b]
            assert tokens.n[b] == p + 1, "a tree step starts from a tier that holds all but the pending token"
            depth = [0]
            for _, parent in tree:
                depth.append(depth[parent + 1] + 1)
            ids.append([int(tokens.buf[b, p])] + [t for t, _ in tree])
            positions.append([p + d for d in depth])
            steps.append(len(depth))
        device, T = self.model.device, max(steps)
        anc = torch.zeros(len(trees), T, T, dtype=torch.bool)  # [B, T, T]: ancestors and self (padding: self)
        for b, tree in enumerate(trees):
            anc[b, 0, 0] = True
            for i, (_, parent) in enumerate(tree):
                anc[b, i + 1] = anc[b, parent + 1]
                anc[b, i + 1, i + 1] = True
            for t in range(steps[b], T):
                anc[b, t, t] = True
        ids, positions = ragged(ids, positions, device)
        rows = torch.tensor([b for b, n in enumerate(steps) for _ in range(n)], device=device)
        cols = torch.tensor([t for n in steps for t in range(n)], device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = self.model.hidden(ids, positions, self.cache, tree=anc.to(device))  # eager: shapes vary per tree
            self.hidden = x[rows, cols]  # [Σ (1 + n_b), D]
            logits = self.model.score(self.hidden)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.calls += 1
        self.roots = list(self.pos)
        self.pos = [p + 1 for p in self.pos]  # the roots are in their slots; the nodes wait in scratch slots
        return logits

    def accept(self, row: int, path: list) -> None:
        """After feed_tree: row's accepted nodes (indices, root to leaf) move to the slots of their positions."""
        r = self.roots[row]
        self.cache.move(row, [r + 1 + i for i in path], [r + 1 + k for k in range(len(path))])
        self.pos[row] = r + 1 + len(path)

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
