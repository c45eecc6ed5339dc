"""The chat page served at `/`: static/index.html, its style sheet and script, with no external resources.

A page of our own rather than Gradio's ChatInterface: Gradio adds ~40 MB of wheels (12 packages) to the serve
extra, its default theme fetches web fonts from Google (nothing outside loopback is reachable in CI), and it
would talk to the model through its own queue instead of the OpenAI API this server exists to provide. This
page is a client of that API: it streams `/v1/chat/completions` with `fetch` and reads the server-sent events
itself (EventSource cannot POST).

Model output is only ever inserted with `textContent`, never as HTML, so a reply like `<img onerror=...>` shows
as text. The server also sends a Content-Security-Policy without 'unsafe-inline' as a second line of defence
(PAGE_HEADERS). Defaults follow the SmolLM2-Instruct model card (temperature 0.2, top-p 0.9).

The files are package data (pyproject.toml's `serve/static/*`), read through importlib.resources so they are
found in a wheel as well as in a checkout.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

# The page loads only its own script and style: the policy forbids inline script, so even a reply that
# slipped past escaping could not run code.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@dataclass(frozen=True)
class PageFile:
    """One file of the page: the URL path it is served at, its name in static/, and its media type."""

    path: str
    name: str
    media_type: str


# Starlette adds "; charset=utf-8" to each text/* type.
PAGE_FILES = (PageFile("/", "index.html", "text/html"), PageFile("/chat.js", "chat.js", "text/javascript"),
              PageFile("/chat.css", "chat.css", "text/css"))


def read_static(name: str) -> str:
    """The text of static/<name>; a missing file (package data left out of an install) is a clear error."""
    resource = importlib.resources.files("smollm2.serve") / "static" / name
    try:
        return resource.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"the chat page's file {name} is missing from the smollm2 package ({resource}); "
                                "reinstall smollm2 (its package data includes serve/static/*)") from None
