"""Load test of `smollm2 serve` on loopback: many concurrent streaming chat requests through the OpenAI client.

    python benchmarks/load_test.py                      # 64 streams of 64 tokens, the server's default batch
    python benchmarks/load_test.py --requests 8 --max-tokens 16 --out /tmp/serve_bench.md

It starts the server as a subprocess (the real bundled model unless --source), then:
  1. one request alone (the single-client baseline: its decode tokens/s);
  2. --requests concurrent streaming chat requests at temperature 0, each a different question;
  3. the same requests again, non-streamed and concurrent: each reply must equal its streamed twin;
  4. idle: no request for the engine's idle_release_s (plus a margin), after which the engine frees its KV cache
     and hands the freed heap back (engine.py): the resident memory must fall back towards where it started;
  5. SIGTERM: the server must drain and exit 0.
It reports errors, mismatches, time to first token (p50/p99), total tokens/s, and the server's resident memory
before, after the burst, after the idle wait and at its peak, prints a table and writes it to --out (Markdown).
The exit status is 1 if any request failed or differed from its twin, or the server did not exit cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import torch

from smollm2.bench.inference import cpu_and_isa
from smollm2.defaults import DEFAULT_QUANTIZE
from smollm2.inference.engine import DEFAULT_MAX_BATCH, IDLE_RELEASE_S

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "cats", "the moon", "bread", "rain", "mountains", "coffee", "trains", "music", "winter",
          "bees", "libraries", "the desert", "bicycles", "volcanoes", "tea", "owls", "clouds", "chess", "rivers",
          "gardens", "snow", "lighthouses", "maps", "apples", "thunder", "forests", "kites", "islands", "clocks",
          "dolphins", "autumn"]
FORMS = ["Write one sentence about {}.", "Give me a fun fact about {}."]


@dataclass
class Result:
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    ttft: float | None = None  # seconds from sending to the first piece of text
    seconds: float = 0.0
    error: str | None = None


def questions(n: int) -> list[str]:
    all_questions = [form.format(topic) for form in FORMS for topic in TOPICS]
    return [all_questions[i % len(all_questions)] + ("" if i < len(all_questions) else f" ({i})") for i in range(n)]


async def ask(api: openai.AsyncOpenAI, model: str, question: str, max_tokens: int, stream: bool) -> Result:
    result, start = Result(), time.perf_counter()
    messages = [{"role": "user", "content": question}]
    try:
        if stream:
            pieces = []
            response = await api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
            async for chunk in response:
                if chunk.usage:
                    result.completion_tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                if chunk.choices[0].delta.content:
                    if result.ttft is None:
                        result.ttft = time.perf_counter() - start
                    pieces.append(chunk.choices[0].delta.content)
                result.finish_reason = chunk.choices[0].finish_reason or result.finish_reason
            result.text = "".join(pieces)
        else:
            response = await api.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                         temperature=0)
            result.text = response.choices[0].message.content
            result.completion_tokens = response.usage.completion_tokens
            result.finish_reason = response.choices[0].finish_reason
    except Exception as e:  # a benchmark counts failures rather than stopping at the first
        result.error = f"{type(e).__name__}: {e}"
    result.seconds = time.perf_counter() - start
    return result


async def run_all(url: str, model: str, prompts: list[str], max_tokens: int,
                  stream: bool) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=1800)) as api:
        start = time.perf_counter()
        results = await asyncio.gather(*(ask(api, model, q, max_tokens, stream) for q in prompts))
        return list(results), time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def memory(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of a process, in MiB."""
    rss = psutil.Process(pid).memory_info().rss / 2**20
    peak = rss
    with open(f"/proc/{pid}/status") as f:  # VmHWM: the peak resident set size (Linux)
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return rss, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="per request (default: %(default)s)")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_BATCH,
                        help="the server's batch size (default: the server's, %(default)s)")
    parser.add_argument("--source", default=None, help="model source (default: the bundled GGUF)")
    parser.add_argument("--out", type=Path, default=REPO / "notes" / "serve_bench.md", help="Markdown report")
    args = parser.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "smollm2", "serve", "--port", str(port), "--max-concurrency",
               str(args.max_concurrency), "--max-queue", str(args.requests), "--model-name", "bench"]
    if args.source:
        command += ["--source", args.source]
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                print(server.stderr.read().decode(), file=sys.stderr)
                raise SystemExit("the server exited during startup")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start within 300 s")
            time.sleep(0.5)
        rss_before, _ = memory(server.pid)
        prompts = questions(args.requests)

        print(f"server up (pid {server.pid}, {rss_before:.0f} MiB); one request alone ...", flush=True)
        asyncio.run(run_all(url, "bench", prompts[:1], 4, stream=False))  # warm-up
        (alone,), _ = asyncio.run(run_all(url, "bench", prompts[:1], args.max_tokens, stream=True))
        alone_rate = (alone.completion_tokens - 1) / (alone.seconds - alone.ttft) if alone.ttft else float("nan")

        print(f"{args.requests} concurrent streaming requests ...", flush=True)
        streamed, streamed_wall = asyncio.run(run_all(url, "bench", prompts, args.max_tokens, stream=True))
        print(f"{args.requests} concurrent non-streamed twins ...", flush=True)
        twins, twins_wall = asyncio.run(run_all(url, "bench", prompts, args.max_tokens, stream=False))
        rss_after, rss_peak = memory(server.pid)
        stats = httpx.get(f"{url}/health", timeout=10).json()
        idle_wait = IDLE_RELEASE_S + 5  # the engine's own idle timer, then time for the release itself
        print(f"idle for {idle_wait:.0f} s (the KV cache is freed after {IDLE_RELEASE_S:.0f} s) ...", flush=True)
        time.sleep(idle_wait)
        rss_idle, _ = memory(server.pid)

        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    errors = [r.error for r in streamed + twins if r.error]
    mismatches = sum(s.error is None and t.error is None and s.text != t.text
                     for s, t in zip(streamed, twins, strict=True))
    ttfts = [r.ttft for r in streamed if r.ttft is not None]
    tokens = sum(r.completion_tokens for r in streamed)
    rows = [
        ("requests (streamed, concurrent)", f"{args.requests} x {args.max_tokens} max tokens, temperature 0"),
        ("server batch (--max-concurrency)", str(args.max_concurrency)),
        ("errors", f"{len(errors)}"),
        ("streamed == non-streamed twin", f"{args.requests - mismatches - len(errors)}/{args.requests}"),
        ("finish reasons", ", ".join(f"{k}: {v}" for k, v in sorted(
            {r: sum(x.finish_reason == r for x in streamed) for r in {x.finish_reason for x in streamed}}.items(),
            key=lambda kv: str(kv[0])))),
        ("TTFT p50 / p99", f"{percentile(ttfts, 50):.2f} s / {percentile(ttfts, 99):.2f} s" if ttfts else "-"),
        ("completion tokens (streamed phase)", f"{tokens}"),
        ("wall time (streamed phase)", f"{streamed_wall:.1f} s"),
        ("total tokens/s, concurrent", f"{tokens / streamed_wall:.1f}"),
        ("tokens/s, one request alone", f"{alone_rate:.1f} (decode; TTFT {alone.ttft or float('nan'):.2f} s)"),
        ("wall time (non-streamed twins)", f"{twins_wall:.1f} s"),
        ("server peak batch", str(stats.get("peak_batch"))),
        ("server RSS before / after the burst / peak", f"{rss_before:.0f} / {rss_after:.0f} / {rss_peak:.0f} MiB"),
        (f"server RSS after {idle_wait:.0f} s idle", f"{rss_idle:.0f} MiB"),
        ("SIGTERM", f"exit status {exit_code}"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for error in errors[:5]:
        print("error:", error)

    load = os.getloadavg()
    report = [
        "# Serving load test",
        "",
        f"`python benchmarks/load_test.py --requests {args.requests} --max-tokens {args.max_tokens} "
        f"--max-concurrency {args.max_concurrency}` ({datetime.date.today()}): `smollm2 serve` with "
        f"{args.source or 'the bundled SmolLM2-135M-Instruct'} (its defaults: --quantize {DEFAULT_QUANTIZE}, "
        "compiled decode step) on loopback, "
        "driven by the official `openai` client (AsyncOpenAI).",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_and_isa()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min: the machine is "
        "shared, so absolute speeds vary; compare rows of one run).",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in rows],
        "",
        "TTFT is measured by the client, from sending the request to the first piece of text; with more requests "
        "than batch rows it includes the time spent waiting for a row. Total tokens/s counts completion tokens "
        "of the streamed phase over its wall time.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report))
    print(f"\nwrote {args.out}")
    return 0 if not errors and not mismatches and exit_code == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
