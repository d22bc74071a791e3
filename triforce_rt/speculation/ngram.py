"""Prompt-lookup drafting: propose what followed the latest earlier occurrence of the context's last n tokens.

No model forward. The proposal is a point mass, q_i = one_hot(x_i), which verify_sample handles exactly: x_i is
accepted with probability p_i(x_i), and after a rejection the residual is p_i with x_i removed.
A lookup is one vectorised numpy scan per n over the token array (longest n first): well under a millisecond at
128K tokens. The tier holds no state: it reads each row's sequence from the hierarchy's token buffer.
"""
import time

import numpy as np
import torch

from .tier import TierStats


def find(arr: np.ndarray, n: int) -> int:
    """Start of the continuation after the latest earlier occurrence of arr[-n:] in arr, or -1."""
    L = len(arr)
    if L <= n:
        return -1
    hit = arr[: L - n] == arr[L - n]  # candidate starts i < L - n (an occurrence before the suffix itself)
    for j in range(1, n):
        hit &= arr[j : L - n + j] == arr[L - n + j]
    starts = np.flatnonzero(hit)
    return int(starts[-1]) + n if len(starts) else -1


class NgramTier:
    def __init__(self, vocab_size: int, gamma: int, max_n: int = 3, min_n: int = 2):
        self.vocab_size, self.gamma = vocab_size, gamma
        self.max_n, self.min_n = max_n, min_n
        self.stats = TierStats("ngram")

    def draft(self, seqs: list, n: int) -> list:
        """Per row, up to n tokens continuing seqs[b] (an int array; none when no n-gram of length >= min_n
        recurs)."""
        t0 = time.perf_counter()
        out = self.lookup(seqs, n)
        self.stats.calls += 1
        self.stats.seconds += time.perf_counter() - t0
        return out

    def lookup(self, seqs: list, n: int) -> list:
        """draft() without counting a call (--mode auto watches the lookup while it does not draft)."""
        out = []
        for seq in seqs:
            arr, toks = np.asarray(seq), []
            for size in range(self.max_n, self.min_n - 1, -1):
                start = find(arr, size)
                if start >= 0:
                    toks = arr[start : start + n].tolist()
                    break
            out.append(toks)
        return out

    def one_hot(self, draft: list, device) -> torch.Tensor:
        """q [len(draft), V]: the point masses of a proposal."""
        q = torch.zeros(len(draft), self.vocab_size, device=device)
        return q.scatter_(1, torch.tensor(draft, device=device)[:, None], 1.0)

    def truncate(self, row: int, n: int) -> None:
        """Nothing to roll back: the lookup reads the hierarchy's buffer."""

    def keep(self, rows: list) -> None:
        """Nothing to gather: the lookup reads the hierarchy's buffer."""

    def join(self, other: "NgramTier") -> None:
        """Nothing to append: the lookup reads the hierarchy's buffer."""
