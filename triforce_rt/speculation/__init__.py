"""Speculative decoding: the verification rules every tier uses (the tier stack arrives with issue #3)."""
from .verify import verify_greedy, verify_sample

__all__ = ["verify_greedy", "verify_sample"]
