"""Batched quantised matmuls on the AVX2 kernels, before and after: time per call and weight bandwidth.

    .venv/bin/python benchmarks/batched_matmul.py [--before da89079] [--rows 1,4,16,64] [--rounds 3]
                                                  [--step-batch 16] [--no-step]

"before" is the AVX2 kernel sources (smollm2/quant/csrc, kernels.ISAS["avx2"].files) at git revision --before,
"after" those of this checkout. With --vnni, "before" is this checkout's AVX2 build and "after" its AVX-VNNI
build (the same sources with vpdpbusd: kernels.ISAS["avxvnni"]), on a CPU that reports avx_vnni. Each is the
build kernels.py would name for its sources (a hash of them, `kernels.build_name`), so the two live side by
side in torch's extension cache; the old one is compiled from `git show` into a temporary directory if it is
not there yet (~1 minute). One process loads one build (both register the same ops), so every measurement runs
in a worker process of its own, the builds in turn for --rounds rounds (a shared machine drifts: both see the
same drift). The table gives, per build, the median over the rounds of each worker's best pass; the decode
step, the median over rounds of each worker's median step.

For each shape of the real model's matmuls (SmolLM2-135M in int4 mode: q4 per group of 32, the output
projection q8) and each row count M, a call's time is measured with the weights streamed from memory, as in a
decode step (the worker cycles through enough copies of the weights to be far larger than the L3 cache), and
the effective weight bandwidth is the weight bytes (codes, scales, zeros) over that time, beside the machine's
sustained read bandwidth (`smollm2.bench.inference.measure_bandwidth`). Every output of the two builds is
compared bit for bit. The step benchmark runs whole decode steps of the real model in int4 (eager forward,
static KV cache in bf16) for --step-batch rows after a prompt of --prompt-len tokens each, and states the
bytes a step reads (weights once, plus every row's keys and values) against the bandwidth limit.
"""

from __future__ import annotations

import argparse
import hashlib
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
from smollm2.quant import kernels

REPO = Path(__file__).resolve().parents[1]
CSRC = "smollm2/quant/csrc"
# (name, N out, K in, format): the 135M model's matmuls; the fused ones (qkv, gate_up) are what int4 runs
SHAPES = [("o_proj", 576, 576, "q4"), ("k/v_proj", 192, 576, "q4"), ("qkv fused", 960, 576, "q4"),
          ("gate/up_proj", 1536, 576, "q4"), ("gate_up fused", 3072, 576, "q4"), ("down_proj", 576, 1536, "q4"),
          ("lm_head", 49152, 576, "q8")]
STREAM_BYTES = 96e6  # weight copies cycled through per measurement: 3x the 32 MiB L3 of the machines here


