"""Verification of drafted blocks, the rule that makes each tier lossless; every row of a batch in one call and one
host sync.

A drafter proposed x_1..x_γ, x_i drawn from q_i; the verifier's distributions p_1..p_{γ+1} come from one
forward over the block. Sampling (Leviathan et al. / Chen et al.): accept x_i with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection emit a draw from normalize(max(p_i - q_i, 0)) and stop;
if all γ are accepted, emit a bonus draw from p_{γ+1}. The emitted tokens are distributed exactly as p.
A point-mass drafter (n-gram) is q_i = one_hot(x_i). Greedy: accept while x_i = argmax p_i, then emit argmax.
Batched: row b's γ_b drafts, its γ_b rows of q and γ_b + 1 rows of p follow the rows before it. The sampled rule
draws a residual token at every draft and a bonus token for every row up front, so one transfer to the host
decides them all; the draws a row does not use are independent of the ones it does, so each row stays exact.
"""
import torch


def offsets(drafts: list) -> list:
    """The first p row of each row's block: row b's γ_b + 1 rows follow the rows before it."""
    out, at = [], 0
    for d in drafts:
        out.append(at)
        at += len(d) + 1
    return out


def verify_greedy(drafts: list, p_logits: torch.Tensor) -> list:
    """drafts[b]: row b's γ_b ids; p_logits [Σ (γ_b+1), V]. Per row (accepted count n, the verifier's token after
    them)."""
    best = p_logits.argmax(dim=-1).tolist()  # the one host sync
    out = []
    for d, at in zip(drafts, offsets(drafts)):
        n = next((i for i, x in enumerate(d) if x != best[at + i]), len(d))
        out.append((n, best[at + n]))
    return out


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(p - q, 0)) per row; p itself where that is 0 everywhere (p = q up to rounding, where a
    rejection has probability ~0)."""
    r = (p - q).clamp(min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp(min=torch.finfo(r.dtype).tiny), p)


def verify_sample(drafts: list, q: torch.Tensor, p: torch.Tensor, generator=None, resample=residual) -> list:
    """drafts[b]: row b's γ_b ids; q [Σ γ_b, V] their draft probabilities; p [Σ (γ_b+1), V] the verifier's (after
    the same temperature / top-k / top-p). resample(p_i, q_i): what a rejection draws from (a test swaps in a
    flawed rule). Per row (accepted count n, the token emitted after them)."""
    dev, starts = p.device, offsets(drafts)
    rows = torch.tensor([at + i for d, at in zip(drafts, starts) for i in range(len(d))], dtype=torch.long, device=dev)
    ids = torch.tensor([x for d in drafts for x in d], dtype=torch.long, device=dev)
    bonus = torch.multinomial(p[[at + len(d) for d, at in zip(drafts, starts)]], 1, generator=generator)[:, 0]
    if len(ids):
        pd, k = p[rows], torch.arange(len(ids), device=dev)
        ratio = pd[k, ids] / q[k, ids]  # q(x_i) > 0: x_i was drawn from q_i
        accept = torch.rand(len(ids), generator=generator, device=dev) < ratio  # u < min(1, ratio)
        again = torch.multinomial(resample(pd, q), 1, generator=generator)[:, 0]
        flat = torch.cat([accept.long(), again, bonus]).tolist()  # the one host sync
    else:
        flat = bonus.tolist()
    m, out, at = len(ids), [], 0
    for b, d in enumerate(drafts):
        n = next((i for i in range(len(d)) if not flat[at + i]), len(d))
        out.append((n, flat[m + at + n] if n < len(d) else flat[2 * m + b]))
        at += len(d)
    return out


def verify_tree(trees: list, p: torch.Tensor, greedy: bool, generator=None) -> list:
    """Several deterministic candidates per node (ReDrafter's beams as a tree). trees[b]: row b's tree, a list of
    (token, parent) nodes in breadth-first order (parent -1: the root, the row's pending token); p [Σ (1 + n_b), V]:
    the verifier's distributions (or logits, greedy) after the root and after each node, row after row.
    Rule: at the root, draw y ~ p (greedy: argmax); if a child of the node holds y, descend into it and draw again;
    else emit y. Each emitted token is a draw from p after the tokens before it, so the output follows p exactly;
    this is the same as trying the children in order, accepting x with probability r(x) and on a rejection
    renormalising r without x. Draws for every node are made up front (one host sync); those a row does not use are
    independent of those it does. Per row (the accepted nodes' indices, the token emitted after them)."""
    y = (p.argmax(-1) if greedy else torch.multinomial(p, 1, generator=generator)[:, 0]).tolist()
    out, at = [], 0
    for tree in trees:
        children = {}
        for i, (tok, parent) in enumerate(tree):
            children.setdefault((parent, tok), i)
        path, node = [], -1
        while (node, y[at + 1 + node]) in children:
            node = children[(node, y[at + 1 + node])]
            path.append(node)
        out.append((path, y[at + 1 + node]))
        at += 1 + len(tree)
    return out
