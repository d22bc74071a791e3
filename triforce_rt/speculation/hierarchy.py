"""Hierarchical speculative decoding over a stack of tiers, each drafting for the next; the last tier is the target.

Everything runs on a batch of sequences, row b of every tier's cache holding seqs[b]; one forward per tier step.
round(k, seqs, limits) gives each row 1..limits[b] of tier k's next tokens:
  tier 0 runs one forward and draws one token per row from its own distribution p_k;
  tier k > 0 asks tier k-1 for g = γ_{k-1} drafts per row (propose), scores them in one forward over g+1
  tokens, and keeps each row's accepted drafts plus one token (verify.py).
By the speculative sampling theorem the tokens of a round are distributed exactly as p_k, whatever the tiers
below drafted. So tier k's output is a proposal with q = p_k for tier k+1, and the target's output is exactly
the target's distribution, at every depth. Greedy is the same recursion with argmax. Cutting a row's tokens at a
count fixed in advance (its limit) keeps a prefix of that process, so it stays exact.
After a verification every tier at or below k is truncated, per row, to the kept prefix (a count moves).
An n-gram tier (ngram.py) proposes up to γ tokens per row, or none. A row with no match asks the tier below
the n-gram tier instead (the drafter in triforce-ngram), or, at the bottom, takes a plain step of the tier above.
Either way a row's proposal comes from one drafter with its own q, so the rule above stays exact.
"""
import torch

from retrieval_cache import RetrievalCache

from ..sampling import SamplingParams, probs
from .ngram import NgramTier
from .tier import Tier
from .verify import verify_greedy


class Hierarchy:
    def __init__(self, tiers: list[Tier], sp: SamplingParams, generator: torch.Generator):
        self.tiers, self.sp, self.gen = tiers, sp, generator

    def round(self, k: int, seqs: list, limits: list) -> tuple[list, list]:
        """Per row: 1..limits[b] tokens of tier k after seqs[b], and the distributions p_k [n_b, V] they follow
        (None when greedy)."""
        tier = self.tiers[k]
        g = min(self.tiers[k - 1].gamma, max(limits) - 1) if k else 0
        drafts, qs, src = self.propose(k - 1, seqs, g) if g else ([[]] * len(seqs), [None] * len(seqs), None)
        logits = tier.feed([s + d for s, d in zip(seqs, drafts)], [len(d) + 1 for d in drafts])
        news, ps = [], []
        for b, (seq, d, q, lg, limit) in enumerate(zip(seqs, drafts, qs, logits, limits)):
            # lg [len(d)+1, V], row i: p_k of the token after d[:i]
            dt = torch.tensor(d, dtype=torch.long, device=lg.device)
            if self.sp.greedy:
                (n, x), p = verify_greedy(dt, lg), None
            else:
                p = probs(lg, self.sp)
                n, x = tier.verify(dt, q, p, self.gen) if d else (0, int(torch.multinomial(p[0], 1, generator=self.gen)))
            if d:
                below = self.tiers[src[b]].stats
                below.drafted += len(d)
                below.accepted += n
                below.rejected += n < len(d)
            out = (d[:n] + [x])[:limit]  # x's marginal is p_k[n] (a residual draw after a rejection, else a bonus)
            for t in self.tiers[: k + 1]:
                t.truncate(b, len(seq) + len(out) - 1)  # drop the rejected drafts and anything drafted past them
            news.append(out)
            ps.append(None if p is None else p[: len(out)])
        return news, ps

    def propose(self, k: int, seqs: list, n: int) -> tuple[list, list, list]:
        """Per row, n tokens of tier k after seqs[b], their distributions [n, V] (None when greedy) and the index of
        the tier that drafted them. Rounds run in lockstep until every row has n; a row that is ahead takes
        one-token rounds, and is cut back to n at the end. An n-gram tier returns its lookups: up to n tokens per
        row, point masses; rows with no match take the tier below's n tokens (where there is one)."""
        tier = self.tiers[k]
        if isinstance(tier, NgramTier):
            toks = tier.draft(seqs, n)
            device = self.tiers[-1].model.embed_tokens.weight.device
            qs = [None if self.sp.greedy or not t else tier.one_hot(t, device) for t in toks]
            src = [k] * len(seqs)
            if k and not all(toks):  # the tier below drafts for every row; rows with a match drop its drafts
                low, low_qs, low_src = self.propose(k - 1, seqs, n)
                for b, seq in enumerate(seqs):
                    if toks[b]:
                        for t in self.tiers[:k]:
                            t.truncate(b, len(seq) - 1)
                    else:
                        toks[b], qs[b], src[b] = low[b], low_qs[b], low_src[b]
            return toks, qs, src
        toks, ps = [[] for _ in seqs], [[] for _ in seqs]
        while min(len(t) for t in toks) < n:
            news, p = self.round(k, [s + t for s, t in zip(seqs, toks)], [max(1, n - len(t)) for t in toks])
            for b in range(len(seqs)):
                toks[b] += news[b]
                ps[b].append(p[b])
        for b, seq in enumerate(seqs):
            if len(toks[b]) > n:
                toks[b] = toks[b][:n]
                for t in self.tiers[: k + 1]:
                    t.truncate(b, len(seq) + n - 1)
        return toks, [None if self.sp.greedy else torch.cat(p)[:n] for p in ps], [k] * len(seqs)

    def keep(self, rows: list) -> None:
        """Continue with these batch rows only (the others finished)."""
        for t in self.tiers:
            t.keep(rows)

    def refresh(self) -> None:
        """Re-select every retrieval cache from the target's cache, which holds each committed sequence but its
        last token; the selection query is the target's latest one (FullCache.last_q). Tails start again."""
        top = self.tiers[-1]
        for t in self.tiers:
            if isinstance(getattr(t, "cache", None), RetrievalCache):
                t.cache.select(top.cache, top.pos)
                t.pos = list(top.pos)
