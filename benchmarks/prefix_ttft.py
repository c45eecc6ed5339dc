"""Time to first token with and without the engine's prefix cache, for requests sharing a long system prompt.

    .venv/bin/python benchmarks/prefix_ttft.py [--quantize none|int4] [--system-tokens 500] [--repeats 5]

Each round sends a request with a fresh question after the same system prompt (rendered with the chat template)
to an engine with the prefix cache (after one warm-up request that fills it) and to one without, in turn, and
times submit -> first token. Prints the medians, their ratio and the machine.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

import smollm2
from smollm2.bench.inference import cpu_and_isa
from smollm2.inference.config import GenerationConfig
from smollm2.inference.engine import Engine

QUESTIONS = ["Where are the wood screws?", "Do you sell garden hoses?", "What is a torque wrench for?",
             "Which aisle has light bulbs?", "Can I buy paint brushes here?", "Where do I find pipe tape?",
             "Do you have cordless drills?", "What size nails hang a picture?"]


def ttft(engine: Engine, prompt: list[int]) -> tuple[float, int]:
    first, done = threading.Event(), threading.Event()

    def on_event(kind: str, value: object) -> None:
        if kind == "text":
            first.set()
        else:
            first.set()
            done.set()

    start = time.perf_counter()
    job = engine.submit(prompt, GenerationConfig(max_new_tokens=4), on_event)
    first.wait(120)
    seconds = time.perf_counter() - start
    done.wait(120)
    return seconds, job.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--system-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = smollm2.load(quantize=args.quantize)
    sentence = "You help customers of a hardware shop find what they need and answer briefly. "
    system = sentence * (args.system_tokens // len(tokenizer.encode(sentence)) + 1)
    system = tokenizer.decode(tokenizer.encode(system)[: args.system_tokens])

    def prompt(question: str) -> list[int]:
        return tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": question}], tokenize=True)

    cached, plain = Engine(model, tokenizer), Engine(model, tokenizer, prefix_cache_mb=0)
    cached.start()
    plain.start()
    try:
        ttft(cached, prompt("Hello?"))  # fills the cache (and warms both paths up)
        ttft(plain, prompt("Hello?"))
        hit, miss, reused = [], [], []
        for i in range(args.repeats):
            question = QUESTIONS[i % len(QUESTIONS)] + f" ({i})"
            seconds, tokens = ttft(cached, prompt(question))
            hit.append(seconds)
            reused.append(tokens)
            miss.append(ttft(plain, prompt(question))[0])
    finally:
        cached.shutdown()
        plain.shutdown()
    n = len(prompt(QUESTIONS[0]))
    print(f"prompt {n} tokens ({args.system_tokens}-token system prompt), quantize={args.quantize}, "
          f"median of {args.repeats} interleaved rounds")
    print("| engine | time to first token, ms | prompt tokens reused |")
    print("|---|---:|---:|")
    print(f"| prefix cache off | {statistics.median(miss) * 1e3:.0f} | 0 |")
    print(f"| prefix cache on (hit) | {statistics.median(hit) * 1e3:.0f} | {statistics.median(reused):.0f} |")
    print(f"ratio off / on: {statistics.median(miss) / statistics.median(hit):.1f}x")
    print(f"{cpu_and_isa()}; {torch.get_num_threads()} torch threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
