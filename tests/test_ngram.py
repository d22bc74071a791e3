"""The n-gram (prompt-lookup) tier: the vectorised lookup against a brute-force search. Its exactness through the hierarchy is covered with the other modes in
test_hierarchy.py (greedy sweeps, sampling chi-square, rollback)."""
import numpy as np

from triforce_rt.speculation import NgramTier
from triforce_rt.speculation.ngram import find


def brute_find(seq: list, n: int) -> int:
    L = len(seq)
    for i in range(L - n - 1, -1, -1):
        if seq[i : i + n] == seq[L - n :]:
            return i + n
    return -1


def test_find_matches_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(300):
        arr = rng.integers(0, 1 + trial % 6, size=rng.integers(1, 60)).astype(np.int32)
        for n in (1, 2, 3, 4):
            assert find(arr, n) == brute_find(arr.tolist(), n), (arr.tolist(), n)


def test_draft_prefers_the_longest_match():
    tier = NgramTier(vocab_size=100, gamma=4, max_n=3)
    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # the trigram 1 2 3 occurred at the start (then 9 9 5 2); the bigram 2 3 last occurred before 7 8
    assert tier.draft([seq, [5, 6, 7, 5, 6]], 4) == [[9, 9, 5, 2], [7, 5, 6]]  # each row looks up its own sequence
    assert tier.draft([seq + [4, 4], [5, 6]], 3) == [[], []]  # neither 3 4 4 nor 4 4 occurred before (no unigrams)
    assert tier.draft([np.array([1, 2, 3, 9, 9, 5, 2, 3])], 2) == [[9, 9]]  # a row of the hierarchy's buffer
