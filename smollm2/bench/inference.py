"""Inference benchmark: prefill and decode speed of each of our modes, beside transformers and llama.cpp.

    python -m smollm2.bench --modes none,int4 --against transformers     (or `smollm2 bench ...`)

Each configuration runs in its own Python process (a "worker", this module with --worker), so its peak RSS,
load time and compile time are its own and no compiled graph or allocator state carries over. The workers
are set up one after the other (load, warm-up, compile), then timed in rounds: one run of each configuration
per round, in turn, --repeats rounds. Interleaving matters on a shared machine whose speed drifts over
minutes: every configuration sees the same drift, so the ratios between them hold. Per worker:
  load      seconds from nothing to a model ready to run (reading the weights, quantising them)
  compile   seconds of the first decode step beyond a plain one (torch.compile); 0 when not compiled
  prefill   tokens/s over a --prompt-len prompt into an empty cache, last position's logits only
  ttft      time to first token: cache allocation, prefill and picking the first token
  decode    tokens/s over --new-tokens greedy one-token steps (batch 1) after the prompt
  RSS       the process's peak resident memory (VmHWM): "run" after loading (warm-up, compiling and the
            timed runs), "peak" over the whole process (loading converts float weights, so it peaks there)
Every number is the median of the --repeats timed runs, after a warm-up run (which also compiles). The parent
also measures the memory bandwidth (a matrix-vector product over a 512 MiB matrix), and reports for each of
our modes the decode limit that bandwidth sets, bandwidth / bytes of weights read per token, and how close
the mode comes to it.

All configurations decode greedily from the same prompt, so their token ids are comparable: the table says
how many leading new tokens match transformers fp32's (or our fp32's when transformers is not run), and
llama.cpp's when it runs (our quantised modes compute as it does: int8 activations, the GGUF's own blocks).
The last line printed is the whole result as JSON (nanochat's infer_bench convention).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..defaults import BENCH_PEERS as PEERS
from ..defaults import QUANTIZE_MODES as OUR_MODES
from .flops import gpu_peak_tflops, prefill_flops_per_token

# A public-domain paragraph (Dickens, A Tale of Two Cities), repeated to the prompt length.
PROMPT_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way - in short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
    "England; there were a king with a large jaw and a queen with a fair face, on the throne of France. "
)


@dataclass
class Result:
    """One configuration's measurements (medians over the repeats)."""

    name: str  # "ours int4", "transformers fp32", "llama.cpp Q4_1"
    mode: str
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    peak_rss_mb: float  # the whole process, loading included
    run_rss_mb: float  # after loading: warm-up (compiling) and the timed runs
    load_s: float
    compile_s: float
    tokens: list[int]  # the greedy new tokens (the same prompt for everyone)
    prefill_flops_per_token: int | None = None  # set by our workers (the model's config), for MFU on a GPU
    weight_mb_per_token: float | None = None  # weights read by one decode step (ours only)
    decode_runs_tok_s: list[float] = field(default_factory=list)
    prefill_runs_tok_s: list[float] = field(default_factory=list)


