"""What a constraint costs per token: llguidance's token mask on our 49152-token vocabulary beside a decode step.

    .venv/bin/python benchmarks/grammar_mask.py [--quantize int4] [--xgrammar]

Generates JSON for a schema with the real weights (greedy) and times, per new token, the mask of allowed tokens
(llguidance computing it and applying it to the logits) and the decode step itself; prints medians and p99.
With --xgrammar (if installed: it needs transformers and triton) also times xgrammar's mask over the same tokens,
for the choice between the two engines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import smollm2
from smollm2.inference.constraints import Constraint
from smollm2.inference.generate import decode_step, prefill
from smollm2.kv_cache import KVCache

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}},
    "required": ["name", "age", "tags", "address"]}


def p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantize", default="int4")
    parser.add_argument("--xgrammar", action="store_true")
    args = parser.parse_args()
    model, tokenizer = smollm2.load(quantize=args.quantize)
    messages = [{"role": "user", "content": "Describe a person called Ada as JSON: name, age, email, tags, address."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    constraint = Constraint.json_schema(SCHEMA)
    t0 = time.perf_counter()
    mask = constraint.matcher(tokenizer, model.config.vocab_size, [2])
    setup = time.perf_counter() - t0
    masks, steps, ids = [], [], list(prompt)
    cache = KVCache(model.config, 1, len(prompt) + 200, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        logits = prefill(model, torch.tensor([prompt]), cache)
        for _ in range(200):
            t0 = time.perf_counter()
            token = int(mask.apply(logits).argmax())
            masks.append(time.perf_counter() - t0)
            if token == 2:
                break
            mask.consume(token)
            ids.append(token)
            if mask.complete:
                break
            t0 = time.perf_counter()
            logits = decode_step(model, torch.tensor([[token]]), cache, len(ids) - 1, None, None)
            steps.append(time.perf_counter() - t0)
    text = tokenizer.decode(ids[len(prompt):])
    print(repr(text[:200]))
    print(f"{len(masks)} tokens of JSON; llguidance vocabulary setup {setup:.1f} s (once per process)")
    print("| per token | median ms | p99 ms |")
    print("|---|---:|---:|")
    print(f"| llguidance mask + apply | {statistics.median(masks) * 1e3:.3f} | {p(masks, 0.99) * 1e3:.3f} |")
    print(f"| decode step, {args.quantize}, eager | "
          f"{statistics.median(steps) * 1e3:.1f} | {p(steps, 0.99) * 1e3:.1f} |")
    if args.xgrammar:
        import xgrammar as xgr

        vocab = [""] * model.config.vocab_size
        for piece, i in tokenizer.backend.get_vocab(with_added_tokens=True).items():
            if i < len(vocab):
                vocab[i] = piece
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, stop_token_ids=[2])
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")))
        bitmask = xgr.allocate_token_bitmask(1, model.config.vocab_size)
        times = []
        for token in ids[len(prompt):]:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask)
            times.append(time.perf_counter() - t0)
            matcher.accept_token(token)
        print(f"| xgrammar mask (no apply) | {statistics.median(times) * 1e3:.3f} | {p(times, 0.99) * 1e3:.3f} |")


if __name__ == "__main__":
    main()
