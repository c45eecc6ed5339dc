"""The chat page at `/`, driven in a real headless browser: Debian's chromium through Playwright.

Needs `pip install playwright` (the Python package only: Playwright's own browser download does not work
here) and `apt-get install chromium` (/usr/bin/chromium).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serve_utils import instruct_tokenizer, live_server, tiny_model

from conftest import REPO

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect  # waits by polling from Python: the page's CSP forbids the eval wait_for_function uses

from smollm2.inference.config import GenerationConfig  # noqa: E402
from smollm2.serve import create_app  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):  # CI installs it (.ci/run): a missing browser there is a failure, not a skip
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert errors == []  # no script errors on the page


def set_value(page, selector: str, value: str) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def send(page, text: str) -> str:
    """Type a message, press Enter, wait for the reply to finish; the reply's text."""
    count = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").nth(count)
    reply.and_(page.locator("[data-done=true]")).wait_for(timeout=120_000)
    return reply.locator(".content").text_content()


def record_streaming(page) -> None:
    """Keep every length the last assistant message's text goes through, in window.lengths."""
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const all = document.querySelectorAll('.msg.assistant .content');
            if (all.length) window.lengths.push(all[all.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")


@pytest.mark.slow
def test_chat_page_streams_and_keeps_the_conversation(real, page, tmp_path):
    model, tokenizer = real
    with live_server(create_app(model, tokenizer)) as url:
        page.goto(url)
        expect(page.locator("#model")).to_have_text("SmolLM2-135M-Instruct")
        page.fill("#system", "You are a concise assistant.")
        set_value(page, "#temperature", "0")
        assert page.text_content("#temperature-value") == "0"
        page.fill("#max_tokens", "20")
        record_streaming(page)

        first = send(page, "What is the capital of France?")
        lengths = page.evaluate("window.lengths")
        assert len({n for n in lengths if 0 < n < len(first)}) >= 2, lengths  # it grew piece by piece
        assert re.fullmatch(r"\d+ tokens · [\d.]+ tokens/s · first token [\d.]+ s", page.text_content("#speed"))

        second = send(page, "And of Germany?")
        api = httpx.Client(base_url=f"{url}/v1", timeout=120)
        messages = [{"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": "What is the capital of France?"}]

        def reply(messages: list[dict]) -> str:
            body = {"model": "SmolLM2-135M-Instruct", "messages": messages, "temperature": 0, "max_tokens": 20}
            return api.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        assert first == reply(messages)  # the page sent the system prompt and settings
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
        assert second == reply(messages)  # and the whole conversation on the second turn
        assert page.locator(".msg.user .content").all_text_contents() == ["What is the capital of France?",
                                                                          "And of Germany?"]

        screenshot = tmp_path / "chat_page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 10_000
        if os.environ.get("SMOLLM2_SCREENSHOT"):  # to look at it: SMOLLM2_SCREENSHOT=/tmp/page.png pytest ...
            shutil.copy(screenshot, os.environ["SMOLLM2_SCREENSHOT"])


INJECTION = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b> & done'


@dataclass
class StubJob:
    """What the server reads of an engine.Job: the prompt, its config, the new ids, logprobs, finish reason, and
    how many prompt tokens the prefix cache gave."""

    prompt_ids: list[int]
    config: GenerationConfig = field(default_factory=GenerationConfig)
    new_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


class StubEngine:
    """Stands in for the Engine: every request gets the same reply, a string full of HTML."""

    context_length = 2048

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def cancel(self, job: StubJob) -> None: ...

    def stats(self) -> dict:
        return {}

    def submit(self, prompt_ids, config, on_event) -> StubJob:
        job = StubJob(list(prompt_ids), config)

        def reply() -> None:
            for piece in (INJECTION[:20], INJECTION[20:]):
                job.new_ids.append(0)
                on_event("text", piece)
            job.finish_reason = "stop"
            on_event("done", "stop")

        threading.Thread(target=reply).start()
        return job


def test_chat_page_escapes_html(page):
    with live_server(create_app(tiny_model(), instruct_tokenizer(), model_name="stub", engine=StubEngine())) as url:
        response = httpx.get(url, timeout=30)
        assert "'unsafe-inline'" not in response.headers["content-security-policy"]
        assert response.headers["content-security-policy"].startswith("default-src 'self'")
        page.goto(url)
        expect(page.locator("#model")).to_have_text("stub")
        assert send(page, "<i>hello</i>") == INJECTION  # shown as the text it is
        assert page.locator(".msg.user .content").text_content() == "<i>hello</i>"
        assert page.locator("#messages img, #messages script, #messages b, #messages i").count() == 0
        assert page.evaluate("window.pwned") is None


def test_chat_page_api_key(page):
    with live_server(create_app(tiny_model(), instruct_tokenizer(), model_name="tiny", api_key="sesame")) as url:
        page.goto(url)
        expect(page.locator("#model")).to_contain_text("model unavailable: You didn't provide an API key")
        page.fill("#api_key", "sesame")
        page.dispatch_event("#api_key", "change")
        expect(page.locator("#model")).to_have_text("tiny")
        page.fill("#max_tokens", "5")
        assert send(page, "hi")  # the random model says something, with the key
        assert page.locator(".msg.error").count() == 0
        page.fill("#api_key", "wrong")
        send(page, "hi again")
        error = page.locator(".msg.assistant").nth(1)
        assert "error" in error.get_attribute("class") and "Incorrect API key" in error.text_content()


def test_space_app_binds_all_interfaces_only_on_a_space():
    spec = importlib.util.spec_from_file_location("space_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # importing it must not load the model or start a server
    assert app.bind_address({}) == ("127.0.0.1", 7860)
    assert app.bind_address({"SPACE_ID": "user/smollm2"}) == ("0.0.0.0", 7860)
    assert app.bind_address({"SPACE_ID": "user/smollm2", "PORT": "9000"}) == ("0.0.0.0", 9000)
    assert app.bind_address({"HOST": "127.0.0.2"}) == ("127.0.0.2", 7860)