def prompt_ids(tokenizer, length: int) -> list[int]:
    """The benchmark prompt: PROMPT_TEXT repeated and cut to exactly `length` token ids."""
    if length < 1:
        raise ValueError(f"--prompt-len must be at least 1, got {length}")
    ids = tokenizer.encode(PROMPT_TEXT, allow_special=False)
    return (ids * (length // len(ids) + 1))[:length]


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Sustained DRAM read bandwidth in GB/s: the best of `repeats` matrix-vector products over a float32 matrix
    much larger than the L3 cache, which is what a one-token decode step does with its weights, so this is
    its speed limit. (A GEMV streams faster than a reduction here: 29-30 GB/s against 22 for `x.sum()`.)"""
    rows = mib * 2**20 // 4 // 2048
    matrix, vector = torch.ones(rows, 2048), torch.ones(2048)
    torch.mv(matrix, vector)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mv(matrix, vector)
        best = min(best, time.perf_counter() - t)
    return matrix.numel() * 4 / best / 1e9


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    through fork and exec, so a worker would report the parent's peak if it was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux: writing 5 to clear_refs); False if unsupported.
    Freed memory is first handed back to the OS (gc, then glibc's malloc_trim), so that the count starts from
    what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


Run = tuple[float, float, float, list[int]]  # one timed run: prefill s, time to first token s, decode s, tokens


@dataclass
class Configuration:
    """One configuration in a worker: loaded, warmed up (and compiled), ready to time with run_once()."""

    name: str
    mode: str
    run_once: Callable[[], Run]
    load_s: float
    compile_s: float
    peak_load_mb: float  # the process's peak while loading (reset afterwards)
    weight_bytes: int | None = None  # per decode step (ours)
    prefill_flops_per_token: int | None = None

    def result(self, runs: list[Run], prompt_len: int, new_tokens: int) -> Result:
        prefill = [prompt_len / r[0] for r in runs]
        decode = [(new_tokens - 1) / r[2] for r in runs]  # the first new token comes from the prefill
        return Result(
            name=self.name, mode=self.mode, prefill_tok_s=statistics.median(prefill),
            decode_tok_s=statistics.median(decode), ttft_s=statistics.median(r[1] for r in runs),
            peak_rss_mb=max(self.peak_load_mb, peak_rss_mb()), run_rss_mb=peak_rss_mb(), load_s=self.load_s,
            compile_s=self.compile_s, tokens=runs[-1][3], decode_runs_tok_s=decode, prefill_runs_tok_s=prefill,
            weight_mb_per_token=None if self.weight_bytes is None else self.weight_bytes / 1e6,
            prefill_flops_per_token=self.prefill_flops_per_token,
        )


# ---- workers: one configuration each, in its own process ---------------------------------------------------


def bench_ours(source: str | None, mode: str, prompt_len: int, new_tokens: int, compile: bool = True,
               device: str = "cpu") -> Configuration:
    """Our model in `mode` (see quantize.py) through the library's own fast path: `load(quantize=mode,
    compile=compile)` and `generate()`, exactly what a user of the README's example runs."""
    from ..inference.generate import generate
    from ..loading import load
    from ..quant.quantize import weight_bytes_per_token

    t = time.perf_counter()
    model, tokenizer = load(source, device=device, quantize=mode, compile=compile)
    _sync(device)
    load_s = time.perf_counter() - t
    peak_load_mb = peak_rss_mb()
    reset_peak_rss()  # from here on: what running needs (loading peaks while float weights are converted)
    ids = prompt_ids(tokenizer, prompt_len)

    def run_once() -> Run:
        t0 = time.perf_counter()
        stream = generate(model, ids, max_new_tokens=new_tokens, ignore_eos=True)
        tokens = [next(stream)]  # the prefill and the first token
        _sync(device)
        t1 = time.perf_counter()
        tokens.extend(stream)  # new_tokens - 1 decode steps
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, t2 - t1, tokens

    run_once()  # the warm-up run; with compile, its first decode step compiles
    compile_s = model.compiled_step.compile_seconds if compile else 0.0
    name = {"none": "ours fp32"}.get(mode, f"ours {mode}") + ("" if compile else " (eager)")
    return Configuration(name, mode, run_once, load_s, compile_s, peak_load_mb, weight_bytes_per_token(model),
                         prefill_flops_per_token(model.config, prompt_len))


def bench_transformers(source: str | None, dtype_name: str, prompt_len: int, new_tokens: int,
                       device: str = "cpu") -> Configuration:
    """transformers' LlamaForCausalLM on the same weights (the GGUF through transformers' own loader)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from ..loading import (
        load_tokenizer,  # ours: the same ids for every configuration
        resolve,
    )

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    t = time.perf_counter()
    kind, path = resolve(source)
    if kind == "gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model = model.to(device).eval()
    _sync(device)
    load_s = time.perf_counter() - t
    tokenizer = load_tokenizer(source)[0]
    peak_load_mb = peak_rss_mb()
    reset_peak_rss()
    ids = torch.tensor([prompt_ids(tokenizer, prompt_len)], device=device)

    @torch.inference_mode()
    def run_once() -> Run:
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        _sync(device)
        t1 = time.perf_counter()
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        _sync(device)
        t2 = time.perf_counter()
        return t1 - t0, t1 - t0, t2 - t1, tokens

    run_once()  # warm-up
    return Configuration(f"transformers {dtype_name}", dtype_name, run_once, load_s, 0.0, peak_load_mb)


def bench_llama_cpp(source: str | None, prompt_len: int, new_tokens: int) -> Configuration:
    """llama.cpp (llama-cpp-python) on the GGUF file itself, with as many threads as torch uses."""
    import llama_cpp

    from ..loading import load_tokenizer, resolve

    kind, path = resolve(source)
    if kind != "gguf":
        raise ValueError(f"llama.cpp needs a .gguf source, got the directory {path}")
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len,
                          n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                          verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt_ids(load_tokenizer(source)[0], prompt_len)
    peak_load_mb = peak_rss_mb()
    reset_peak_rss()

    def run_once() -> Run:
        llm.reset()  # forget the previous run, or generate() would reuse its cached prompt
        t0 = time.perf_counter()
        stream = llm.generate(ids, temp=0.0, top_k=1, reset=True)  # greedy
        tokens = [int(next(stream))]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(int(next(stream)))
        t2 = time.perf_counter()
        stream.close()
        return t1 - t0, t1 - t0, t2 - t1, tokens

    run_once()  # warm-up
    return Configuration("llama.cpp (GGUF as is)", "gguf", run_once, load_s, 0.0, peak_load_mb)


def _set_up(spec: dict) -> Configuration:
    kind = spec.pop("kind")
    if kind == "ours":
        return bench_ours(**spec)
    if kind == "transformers":
        return bench_transformers(**spec)
    if kind == "llama.cpp":
        return bench_llama_cpp(**spec)
    raise ValueError(f"unknown benchmark kind {kind!r}")


def _serve(spec: dict) -> None:
    """The worker: set up, say "ready", then answer each "run" line on stdin with one timed run (JSON) and
    "done" with the Result (JSON)."""
    prompt_len, new_tokens = spec["prompt_len"], spec["new_tokens"]
    configuration = _set_up(spec)
    runs: list[Run] = []
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            runs.append(configuration.run_once())
            print(json.dumps(runs[-1]), flush=True)
        elif line.strip() == "done":
            print(json.dumps(asdict(configuration.result(runs, prompt_len, new_tokens))), flush=True)
            return


# ---- the parent: one worker per configuration, then the table ------------------------------------------


def peers_available() -> dict[str, bool]:
    import importlib.util

    return {"transformers": importlib.util.find_spec("transformers") is not None,
            "llama.cpp": importlib.util.find_spec("llama_cpp") is not None}


class Worker:
    """A configuration's process, driven line by line (see _serve). Its stderr goes to a temporary file, read
    back only to explain a failure (a pipe could fill up and block it). A worker still running `timeout`
    seconds after it started is killed (a hung configuration must not hang the whole benchmark)."""

    def __init__(self, spec: dict, timeout: float = 3600) -> None:
        import tempfile
        import threading

        self.spec, self.timeout, self.timed_out = spec, timeout, False
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "smollm2.bench", "--worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True)
        self._watchdog = threading.Timer(timeout, self._time_out)
        self._watchdog.daemon = True
        self._watchdog.start()
        self._expect("ready")

    def _time_out(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._watchdog.cancel()
            self.stderr.seek(0)
            tail = "\n".join(self.stderr.read().strip().splitlines()[-15:])
            why = f"timed out after {self.timeout:g} s" if self.timed_out else f"exit {self.proc.returncode}"
            raise RuntimeError(f"benchmark worker {self.spec} failed ({why}):\n{tail}")
        return line.strip()

    def _expect(self, word: str) -> None:
        while self._line() != word:  # (a library may print to stdout while loading)
            pass

    def ask(self, command: str) -> object:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while True:
            line = self._line()
            if line.startswith(("[", "{")):
                return json.loads(line)

    def finish(self) -> Result:
        result = Result(**self.ask("done"))
        self.proc.wait()
        self.kill()
        return result

    def kill(self) -> None:
        self._watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def run_bench(
    source: str | None = None,
    modes: tuple[str, ...] = OUR_MODES,
    against: tuple[str, ...] = ("transformers",),
    prompt_len: int = 512,
    new_tokens: int = 64,
    repeats: int = 3,
    compile: bool = True,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Every configuration, each in its own process, timed in interleaved rounds; a JSON-able dict with the
    machine and the results."""
    for mode in modes:
        if mode not in OUR_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(OUR_MODES)}")
    for peer in against:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    if repeats < 1 or new_tokens < 2 or prompt_len < 1:
        raise ValueError(f"need --repeats >= 1, --new-tokens >= 2 and --prompt-len >= 1, got {repeats}, "
                         f"{new_tokens}, {prompt_len}")
    common = dict(source=source, prompt_len=prompt_len, new_tokens=new_tokens)
    skipped = [f"ours {m} (CPU kernels only)" for m in modes if m in ("int8", "int4") and device != "cpu"]
    modes = tuple(m for m in modes if device == "cpu" or m not in ("int8", "int4"))
    specs = [dict(kind="ours", mode=m, compile=compile, device=device, **common) for m in modes]
    available = peers_available()
    for peer in against:
        if not available[peer]:
            skipped.append(f"{peer} (not installed)")
        elif peer == "transformers":
            specs += [dict(kind="transformers", dtype_name=d, device=device, **common) for d in ("fp32", "bf16")]
        elif device != "cpu":
            skipped.append("llama.cpp (CPU only here)")
        else:
            specs.append(dict(kind="llama.cpp", **common))
    bandwidth = measure_bandwidth() if device == "cpu" else None
    workers: list[Worker] = []
    try:
        for spec in specs:  # one at a time: setting up (loading, compiling) uses every core
            if progress:
                progress(f"setting up {spec['kind']} {spec.get('mode', spec.get('dtype_name', ''))}")
            workers.append(Worker(spec))
        for i in range(repeats):  # then one timed run of each, in turn
            if progress:
                progress(f"round {i + 1} of {repeats}")
            for worker in workers:
                worker.ask("run")
        results = [worker.finish() for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    reference = next((r for r in results if r.name == "transformers fp32"),
                     next((r for r in results if r.mode == "none"), None))
    llama = next((r for r in results if r.mode == "gguf"), None)
    flops = next((r.prefill_flops_per_token for r in results if r.prefill_flops_per_token), None)
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    rows = []
    for r in results:
        row = asdict(r)
        if reference is not None:
            row["same_tokens_as"] = reference.name
            row["same_tokens"] = _common_prefix(r.tokens, reference.tokens)
        if llama is not None:  # quantised modes compute as llama.cpp does: compare with it too
            row["same_tokens_as_llama_cpp"] = _common_prefix(r.tokens, llama.tokens)
        if bandwidth and r.weight_mb_per_token:
            row["limit_tok_s"] = bandwidth * 1e3 / r.weight_mb_per_token
            row["fraction_of_limit"] = r.decode_tok_s / row["limit_tok_s"]
        peak = gpu and gpu_peak_tflops(gpu, "bf16" if r.mode == "bf16" else "fp32")
        if peak and flops:  # model FLOPs utilisation of the prefill (decode at batch 1 is bound by memory)
            row["prefill_mfu"] = r.prefill_tok_s * flops / (peak * 1e12)
        rows.append(row)
    return {
        "machine": machine_info(),
        "bandwidth_gb_s": bandwidth,
        "source": source or "bundled SmolLM2-135M-Instruct Q4_1 GGUF",
        "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "device": device,
        "skipped": skipped, "results": rows,
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy continuations share (after the first difference they diverge)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def cpu_and_isa() -> str:
    """The CPU's model name and its vector ISA flags (avx*, amx*, fma, f16c), from /proc/cpuinfo (Linux): the
    line a benchmark's numbers are read with."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return f"{name}, flags " + " ".join(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(report: dict):  # -> rich.table.Table
    from rich.table import Table

    table = Table(title=f"SmolLM2 inference: prompt {report['prompt_len']}, {report['new_tokens']} new tokens, "
                        f"batch 1, greedy, median of {report['repeats']}")
    for col in ("configuration", "prefill tok/s", "decode tok/s", "TTFT ms", "RSS MB run/peak", "load s",
                "compile s", "MB read/tok", "limit tok/s", "of limit", "same tokens"):
        # "same tokens": how many leading greedy tokens equal the reference's (transformers fp32, else ours
        # fp32), then llama.cpp's when it ran
        table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=True)
    mfu = any("prefill_mfu" in r for r in report["results"])
    if mfu:
        table.add_column("prefill MFU", justify="right", no_wrap=True)
    for r in report["results"]:
        limit = r.get("limit_tok_s")
        table.add_row(
            r["name"], f"{r['prefill_tok_s']:.0f}", f"{r['decode_tok_s']:.1f}", f"{r['ttft_s'] * 1e3:.0f}",
            f"{r['run_rss_mb']:.0f} / {r['peak_rss_mb']:.0f}", f"{r['load_s']:.1f}", f"{r['compile_s']:.1f}",
            f"{r['weight_mb_per_token']:.0f}" if r.get("weight_mb_per_token") else "-",
            f"{limit:.0f}" if limit else "-", f"{r['fraction_of_limit']:.0%}" if limit else "-",
            " / ".join(f"{r[k]}" for k in ("same_tokens", "same_tokens_as_llama_cpp") if k in r) or "-",
            *([f"{r['prefill_mfu']:.1%}" if "prefill_mfu" in r else "-"] if mfu else []),
        )
    return table


def worker_main(spec: str) -> int:
    """One configuration's process (see Worker): `python -m smollm2.bench --worker SPEC`, SPEC a JSON object."""
    torch.manual_seed(0)
    _serve(json.loads(spec))
    return 0
