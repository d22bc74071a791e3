"""Hierarchical speculative decoding over a stack of tiers, each drafting for the next; the last tier is the target.

Everything runs on a batch of sequences, row b of every tier's cache holding row b of the token buffer; one forward
per tier step, one host sync per verification. round(k, limits) gives each row 1..limits[b] of tier k's next tokens:
  tier 0 runs one forward and draws one token per row from its own distribution p_k;
  tier k > 0 asks tier k-1 for g = γ_{k-1} drafts per row (propose), scores them in one forward over g+1
  tokens, and keeps each row's accepted drafts plus one token (verify.py).
By the speculative sampling theorem the tokens of a round are distributed exactly as p_k, whatever the tiers
below drafted. So tier k's output is a proposal with q = p_k for tier k+1, and the target's output is exactly
the target's distribution, at every depth. Greedy is the same recursion with argmax. Cutting a row's tokens at a
count fixed in advance (its limit) keeps a prefix of that process, so it stays exact.
After a verification every tier at or below k is truncated, per row, to the kept prefix (a count moves).
An n-gram tier (ngram.py) proposes up to γ tokens per row, or none. A row with no match asks the tier below
the n-gram tier instead, for up to that tier's own γ (the drafter in triforce-ngram, the head in redrafter-ngram),
or, at the bottom, takes a plain step of the tier above.
Either way a row's proposal comes from one drafter with its own q, so the rule above stays exact.
A recurrent head (head.py) is a bottom tier without a forward: every verification above it anchors each row at the
verifier's hidden state, from which the next draft unrolls; a row with no anchor drafts nothing (a plain step).
"""
import numpy as np
import torch

from retrieval_cache import RetrievalCache

from ..sampling import SamplingParams, probs
from .head import HeadTier
from .ngram import NgramTier
from .tier import Tier
from .verify import offsets, verify_greedy, verify_tree


class Tokens:
    """Per-row token buffers: row b's sequence is buf[b, :n[b]], its committed tokens then the drafts the recursion
    is weighing. Appending and rolling back move n[b]; nothing is copied per step."""

    def __init__(self, prompts: list, capacity: int):
        self.buf = np.zeros((len(prompts), capacity), dtype=np.int64)
        self.n = np.array([len(p) for p in prompts])
        for b, p in enumerate(prompts):
            self.buf[b, : len(p)] = p

    def row(self, b: int) -> np.ndarray:
        return self.buf[b, : self.n[b]]

    def put(self, b: int, at: int, toks: list) -> None:
        """Row b's sequence becomes its first `at` tokens, then toks."""
        self.buf[b, at : at + len(toks)] = toks
        self.n[b] = at + len(toks)

    def keep(self, rows: list) -> None:
        self.buf, self.n = self.buf[rows], self.n[rows]

    def join(self, other: "Tokens") -> None:
        self.buf, self.n = np.concatenate([self.buf, other.buf]), np.concatenate([self.n, other.n])


