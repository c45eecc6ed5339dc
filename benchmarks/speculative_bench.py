"""Prompt-lookup speculative decoding against plain decoding, on the real weights (issue 14, item 4).

    nice -n 19 .venv/bin/python benchmarks/speculative_bench.py [--modes none,int4] [--new-tokens 96] [--rounds 3]

A fixed set of chat prompts: six input-grounded ones (summarise, extract, rewrite, edit code, ...: the reply
copies from the prompt, where drafting pays) and three open-ended ones (where drafts are mostly wrong and
speculation must back off so as not to cost). For each mode (fp32 = "none", int4) and prompt, greedy
decoding runs plain and with speculative="prompt-lookup", interleaved: plain, speculative, next prompt, ...,
then the next round, so drift on a shared machine hits both alike. Decode tokens/s counts the tokens after
the first (which the prefill gives) over the time from the first token to the last; the table shows the
median over the rounds, their ratio, the share of drafted tokens accepted, and whether the speculative tokens
equalled plain greedy's in every round. The machine line gives the CPU, its SIMD flags, the load average
(the machine may be shared) and the measured memory bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import smollm2
from smollm2.bench.inference import machine_info, measure_bandwidth

PARAGRAPH = (
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres over an area of approximately 344,400 square "
    "kilometres. The reef is located in the Coral Sea, off the coast of Queensland, Australia. It can be seen "
    "from outer space and is the world's biggest single structure made by living organisms. This reef "
    "structure is composed of and built by billions of tiny organisms, known as coral polyps."
)
PEOPLE = (
    "Alice Johnson moved to Berlin in 2019 to work as an engineer. Her brother, Tom Johnson, stayed in "
    "Chicago, where he teaches history. Their friend Maria Lopez lives in Madrid and runs a bakery, and "
    "Kenji Sato, a photographer, splits his time between Tokyo and Osaka."
)
CODE = (
    "def average(values):\n"
    "    total = 0\n"
    "    count = 0\n"
    "    for value in values:\n"
    "        total = total + value\n"
    "        count = count + 1\n"
    "    if count == 0:\n"
    "        return 0\n"
    "    return total / count\n"
)
CODE_2 = (
    "def find_user(users, name):\n"
    "    for user in users:\n"
    "        if user['name'] == name:\n"
    "            return user\n"
    "    return None\n"
)

# (name, kind, user message)
PROMPTS = (
    ("summarise", "grounded", f"Summarise this paragraph in two sentences, using its own words:\n\n{PARAGRAPH}"),
    ("extract", "grounded", f"List every person in this text with the city they live in, one per line, as "
                            f"'Name: City'.\n\n{PEOPLE}"),
    ("rewrite", "grounded", f"Rewrite this paragraph, replacing 'reef' with 'Reef System' and changing nothing "
                            f"else:\n\n{PARAGRAPH}"),
    ("repeat", "grounded", f"Repeat the following text exactly, word for word:\n\n{PEOPLE}"),
    ("edit code", "grounded", f"Rename the function `average` to `mean` in this Python code and return the "
                              f"whole code:\n\n```python\n{CODE}```"),
    ("edit code 2", "grounded", f"Add a docstring to this Python function and return the whole function:\n\n"
                                f"```python\n{CODE_2}```"),
    ("story", "open", "Write a short story about a dragon who learns to bake bread."),
    ("explain", "open", "Explain why the sky is blue to a ten-year-old."),
    ("advice", "open", "Give me five tips for staying focused while studying."),
)


def cpu_flags() -> list[str]:
    """The SIMD flags that matter for our kernels, as /proc/cpuinfo reports them."""
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return []
    wanted = ("avx", "fma", "f16c", "amx", "vnni")
    return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(wanted) or any(w in f for w in wanted))


def run_once(model, prompt_ids: list[int], new_tokens: int, speculative: str | None) -> tuple[list[int], float, object]:
    """(tokens, decode tokens/s after the first token, speculation stats) for one greedy generation."""
    stream = smollm2.generate(model, prompt_ids, max_new_tokens=new_tokens, speculative=speculative)
    tokens, first = [], None
    for token in stream:
        tokens.append(token)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    speed = (len(tokens) - 1) / (end - first) if len(tokens) > 1 and end > first else float("nan")
    return tokens, speed, stream.speculation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="none,int4", help="comma-separated quantize modes (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=96, help="max new tokens per reply (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, median taken (default: %(default)s)")
    args = parser.parse_args()

    info = machine_info()
    load1, load5, _ = os.getloadavg()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']} "
          f"({info['capability']}), SIMD flags: {' '.join(cpu_flags())}")
    print(f"memory bandwidth {measure_bandwidth():.1f} GB/s; load average {load1:.1f} (1 min), {load5:.1f} (5 min) "
          f"at the start; greedy, up to {args.new_tokens} new tokens, median of {args.rounds} interleaved rounds")

    header = (f"{'mode':5} {'prompt':12} {'kind':8} {'new':>4} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} "
              f"{'accepted':>9} {'identical':>9}")
    rows = []
    for mode in args.modes.split(","):
        model, tokenizer = smollm2.load(quantize=mode)
        model.eval()
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True) for _, _, text in PROMPTS]
        run_once(model, prompts[0], 8, None)  # warm-up (kernels, allocator)
        run_once(model, prompts[0], 8, "prompt-lookup")
        plain = {i: [] for i in range(len(PROMPTS))}
        spec = {i: [] for i in range(len(PROMPTS))}
        for _ in range(args.rounds):
            for i, ids in enumerate(prompts):
                plain[i].append(run_once(model, ids, args.new_tokens, None))
                spec[i].append(run_once(model, ids, args.new_tokens, "prompt-lookup"))
        name = "fp32" if mode == "none" else mode
        for i, (prompt_name, kind, _) in enumerate(PROMPTS):
            p = statistics.median(speed for _, speed, _ in plain[i])
            s = statistics.median(speed for _, speed, _ in spec[i])
            stats = spec[i][-1][2]
            same = all(a[0] == b[0] for a, b in zip(plain[i], spec[i], strict=True))
            rows.append((name, prompt_name, kind, len(spec[i][-1][0]), p, s, s / p, stats.acceptance, same))
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    print()
    print(header)
    print("-" * len(header))
    for name, prompt_name, kind, new, p, s, ratio, acceptance, same in rows:
        print(f"{name:5} {prompt_name:12} {kind:8} {new:>4} {p:>11.1f} {s:>10.1f} {ratio:>5.2f}x {acceptance:>9.0%} "
              f"{'yes' if same else 'NO':>9}")
    for name in dict.fromkeys(r[0] for r in rows):
        for kind in ("grounded", "open"):
            ratios = [r[6] for r in rows if r[0] == name and r[2] == kind]
            print(f"{name} {kind}: median ratio {statistics.median(ratios):.2f}x "
                  f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    load1, load5, _ = os.getloadavg()
    print(f"load average at the end: {load1:.1f} (1 min), {load5:.1f} (5 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
