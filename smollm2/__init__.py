"""smollm2: SmolLM2 rebuilt from torch primitives. `from smollm2 import load, Config, SmolLM2, generate`.

The top level loads and runs the model (config, model, kv_cache, tokenizer, weights, gguf, checkpoint_format,
loading); the subpackages are the applications built on it: inference/ (generation, the compiled step, the
batching engine), quant/ (quantised layers and our C++ kernels), train/, eval/, serve/, bench/ and commands/
(the command line). The names below are imported on first use (PEP 562), so `import smollm2` and
`smollm2 --help` load no torch.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config
    from .hooks import capture
    from .inference.config import GenerationConfig
    from .inference.generate import chat, generate, generate_batch, stream_text
    from .loading import load
    from .model import SmolLM2
    from .tokenizer import Tokenizer
    from .weights import save_pretrained

# public name -> the module that defines it
_EXPORTS = {
    "Config": "config",
    "capture": "hooks",
    "GenerationConfig": "inference.config",
    "SmolLM2": "model",
    "Tokenizer": "tokenizer",
    "chat": "inference.generate",
    "generate": "inference.generate",
    "generate_batch": "inference.generate",
    "load": "loading",
    "save_pretrained": "weights",
    "stream_text": "inference.generate",
}

__all__ = [
    "Config", "GenerationConfig", "SmolLM2", "Tokenizer", "capture", "chat", "generate", "generate_batch", "load",
    "save_pretrained", "stream_text",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        # a submodule, as `import smollm2; smollm2.loading.bundled_gguf()` found it when imports were eager
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