class Hierarchy:
    def __init__(self, tiers: list[Tier], sp: SamplingParams, generator: torch.Generator, tokens: Tokens):
        self.pool = list(tiers)  # every tier built, the target last
        self.tiers, self.sp, self.gen, self.tok = list(tiers), sp, generator, tokens  # those drafting now

    def use(self, tiers: list) -> None:
        """Draft with these tiers of the pool from the next round on (a sub-stack, the target last; --mode auto).
        A retrieval tier that rejoins is re-selected from the target's cache; an idle tier's count is never past
        the committed tokens, and nothing else of it changes while it idles."""
        for t in tiers:
            if t not in self.tiers and isinstance(getattr(t, "cache", None), RetrievalCache):
                self.reselect(t)
        self.tiers = list(tiers)

    def round(self, k: int, limits: list) -> tuple[list, list]:
        """Per row: 1..limits[b] tokens of tier k after its sequence (appended to it), and the distributions p_k
        [n_b, V] they follow (None when greedy)."""
        if k and isinstance(self.tiers[k - 1], HeadTier) and self.tiers[k - 1].width > 1:
            return self.tree_round(k, limits)
        tier, base = self.tiers[k], self.tok.n.copy()
        g = min(self.tiers[k - 1].gamma, max(limits) - 1) if k else 0
        B = len(base)
        drafts, qs, src = self.propose(k - 1, g) if g else ([[]] * B, [None] * B, None)
        need = [len(d) + 1 for d in drafts]
        logits = tier.feed(self.tok, need)  # [Σ need, V], row b's need[b] rows in order
        if self.sp.greedy:
            p, verdicts = None, verify_greedy(drafts, logits)
        else:
            p = probs(logits, self.sp)
            q = [x for x in qs if x is not None]
            verdicts = tier.verify(drafts, torch.cat(q) if q else None, p, self.gen)
        news, ps = [], []
        for b, (d, (n, x), at, limit) in enumerate(zip(drafts, verdicts, offsets(drafts), limits)):
            if d:
                below = self.tiers[src[b]].stats
                below.drafted += len(d)
                below.accepted += n
                below.rejected += n < len(d)
            out = (d[:n] + [x])[:limit]  # x's marginal is p_k[n] (a residual draw after a rejection, else a bonus)
            self.tok.put(b, int(base[b]), out)
            for t in self.tiers[: k + 1]:
                t.truncate(b, int(base[b]) + len(out) - 1)  # drop the rejected drafts and anything drafted past them
            if k and isinstance(self.tiers[0], HeadTier):  # the hidden state that chose out[-1]
                self.tiers[0].anchor(b, tier.hidden[at + len(out) - 1], int(base[b]) + len(out) - 1)
            news.append(out)
            ps.append(None if p is None else p[at : at + len(out)])
        return news, ps

    def tree_round(self, k: int, limits: list) -> tuple[list, list]:
        """round() of tier k over the beams of the head below it (ReDrafter): each row's beams, deduplicated into a
        tree, are verified in one forward with a tree mask (verify_tree); the accepted path moves to its true slots.
        Where no row's tree branches (the beams agree, or the head's cutoff kept one path), the forward is a chain
        step instead: the nodes go to their true slots at once, and the tier's step kernel runs without a mask.
        The tokens' distributions are not returned (a tree round is the top tier's)."""
        head, tier, base = self.tiers[k - 1], self.tiers[k], self.tok.n.copy()
        g = min(head.gamma, max(limits) - 1)
        trees = head.tree(self.tok, head.width, g) if g else [[] for _ in limits]
        chains = all(parent == i - 1 for tree in trees for i, (_, parent) in enumerate(tree))
        if chains:  # node i of row b is its (i + 1)-th draft: the same logits, row after row, as feed_tree's
            for b, tree in enumerate(trees):
                self.tok.put(b, int(base[b]), [t for t, _ in tree])
            logits = tier.feed(self.tok, [1 + len(tree) for tree in trees])
        else:
            logits = tier.feed_tree(self.tok, trees)
        verdicts = verify_tree(trees, logits if self.sp.greedy else probs(logits, self.sp), self.sp.greedy, self.gen)
        news, at = [], 0
        for b, (tree, (path, y), limit) in enumerate(zip(trees, verdicts, limits)):
            if tree:
                head.stats.drafted += len(tree)
                head.stats.accepted += len(path)
                head.stats.rejected += any(parent == (path[-1] if path else -1) for _, parent in tree)
            out = ([tree[i][0] for i in path] + [y])[:limit]
            self.tok.put(b, int(base[b]), out)
            if not chains:
                tier.accept(b, path)
            for t in self.tiers[: k + 1]:
                t.truncate(b, int(base[b]) + len(out) - 1)
            chose = at + (1 + path[len(out) - 2] if len(out) > 1 else 0)  # the root or node before out[-1]
            head.anchor(b, tier.hidden[chose], int(base[b]) + len(out) - 1)
            news.append(out)
            at += 1 + len(tree)
        return news, [None] * len(news)

    def propose(self, k: int, n: int) -> tuple[list, list, list]:
        """Per row, n tokens of tier k appended to its sequence, their distributions [n, V] (None when greedy) and
        the index of the tier that drafted them. Rounds run in lockstep until every row has n; a row that is ahead
        takes one-token rounds, and is cut back to n at the end. An n-gram tier returns its lookups: up to n tokens
        per row, point masses; rows with no match take the tier below's min(n, its γ) tokens (where there is one).
        A head tier returns up to n tokens per anchored row (fewer past its cutoff), none for the others."""
        tier, start = self.tiers[k], self.tok.n.copy()
        if isinstance(tier, HeadTier):  # the bottom tier: rows without an anchor draft nothing
            toks, qs = tier.draft(self.tok, n, self.sp, self.gen)
            for b, t in enumerate(toks):
                self.tok.put(b, int(start[b]), t)
            return toks, qs, [k] * len(start)
        if isinstance(tier, NgramTier):
            toks = tier.draft([self.tok.row(b) for b in range(len(start))], n)
            src = [k] * len(start)
            qs = [None] * len(start)
            if k and not all(toks):  # the tier below drafts (up to its own γ) for every row; rows with a match drop
                low, low_qs, low_src = self.propose(k - 1, min(n, self.tiers[k - 1].gamma))  # its drafts
                for b in range(len(start)):
                    if toks[b]:
                        for t in self.tiers[:k]:
                            t.truncate(b, int(start[b]) - 1)
                    else:
                        toks[b], qs[b], src[b] = low[b], low_qs[b], low_src[b]
            device = self.tiers[-1].model.device
            for b, t in enumerate(toks):
                if src[b] == k:
                    self.tok.put(b, int(start[b]), t)
                    qs[b] = None if self.sp.greedy or not t else tier.one_hot(t, device)
            return toks, qs, src
        toks, ps = [[] for _ in start], [[] for _ in start]
        while min(len(t) for t in toks) < n:
            news, p = self.round(k, [max(1, n - len(t)) for t in toks])
            for b in range(len(start)):
                toks[b] += news[b]
                ps[b].append(p[b])
        for b in range(len(start)):
            if len(toks[b]) > n:
                toks[b] = toks[b][:n]
                self.tok.n[b] = start[b] + n
                for t in self.tiers[: k + 1]:
                    t.truncate(b, int(start[b]) + n - 1)
        return toks, [None if self.sp.greedy else torch.cat(p)[:n] for p in ps], [k] * len(start)

    def rollback(self, row: int, n: int) -> None:
        """Row's sequence back to its first n tokens, in the buffer and every tier (the last one pending)."""
        self.tok.n[row] = n
        for t in self.pool:
            t.truncate(row, n - 1)

    def keep(self, rows: list) -> None:
        """Continue with these batch rows only (the others finished), in every tier of the pool."""
        self.tok.keep(rows)
        for t in self.pool:
            t.keep(rows)

    def join(self, tiers: list, tokens: Tokens) -> None:
        """Append sequences that join the batch: tiers, the pool built for them (the same kinds and sizes) over
        their own prefill, and their token buffers. Their rows come after the batch's, in every tier of the pool."""
        self.tok.join(tokens)
        for t, o in zip(self.pool, tiers, strict=True):
            t.join(o)

    def refresh(self) -> None:
        """Re-select every retrieval cache from the target's cache, which holds each committed sequence but its
        last token; the selection query is the target's latest one (FullCache.last_q). Tails start again."""
        for t in self.tiers:
            if isinstance(getattr(t, "cache", None), RetrievalCache):
                self.reselect(t)

    def reselect(self, tier: Tier) -> None:
        top = self.tiers[-1]
        tier.cache.select(top.cache, top.pos)
        tier.pos = list(top.pos)
