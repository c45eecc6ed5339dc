"""smollm2: SmolLM2 rebuilt from torch primitives. `from smollm2 import load, Config, SmolLM2`."""

from .config import Config
from .loading import load
from .model import SmolLM2
from .tokenizer import Tokenizer
from .weights import save_pretrained

__all__ = ["Config", "SmolLM2", "Tokenizer", "load", "save_pretrained"]