def build_of(rev: str | None) -> str:
    """The AVX2 build's name for the sources at git revision rev (None: this checkout), built if missing."""
    isa = kernels.ISAS["avx2"]
    flags = [*isa.cflags, *kernels._LDFLAGS]
    if rev is None:
        return kernels.NAMES["avx2"]
    texts = {f: subprocess.run(["git", "show", f"{rev}:{CSRC}/{f}"], cwd=REPO, check=True, capture_output=True,
                               text=True).stdout for f in isa.files}
    name = kernels.build_name(texts, flags, prefix=isa.prefix)
    if (kernels.build_dir("avx2").parent / name / f"{name}.so").is_file():
        return name
    from torch.utils import cpp_extension

    print(f"building {name} from {rev}'s sources (about a minute)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for f, text in texts.items():
            Path(tmp, f).write_text(text, encoding="utf-8")
        cpp_extension.load(name, sources=[str(Path(tmp, f)) for f in isa.files if f.endswith(".cpp")],
                           extra_cflags=list(isa.cflags), extra_ldflags=kernels._LDFLAGS, is_python_module=False)
    return name


# ---- the worker: one build, all the measurements ---------------------------------------------------------


def load_build(name: str, isa: str) -> None:
    """Make kernels.available() load the build NAME (of the AVX2 sources, for ISA) in this process."""
    kernels.NAMES[isa] = name
    if kernels.isa() != isa or not kernels.available():
        raise SystemExit(f"could not load the {isa} build {name}")


def weights(N: int, K: int, fmt: str, seed: int = 0) -> tuple[list[torch.Tensor], int]:
    """One layer's packed tensors (codes, scales[, zeros]) for a random weight, and their bytes."""
    from smollm2.quant.quantize import Q4Linear, Q8Linear

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05 + torch.linspace(-0.02, 0.02, K)
    layer = (Q4Linear if fmt == "q4" else Q8Linear).from_float(w)
    tensors = [layer.weight, layer.scales] + ([layer.zeros] if fmt == "q4" else [])
    return tensors, sum(t.numel() * t.element_size() for t in tensors)


def call(fmt: str, x: torch.Tensor, tensors: list[torch.Tensor], N: int) -> torch.Tensor:
    op = torch.ops.smollm2.q4_mm if fmt == "q4" else torch.ops.smollm2.q8_mm
    return op(x, *tensors, N)


def time_matmuls(rows: list[int], repeats: int) -> dict:
    """Per shape and M: the seconds per call of the best of `repeats` passes through the weight copies (on a
    shared machine other work only ever adds time), and a hash of the outputs (the same input for both
    builds)."""
    out = {}
    for label, N, K, fmt in SHAPES:
        tensors, nbytes = weights(N, K, fmt)
        copies = [[t.clone() for t in tensors] for _ in range(max(1, min(2000, round(STREAM_BYTES / nbytes))))]
        for M in rows:
            g = torch.Generator().manual_seed(M)
            x = torch.randn(M, K, generator=g)
            x = x if fmt == "q8" else x.to(torch.bfloat16)  # int4 mode: bf16 activations, fp32 into the head
            digest = hashlib.sha256(call(fmt, x, tensors, N).view(torch.int16 if x.dtype == torch.bfloat16
                                                                  else torch.int32).numpy().tobytes()).hexdigest()
            for c in copies:  # warm-up pass (faults the copies' pages in)
                call(fmt, x, c, N)
            per_call = []
            for _ in range(repeats):
                t = time.perf_counter()
                for c in copies:
                    call(fmt, x, c, N)
                per_call.append((time.perf_counter() - t) / len(copies))
            out[f"{label}|{M}"] = {"s": min(per_call), "bytes": nbytes, "hash": digest[:16]}
    return out


def time_step(batch: int, prompt_len: int, steps: int) -> dict:
    """Whole decode steps of the real model in int4 for `batch` rows (eager forward, bf16 KV cache)."""
    import smollm2
    from smollm2.kv_cache import KVCache
    from smollm2.quant.quantize import weight_bytes_per_token

    model, _ = smollm2.load(quantize="int4")
    cfg = model.config
    cache = KVCache(cfg, batch, prompt_len + steps + 4, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g)
    times, tokens = [], []
    with torch.no_grad():
        logits = model(ids, cache=cache, output="last_logits")
        for i in range(steps + 3):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(nxt[:, 0].tolist())
            t = time.perf_counter()
            logits = model(nxt, cache=cache, start=prompt_len + i, output="last_logits")
            if i >= 3:  # three warm-up steps
                times.append(time.perf_counter() - t)
    kv_per_pos = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2  # bytes, one row
    mean_len = prompt_len + 3 + (steps + 1) / 2  # positions attended, averaged over the timed steps
    return {"s": statistics.median(times), "weight_bytes": weight_bytes_per_token(model),
            "kv_bytes": batch * kv_per_pos * mean_len, "tokens": hashlib.sha256(json.dumps(tokens).encode())
            .hexdigest()[:16]}


def worker(spec: dict) -> None:
    load_build(spec["build"], spec["isa"])
    result = {"matmul": time_matmuls(spec["rows"], spec["repeats"])}
    if spec["step_batch"]:
        result["step"] = time_step(spec["step_batch"], spec["prompt_len"], spec["steps"])
    print(json.dumps(result))


# ---- the parent --------------------------------------------------------------------------------------------


def run_worker(spec: dict) -> dict:
    env = {**os.environ, "SMOLLM2_ISA": spec["isa"]}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"worker for {spec['build']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="da89079", help="git revision of the 'before' kernels")
    parser.add_argument("--rows", default="1,4,16,64", help="activation rows M per call")
    parser.add_argument("--rounds", type=int, default=3, help="workers per build, run in turn")
    parser.add_argument("--repeats", type=int, default=5, help="passes through the weight copies per worker")
    parser.add_argument("--step-batch", type=int, default=16, help="rows of the decode-step benchmark")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per worker")
    parser.add_argument("--no-step", action="store_true", help="only the matmuls")
    parser.add_argument("--vnni", action="store_true",
                        help="before = this checkout's AVX2 build, after = its AVX-VNNI build (not --before)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if not kernels.cpu_runs("avxvnni" if args.vnni else "avx2"):
        raise SystemExit(f"this CPU cannot run the {'AVX-VNNI' if args.vnni else 'AVX2'} kernels")
    from smollm2.bench.inference import measure_bandwidth

    if args.vnni:
        for isa in ("avx2", "avxvnni"):
            if not kernels.built(isa):
                raise SystemExit(f"the {isa} build is not there: run python -m smollm2.kernels first")
        isas = {"before": "avx2", "after": "avxvnni"}
        builds = {which: kernels.NAMES[isa] for which, isa in isas.items()}
        args.before = "this checkout, avx2"
    else:
        isas = {"before": "avx2", "after": "avx2"}
        builds = {"before": build_of(args.before), "after": build_of(None)}
    rows = [int(r) for r in args.rows.split(",")]
    print(f"machine: {cpu_and_isa()}, {os.cpu_count()} cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"builds: before = {builds['before']} ({args.before}), after = {builds['after']} (this checkout"
          f"{', avxvnni' if args.vnni else ''})")
    bandwidth = measure_bandwidth()
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for which, name in builds.items():
            spec = {"build": name, "isa": isas[which], "rows": rows, "repeats": args.repeats,
                    "prompt_len": args.prompt_len, "steps": args.steps,
                    "step_batch": 0 if args.no_step else args.step_batch}
            results[which].append(run_worker(spec))
            print(f"  round {r + 1}/{args.rounds}: {which} done", flush=True)
    bandwidth = max(bandwidth, measure_bandwidth())
    print(f"sustained read bandwidth (measure_bandwidth, best of two): {bandwidth:.1f} GB/s; "
          f"load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    def median(which: str, key: str) -> float:
        return statistics.median(run["matmul"][key]["s"] for run in results[which])

    print("\n| matmul (N x K, format) | weight MB | M | before us | after us | speed-up | before GB/s | after GB/s |"
          " after % of bw |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    mismatches = []
    for label, N, K, fmt in SHAPES:
        for M in rows:
            key = f"{label}|{M}"
            nbytes = results["after"][0]["matmul"][key]["bytes"]
            b, a = median("before", key), median("after", key)
            if results["before"][0]["matmul"][key]["hash"] != results["after"][0]["matmul"][key]["hash"]:
                mismatches.append(key)
            print(f"| {label} ({N} x {K}, {fmt}) | {nbytes / 1e6:.3f} | {M} | {b * 1e6:.1f} | {a * 1e6:.1f} | "
                  f"{b / a:.2f}x | {nbytes / b / 1e9:.1f} | {nbytes / a / 1e9:.1f} | "
                  f"{100 * nbytes / a / 1e9 / bandwidth:.0f}% |")
    print("outputs before = after, bit for bit:", "yes, every shape and M" if not mismatches else
          f"NO: {', '.join(mismatches)}")
    if args.no_step:
        return
    step = {w: statistics.median(run["step"]["s"] for run in results[w]) for w in results}
    info = results["after"][0]["step"]
    total = info["weight_bytes"] + info["kv_bytes"]
    limit = total / (bandwidth * 1e9)
    same = len({run["step"]["tokens"] for w in results for run in results[w]}) == 1
    print(f"\ndecode step, int4, batch {args.step_batch}, prompt {args.prompt_len} (eager forward, bf16 KV cache): "
          f"reads {info['weight_bytes'] / 1e6:.1f} MB of weights + {info['kv_bytes'] / 1e6:.1f} MB of KV = "
          f"{total / 1e6:.1f} MB, {limit * 1e3:.2f} ms at {bandwidth:.1f} GB/s")
    for w in ("before", "after"):
        print(f"  {w}: {step[w] * 1e3:.2f} ms/step = {args.step_batch / step[w]:.0f} tok/s, "
              f"{total / step[w] / 1e9:.1f} GB/s = {100 * limit / step[w]:.0f}% of the bandwidth limit")
    print(f"  speed-up {step['before'] / step['after']:.2f}x; greedy tokens of both builds the same: "
          f"{'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
