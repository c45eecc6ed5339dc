"""What each quantisation mode costs in quality, on the real SmolLM2-135M-Instruct weights.

    python benchmarks/quant_quality.py [--source PATH] [--tokens 2048] [--new-tokens 32]

perplexity  on a held-out slice of tinyshakespeare (its last ~9k characters, `--tokens` tokens, windows of
            512), relative to fp32 on the same tokens
top-1       teacher-forced greedy agreement: along fp32's greedy continuation of each prompt, the share of
            positions where the mode's most likely next token is fp32's (every position compared, since each
            step sees the same history)
prefix      free-running greedy: the share of new tokens produced before the first difference from fp32's
            continuation (one near-tie flips everything after it, so this is the harsher number)
Timing-free: the numbers are the same on a busy machine. The last stdout line is the result as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Water boils at a temperature of",
]
TINYSHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
# (name, mode, quantize_model keyword arguments)
CONFIGS = [("fp32", "none", {}), ("bf16", "bf16", {}), ("int8", "int8", {}), ("int4", "int4", {}),
           ("int4, int4 head", "int4", {"head": "int4"})]


@torch.inference_mode()
def teacher_forced_matches(model, prompt: list[int], continuation: list[int]) -> int:
    """How many of continuation's tokens are the model's argmax given the prompt and the continuation so far."""
    ids = torch.tensor([prompt + continuation])
    h = model.hidden(ids)[0, len(prompt) - 1 : -1]  # the positions that predict each continuation token
    return int((model.lm_head(h).argmax(-1) == torch.tensor(continuation)).sum())


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=None, help="weights (default: the bundled Q4_1 GGUF)")
    parser.add_argument("--text", type=Path, default=TINYSHAKESPEARE, help="held-out text (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of held-out text (default: %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default: %(default)s)")
    args = parser.parse_args(argv)

    import smollm2
    from smollm2.eval.perplexity import perplexity
    from smollm2.inference.generate import generate
    from smollm2.quant.quantize import quantize_model

    base, tokenizer = smollm2.load(args.source)
    text = args.text.read_text(encoding="utf-8")[-9000:]
    ids = torch.tensor(tokenizer.encode(text, allow_special=False)[: args.tokens])
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    def continuations(model) -> list[list[int]]:
        return [list(generate(model, p, max_new_tokens=args.new_tokens, ignore_eos=True)) for p in prompts]

    rows, reference, base_ppl = [], None, None
    for name, mode, kwargs in CONFIGS:
        model = quantize_model(copy.deepcopy(base), mode, **kwargs)
        ppl = perplexity(model, ids, seq_len=512, batch_size=1).ppl
        outs = continuations(model)
        if reference is None:
            reference, base_ppl = outs, ppl
        total = sum(len(r) for r in reference)
        top1 = sum(teacher_forced_matches(model, p, r) for p, r in zip(prompts, reference, strict=True)) / total
        prefix = sum(_common_prefix(o, r) for o, r in zip(outs, reference, strict=True)) / total
        rows.append({"config": name, "ppl": ppl, "ppl_vs_fp32": ppl / base_ppl - 1, "top1_agreement": top1,
                     "prefix_agreement": prefix})
        print(f"{name:<18} perplexity {ppl:8.3f} ({ppl / base_ppl - 1:+.2%} vs fp32)   "
              f"top-1 agreement {top1:.1%}   identical prefix {prefix:.0%}", flush=True)
    print(json.dumps({"tokens": int(ids.numel()), "prompts": PROMPTS, "new_tokens": args.new_tokens,
                      "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
