"""Speculative decoding: the verification rule, tiers, and the hierarchy that stacks them."""
from .hierarchy import Hierarchy
from .ngram import NgramTier
from .tier import Tier, TierStats
from .verify import verify_greedy, verify_sample

__all__ = ["Hierarchy", "NgramTier", "Tier", "TierStats", "verify_greedy", "verify_sample"]
