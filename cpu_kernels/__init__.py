"""CPU matrix kernels (numba) for decode steps of a few rows: fp32 weights, or a GGUF's Q4_0/Q4_1/Q8_0 blocks read
in place, computed in fp32 with exactly the dequantized values (blocks.py, linear.py). Imports no other package of
this project."""
from .blocks import FORMATS, QK, Blocks
from .linear import linear, pack
from .modules import Embedding, Linear

VERSION = 3  # bumped when the kernels' speed changes: measured step costs (calibration) keyed by it go stale

__all__ = ["VERSION", "FORMATS", "QK", "Blocks", "linear", "pack", "Linear", "Embedding"]
