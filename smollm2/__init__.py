"""smollm2: SmolLM2 rebuilt from torch primitives. `from smollm2 import load, Config, SmolLM2`.

The names below are imported on first use (PEP 562), so `import smollm2` and `smollm2 --help` load no torch.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config
    from .generate import GenerationConfig, chat, generate, generate_batch, stream_text
    from .loading import load
    from .model import SmolLM2
    from .tokenizer import Tokenizer
    from .weights import save_pretrained

# public name -> the submodule that defines it
_EXPORTS = {
    "Config": "config",
    "GenerationConfig": "generate",
    "SmolLM2": "model",
    "Tokenizer": "tokenizer",
    "chat": "generate",
    "generate": "generate",
    "generate_batch": "generate",
    "load": "loading",
    "save_pretrained": "weights",
    "stream_text": "generate",
}

__all__ = [
    "Config", "GenerationConfig", "SmolLM2", "Tokenizer", "chat", "generate", "generate_batch", "load",
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


class _Package(_types.ModuleType):
    """`smollm2.generate` is the function generate(), as `from smollm2 import generate` promises.

    Importing the submodule smollm2.generate (which any module using it does) makes the import system set the
    package's attribute `generate` to that submodule; this keeps the function there instead. (The submodule
    is still `sys.modules["smollm2.generate"]`, and `from smollm2.generate import ...` works as always.)
    """

    def __setattr__(self, name: str, value: object) -> None:
        if (isinstance(value, _types.ModuleType) and value.__name__ == f"{__name__}.{name}"
                and _EXPORTS.get(name) == name):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
