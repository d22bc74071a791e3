"""The bottom tier of the ReDrafter modes: a recurrent head (models/head.py) drafting from a verifier's hidden state.

No cache and no forward of its own model: after every verification the hierarchy anchors each row at the verifier's
hidden state h that chose the row's last token (anchor()); pos[b] then counts the tokens h has seen, and the last
token is pending. A draft unrolls the recurrence from there: x_1 is the pending token, each drafted token the next
input. So drafting costs no call of the tier above. A row whose anchor is gone (a rollback before it, or a row that
just joined) drafts nothing, and the tier above takes a plain step there, which anchors it again.
Sampling: draft j is drawn from q_j = probs(logits_j) under the same temperature / top-k / top-p as the verifier's p;
verify_sample accepts it with min(1, p/q), so the output stays exact (greedy: the argmax).
"""
import time
from dataclasses import dataclass

import torch

from ..sampling import probs
from .tier import TierStats


@dataclass
class HeadStats(TierStats):
    beam_tokens: int = 0  # tokens of its beams (with beams > 1, drafted counts the tree's nodes after dedup)


def pick(t: torch.Tensor, beam: torch.Tensor) -> torch.Tensor:
    """t [b, beams, ...] -> [b, width, ...]: row i's entries beam[i] (beam [b, width])."""
    return t.gather(1, beam.view(*beam.shape, *[1] * (t.dim() - 2)).expand(-1, -1, *t.shape[2:]))


class HeadTier:
    def __init__(self, head, embed, gamma: int, batch: int, width: int = 1):
        self.head, self.embed, self.gamma = head, embed, gamma  # embed: the target's token embedding (ids -> [.., D])
        self.width = width  # beams: 1 drafts a chain (draft()), more a tree (tree())
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
            with torch.inference_mode():
                for _ in range(n):
                    s = self.head.step(self.embed(x).to(h.dtype), s)
                    if sp.greedy:  # the kept ids are sorted, so ties break as over the whole vocabulary
                        x = self.head.vocab_ids[self.head.reduced_logits(s, h).argmax(-1)]
                    else:
                        p = probs(self.head.logits(s, h), sp)  # [b', V]
                        x = torch.multinomial(p, 1, generator=generator)[:, 0]
                        q.append(p)
                    out.append(x)
            drafted = torch.stack(out, 1).tolist()  # [b', n]: the one host sync
            for i, b in enumerate(rows):
                toks[b] = drafted[i]
                qs[b] = None if sp.greedy else torch.stack([p[i] for p in q])
            self.stats.calls += n
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
            with torch.inference_mode():
                for _ in range(n):
                    s = self.head.step(self.embed(x).to(h.dtype), s)  # [b', beams, D]
                    # over the R kept tokens (the others have log-probability -inf): [b', beams, R]
                    cand = score[..., None] + self.head.reduced_logits(s, h.expand_as(s)).log_softmax(-1)
                    score, flat = cand.flatten(1).topk(min(width, cand[0].numel()), dim=-1)  # [b', width]
                    beam, x = flat // cand.shape[-1], self.head.vocab_ids[flat % cand.shape[-1]]  # the beam extended
                    s, seqs = pick(s, beam), torch.cat([pick(seqs, beam), x[..., None]], dim=-1)
            for i, beams in zip(rows, seqs.tolist()):  # [width, n] each: the one host sync
                index = {}
                for d in range(n):
                    for beam in beams:
                        key = tuple(beam[: d + 1])
                        if key not in index:
                            index[key] = len(trees[i])
                            trees[i].append((beam[d], index.get(key[:-1], -1)))
            self.stats.calls += n
            self.stats.beam_tokens += len(rows) * width * n
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
