"""Pinned host memory and weight streaming with a prefetch stream. Never imports triforce_rt."""
from .weights import WeightStream

__all__ = ["WeightStream"]
