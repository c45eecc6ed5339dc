"""Training-step benchmark: our SmolLM2-135M step beside a plain transformers LlamaForCausalLM step.

    python benchmarks/train_bench.py                      # every configuration, ~10-15 minutes on 2 cores
    python benchmarks/train_bench.py --configs ours-bf16,hf-bf16 --steps 3

Both sides train the same 135M architecture (SmolLM2-135M's config, random init) on the same batch of 8 x 256
random tokens with the same optimizer: AdamW (fused, lr 3e-3, betas 0.9/0.95, weight decay 0.01) and gradient
clipping at 1.0. One step = forward, loss, backward, clip, optimizer step, zero grad.
  ours  smollm2.train's LossModel: the model's final hidden states go to a chunked linear cross-entropy that
        computes the gradient chunk by chunk (smollm2/train/loss.py), so the 2048 x 49152 logits never exist
        whole, and the optimizer is the training loop's own (make_optimizer).
  hf    LlamaForCausalLM(input_ids, labels=...).loss, transformers' standard path (full logits).
Dtypes: fp32 eager; bf16 = torch.autocast(bfloat16) around forward and loss (weights and optimizer fp32);
compiled = torch.compile of the module (the first step compiles and is excluded from the timing).
--device cuda runs the same steps on a GPU and adds its peak allocated memory and MFU (model FLOPs per token,
6 x parameters + attention, times tokens/s, over the GPU's datasheet peak for the dtype: smollm2.bench).

Each configuration runs in a fresh process, so its peak RSS (VmHWM: weights, gradients, optimizer state,
activations, plus ~0.4 GB of Python and torch) is its own; it is counted over the timed steps (the count is
reset after the warm-up, so compiling is excluded; the peak including warm-up is in the JSON too). tokens/s is
the median over --steps timed steps after --warmup untimed ones. The last stdout line is the whole result as
JSON. ckpt = activation checkpointing per block (benchmark-only here: the training loop has no such knob).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("ours-fp32", "ours-bf16", "ours-bf16-compiled", "ours-bf16-compiled-ckpt", "hf-fp32", "hf-bf16",
           "hf-bf16-compiled")
DEFAULT_CONFIGS = ("ours-fp32", "ours-bf16", "ours-bf16-compiled", "ours-bf16-compiled-ckpt", "hf-fp32", "hf-bf16")
BATCH, SEQ = 8, 256
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 0.01, 1.0


def _batch(vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator)  # inputs and next-token targets


def _step(loss_of, params: list[torch.Tensor], optimizer, bf16: bool, device: torch.device):
    """One training step on a module: forward and loss (bf16 autocast or not), backward, clip, AdamW, zero grad;
    returns the loss (float() waits for the device, so a step's time includes all of its work)."""

    def step(module: torch.nn.Module) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(module)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _ours(bf16: bool, device: torch.device, ckpt: bool = False):
    """(module, step function) for our model and loss. ckpt: activation checkpointing per block (each block
    keeps only its input for the backward pass and recomputes the rest: less memory, one more forward)."""
    from smollm2.config import preset
    from smollm2.model import SmolLM2
    from smollm2.train.config import TrainConfig
    from smollm2.train.loop import LossModel, make_optimizer

    model = SmolLM2(preset("135m")).to(device)
    model.init_weights()
    if ckpt:
        from torch.utils.checkpoint import checkpoint

        for block in model.model.layers:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    core = LossModel(model, torch.bfloat16 if bf16 else torch.float32)
    config = TrainConfig(lr=LR, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY)
    optimizer = make_optimizer(core, config, device)
    tokens = _batch(model.config.vocab_size).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    # LossModel returns the summed cross-entropy
    return core, _step(lambda module: module(x, y) / y.numel(), list(core.parameters()), optimizer, bf16, device)


def _hf(bf16: bool, device: torch.device):
    """(module, step function) for transformers' LlamaForCausalLM with the same architecture."""
    import transformers

    from smollm2.config import preset

    c = preset("135m")
    config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
        initializer_range=c.initializer_range, attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).to(device).train()
    assert model.config.num_key_value_heads == c.num_key_value_heads and model.config.tie_word_embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=True)
    tokens = _batch(c.vocab_size).to(device)
    x = tokens[:, :-1]

    # transformers shifts the labels itself
    return model, _step(lambda module: module(input_ids=x, labels=x).loss, list(model.parameters()), optimizer,
                        bf16, device)


