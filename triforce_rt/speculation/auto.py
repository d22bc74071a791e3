"""--mode auto: which tiers of the pool draft, and γ, chosen between rounds from measured step costs and the
acceptance observed so far.

The pool is a retrieval tier and an n-gram lookup under the target; a plan is one of its sub-stacks:
  ar (), ngram ("ngram",), self-spec ("retrieval",), self-spec-ngram ("retrieval", "ngram": the lookup drafts
  where it matches, the retrieval tier where it does not),
with γ in 1..γ_max drafts per verification. Its speed, in tokens per second of the round, from the costs of
calibration.py (c_t(T): a target forward of T tokens per row; c_r: one retrieval step; s: one re-selection, paid
each round when refresh is on) and E(α, γ) = (1 − α^{γ+1}) / (1 − α), the tokens a verification of γ drafts keeps
when each is accepted with probability α:
  ar               1 / c_t(1)
  ngram            [m E(α_n, γ) + (1 − m)] / [m c_t(γ+1) + (1 − m) c_t(1)]     m: the share of rounds the lookup matches
  self-spec        E(α_r, γ) / [γ c_r + c_t(γ+1) + s]
  self-spec-ngram  [m E(α_n, γ) + (1 − m) E(α_r, γ)] / [(1 − m) γ c_r + c_t(γ+1) + s]
A plan of other tiers replaces the current one when it is predicted GAIN faster; γ follows the best value at once.
Estimates: counts decayed by DECAY per round, plus PRIOR_WEIGHT pseudo-drafts at the prior. The lookup is run
before every round, drafting or not, and compared with the tokens the round kept, so m and α_n are always observed
(for sampling too: a point-mass draft x is accepted with probability p(x), the chance that the kept token is x).
α_r is observed only while the retrieval tier drafts, so the plans weigh it optimistically, by an upper confidence
bound α̂_r + UCB / √(drafts seen + PRIOR_WEIGHT): a tier seen little is tried, one seen often is judged by what it
did, and while it idles its counts decay, the bound grows, and a plan that dropped it tries it again after a while.
Switching between rounds keeps the output exact: each round's tokens follow the target's law whatever drafted.
"""
import logging
from dataclasses import dataclass

from ..calibration import interpolate

log = logging.getLogger(__name__)
PLANS = {"ar": (), "ngram": ("ngram",), "self-spec": ("retrieval",), "self-spec-ngram": ("retrieval", "ngram")}
GAIN = 1.05  # a plan with other tiers must be predicted this much faster to replace the current one
DECAY = 0.95  # per round: the estimates follow roughly the last 20 rounds
PRIOR_WEIGHT = 2.0  # pseudo-drafts at the prior
PRIOR = {"retrieval": 0.85, "ngram": 0.6, "match": 0.5}  # α_r, α_n, m before any observation
UCB = 0.3  # the retrieval tier's optimism: +0.21 before any draft, +0.07 after 16, +0.03 after 100


@dataclass
class Estimate:
    """A rate hits / trials over decayed counts, starting at a prior."""
    prior: float
    hits: float = 0.0
    trials: float = 0.0

    def add(self, hits: float, trials: float) -> None:
        self.hits += hits
        self.trials += trials

    def decay(self) -> None:
        self.hits *= DECAY
        self.trials *= DECAY

    @property
    def value(self) -> float:
        return (self.hits + PRIOR_WEIGHT * self.prior) / (self.trials + PRIOR_WEIGHT)

    @property
    def bound(self) -> float:
        """An upper confidence bound of the rate (at most 0.99)."""
        return min(0.99, self.value + UCB / (self.trials + PRIOR_WEIGHT) ** 0.5)


def kept(alpha: float, gamma: int) -> float:
    """E(α, γ): expected tokens a verification of γ drafts keeps (accepted drafts + the verifier's own token)."""
    alpha = min(alpha, 0.999)
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


class Auto:
    def __init__(self, hierarchy, costs: dict, gamma_max: int, refresh: bool):
        self.h, self.costs, self.gamma_max, self.refresh = hierarchy, costs, gamma_max, refresh
        self.pool = {t.stats.name: t for t in hierarchy.pool[:-1]}  # "retrieval", "ngram"
        self.alpha_r, self.alpha_n, self.match = (Estimate(PRIOR[k]) for k in ("retrieval", "ngram", "match"))
        self.seen = (0, 0)  # the retrieval tier's (accepted, rejected) at the last round
        self.shadow = []
        self.name, self.gamma = None, 0
        self.log = []  # the plan and every switch: {"at": new tokens so far, "mode", "gamma2", "tok_s"}

    def speed(self, name: str, g: int) -> float:
        """Predicted tokens per second of plan name with γ = g."""
        ct, cr = (lambda T: interpolate(self.costs["target"], T)), self.costs["retrieval"]
        s = self.costs["select"] if self.refresh else 0.0
        m, en, er = self.match.value, kept(self.alpha_n.value, g), kept(self.alpha_r.bound, g)
        if name == "ar":
            return 1 / ct(1)
        if name == "ngram":
            return (m * en + 1 - m) / (m * ct(g + 1) + (1 - m) * ct(1))
        if name == "self-spec":
            return er / (g * cr + ct(g + 1) + s)
        return (m * en + (1 - m) * er) / ((1 - m) * g * cr + ct(g + 1) + s)

    def choose(self, at: int) -> None:
        """Re-plan before a round: the best (plan, γ); another stack only when GAIN faster than the current one."""
        best = {name: max((self.speed(name, g), g) for g in range(1, self.gamma_max + 1)) if name != "ar"
                else (self.speed("ar", 0), 0) for name in PLANS}
        name = max(best, key=lambda n: best[n][0])
        if self.name is not None and name != self.name and best[name][0] < GAIN * best[self.name][0]:
            name = self.name
        speed, gamma = best[name]
        if (name, gamma) == (self.name, self.gamma):
            return
        stack = [self.pool[k] for k in PLANS[name]]
        for t in stack:
            t.gamma = gamma
        self.h.use(stack + self.h.pool[-1:])
        if name != self.name:
            entry = {"at": at, "mode": name, "gamma2": gamma, "tok_s": round(speed, 1)}
            self.log.append(entry)
            r = self.alpha_r
            log.info(f"[auto] at {at} new tokens: {name}" + (f", gamma2 {gamma}" if gamma else "")
                     + f" (predicted {speed:.1f} tok/s; α retrieval {r.value:.2f}, bound {r.bound:.2f}; "
                     f"α ngram {self.alpha_n.value:.2f}, ngram match {self.match.value:.2f})")
        self.name, self.gamma = name, gamma

    def before(self) -> None:
        """The lookup's drafts for this round, whether it drafts or not."""
        tok = self.h.tok
        self.shadow = self.pool["ngram"].lookup([tok.row(b) for b in range(len(tok.n))], self.gamma_max)

    def after(self, news: list) -> None:
        """Fold the round's outcome into the estimates: the shadow lookups against the kept tokens, the retrieval
        tier's verifications since the last round."""
        for est in (self.alpha_r, self.alpha_n, self.match):
            est.decay()
        for draft, new in zip(self.shadow, news):
            self.match.add(bool(draft), 1)
            n = 0
            while n < min(len(draft), len(new)) and draft[n] == new[n]:
                n += 1
            self.alpha_n.add(n, n + (n < min(len(draft), len(new))))
        st = self.pool["retrieval"].stats
        acc, rej = st.accepted - self.seen[0], st.rejected - self.seen[1]
        self.seen = (st.accepted, st.rejected)
        self.alpha_r.add(acc, acc + rej)
