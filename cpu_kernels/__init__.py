"""CPU matrix kernels (numba) for decode steps of a few rows: fp32 weights, or a GGUF's Q4_0/Q4_1/Q8_0 blocks read
in place, computed in fp32 with exactly the dequantized values (blocks.py, linear.py); and a Llama block's work
around attention in two calls (linear.py: attention_in, attention_out). Imports no other package of this project."""
import os
import sys


def wide_vectors() -> None:
    """Let numba's LLVM vectorise with 512-bit registers on AVX-512 CPUs (its tuning for Intel's server cores prefers
    256 bits): the numba kernels are bound by vector arithmetic (the 4-bit blocks' dequantization and a verify step's
    sums). numba fixes its target when the process's first jitted function is made, so this runs at the package's
    import, before its own kernels; an explicit NUMBA_CPU_NAME or NUMBA_CPU_FEATURES is left alone, and child
    processes inherit the setting. The same function is in retrieval_cache (packages here import no other package of
    the project): whichever is imported first sets it. Values: the linear maps never reassociate; attention sums may
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

from .blocks import FORMATS, QK, Blocks
from .linear import MAX_ROWS, attention_in, attention_out, linear, pack
from .modules import Embedding, Linear

VERSION = 4  # bumped when the kernels' speed changes: measured step costs (calibration) keyed by it go stale

__all__ = ["VERSION", "FORMATS", "QK", "Blocks", "MAX_ROWS", "attention_in", "attention_out", "linear", "pack", "Linear", "Embedding"]
