from .config import ModelConfig
from .llama import Transformer
from .loader import load_model

__all__ = ["ModelConfig", "Transformer", "load_model"]
