"""`smollm2 generate` and `smollm2 chat` run as real processes on the real weights.

Each output is compared with what the library gives for the same options (greedy, or sampled with a seed), so
the test checks the wiring of every flag, not just that something was printed. The CLI's default weights are
int4 (`real_int4`); `--quantize none` gives the exact float model (`real`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from smollm2.inference.generate import chat, stream_text

STATS = re.compile(r"^\[(\d+) prompt tokens, (\d+) new tokens, ([\d.]+) tokens/s(?:, compiled in [\d.]+ s)?, "
                   r"finish: (stop|length)\]$")
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}


def smollm2(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smollm2", *args], input=stdin, capture_output=True, text=True,
                          encoding="utf-8", env=ENV, timeout=600)


def test_bad_options_are_one_line_errors() -> None:
    result = smollm2("generate", "Gravity is", "--top-p", "1.5")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "smollm2 generate: error: top_p must be a number in (0, 1] (1 = off), got 1.5\n"
    result = smollm2("chat", "--temperature", "-1")
    assert result.returncode == 2
    assert result.stderr == "smollm2 chat: error: temperature must be a finite number >= 0 (0 = greedy), got -1.0\n"


@pytest.mark.slow
def test_generate_streams_the_continuation_and_trims_stop_strings(real_int4) -> None:
    model, tokenizer = real_int4  # the default --quantize
    full = "".join(stream_text(model, tokenizer, "Gravity is", max_new_tokens=24))
    stop = full.split()[len(full.split()) // 2]  # a word from the middle of the greedy continuation
    expected = stream_text(model, tokenizer, "Gravity is", max_new_tokens=24, stop=[stop])
    text = "".join(expected)
    assert len(text) < len(full) and expected.finish_reason == "stop"

    result = smollm2("generate", "Gravity is", "--max-new-tokens", "24", "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    stats = STATS.match(result.stderr.strip().splitlines()[-1])
    assert stats is not None, result.stderr
    assert int(stats[1]) == len(tokenizer.encode("Gravity is"))
    assert int(stats[2]) == len(expected.new_ids) and float(stats[3]) > 0 and stats[4] == "stop"


@pytest.mark.slow
def test_generate_chat_mode_with_sampling_flags(real) -> None:
    model, tokenizer = real
    options = dict(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                   seed=7)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a fruit."}]
    expected = chat(model, tokenizer, messages, **options)
    text = "".join(expected)
    result = smollm2("generate", "Name a fruit.", "--chat", "--system", "Answer briefly.", "--max-new-tokens", "16",
                     "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--min-p", "0.05",
                     "--repetition-penalty", "1.1", "--seed", "7", "--quantize", "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    stats = STATS.match(result.stderr.strip().splitlines()[-1])
    assert stats is not None and int(stats[1]) == len(expected.prompt_ids)


@pytest.mark.slow
def test_generate_compiled_step_gives_the_library_tokens(real_int4) -> None:
    """--compile decodes with the compiled step (load(compile=True)): the same greedy text, and the line of
    counts says how long compiling took."""
    model, tokenizer = real_int4
    text = "".join(stream_text(model, tokenizer, "The capital of France is", max_new_tokens=12))
    result = smollm2("generate", "The capital of France is", "--max-new-tokens", "12", "--compile")
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    last = result.stderr.strip().splitlines()[-1]
    assert STATS.match(last) and ", compiled in " in last, result.stderr


@pytest.mark.slow
def test_chat_repl_through_a_pipe(real_int4) -> None:
    model, tokenizer = real_int4  # the default --quantize
    n = 20

    def reply(messages: list[dict[str, str]]) -> str:
        return "".join(chat(model, tokenizer, messages, max_new_tokens=n))

    u1, u2, u3, u4 = "What is the capital of France?", "And of Italy?", "Tell me a joke.", "Hello!"
    r1 = reply([{"role": "user", "content": u1}])
    r2 = reply([{"role": "user", "content": u1}, {"role": "assistant", "content": r1},
                {"role": "user", "content": u2}])
    r3 = reply([{"role": "user", "content": u3}])  # after /reset: no history
    r4 = reply([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": u4}])
    lines = [u1, u2, "/reset", u3, "/system You are a pirate.", "", u4, "/exit", "never read"]
    result = smollm2("chat", "--max-new-tokens", str(n), stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{r1}\n{r2}\n{r3}\n{r4}\n"
    assert "(new conversation)" in result.stderr
    assert "(new conversation, system prompt: You are a pirate.)" in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_without_leaving(real) -> None:
    model, tokenizer = real
    story = "Write a long story about a dragon who learns to fly."
    process = subprocess.Popen([sys.executable, "-m", "smollm2", "chat", "--max-new-tokens", "200",
                                "--quantize", "none"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        process.stdin.write(story.encode() + b"\n")
        process.stdin.flush()
        first = os.read(process.stdout.fileno(), 4096)  # blocks until the reply starts streaming
        assert first
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(b"/reset\nHi\n", timeout=600)
    finally:
        process.kill()
    stdout, stderr = (first + out).decode(), err.decode()
    assert process.returncode == 0, stderr
    assert "[stopped]" in stderr
    hi = "".join(chat(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=200))
    assert stdout.endswith("\n" + hi + "\n")  # the REPL went on and answered the next message
    partial = stdout[: -len(hi) - 2]
    assert partial
    # What was shown is the start of the full reply, and the full reply is longer: it was cut.
    shown = ""
    for piece in chat(model, tokenizer, [{"role": "user", "content": story}], max_new_tokens=200):
        shown += piece
        if len(shown) > len(partial):
            break
    assert shown.startswith(partial) and len(shown) > len(partial)


@pytest.mark.slow
def test_generate_json_schema_prints_json_that_validates(real_int4, tmp_path) -> None:
    pytest.importorskip("llguidance", reason="constrained decoding needs the grammar extra")
    from smollm2.inference.constraints import Constraint

    model, tokenizer = real_int4
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20},
                                               "warm": {"type": "boolean"}},
              "required": ["colour", "warm"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema), encoding="utf-8")
    prompt = "A JSON object about the colour of the sun:"
    expected = "".join(stream_text(model, tokenizer, prompt, max_new_tokens=40,
                                   constraint=Constraint.json_schema(schema)))
    result = smollm2("generate", prompt, "--max-new-tokens", "40", "--json-schema", str(tmp_path / "schema.json"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    value = json.loads(result.stdout)
    assert set(value) == {"colour", "warm"} and isinstance(value["warm"], bool)

    bad = smollm2("generate", prompt, "--json-schema", str(tmp_path / "missing.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("smollm2 generate: error: cannot read the JSON schema")
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    bad = smollm2("generate", prompt, "--json-schema", str(tmp_path / "broken.json"))
    assert bad.returncode == 2 and "the JSON schema is not valid JSON" in bad.stderr