def run_config(name: str, steps: int, warmup: int, device: torch.device) -> dict:
    from smollm2.bench.flops import gpu_peak_tflops, train_flops_per_token
    from smollm2.bench.inference import peak_rss_mb, reset_peak_rss
    from smollm2.config import preset

    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    torch.manual_seed(0)
    side, dtype, *options = name.split("-")
    if side == "ours":
        module, step = _ours(bf16=dtype == "bf16", device=device, ckpt="ckpt" in options)
    else:
        module, step = _hf(bf16=dtype == "bf16", device=device)
    runner = torch.compile(module) if "compiled" in options else module
    t = time.perf_counter()
    losses = [step(runner)]
    first_step_s = time.perf_counter() - t
    for _ in range(warmup - 1):
        losses.append(step(runner))
    peak_with_warmup = peak_rss_mb()
    steady = reset_peak_rss()  # the timed steps' own peak, without compilation's
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(step(runner))
        times.append(time.perf_counter() - t)
    peak_timed = peak_rss_mb() if steady else peak_with_warmup
    tok_s = BATCH * SEQ / statistics.median(times)
    result = {
        "config": name, "device": str(device), "tokens_per_step": BATCH * SEQ,
        "tok_s": tok_s, "step_s": times, "first_step_s": first_step_s,
        "peak_rss_mb": peak_timed, "peak_rss_with_warmup_mb": max(peak_with_warmup, peak_timed),
        "losses": losses,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    if device.type == "cuda":  # the GPU's own memory, and model FLOPs utilisation against its datasheet peak
        result["gpu"] = torch.cuda.get_device_name(device)
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        peak = gpu_peak_tflops(result["gpu"], "bf16" if dtype == "bf16" else "fp32")
        flops = train_flops_per_token(preset("135m"), SEQ)
        result["mfu"] = None if peak is None else tok_s * flops / (peak * 1e12)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from {','.join(CONFIGS)} (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, >= 1 (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result to FILE")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit(f"--steps and --warmup must be >= 1, got {args.steps}, {args.warmup}")
    if args.worker:
        print(json.dumps(run_config(args.worker, args.steps, args.warmup, torch.device(args.device))))
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")
    results = []
    for n in names:
        print(f"running {n} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", n, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{n} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    gpu = args.device.startswith("cuda")
    where = results[0]["gpu"] if gpu and results else f"{torch.get_num_threads()} threads"
    print(f"training step, SmolLM2-135M config, batch {BATCH} x {SEQ} tokens, AdamW, {where}, "
          f"median of {args.steps} steps")
    memory = "peak GPU MB" if gpu else "peak RSS MB"
    print(f"{'config':<24}{'tokens/s':>10}{memory:>13}{'first step s':>14}{'loss first->last':>20}"
          + ("      MFU" if gpu else ""))
    for r in results:
        mfu = f"{r['mfu']:>9.1%}" if r.get("mfu") is not None else ("        -" if gpu else "")
        print(f"{r['config']:<24}{r['tok_s']:>10.1f}{r['peak_gpu_mb' if gpu else 'peak_rss_mb']:>13.0f}"
              f"{r['first_step_s']:>14.1f}{r['losses'][0]:>11.3f} -> {r['losses'][-1]:.3f}{mfu}")
    report = {"batch": BATCH, "seq_len": SEQ, "steps": args.steps, "device": args.device, "results": results}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
