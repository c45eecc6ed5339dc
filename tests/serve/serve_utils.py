"""Helpers for the server tests: a live uvicorn server on a free loopback port, a tiny random model, and the
original SmolLM2-Instruct tokenizer (with its chat template) to go with it."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch

from conftest import SHARED_DATA, require
from smollm2.config import Config
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:  # app: FastAPI
    """Serve app with uvicorn in a thread on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free one, and the bound socket keeps it ours
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def tiny_model(vocab_size: int = 49152, max_positions: int = 4096) -> SmolLM2:
    """A 2-layer random model with the real vocabulary size, so the real tokenizer works with it."""
    config = Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                    rope_theta=10000.0, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    with torch.no_grad():
        # A zero (tied) embedding row gives token 2, the end of turn, logit 0 while the best of 49k random
        # logits is far above 0: greedy decoding then never ends early, and long-generation tests stay long.
        model.model.embed_tokens.weight[config.eos_token_id] = 0
    return model.eval()


def instruct_tokenizer() -> Tokenizer:
    """SmolLM2-135M-Instruct's own tokenizer.json and chat template (loads in a moment; the model takes ~8 s)."""
    return Tokenizer.from_dir(require(SHARED_DATA / "smollm2-135m-instruct"))
