"""Pinned host memory, weight streaming with a prefetch stream, and a GPU memory cap. Never imports triforce_rt."""
from .memory import cap_memory
from .weights import WeightStream

__all__ = ["WeightStream", "cap_memory"]
