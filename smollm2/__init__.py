"""smollm2: SmolLM2 rebuilt from torch primitives. `from smollm2 import load, Config, SmolLM2`."""

from .config import Config
from .generate import GenerationConfig, chat, generate, generate_batch, stream_text
from .loading import load
from .model import SmolLM2
from .tokenizer import Tokenizer
from .weights import save_pretrained

__all__ = [
    "Config", "GenerationConfig", "SmolLM2", "Tokenizer", "chat", "generate", "generate_batch", "load",
    "save_pretrained", "stream_text",
]
