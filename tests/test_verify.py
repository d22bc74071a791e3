"""The verification rule: exact target distribution (chi-square), and teeth against TriForce's p-resampling."""
import itertools

import pytest
import torch
from conftest import pooled_chisquare
from scipy.stats import chisquare

from triforce_rt.speculation import verify_greedy, verify_sample

V, DRAWS, ALPHA = 8, 20000, 1e-3


def dists(seed, n, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, V, generator=g) * sharp, -1)


def two_token_law(p1, p2_given):
    """Exact P(y1, y2) = p1(y1) p2(y2 | y1) over all V*V pairs."""
    return torch.stack([p1[a] * p2_given[a][b] for a, b in itertools.product(range(V), repeat=2)])


def speculate_two(p1, p2_given, q1, q2_given, g, flawed=False):
    """One γ=2 round from a fixed 'model' (p: verifier, q: drafter); returns the first two emitted tokens."""
    x1 = int(torch.multinomial(q1, 1, generator=g))
    x2 = int(torch.multinomial(q2_given[x1], 1, generator=g))
    draft = torch.tensor([x1, x2])
    q = torch.stack([q1, q2_given[x1]])
    p = torch.stack([p1, p2_given[x1], p2_given[x1]])  # the bonus row is never reached for 2 tokens' law
    [(n, nxt)] = verify_sample([draft.tolist()], q, p, g)
    if flawed and n < 2:  # TriForce's middle tier: on rejection, draw from p instead of the residual
        nxt = int(torch.multinomial(p[n], 1, generator=g))
    out = draft[:n].tolist() + [nxt]
    if len(out) < 2:  # rejected at the first token: the second comes from the verifier given the first
        out.append(int(torch.multinomial(p2_given[out[0]], 1, generator=g)))
    return tuple(out[:2])


def chi2_pvalue(flawed, seed=0):
    p1, q1 = dists(1, 1)[0], dists(2, 1)[0]
    p2, q2 = dists(3, V), dists(4, V)
    law = two_token_law(p1, p2)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V * V)
    for _ in range(DRAWS):
        a, b = speculate_two(p1, p2, q1, q2, g, flawed)
        counts[a * V + b] += 1
    return pooled_chisquare(counts, law)


def test_sampled_tokens_follow_the_verifier_exactly():
    assert chi2_pvalue(flawed=False) > ALPHA


def test_resampling_from_p_on_rejection_is_caught():
    assert chi2_pvalue(flawed=True) < ALPHA


def test_point_mass_draft_is_exact():
    """An n-gram draft is q = one_hot(x): the first emitted token still follows p."""
    p = dists(5, 2)
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(V)
    for _ in range(DRAWS):
        q = torch.nn.functional.one_hot(torch.tensor([3]), V).float()
        [(n, nxt)] = verify_sample([[3]], q, p, g)
        counts[3 if n == 1 else nxt] += 1
    assert chisquare(counts.numpy(), (p[0] * DRAWS).numpy()).pvalue > ALPHA


@pytest.mark.parametrize("draft,expect", [([4, 1, 7], (3, 2)), ([4, 0, 7], (1, 1)), ([5, 1, 7], (0, 4))])
def test_greedy_accepts_the_matching_prefix(draft, expect):
    logits = torch.full((4, V), -1.0)
    for i, t in enumerate([4, 1, 7, 2]):
        logits[i, t] = 1.0
    assert verify_greedy([draft], logits) == [expect]


def test_rows_of_a_batch_are_verified_together():
    """Three rows of different lengths (one with no draft) in one call: greedy gives each row its own verdict, and
    sampling keeps each row's first token on its own verifier's law."""
    logits = torch.full((7, V), -1.0)
    for i, t in enumerate([4, 1, 7, 2, 5, 6, 3]):  # rows: drafts [4, 1, 0] -> 4 rows, [] -> 1 row, [6] -> 2 rows
        logits[i, t] = 1.0
    assert verify_greedy([[4, 1, 0], [], [6]], logits) == [(2, 7), (0, 5), (1, 3)]
    p = dists(6, 7)
    q = torch.nn.functional.one_hot(torch.tensor([4, 1, 0, 6]), V).float()
    g = torch.Generator().manual_seed(2)
    counts = torch.zeros(3, V)
    for _ in range(DRAWS // 4):
        for b, (n, x) in enumerate(verify_sample([[4, 1, 0], [], [6]], q, p, g)):
            counts[b, ([4, 5, 6][b] if n else x)] += 1  # row b's first token: its draft if accepted, else x
    for b, first in enumerate([0, 4, 5]):  # the p row of each row's first token
        assert pooled_chisquare(counts[b], p[first]) > ALPHA
