"""The bottom tier of the ReDrafter modes: a recurrent head (models/head.py) drafting from a verifier's hidden state.

No cache and no forward of its own model: after every verification the hierarchy anchors each row at the verifier's
hidden state h that chose the row's last token (anchor()); pos[b] then counts the tokens h has seen, and the last
token is pending. A draft unrolls the recurrence from there: x_1 is the pending token, each drafted token the next
input. So drafting costs no call of the tier above. A row whose anchor is gone (a rollback before it, or a row that
just joined) drafts nothing, and the tier above takes a plain step there, which anchors it again.
Sampling: draft j is drawn from q_j = probs(logits_j) under the same temperature / top-k / top-p as the verifier's p;
verify_sample accepts it with min(1, p/q), so the output stays exact (greedy: the argmax).
Draft length (cutoff, --head-cutoff): a row drafts x_j while q_1(x_1) ... q_{j-1}(x_{j-1}) max q_j, the head's
probability of its draft so far and of its likeliest next token, is at least the cutoff, up to n tokens (greedy: x_j
is the argmax of q_j over the kept tokens, so this is the probability of x_1 .. x_j). It estimates the chance that
drafts 1..j are all accepted, so a draft the head doubts is not sent to the verifier, whose step grows with its
tokens. Whether x_j is drafted depends on x_1 .. x_{j-1} only, never on x_j itself, so x_j is still a draw from q_j
and the rule above stays exact (stopping on q_j(x_j) would draw drafts from q_j cut to its likely tokens: a test's
chi-square rejects that). A tree's beams are deterministic: it keeps the nodes whose path is as likely.
"""
import math
import time
from dataclasses import dataclass

import torch

from ..sampling import probs
from .tier import TierStats


@dataclass
class HeadStats(TierStats):
    beam_tokens: int = 0  # tokens of its beams that a tree keeps (with beams > 1, drafted counts its nodes after dedup)


