"""Fine-tuning: the masked loss, exact resume (full and LoRA), LoRA checkpoints, bad input, real weights learning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from train_utils import assert_bitwise_equal, checkpoint_tensors, metrics, one_thread  # noqa: F401 (fixture)

from conftest import SHARED_DATA, require
from smollm2.config import Config
from smollm2.loading import load, load_tokenizer
from smollm2.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.train import dist
from smollm2.train.chat_data import IGNORE
from smollm2.train.checkpoint import latest_checkpoint
from smollm2.train.sft import SFTLossModel, SFTTrainer, finetune
from smollm2.train.sft_config import SFTConfig
from smollm2.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")
GSM8K_TRAIN = SHARED_DATA / "eval" / "gsm8k" / "train.jsonl"


def gsm8k_chats(path: Path, n: int, skip: int = 0) -> Path:
    """GSM8K's train split as question -> answer chats ({"prompt", "completion"} lines)."""
    lines = require(GSM8K_TRAIN).read_text(encoding="utf-8").splitlines()[skip : skip + n]
    rows = [json.loads(line) for line in lines]
    path.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()[0]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A 2-layer random model with SmolLM2's vocabulary and tokenizer, in the original's layout."""
    config = Config(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                    initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    return save_pretrained(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gsm8k_chats(tmp_path_factory.mktemp("chats") / "gsm8k.jsonl", 16)


def quick(data: Path, out: Path, source: Path, **overrides: object) -> SFTConfig:
    settings = dict(data=str(data), out=str(out), source=str(source), steps=4, batch_size=4, max_len=256,
                    val_fraction=0.2, lr=3e-3, eval_every=2, sample_every=0, save_every=0, log_every=1000,
                    device="cpu", seed=1)
    return SFTConfig(**{**settings, **overrides})


def test_masked_loss_is_cross_entropy_over_the_counted_labels(tiny_config: Config) -> None:
    torch.manual_seed(0)
    model = SmolLM2(tiny_config)
    model.init_weights()
    ids = torch.randint(0, tiny_config.vocab_size, (3, 10))
    labels = torch.randint(0, tiny_config.vocab_size, (3, 10))
    labels[torch.rand(3, 10) < 0.6] = IGNORE
    loss = SFTLossModel(model, torch.float32)(ids, labels)
    expected = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact(tmp_path: Path, tiny_source: Path, chats: Path, lora: bool) -> None:
    """4 steps straight == 2 steps, stop, resume to 4: weights, optimizer state and losses bit for bit (fp32,
    2 micro-batches per step, adapter dropout on)."""
    options = dict(grad_accum=2, lora=lora, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    straight = finetune(quick(chats, tmp_path / "straight", tiny_source, **options), progress=False)
    finetune(quick(chats, tmp_path / "resumed", tiny_source, stop_at=2, **options), progress=False)
    second = finetune(quick(chats, tmp_path / "resumed", tiny_source, **options), resume=True, progress=False)
    assert [r["step"] for r in second] == [3, 4]
    for name in ("model.safetensors", "optimizer.safetensors") + ((ADAPTER_WEIGHTS,) if lora else ()):
        assert_bitwise_equal(checkpoint_tensors(tmp_path / "straight", name),
                             checkpoint_tensors(tmp_path / "resumed", name))
    losses = [r["loss"] for r in metrics(tmp_path / "resumed") if "loss" in r]
    assert losses == [r["loss"] for r in straight]
    assert any("val_loss" in r for r in metrics(tmp_path / "resumed"))
    optimizer = checkpoint_tensors(tmp_path / "straight", "optimizer.safetensors")
    if lora:  # AdamW moments for the adapters alone
        assert optimizer and all(".lora_A." in k or ".lora_B." in k for k in optimizer)
    else:
        assert any("embed_tokens" in k for k in optimizer)


def test_lora_checkpoint_is_merged_weights_plus_a_peft_adapter(tmp_path: Path, tiny_source: Path, chats: Path) -> None:
    finetune(quick(chats, tmp_path / "run", tiny_source, steps=3, lora=True, lora_rank=4, lora_alpha=8.0,
                   lora_targets="q,v,down", eval_every=0), progress=False)
    checkpoint = latest_checkpoint(tmp_path / "run")
    adapter_config = json.loads((checkpoint / ADAPTER_CONFIG).read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    ids = torch.randint(0, 1000, (1, 20))
    merged, _ = load(tmp_path / "run")  # the run loads as a plain model: the merged weights
    base, _ = load(tiny_source)
    adapted = load_adapter(base, checkpoint).eval()
    untouched, _ = load(tiny_source)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted(ids), atol=1e-5, rtol=1e-5)
        assert (merged(ids) - untouched(ids)).abs().max() > 1e-4  # training changed the model
    # the frozen weights are the base's, bit for bit: only the adapted layers changed
    merged_state, base_state = merged.state_dict(), untouched.state_dict()
    for key, value in merged_state.items():
        adapted_layer = any(f".{name}.weight" in key for name in ("q_proj", "v_proj", "down_proj"))
        assert torch.equal(value, base_state[key]) != adapted_layer, key


def test_bad_runs_are_clear_errors(tmp_path: Path, tiny_source: Path, chats: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().splitlines()[0] + "\n" + json.dumps({"messages": [{"role": "user",
                                                                                          "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: no assistant turn"):
        finetune(quick(bad, tmp_path / "a", tiny_source), progress=False)
    with pytest.raises(ValueError, match="--fsdp"):
        finetune(quick(chats, tmp_path / "b", tiny_source, fsdp=True), progress=False)
    with pytest.raises(ValueError, match="--lora-rank 0"):
        finetune(quick(chats, tmp_path / "c", tiny_source, lora=True, lora_rank=0), progress=False)
    with pytest.raises(ValueError, match="--epochs 0"):
        SFTConfig(epochs=0)
    with pytest.raises(ValueError, match="--val-fraction 1"):
        SFTConfig(val_fraction=1)
    run = tmp_path / "run"
    finetune(quick(chats, run, tiny_source, steps=2, eval_every=0), progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        finetune(quick(chats, run, tiny_source, steps=2), progress=False)
    with pytest.raises(ValueError, match="--batch-size is 2, but the run was trained with 4"):
        finetune(quick(chats, run, tiny_source, steps=4, batch_size=2), resume=True, progress=False)
    with pytest.raises(ValueError, match="--lora is True, but the run was trained with False"):
        finetune(quick(chats, run, tiny_source, steps=4, lora=True), resume=True, progress=False)
    fewer = gsm8k_chats(tmp_path / "fewer.jsonl", 12)
    with pytest.raises(ValueError, match=r"has \d+ training conversations, but the run was trained on \d+"):
        finetune(quick(fewer, run, tiny_source, steps=4), resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to do"):
        finetune(quick(chats, run, tiny_source, steps=2), resume=True, progress=False)


def test_lora_resume_rejects_another_base(tmp_path: Path, tiny_source: Path, chats: Path) -> None:
    run = tmp_path / "run"
    finetune(quick(chats, run, tiny_source, steps=2, lora=True, lora_rank=4, eval_every=0), progress=False)
    other, tokenizer = load(tiny_source)
    with torch.no_grad():
        other.model.norm.weight.add_(1e-3)
    save_pretrained(other, tmp_path / "other", tokenizer)
    with pytest.raises(ValueError, match="--source is .*other"):
        finetune(quick(chats, run, tmp_path / "other", steps=4, lora=True, lora_rank=4), resume=True,
                 progress=False)


@pytest.mark.slow
def test_real_weights_lora_sft_loss_falls(tmp_path: Path) -> None:
    """The bundled SmolLM2-135M-Instruct, LoRA on the two shortest of 300 GSM8K chats (~110 tokens each): two
    epochs of two one-conversation steps, and the second epoch's loss is well below the first's. (The trainer's
    steps, without its final save. About 5 s a step on a quiet 2-core CPU.)"""
    rows = [json.loads(line) for line in require(GSM8K_TRAIN).read_text(encoding="utf-8").splitlines()[:300]]
    rows = sorted(rows, key=lambda r: len(r["question"]) + len(r["answer"]))[:2]
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["answer"]}) + "\n" for r in rows))
    config = SFTConfig(data=str(data), out=str(tmp_path / "run"), steps=4, batch_size=1, max_len=256, val_fraction=0,
                       lr=2e-3, warmup=0, schedule="constant", lora=True, lora_rank=8, device="cpu")
    torch.set_num_threads(2)  # (the fixture puts one back)
    trainer = SFTTrainer(config, dist.setup("cpu"))
    losses = [trainer.train_step(step)["loss"] for step in range(4)]
    assert all(0 < loss < 10 for loss in losses), losses
    assert sum(losses[2:]) < 0.8 * sum(losses[:2]), losses  # the same two conversations, a second time


def test_command_line_trains_resumes_and_reports_errors(tmp_path: Path, tiny_source: Path, chats: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from smollm2.cli import main

    run = tmp_path / "run"
    common = ["--source", str(tiny_source), "--max-len", "256", "--batch-size", "4", "--eval-every", "0",
              "--sample-every", "0", "--device", "cpu"]
    assert main(["finetune", "--data", str(chats), "--out", str(run), "--steps", "3", "--stop-at", "2",
                 "--lora", "--lora-rank", "2", "--lora-targets", "q,v", *common]) == 0
    assert "LoRA r=2 on 4 layers" in capsys.readouterr().out
    assert main(["finetune", "--resume", str(run)]) == 0  # every setting from the run itself
    out = capsys.readouterr().out
    assert "resuming" in out and "steps 3-3 of 3" in out
    assert [r["step"] for r in metrics(run) if "loss" in r] == [1, 2, 3]
    assert main(["finetune", "--resume", str(run), "--batch-size", "2", "--steps", "5"]) == 2
    assert "--batch-size is 2, but the run was trained with 4" in capsys.readouterr().err
    missing = tmp_path / "missing.jsonl"
    assert main(["finetune", "--data", str(missing), "--out", str(tmp_path / "x"), *common]) == 2
    assert f"--data {missing}: no such file" in capsys.readouterr().err
