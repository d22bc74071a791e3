"""KV cache layouts for hierarchical speculative decoding. Never imports triforce_rt.

FullCache (every token; PagedCache: the same in blocks of a shared BlockPool), StreamingCache (sinks + window),
RetrievalCache (top-k chunks of a FullCache or PagedCache); NoCache (attention within one forward, for training).
All share one protocol: begin(positions, rope) once per forward, attend(layer, q, k, v) per layer, keep(rows) to
drop finished batch rows and join(other) to append another cache's rows. Caches are batched and addressed by
position (a query at p sees slots of positions <= p), so rolling back rejected tokens is the caller's count and
moves no data.
"""
from .attention import KERNELS, attend, causal_mask, kernel, rotate, use_kernel
from .full import FullCache
from .nocache import NoCache
from .paged import BlockPool, PagedCache, PoolFull
from .retrieval import RetrievalCache
from .streaming import StreamingCache

__all__ = ["FullCache", "BlockPool", "PagedCache", "PoolFull", "NoCache", "StreamingCache", "RetrievalCache", "attend", "causal_mask", "rotate", "use_kernel", "kernel", "KERNELS"]
