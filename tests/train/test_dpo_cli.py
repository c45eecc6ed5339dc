"""`smollm2 dpo` on the command line: --help without torch, a run and its resume, bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import metrics, one_thread  # noqa: F401 (fixture)

from smollm2.cli import main
from smollm2.config import Config
from smollm2.loading import load_tokenizer
from smollm2.model import SmolLM2
from smollm2.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")

_HELP = r"""
import sys
from smollm2.cli import main
try:
    main(["dpo", "--help"])
except SystemExit as e:
    assert e.code == 0, e.code
print("TORCH", "torch" in sys.modules)
"""


def test_help_names_the_options_and_imports_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", _HELP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("TORCH False"), proc.stdout[-300:]
    text = " ".join(proc.stdout.split())
    for option in ("--data PAIRS.jsonl", "--beta BETA", "--lora", "--source SOURCE", "--resume RUN_DIR",
                   "--val-fraction", "(default: 0.1)", "Anthropic HH"):
        assert option in text, option
    assert "--seq-len" not in text and "--model " not in text  # TrainConfig's knobs a DPO run does not use


def test_run_resume_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = load_tokenizer()[0]
    config = Config(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, rope_theta=10000.0,
                    initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    source = save_pretrained(model, tmp_path / "model", tokenizer)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": "Yes.", "rejected": "No way."}) + "\n"
                             for i in range(6)), encoding="utf-8")
    run = tmp_path / "run"
    common = ["--eval-every", "0", "--save-every", "0", "--device", "cpu"]
    assert main(["dpo", "--data", str(pairs), "--out", str(run), "--source", str(source), "--lora", "--lora-rank",
                 "2", "--steps", "2", "--batch-size", "2", "--beta", "0.5", "--lr", "1e-2", *common]) == 0
    assert main(["dpo", "--resume", str(run), "--steps", "3", *common]) == 0
    out = capsys.readouterr().out
    assert "DPO of" in out and "resuming DPO of" in out and "beta 0.5" in out
    rows = [r for r in metrics(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("reward_accuracy" in r and "reward_margin" in r for r in rows)
    saved = json.loads((run / "checkpoints" / "step_000003" / "trainer.json").read_text())
    assert saved["dpo"] is True and saved["finetune"]["beta"] == 0.5 and saved["finetune"]["lora"] is True
    assert (run / "loss.png").is_file() or "matplotlib" not in sys.modules

    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs.read_text() + '{"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}\n')
    assert main(["dpo", "--data", str(bad), "--out", str(tmp_path / "b"), "--source", str(source), *common]) == 2
    assert f"smollm2 dpo: error: {bad}:7: chosen and rejected are the same reply" in capsys.readouterr().err
    assert main(["dpo", "--data", str(pairs), "--out", str(tmp_path / "c"), "--beta", "0"]) == 2
    assert "--beta 0.0: must be a positive number" in capsys.readouterr().err
