"""How a loaded model runs, kept in one object beside its weights: where it came from, its tokenizer, and the
policy for CUDA graphs and offloading. The Transformer holds one Runtime (model.runtime); nothing else about
running it sits on the nn.Module.
"""
import os
from dataclasses import dataclass, field

from .errors import UserError

KERNELS = ("auto", "torch", "numba")  # --kernels: the matrix kernels a model runs with (models/kernels.py)


def check_threads(n: int, what: str = "--threads") -> int:
    """A torch CPU thread count: 1 to the machine's logical CPUs (what: the flag or key, for the error)."""
    cpus = os.cpu_count() or 1
    if not 1 <= n <= cpus:
        raise UserError(f"{what} must be between 1 and this machine's {cpus} CPUs (got {n})")
    return n


def set_threads(n: int | None) -> None:
    """The CPU threads of torch and of the numba kernels: n (checked), or their own choice for None. numba's pool
    has NUMBA_NUM_THREADS threads, fixed at its import (the machine's CPUs unless the variable is set)."""
    import numba
    import torch

    if n is not None:
        torch.set_num_threads(check_threads(n))
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


@dataclass
class Runtime:
    tokenizer: object = None  # transformers tokenizer, attached by load_model
    source: str | None = None  # the HF folder the weights came from
    cuda_graphs: bool = False  # asked for: tiers over this model replay fixed-shape steps as CUDA graphs
    weight_stream: object = None  # offload.WeightStream when the layers stream from host memory
    kv_offload: bool = False  # the generate loop keeps the full KV cache in host memory (offload.KVStream)
    tensor_parallel: bool = False  # the layers are shards whose outputs are summed across ranks (parallel.py)
    casts: dict = field(default_factory=dict)  # dtype -> this model's copy in that dtype (Transformer.with_dtype)
    kernels: str = "torch"  # the matrix kernels: "torch" or "numba" (models/kernels.py)
    head: tuple | None = None  # numba: the head's packed arrays (cpu_kernels.pack), made once

    def graphs_blocker(self, dynamic_rope: bool) -> str | None:
        """Why steps cannot be captured as CUDA graphs (copies or collectives across forwards, or RoPE tables
        that grow with the position), or None."""
        if self.weight_stream is not None or self.kv_offload:
            return "--offload"
        if self.tensor_parallel:
            return "--tp"
        return "dynamic RoPE" if dynamic_rope else None

    def graphs_allowed(self, cache, dynamic_rope: bool) -> bool:
        """The one decision: graphs asked for, nothing blocks them, and the cache is not streamed from the host."""
        return (self.cuda_graphs and self.graphs_blocker(dynamic_rope) is None and getattr(cache, "store", None) is None
                and getattr(cache, "pool", None) is None)  # a paged cache takes blocks as it goes: a host decision
