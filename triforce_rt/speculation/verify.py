"""Verification of a drafted block, the rule that makes each tier lossless.

A drafter proposed x_1..x_γ, x_i drawn from q_i; the verifier's distributions p_1..p_{γ+1} come from one
forward over the block. Sampling (Leviathan et al. / Chen et al.): accept x_i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a draw from normalize(max(p_i - q_i, 0)) and stop;
if all γ are accepted, emit a bonus draw from p_{γ+1}. The emitted tokens are distributed exactly as p.
A point-mass drafter (n-gram) is q_i = one_hot(x_i). Greedy: accept while x_i = argmax p_i, then emit argmax.
"""
import torch


def verify_greedy(draft: torch.Tensor, p_logits: torch.Tensor) -> tuple[int, int]:
    """draft [γ] ids; p_logits [γ+1, V]. Returns (accepted count n, the verifier's token after them)."""
    best = p_logits.argmax(dim=-1)  # [γ+1]
    mismatch = (draft != best[:-1]).nonzero()
    n = int(mismatch[0]) if len(mismatch) else len(draft)
    return n, int(best[n])


def verify_sample(draft: torch.Tensor, q: torch.Tensor, p: torch.Tensor, generator=None) -> tuple[int, int]:
    """draft [γ] ids; q [γ, V] draft probabilities; p [γ+1, V] verifier probabilities (after the same
    temperature / top-k / top-p). Returns (accepted count n, the token emitted after them)."""
    gamma = len(draft)
    idx = torch.arange(gamma, device=draft.device)
    ratio = p[idx, draft] / q[idx, draft]  # q(x_i) > 0: x_i was drawn from q_i
    u = torch.rand(gamma, generator=generator, device=p.device)
    rejected = (u >= ratio).nonzero()  # accept iff u < min(1, ratio)
    if len(rejected) == 0:
        return gamma, int(torch.multinomial(p[gamma], 1, generator=generator))
    n = int(rejected[0])
    residual = (p[n] - q[n]).clamp(min=0)
    total = residual.sum()
    # total == 0 only if p_n == q_n up to rounding, where rejection has probability ~0: fall back to p_n.
    dist = residual / total if total > 0 else p[n]
    return n, int(torch.multinomial(dist, 1, generator=generator))
