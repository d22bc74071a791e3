"""triforce-rt: lossless hierarchical speculative decoding for long-context generation."""
from .engine import GenerationConfig, GenerationResult, generate
from .errors import UserError
from .models import load_model

__all__ = ["load_model", "generate", "GenerationConfig", "GenerationResult", "UserError"]
__version__ = "0.1.0"
