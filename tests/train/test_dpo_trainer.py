"""DPO training: reply log-probabilities, the frozen reference (a copy, or the adapters off), learning, exact
resume with gradient accumulation, bad runs. A 2-layer model with SmolLM2's vocabulary and short pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_utils import assert_bitwise_equal, checkpoint_tensors, metrics, one_thread  # noqa: F401 (fixture)

from smollm2.config import Config
from smollm2.loading import load, load_tokenizer
from smollm2.lora import ADAPTER_WEIGHTS, lora_layers
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.train import dist
from smollm2.train.chat_data import IGNORE
from smollm2.train.dpo import reply_logprobs, sequence_logprobs
from smollm2.train.dpo_config import DPOConfig
from smollm2.train.dpo_trainer import DPOTrainer, dpo
from smollm2.train.preference_data import collate_pairs
from smollm2.train.sft import finetune
from smollm2.train.sft_config import SFTConfig
from smollm2.weights import save_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int, vocab: int = 49152) -> SmolLM2:
    config = Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                    initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = SmolLM2(config)
    model.init_weights()
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()[0]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A 2-layer random model with SmolLM2's vocabulary and tokenizer, in the original's layout."""
    assert tokenizer.vocab_size == 49152
    return save_pretrained(tiny_model(0), tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 short pairs: a polite answer chosen over a rude one."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}, happy to help.",
             "rejected": "Figure it out yourself."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quick(data: Path, out: Path, source: Path, **overrides: object) -> DPOConfig:
    settings = dict(data=str(data), out=str(out), source=str(source), steps=4, batch_size=4, max_len=128,
                    val_fraction=0.25, lr=1e-3, warmup=0, eval_every=2, sample_every=0, save_every=0,
                    log_every=1000, device="cpu", seed=1)
    return DPOConfig(**{**settings, **overrides})


def trainer(config: DPOConfig, resume: bool = False) -> DPOTrainer:
    return DPOTrainer(config, dist.setup("cpu"), resume=resume)


def assert_policy_is_reference(run: DPOTrainer) -> None:
    """Before any update the policy is its reference bit for bit (the step-0 validation relies on it)."""
    x, y = collate_pairs(run.data.val + run.data.train[:2], run.pad_id)
    run.core.eval()
    with torch.no_grad():
        assert torch.equal(run.core.reference(x, y), run.core.logprobs(x, y))
    run.core.train()


def test_reply_logprobs_are_sequence_logprobs_of_the_full_logits() -> None:
    model = tiny_model(1)
    ids = torch.randint(0, 1000, (3, 12))
    labels = torch.randint(0, 1000, (3, 12))
    labels[torch.rand(3, 12) < 0.5] = IGNORE
    labels[2] = IGNORE  # a row with nothing counted sums to zero
    with torch.no_grad():
        fast = reply_logprobs(model(ids, output="hidden"), model.lm_head.weight, labels)
        full = sequence_logprobs(model(ids), labels)
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-5)
    assert fast[2].item() == 0.0 and fast[0].item() < -1.0


def test_full_dpo_learns_and_its_reference_stays_frozen(tmp_path: Path, tiny_source: Path, pairs: Path) -> None:
    run = trainer(quick(pairs, tmp_path / "run", tiny_source, steps=8, batch_size=9, val_fraction=0.25, lr=2e-3,
                        eval_every=8))
    reference_model = run.core.reference.model
    assert not any(p.requires_grad for p in reference_model.parameters())
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in reference_model.parameters()}
    assert_policy_is_reference(run)
    rows = run.run(progress=False)
    # step 1's forward comes before any update: the policy is the reference, the rewards exactly 0
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["reward_accuracy"] == 0.0
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)  # log 2
    assert rows[-1]["reward_accuracy"] == 1.0 and rows[-1]["reward_margin"] > 0.5
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    assert all(p.grad is None for p in reference_model.parameters())
    assert_bitwise_equal(reference_model.state_dict(), load(tiny_source)[0].state_dict())  # unchanged
    assert not torch.equal(run.core.model.model.embed_tokens.weight, reference_model.model.embed_tokens.weight)
    assert not any(k.startswith("reference") for k in checkpoint_tensors(tmp_path / "run"))
    # held-out pairs, before (step 0) and after: the generalising preference shows there too
    val = [r for r in metrics(tmp_path / "run") if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 8]
    assert val[0]["val_reward_margin"] == 0.0 and val[1]["val_reward_margin"] > 0.5
    assert val[1]["val_reward_accuracy"] == 1.0


