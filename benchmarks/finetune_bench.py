"""Fine-tuning benchmark: our SFT step, full and LoRA, beside TRL's SFTTrainer + peft on transformers.

    python benchmarks/finetune_bench.py                              # the four configurations, one round
    python benchmarks/finetune_bench.py --steps 3 --warmup 1 --rounds 2 --threads 1
    python benchmarks/finetune_bench.py --configs ours-full,ours-lora   # without the peers

Both sides fine-tune the bundled SmolLM2-135M-Instruct (the Q4_1 GGUF that `smollm2 finetune` starts from,
dequantised to fp32 by smollm2.load; TRL gets the same weights written in the original's layout by
weights.save_pretrained) on the same rows: GSM8K training chats (question as the user turn, answer as the
assistant's) rendered with the model's chat template (train/chat_data.render), packed end to end and cut into
rows of 512 tokens (TRL's "wrapped" packing), the loss on assistant tokens only. Both get the same ids and the
same labels, so step 1's loss must agree. Batch 8 x 512, fp32, one optimizer step per batch (no accumulation),
AdamW lr 1e-3, cosine, no warmup, clip 1.0, the same settings on both sides.
  ours-full / ours-lora   smollm2.train.sft.SFTTrainer, built as `smollm2 finetune` builds it, and its own
                          train_step (forward, chunked assistant-only cross-entropy, backward, clip, AdamW);
                          only its batches are replaced by the fixed rows. LoRA: --lora defaults (rank 16,
                          alpha 32, dropout 0.05 on q,k,v,o,gate,up,down).
  trl-full / trl-lora     trl.SFTTrainer on transformers' LlamaForCausalLM (sdpa attention), the rows passed
                          pre-tokenized (input_ids + labels), sequential sampler; LoRA through peft.LoraConfig
                          with the same rank, alpha, dropout and modules. gradient_checkpointing=False (TRL's
                          SFTConfig defaults to True; we have no such knob, so both run without it).
trl and peft are optional (`pip install -e '.[peers]'`); without them the TRL rows are skipped and said so.

Timing: wall time per optimizer step (ours: around train_step; TRL: between consecutive on_step_end callbacks,
which includes its data collation and per-step logging), median over --steps timed steps after --warmup
untimed ones. Memory: each configuration runs in its own fresh process; peak RSS is the kernel's high-water
mark VmHWM from /proc/self/status (not a sampling thread), reset after the warm-up (writing 5 to
/proc/self/clear_refs, smollm2.bench.inference.reset_peak_rss) so it is the timed steps' own peak: weights,
gradients, optimizer state, activations and the interpreter. The peak including loading and the warm-up is kept
too. --rounds R repeats all configurations R times, interleaved (the order rotates each round); the table shows
the median over rounds. The last stdout line is the whole result as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from smollm2.bench.inference import cpu_and_isa

CONFIGS = ("ours-full", "trl-full", "ours-lora", "trl-lora")
BATCH, SEQ = 8, 512
LR, CLIP = 1e-3, 1.0
LORA_RANK, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05
LORA_TARGETS = "q,k,v,o,gate,up,down"
HF_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "gsm8k" / "train.jsonl"


# ---- the rows both sides train on --------------------------------------------------------------------------


def build_rows(data: Path, n_rows: int, seq: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids, trained) of shape (n_rows, seq): GSM8K chats rendered with the chat template, packed end to end and
    cut at seq tokens; trained marks assistant tokens (the answer and its <|im_end|>). Also the chats used."""
    from smollm2.loading import load_tokenizer
    from smollm2.train.chat_data import render

    tokenizer, _ = load_tokenizer()
    ids: list[int] = []
    trained: list[bool] = []
    chats = 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            messages = [{"role": "user", "content": record["question"]},
                        {"role": "assistant", "content": record["answer"]}]
            piece, marks = render(tokenizer, messages)
            ids += piece
            trained += marks
            chats += 1
            if len(ids) >= n_rows * seq:
                break
    if len(ids) < n_rows * seq:
        raise SystemExit(f"{data}: {len(ids)} tokens, fewer than the {n_rows} x {seq} the steps need")
    shape = (n_rows, seq)
    return (torch.tensor(ids[: n_rows * seq]).view(shape), torch.tensor(trained[: n_rows * seq]).view(shape),
            chats)


