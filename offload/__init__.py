"""Pinned host memory: weight streaming with a prefetch stream (WeightStream), a full KV cache streamed per layer
(KVStream), and a GPU memory cap. Never imports triforce_rt."""
from .kv import KVStream
from .memory import cap_memory
from .weights import WeightStream

__all__ = ["KVStream", "WeightStream", "cap_memory"]