def pick(t: torch.Tensor, beam: torch.Tensor) -> torch.Tensor:
    """t [b, beams, ...] -> [b, width, ...]: row i's entries beam[i] (beam [b, width])."""
    return t.gather(1, beam.view(*beam.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


class HeadTier:
    def __init__(self, head, embed, gamma: int, batch: int, width: int = 1, cutoff: float = 0.0):
        self.head, self.embed, self.gamma = head, embed, gamma  # embed: the target's token embedding (ids -> [.., D])
        self.width = width  # beams: 1 drafts a chain (draft()), more a tree (tree())
        self.cutoff = cutoff  # the least probability of a draft (a tree node's path) that is verified
        self.h = torch.zeros(batch, head.hidden, device=head.vocab_ids.device)  # [B, D]
        self.pos = [-1] * batch  # tokens seen by h[b]; -1: no anchor
        self.stats = HeadStats("head")

    def anchor(self, row: int, h: torch.Tensor, n: int) -> None:
        """Row's next drafts start from h [D], the hidden state after its first n tokens."""
        self.h[row] = h.to(self.h.dtype)
        self.pos[row] = n

    def anchored(self, tokens) -> tuple:
        """The rows anchored at their pending token (the last of their sequence in tokens, the hierarchy's buffers),
        and those pending tokens [b']."""
        rows = [b for b, p in enumerate(self.pos) if p >= 0 and tokens.n[b] == p + 1]
        x = torch.tensor([int(tokens.buf[b, tokens.n[b] - 1]) for b in rows], dtype=torch.long, device=self.h.device)
        return rows, x

    def draft(self, tokens, n: int, sp, generator) -> tuple:
        """Per row of tokens (the hierarchy's buffers), n drafted tokens after its sequence, or none where the row has
        no anchor at its pending token; and their distributions q [n, V] (None when greedy or none drafted)."""
        t0 = time.perf_counter()
        rows, x = self.anchored(tokens)
        toks, qs = [[] for _ in self.pos], [None] * len(self.pos)
        if rows:
            h, s, out, q = self.h[rows], None, [], []
            path, keep = torch.ones(len(rows), device=h.device), []  # q_1(x_1)..q_j(x_j) [b'], and draft j or not
            with torch.inference_mode():
                for _ in range(n):
                    s = self.head.step(self.embed(x).to(h.dtype), s)
                    if sp.greedy:  # the kept ids are sorted, so ties break as over the whole vocabulary
                        logits = self.head.reduced_logits(s, h)  # [b', R]
                        top, best = logits.max(-1)  # the first of equal maxima, as argmax
                        x = self.head.vocab_ids[best]
                        if self.cutoff:  # q(x) = softmax(logits)[best]
                            path = path * (top - logits.logsumexp(-1)).exp()
                        keep.append(path >= self.cutoff)
                    else:
                        p = probs(self.head.logits(s, h), sp)  # [b', V]
                        keep.append(path * p.max(-1).values >= self.cutoff)  # before x is drawn
                        x = torch.multinomial(p, 1, generator=generator)[:, 0]
                        path = path * p.gather(1, x[:, None])[:, 0]
                        q.append(p)
                    out.append(x)
                    if self.cutoff and not keep[-1].any():  # a host sync per step, only with a cutoff
                        break
            drafted = torch.stack(out, 1).tolist()  # [b', steps]
            lengths = torch.stack(keep, 1).sum(1).tolist()  # the bound only falls: the kept drafts are a prefix
            for i, b in enumerate(rows):
                toks[b] = drafted[i][: lengths[i]]
                qs[b] = None if sp.greedy or not toks[b] else torch.stack([p[i] for p in q[: lengths[i]]])
            self.stats.calls += len(out)
        self.stats.seconds += time.perf_counter() - t0
        return toks, qs

    def tree(self, tokens, width: int, n: int) -> list:
        """Per row, beam search of `width` beams of n tokens after its sequence (by the head's log-probabilities),
        deduplicated into a tree: [(token, parent)] in breadth-first order, parent -1 for the pending token; [] for
        a row with no anchor at its pending token."""
        t0 = time.perf_counter()
        rows, x = self.anchored(tokens)
        trees = [[] for _ in self.pos]
        if rows:
            dev, x = self.h.device, x[:, None]  # [b', 1]
            h = self.h[rows][:, None]  # [b', 1, D]
            s, score, seqs = None, torch.zeros(len(rows), 1, device=dev), x[..., None][..., :0]  # 1 empty beam
            paths = score[..., None][..., :0]  # [b', beams, depth]: each beam's log-probability at every depth
            least = math.log(self.cutoff) if self.cutoff else -math.inf
            with torch.inference_mode():
                for _ in range(n):
                    s = self.head.step(self.embed(x).to(h.dtype), s)  # [b', beams, D]
                    # over the R kept tokens (the others have log-probability -inf): [b', beams, R]
                    cand = score[..., None] + self.head.reduced_logits(s, h.expand_as(s)).log_softmax(-1)
                    score, flat = cand.flatten(1).topk(min(width, cand[0].numel()), dim=-1)  # [b', width]
                    beam, x = flat // cand.shape[-1], self.head.vocab_ids[flat % cand.shape[-1]]  # the beam extended
                    s, seqs = pick(s, beam), torch.cat([pick(seqs, beam), x[..., None]], dim=-1)
                    paths = torch.cat([pick(paths, beam), score[..., None]], dim=-1)
                    if self.cutoff and not (score >= least).any():  # no node of this depth is kept, nor deeper
                        break
            kept = paths >= least  # [b', width, steps]
            for i, beams, likely in zip(rows, seqs.tolist(), kept.tolist()):  # the one host sync
                index = {}
                for d in range(len(beams[0])):
                    for beam, keep in zip(beams, likely):
                        key = tuple(beam[: d + 1])
                        if keep[d] and key not in index:  # a kept node's parent is kept: its path is likelier
                            index[key] = len(trees[i])
                            trees[i].append((beam[d], index.get(key[:-1], -1)))
            self.stats.calls += seqs.shape[-1]
            self.stats.beam_tokens += int(kept.sum())
        self.stats.seconds += time.perf_counter() - t0
        return trees

    def truncate(self, row: int, n: int) -> None:
        """Keep the first n tokens: an anchor that has seen more is gone."""
        if self.pos[row] > n:
            self.pos[row] = -1

    def keep(self, rows: list) -> None:
        self.h, self.pos = self.h[rows], [self.pos[r] for r in rows]

    def join(self, other: "HeadTier") -> None:
        self.h, self.pos = torch.cat([self.h, other.h]), self.pos + other.pos
