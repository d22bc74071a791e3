"""KV cache layouts for hierarchical speculative decoding. Never imports triforce_rt.

FullCache (every token; PagedCache: the same in blocks of a shared BlockPool), StreamingCache (sinks + window),
RetrievalCache (top-k chunks of a FullCache or PagedCache); NoCache (attention within one forward, for training).
All share one protocol: begin(positions, rope) once per forward, attend(layer, q, k, v) per layer, keep(rows) to
drop finished batch rows and join(other) to append another cache's rows. Caches are batched and addressed by
position (a query at p sees slots of positions <= p), so rolling back rejected tokens is the caller's count and
moves no data.
"""
import os
import sys


def wide_vectors() -> None:
    """Let numba's LLVM vectorise with 512-bit registers on AVX-512 CPUs (its tuning for Intel's server cores prefers
    256 bits): the numba kernels are bound by vector arithmetic (the attention kernel's scores, exp and weighted
    sums). numba fixes its target when the process's first jitted function is made, so this runs at the package's
    import, before its own kernels; an explicit NUMBA_CPU_NAME or NUMBA_CPU_FEATURES is left alone, and child
    processes inherit the setting. The same function is in cpu_kernels (packages here import no other package of the
    project): whichever is imported first sets it. Values: the linear maps never reassociate; attention sums may
    regroup, within the fp32 bound tests/test_attention_kernel.py derives."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return
    from llvmlite import binding

    features = binding.get_host_cpu_features()
    if features.get("avx512f"):
        os.environ["NUMBA_CPU_FEATURES"] = wide = features.flatten() + ",-prefer-256-bit"
        if "numba" in sys.modules:  # imported already: it read its config from the environment before this
            sys.modules["numba"].core.config.CPU_FEATURES = wide


wide_vectors()

from .attention import KERNELS, attend, causal_mask, kernel, rotate, use_kernel
from .full import FullCache
from .nocache import NoCache
from .paged import BlockPool, PagedCache, PoolFull
from .retrieval import RetrievalCache
from .streaming import StreamingCache

__all__ = ["FullCache", "BlockPool", "PagedCache", "PoolFull", "NoCache", "StreamingCache", "RetrievalCache", "attend", "causal_mask", "rotate", "use_kernel", "kernel", "KERNELS"]
