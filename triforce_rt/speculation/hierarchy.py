"""Hierarchical speculative decoding over a stack of tiers, cheapest first; the last tier is the target.

round(k, seq) gives tier k's next tokens after seq:
  tier 0 (or any tier asked for one token) runs one forward and draws from its own distribution p_k;
  tier k > 0 asks tier k-1 for g = γ_{k-1} drafts (propose), scores them in one forward over g+1 tokens,
  and keeps the accepted drafts plus one token (verify.py).
By the speculative sampling theorem the tokens of a round are distributed exactly as p_k, whatever the tiers
below drafted. So tier k's output is a proposal with q = p_k for tier k+1, and the target's output is exactly
the target's distribution, at every depth. Greedy is the same recursion with argmax.
After a verification every tier at or below k is truncated to the accepted prefix (a rollback: lengths move).
An n-gram tier (ngram.py) sits at the bottom: it proposes up to γ tokens, or none, and a round with no
proposal is a plain step of the tier above.
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

    def round(self, k: int, seq: list, limit: int) -> tuple[list, torch.Tensor | None]:
        """1..limit tokens of tier k after seq, and the distributions p_k [n, V] they follow (None when greedy)."""
        tier = self.tiers[k]
        g = min(self.tiers[k - 1].gamma, limit - 1) if k else 0
        draft, q = self.propose(k - 1, seq, g) if g else ([], None)
        g = len(draft)  # an n-gram tier may propose fewer tokens, or none
        if g == 0:
            logits = tier.feed(seq, last_only=True)  # [1, V]
            if self.sp.greedy:
                return [int(logits.argmax())], None
            p = probs(logits, self.sp)
            return [int(torch.multinomial(p[0], 1, generator=self.gen))], p

        logits = tier.feed(seq + draft)[-(g + 1) :]  # row i: p_k of the token after draft[:i]
        d = torch.tensor(draft, device=logits.device)
        if self.sp.greedy:
            (n, x), p = verify_greedy(d, logits), None
        else:
            p = probs(logits, self.sp)
            n, x = tier.verify(d, q, p, self.gen)
        below = self.tiers[k - 1].stats
        below.drafted += g
        below.accepted += n
        below.rejected += n < g
        for t in self.tiers[: k + 1]:
            t.truncate(len(seq) + n)  # drop the rejected drafts (and anything drafted past them)
        # x's marginal is p_k[n] (a residual draw after a rejection, a bonus draw otherwise).
        return draft[:n] + [x], (None if p is None else p[: n + 1])

    def propose(self, k: int, seq: list, n: int) -> tuple[list, torch.Tensor | None]:
        """n tokens of tier k after seq, by rounds (each returns at most what it is asked for), and their
        distributions [n, V] (None when greedy). An n-gram tier returns its lookup: up to n tokens, point masses."""
        tier = self.tiers[k]
        if isinstance(tier, NgramTier):
            toks = tier.draft(seq, n)
            return toks, (None if self.sp.greedy or not toks else tier.one_hot(toks, self.tiers[-1].cache.k.device))
        toks, ps = [], []
        while len(toks) < n:
            new, p = self.round(k, seq + toks, n - len(toks))
            toks += new
            ps.append(p)
        return toks, (None if self.sp.greedy else torch.cat(ps))

    def refresh(self) -> None:
        """Re-select every retrieval cache from the target's cache, which holds the committed sequence but its
        last token; the selection query is the target's latest one (FullCache.last_q). Tails empty."""
        top = self.tiers[-1]
        for t in self.tiers:
            if isinstance(getattr(t, "cache", None), RetrievalCache):
                t.cache.select(top.cache)
                t.pos = top.pos
