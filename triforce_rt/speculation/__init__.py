"""Speculative decoding: the verification rule, tiers, and the hierarchy that stacks them."""
from .head import HeadTier
from .hierarchy import Hierarchy, Tokens
from .ngram import NgramTier
from .tier import Tier, TierStats
from .verify import verify_greedy, verify_sample

__all__ = ["HeadTier", "Hierarchy", "NgramTier", "Tier", "TierStats", "Tokens", "verify_greedy", "verify_sample"]
