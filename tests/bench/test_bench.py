"""`smollm2 bench` (smollm2/bench.py) end to end on a tiny saved model: every configuration runs, the numbers
are consistent with each other, and the last line of output is the JSON report. Speed itself is not asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ORIGINAL_TOKENIZER, require
from smollm2.bench.inference import _common_prefix, prompt_ids
from smollm2.cli import main
from smollm2.config import Config
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.weights import save_pretrained


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer model with the real tokenizer (vocab 49152), saved in the original's layout."""
    tokenizer = Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)
    config = Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = SmolLM2(config)
    model.init_weights()
    path = tmp_path_factory.mktemp("tiny")
    save_pretrained(model, path, tokenizer)
    return path


def test_prompt_is_exactly_the_requested_length() -> None:
    tokenizer = Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)
    for n in (1, 100, 512):
        ids = prompt_ids(tokenizer, n)
        assert len(ids) == n and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert prompt_ids(tokenizer, 512)[:50] == prompt_ids(tokenizer, 100)[:50]
    with pytest.raises(ValueError, match="--prompt-len must be at least 1"):
        prompt_ids(tokenizer, 0)


def test_common_prefix() -> None:
    assert _common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert _common_prefix([1, 2], [1, 2]) == 2 and _common_prefix([5], [1]) == 0


def test_bench_command_end_to_end(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out_file = tmp_path / "bench.json"
    code = main(["bench", "--source", str(tiny_dir), "--modes", "none,int4", "--against", "none",
                 "--prompt-len", "16", "--new-tokens", "5", "--repeats", "2", "--no-compile",
                 "--json", str(out_file)])
    assert code == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    report = json.loads(lines[-1])
    # Set up one after the other, then timed in interleaved rounds (one run of each configuration per round).
    progress = [line for line in captured.err.splitlines() if line.startswith(("setting up ", "round "))]
    assert progress == ["setting up ours none", "setting up ours int4", "round 1 of 2", "round 2 of 2"]
    assert report == json.loads(out_file.read_text())
    assert "ours fp32 (eager)" in "\n".join(lines[:-1])  # the table came first
    assert report["prompt_len"] == 16 and report["bandwidth_gb_s"] > 0
    fp32, int4 = report["results"]
    assert (fp32["mode"], int4["mode"]) == ("none", "int4")
    for r in (fp32, int4):
        assert len(r["tokens"]) == 5 and len(r["decode_runs_tok_s"]) == 2
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["limit_tok_s"] == pytest.approx(report["bandwidth_gb_s"] * 1e3 / r["weight_mb_per_token"])
    assert fp32["same_tokens"] == 5  # the reference (our fp32, with no transformers run) against itself
    assert int4["weight_mb_per_token"] < fp32["weight_mb_per_token"] / 3


def test_a_failing_worker_is_reported(tmp_path: Path) -> None:
    from smollm2.bench.inference import run_bench

    with pytest.raises(RuntimeError, match=r"benchmark worker .* failed \(exit 1\):\n(.|\n)*missing\.gguf"):
        run_bench(source=str(tmp_path / "missing.gguf"), modes=("none",), against=(), prompt_len=4, new_tokens=2,
                  repeats=1, compile=False)


def test_a_hung_worker_is_killed_and_reported() -> None:
    from smollm2.bench.inference import Worker

    spec = dict(kind="ours", source=None, mode="none", prompt_len=4, new_tokens=2, compile=False)
    with pytest.raises(RuntimeError, match=r"failed \(timed out after 0.2 s\)"):
        Worker(spec, timeout=0.2)  # (importing torch alone takes longer)


def test_bench_rejects_unknown_modes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--modes", "int3"])
    assert "unknown --modes value(s) int3" in capsys.readouterr().err


def test_flops_per_token_counts_every_matmul() -> None:
    """The 135M config: 30 blocks of q/k/v/o and gate/up/down, and the tied output projection."""
    from smollm2.bench.flops import prefill_flops_per_token, train_flops_per_token
    from smollm2.config import preset

    config = preset("135m")
    blocks = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3)  # q, o; k, v; gate, up, down
    head = 576 * 49152
    assert blocks + 576 * 49152 + 30 * 576 * 2 + 576 == 134_515_008  # + the (tied) embedding and the norms
    assert train_flops_per_token(config, 256) == 6 * (blocks + head) + 12 * 30 * 576 * 256
    assert prefill_flops_per_token(config, 512) == 2 * blocks + 2 * 30 * 576 * 512  # no output projection


def test_gpu_peak_tflops() -> None:
    from smollm2.bench.flops import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert gpu_peak_tflops("Some Other GPU", "bf16") is None


def test_table_shows_prefill_mfu_on_a_gpu_report_only() -> None:
    from rich.console import Console

    from smollm2.bench.inference import format_table

    row = dict(name="ours bf16", mode="bf16", prefill_tok_s=50000.0, decode_tok_s=300.0, ttft_s=0.01, run_rss_mb=900,
               peak_rss_mb=1400, load_s=3.0, compile_s=20.0, weight_mb_per_token=269.0, same_tokens=64)
    report = dict(prompt_len=512, new_tokens=64, repeats=3, results=[row])

    def render() -> str:
        console = Console(width=300, record=True)
        console.print(format_table(report))
        return console.export_text()

    assert "MFU" not in render()
    row["prefill_mfu"] = 0.0123
    text = render()
    assert "prefill MFU" in text and "1.2%" in text


def test_quantize_is_the_bench_modes_option() -> None:
    from smollm2.cli import build_parser

    assert build_parser().parse_args(["bench", "--quantize", "int4"]).modes == ("int4",)
    assert build_parser().parse_args(["bench", "--modes", "none,bf16"]).modes == ("none", "bf16")