def our_batches(ids: torch.Tensor, trained: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, labels) per step, as chat_data.collate makes them: position t predicts ids[t + 1] where that
    token is trained; the last position has no next token in the row (IGNORE), exactly as transformers' shifted
    labels leave it, so both sides average over the same targets."""
    labels = torch.where(trained[:, 1:], ids[:, 1:], IGNORE)
    labels = torch.cat([labels, torch.full((ids.shape[0], 1), IGNORE)], dim=1)
    return [(ids[i : i + batch], labels[i : i + batch]) for i in range(0, ids.shape[0], batch)]


# ---- the workers (each in its own process) ------------------------------------------------------------------


def _ours(lora: bool, work: Path, steps: int, warmup: int, batch: int, seq: int) -> dict:
    from smollm2.bench.inference import peak_rss_mb, reset_peak_rss
    from smollm2.train import dist
    from smollm2.train.sft import SFTTrainer
    from smollm2.train.sft_config import SFTConfig

    rows = torch.load(work / "rows.pt", weights_only=True)
    batches = our_batches(rows["ids"], rows["trained"], batch)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    # SFTTrainer reads its conversations from a file (a few chats, written by the parent); its batches are then
    # replaced by the fixed rows, everything else (model, LoRA, loss, optimizer, the step) is `smollm2 finetune`'s.
    config = SFTConfig(data=str(work / "chats.jsonl"), out=str(run), lora=lora, lora_rank=LORA_RANK,
                       lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, lora_targets=LORA_TARGETS,
                       batch_size=batch, steps=warmup + steps, warmup=0, lr=LR, clip=CLIP,
                       val_fraction=0.0, eval_every=0, sample_every=0, dtype="fp32", device="cpu")
    trainer = SFTTrainer(config, dist.setup("cpu"))
    pending = iter(batches)
    trainer.next_batches = lambda: [next(pending)]
    trainer.step_tokens = lambda step_batches: (sum(x.numel() for x, _ in step_batches),
                                                sum(int((y != IGNORE).sum()) for _, y in step_batches))
    trainable = sum(p.numel() for p in trainer.params)
    times, losses = [], []
    peak_load = peak_rss_mb()
    for step in range(warmup + steps):
        if step == warmup:
            peak_load = peak_rss_mb()
            reset_peak_rss()
        t = time.perf_counter()
        metrics = trainer.train_step(step)
        times.append(time.perf_counter() - t)
        losses.append(metrics["loss"])
    peak = peak_rss_mb()
    return {"step_s": times[warmup:], "warmup_s": times[:warmup], "losses": losses, "peak_rss_mb": peak,
            "peak_rss_with_load_mb": max(peak_load, peak), "trainable": trainable, "optimizer": "torch AdamW fused"}


def _trl(lora: bool, work: Path, steps: int, warmup: int, batch: int, seq: int) -> dict:
    import peft
    import transformers
    import trl
    from datasets import Dataset

    from smollm2.bench.inference import peak_rss_mb, reset_peak_rss

    rows = torch.load(work / "rows.pt", weights_only=True)
    ids, trained = rows["ids"], rows["trained"]
    labels = torch.where(trained, ids, IGNORE)  # unshifted: transformers shifts them itself
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32,
                                                              attn_implementation="sdpa")
    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "hf")
    args = trl.SFTConfig(
        output_dir=str(work / "trl-out"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        max_steps=warmup + steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta2=0.999, max_grad_norm=CLIP, max_length=seq, packing=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, bf16=False, fp16=False, seed=42, disable_tqdm=True,
    )
    peft_config = None
    if lora:
        peft_config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                      target_modules=HF_MODULES, task_type="CAUSAL_LM")
    record: dict = {"times": [], "losses": [], "peak_load": 0.0, "peak": 0.0}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001 (transformers' signature)
            if state.global_step == 0:
                record["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            now = time.perf_counter()
            record["times"].append(now - record["t"])
            if state.global_step == warmup:  # the timed steps' peak starts here
                record["peak_load"] = peak_rss_mb()
                reset_peak_rss()
            if state.global_step == warmup + steps:
                record["peak"] = peak_rss_mb()
            record["t"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                record["losses"].append(float(logs["loss"]))

    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[Timer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    times = record["times"]
    return {"step_s": times[warmup:], "warmup_s": times[:warmup], "losses": record["losses"],
            "peak_rss_mb": record["peak"], "peak_rss_with_load_mb": max(record["peak_load"], record["peak"]),
            "trainable": trainable, "optimizer": str(args.optim),
            "versions": {"transformers": transformers.__version__, "trl": trl.__version__,
                         "peft": peft.__version__}}


def run_worker(name: str, work: Path, steps: int, warmup: int, batch: int, seq: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    side, kind = name.split("-")
    result = (_ours if side == "ours" else _trl)(kind == "lora", work, steps, warmup, batch, seq)
    result.update(config=name, threads=torch.get_num_threads(), torch=torch.__version__,
                  tok_s=batch * seq / statistics.median(result["step_s"]))
    return result


# ---- the parent ---------------------------------------------------------------------------------------------


def missing_peers() -> list[str]:
    return [name for name in ("trl", "peft", "transformers", "datasets") if importlib.util.find_spec(name) is None]


def machine(threads: int) -> str:
    """The CPU and its vector ISA flags, cores, threads and torch version: the line the table is read with."""
    return f"{cpu_and_isa()} | {os.cpu_count()} CPUs | {threads} torch thread(s) | torch {torch.__version__}"


def prepare(work: Path, data: Path, n_rows: int, seq: int, need_hf: bool) -> int:
    """rows.pt (the packed rows), chats.jsonl (for SFTTrainer's constructor) and, for TRL, hf/ (the bundled
    weights in the original's layout); returns the number of chats the rows hold."""
    ids, trained, chats = build_rows(data, n_rows, seq)
    torch.save({"ids": ids, "trained": trained}, work / "rows.pt")
    with open(data, encoding="utf-8") as src, open(work / "chats.jsonl", "w", encoding="utf-8") as dst:
        for _, line in zip(range(16), src, strict=False):
            record = json.loads(line)
            dst.write(json.dumps({"prompt": record["question"], "completion": record["answer"]}) + "\n")
    if need_hf:
        from smollm2.loading import load
        from smollm2.weights import save_pretrained

        model, tokenizer = load(quantize="none")
        save_pretrained(model, work / "hf", tokenizer)
        del model
    return chats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {','.join(CONFIGS)} (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, >= 1 (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's default for this machine)")
    parser.add_argument("--batch-size", type=int, default=BATCH, help="rows per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=SEQ, help="tokens per row (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K train.jsonl (default: %(default)s)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the result to FILE")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.rounds < 1:
        raise SystemExit(f"--steps, --warmup and --rounds must be >= 1, got {args.steps}, {args.warmup}, "
                         f"{args.rounds}")
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.work, args.steps, args.warmup, args.batch_size, args.seq_len,
                                    args.threads)))
        return 0

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    for n in names:
        if n not in CONFIGS:
            raise SystemExit(f"unknown config {n!r}; choose from {', '.join(CONFIGS)}")
    missing = missing_peers()
    if missing and any(n.startswith("trl") for n in names):
        print(f"TRL configurations skipped: {', '.join(missing)} not installed (pip install -e '.[peers]')",
              file=sys.stderr)
        names = [n for n in names if not n.startswith("trl")]
    if not names:
        raise SystemExit("nothing to run")
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data}: no such file (GSM8K's train.jsonl)")
    threads = args.threads or torch.get_num_threads()
    batch, seq = args.batch_size, args.seq_len
    load_before = os.getloadavg()[0]
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as tmp:
        work = Path(tmp)
        print("preparing the rows and weights ...", file=sys.stderr, flush=True)
        need_hf = any(n.startswith("trl") for n in names)
        chats = prepare(work, args.data, (args.warmup + args.steps) * batch, seq, need_hf)
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                print(f"round {r + 1}/{args.rounds}: {n} ...", file=sys.stderr, flush=True)
                cmd = [sys.executable, __file__, "--worker", n, "--work", str(work), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--batch-size", str(batch), "--seq-len", str(seq)]
                cmd += ["--threads", str(args.threads)] if args.threads else []
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{n} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results[n].append(result)
                print(f"  {n}: {result['tok_s']:.1f} tokens/s, peak RSS {result['peak_rss_mb']:.0f} MB, steps "
                      f"{', '.join(f'{s:.1f}' for s in result['step_s'])} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    def median(n: str, key: str) -> float | None:
        values = [r[key] for r in results.get(n, [])]
        return statistics.median(values) if values else None

    print(f"fine-tuning step, SmolLM2-135M-Instruct (bundled weights, fp32), batch {batch} x {seq} tokens of GSM8K "
          f"train chats ({chats} chats packed), AdamW; median of {args.steps} timed steps after {args.warmup} "
          f"warm-up, {args.rounds} round(s); peak RSS = VmHWM of the timed steps, one process per configuration")
    print(f"machine: {machine(threads)} | load average {load_before:.1f} -> {load_after:.1f}")
    versions = next((r["versions"] for n in names for r in results[n] if "versions" in r), None)
    if versions:
        print("peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"{'config':<11}{'tokens/s':>10}{'step s':>9}{'peak RSS MB':>13}{'with load MB':>14}{'trainable':>11}"
          f"{'loss step 1':>13}")
    for n in names:
        if not results[n]:
            print(f"{n:<11}{'failed':>10}")
            continue
        first = results[n][0]
        print(f"{n:<11}{median(n, 'tok_s'):>10.1f}{batch * seq / median(n, 'tok_s'):>9.1f}"
              f"{median(n, 'peak_rss_mb'):>13.0f}{median(n, 'peak_rss_with_load_mb'):>14.0f}"
              f"{first['trainable'] / 1e6:>10.2f}M{first['losses'][0]:>13.4f}")

    def ratio(a: float | None, b: float | None, fmt: str) -> str:
        return format(a / b, fmt) if a is not None and b else "-"

    ratios = {}
    for kind in ("full", "lora"):
        ratios[f"tok_s ours/trl {kind}"] = ratio(median(f"ours-{kind}", "tok_s"), median(f"trl-{kind}", "tok_s"),
                                                 ".2f")
        ratios[f"peak ours/trl {kind}"] = ratio(median(f"ours-{kind}", "peak_rss_mb"),
                                                median(f"trl-{kind}", "peak_rss_mb"), ".2f")
    for side in ("ours", "trl"):
        ratios[f"lora/full peak {side}"] = ratio(median(f"{side}-lora", "peak_rss_mb"),
                                                 median(f"{side}-full", "peak_rss_mb"), ".2f")
    print(f"tokens/s ours/TRL: full {ratios['tok_s ours/trl full']}x, LoRA {ratios['tok_s ours/trl lora']}x | "
          f"peak RSS ours/TRL: full {ratios['peak ours/trl full']}, LoRA {ratios['peak ours/trl lora']} | "
          f"LoRA peak / full peak: ours {ratios['lora/full peak ours']}, TRL {ratios['lora/full peak trl']}")
    report = {"batch": batch, "seq_len": seq, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
              "machine": machine(threads), "load_average": [load_before, load_after], "chats": chats,
              "ratios": ratios, "results": results}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