def test_lora_reference_is_the_model_with_adapters_off(tmp_path: Path, tiny_source: Path, pairs: Path) -> None:
    run = trainer(quick(pairs, tmp_path / "run", tiny_source, steps=3, lora=True, lora_rank=4, lr=1e-2,
                        eval_every=0))
    assert_policy_is_reference(run)
    rows = run.run(progress=False)
    assert rows[-1]["reward_margin"] != 0.0
    x, y = collate_pairs(run.data.train[:3], run.pad_id)
    base = load(tiny_source)[0].eval()
    run.core.eval()
    with torch.no_grad():
        policy_before = run.core.logprobs(x, y)
        reference = run.core.reference(x, y)
        policy_after = run.core.logprobs(x, y)
        expected = reply_logprobs(base(x, output="hidden"), base.lm_head.weight, y)
    assert torch.equal(reference, expected)  # the base model, bit for bit: no second copy needed
    assert not torch.allclose(policy_before, reference)  # the adapters have learnt something
    assert torch.equal(policy_before, policy_after)  # and are switched back on
    assert all(layer.enabled for layer in lora_layers(run.core.model).values())
    trained = [p for p in run.core.parameters() if p.requires_grad]
    assert trained and all(p.ndim == 2 and min(p.shape) == 4 for p in trained)  # the adapters alone


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_exact(tmp_path: Path, tiny_source: Path, pairs: Path, lora: bool) -> None:
    """4 steps straight == 2 steps, stop, resume to 4: weights, optimizer state, losses and rewards bit for bit
    (fp32, 2 micro-batches per step, adapter dropout on)."""
    options = dict(grad_accum=2, lora=lora, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, lr=5e-3)
    straight = dpo(quick(pairs, tmp_path / "straight", tiny_source, **options), progress=False)
    dpo(quick(pairs, tmp_path / "resumed", tiny_source, stop_at=2, **options), progress=False)
    second = dpo(quick(pairs, tmp_path / "resumed", tiny_source, **options), resume=True, progress=False)
    assert [r["step"] for r in second] == [3, 4]
    for name in ("model.safetensors", "optimizer.safetensors") + ((ADAPTER_WEIGHTS,) if lora else ()):
        assert_bitwise_equal(checkpoint_tensors(tmp_path / "straight", name),
                             checkpoint_tensors(tmp_path / "resumed", name))
    keys = ("loss", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp", "grad_norm")
    resumed = [r for r in metrics(tmp_path / "resumed") if "loss" in r]
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    assert straight[-1]["reward_margin"] != 0.0
    val = {r["step"]: r for r in metrics(tmp_path / "resumed") if "val_loss" in r}
    straight_val = {r["step"]: r for r in metrics(tmp_path / "straight") if "val_loss" in r}
    assert sorted(val) == [0, 2, 4] and val[4] == straight_val[4]


def test_bad_runs_are_clear_errors(tmp_path: Path, tiny_source: Path, pairs: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="--beta 0"):
        DPOConfig(beta=0)
    with pytest.raises(ValueError, match="--beta -1"):
        DPOConfig(beta=-1.0)
    with pytest.raises(FileNotFoundError, match="no such file"):
        dpo(quick(tmp_path / "missing.jsonl", tmp_path / "a", tiny_source), progress=False)
    run = tmp_path / "run"
    dpo(quick(pairs, run, tiny_source, steps=2, eval_every=0), progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        dpo(quick(pairs, run, tiny_source, steps=2), progress=False)
    with pytest.raises(ValueError, match="--batch-size is 2, but the run was trained with 4"):
        dpo(quick(pairs, run, tiny_source, steps=4, batch_size=2), resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to do"):
        dpo(quick(pairs, run, tiny_source, steps=2), resume=True, progress=False)
    # a full run's reference is --source again: it must still hold the weights the run started from
    source = save_pretrained(tiny_model(0), tmp_path / "source", tokenizer)
    dpo(quick(pairs, tmp_path / "full", source, steps=1, eval_every=0), progress=False)
    save_pretrained(tiny_model(5), source, tokenizer)
    with pytest.raises(ValueError, match="not the reference the run started from"):
        dpo(quick(pairs, tmp_path / "full", source, steps=2), resume=True, progress=False)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"prompt": f"Hi {i}", "completion": "Hello."}) + "\n" for i in range(8)))
    finetune(SFTConfig(data=str(chats), out=str(tmp_path / "sft"), source=str(tiny_source), steps=1, batch_size=2,
                       eval_every=0, sample_every=0, device="cpu"), progress=False)
    with pytest.raises(ValueError, match="not a DPO run"):
        dpo(quick(pairs, tmp_path / "sft", tiny_source, steps=2), resume=True, progress=False)
