"""Training: labels, the sampler, the chunked loss, the schedule, loss falling, exact resume, errors, signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_utils import (
    TINY_MODEL,
    assert_bitwise_equal,
    byte_corpus,
    checkpoint_tensors,
    metrics,
    one_thread,  # noqa: F401 (fixture)
    quick_config,
    tiny_model_json,
    train_losses,
    write_tokens,
)

from conftest import ORIGINAL_TOKENIZER, REPO, TINYSHAKESPEARE, require
from smollm2.config import Config
from smollm2.model import SmolLM2
from smollm2.train import NonFiniteLossError, load_checkpoint, train
from smollm2.train import loss as loss_module
from smollm2.train.checkpoint import latest_checkpoint, list_checkpoints
from smollm2.train.config import TrainConfig
from smollm2.train.data import BatchSampler, TokenData, val_starts, windows
from smollm2.train.loop import LossModel, check_resume, lr_at, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- data ------------------------------------------------------------------------------------------------------


def test_labels_are_inputs_shifted_by_one() -> None:
    tokens = np.arange(1000, dtype=np.uint16) * 7 % 65521  # distinct values, so a misaligned window shows
    starts = np.array([0, 33, 500])
    x, y = windows(tokens, starts, 16)
    assert x.shape == y.shape == (3, 16)
    assert x.dtype == y.dtype == torch.int64
    for row, start in enumerate(starts):
        assert x[row].tolist() == tokens[start : start + 16].tolist()
        assert y[row].tolist() == tokens[start + 1 : start + 17].tolist()
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_sampler_visits_every_window_once_per_epoch_and_resumes_from_its_state() -> None:
    sampler = BatchSampler(n_tokens=1000, seq_len=32, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3)
    epoch0 = sampler.order(0)
    assert len(set(epoch0.tolist())) == len(epoch0) == (1000 - 1 - epoch0.min()) // 32
    assert np.all(np.diff(np.sort(epoch0)) == 32)  # non-overlapping windows of one cut
    assert not np.array_equal(sampler.order(1), epoch0)  # a fresh order (and cut) each epoch
    seen = np.concatenate([sampler.next_global_batch() for _ in range(len(epoch0) // 4)])
    assert seen.tolist() == epoch0[: len(seen)].tolist()

    for _ in range(3):  # into the next epoch, mid-way
        sampler.next_global_batch()
    state = sampler.state_dict()
    assert set(state) == {"epoch", "position"} and all(isinstance(v, int) for v in state.values())
    expected = [sampler.next_global_batch() for _ in range(20)]
    resumed = BatchSampler(n_tokens=1000, seq_len=32, batch_size=4, grad_accum=1, rank=0, world_size=1, seed=3)
    resumed.load_state_dict(state)
    for batch in expected:
        assert np.array_equal(resumed.next_global_batch(), batch)


def test_sampler_shards_the_global_batch_over_processes_and_micro_batches() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    single = BatchSampler(5000, 16, batch_size=8, grad_accum=1, rank=0, world_size=1, seed=0)
    ranks = [BatchSampler(5000, 16, batch_size=8, grad_accum=2, rank=r, world_size=2, seed=0) for r in range(2)]
    for _ in range(5):
        (whole, _), = single.next_batches(tokens)
        shards = [batch for sampler in ranks for batch, _ in sampler.next_batches(tokens)]
        assert all(shard.shape == (2, 16) for shard in shards)
        assert sorted(map(tuple, torch.cat(shards).tolist())) == sorted(map(tuple, whole.tolist()))


def test_validation_windows_are_fixed() -> None:
    starts, length = val_starts(n_tokens=1000, seq_len=64, max_tokens=10**6)
    assert length == 64 and starts.tolist() == list(range(0, 15 * 64, 64))  # 15 = (1000 - 1) // 64
    starts, length = val_starts(n_tokens=1000, seq_len=64, max_tokens=200)
    assert starts.tolist() == [0, 64, 128]
    starts, length = val_starts(n_tokens=40, seq_len=64, max_tokens=10**6)
    assert length == 39 and starts.tolist() == [0]  # a short split gives one shorter window
    assert len(val_starts(n_tokens=1, seq_len=64, max_tokens=100)[0]) == 0


# ---- loss, optimizer, schedule -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_chunked_linear_cross_entropy_equals_full_logits(monkeypatch: pytest.MonkeyPatch,
                                                        compute_dtype: torch.dtype) -> None:
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", 7)  # several chunks and a ragged last one
    h = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (30,))
    ours = loss_module.linear_cross_entropy(h, weight, labels, compute_dtype)
    (ours * 0.5).backward()
    ours_grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    logits = (h.to(compute_dtype) @ weight.to(compute_dtype).T).float()
    reference = F.cross_entropy(logits, labels, reduction="sum")
    (reference * 0.5).backward()
    tol = dict(rtol=1e-5, atol=1e-5) if compute_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours, reference, **tol)
    torch.testing.assert_close(ours_grads[0], h.grad, **tol)
    torch.testing.assert_close(ours_grads[1], weight.grad, **tol)
    with torch.no_grad():  # evaluation path: same value, no gradients kept
        torch.testing.assert_close(loss_module.linear_cross_entropy(h, weight, labels, compute_dtype), ours)


def test_weight_decay_on_matrices_only() -> None:
    model = LossModel(SmolLM2(Config(**TINY_MODEL)), torch.float32)
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.01), torch.device("cpu"))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decayed["params"])
    assert {names[id(p)].rsplit(".", 2)[-2] for p in plain["params"]} == {
        "input_layernorm", "post_attention_layernorm", "norm"}
    assert any(names[id(p)] == "model.model.embed_tokens.weight" for p in decayed["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert decayed["betas"] == (0.9, 0.95) and decayed["eps"] == 1e-8


def test_learning_rate_schedules() -> None:
    wsd = TrainConfig(steps=100, warmup=10, lr=1e-2, decay_fraction=0.2, min_lr=1e-3)
    rates = [lr_at(wsd, s) for s in range(100)]
    assert rates[0] == pytest.approx(1e-3) and rates[9] == pytest.approx(1e-2)  # linear warmup
    assert all(r == 1e-2 for r in rates[10:80])  # stable
    assert rates[80] == pytest.approx(1e-2) and rates[99] == pytest.approx(1e-3 + 9e-3 / 20)  # linear decay
    assert all(a > b for a, b in zip(rates[80:-1], rates[81:], strict=True))
    cosine = TrainConfig(steps=100, warmup=0, lr=1e-2, schedule="cosine", min_lr=0.0)
    assert lr_at(cosine, 0) == pytest.approx(1e-2) and lr_at(cosine, 50) == pytest.approx(5e-3)
    constant = TrainConfig(steps=100, warmup=4, lr=1e-2, schedule="constant")
    assert [lr_at(constant, s) for s in (0, 3, 50, 99)] == pytest.approx([2.5e-3, 1e-2, 1e-2, 1e-2])


def test_loss_falls_on_a_repeated_batch() -> None:
    model = SmolLM2(Config(**TINY_MODEL))
    model.init_weights()
    core = LossModel(model, torch.float32)
    optimizer = make_optimizer(core, TrainConfig(lr=3e-3), torch.device("cpu"))
    x, y = windows(np.frombuffer(require(TINYSHAKESPEARE).read_bytes()[:2000], dtype=np.uint8),
                   np.array([0, 300, 600, 900]), 32)
    losses = []
    for _ in range(30):
        loss = core(x, y) / y.numel()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), abs=0.5)  # a fresh model guesses uniformly
    assert losses[-1] < 0.5 * losses[0]
    assert min(losses[-5:]) < min(losses[:5])


# ---- whole runs --------------------------------------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    return byte_corpus(tmp_path / "data"), tiny_model_json(tmp_path)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_is_exact(tmp_path: Path, corpus: tuple[Path, Path], grad_accum: int) -> None:
    data, model = corpus
    straight = train(quick_config(data, tmp_path / "straight", model, grad_accum=grad_accum), progress=False)
    first = train(quick_config(data, tmp_path / "resumed", model, grad_accum=grad_accum, stop_at=20),
                  progress=False)
    state = load_checkpoint(tmp_path / "resumed").trainer["data"]
    assert state["epoch"] >= 1 and state["position"] > 0  # stopped in the middle of an epoch
    second = train(quick_config(data, tmp_path / "resumed", model, grad_accum=grad_accum), resume=True,
                   progress=False)
    assert [r["step"] for r in first + second] == list(range(1, 41))
    assert [r["loss"] for r in first + second] == [r["loss"] for r in straight]
    assert [r["lr"] for r in first + second] == [r["lr"] for r in straight]
    assert straight[-1]["loss"] < straight[0]["loss"] - 1.0
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert_bitwise_equal(checkpoint_tensors(tmp_path / "straight", name),
                             checkpoint_tensors(tmp_path / "resumed", name))
    assert train_losses(tmp_path / "resumed") == [r["loss"] for r in straight]  # metrics.jsonl, across both


def test_run_outputs_validation_samples_and_plot(tmp_path: Path) -> None:
    """preset tiny on real SmolLM2 tokens: val loss and greedy samples recomputed from the saved weights."""
    from smollm2.tokenizer import Tokenizer
    from smollm2.train.checkpoint import checkpoint_model
    from smollm2.weights import build_model

    tokenizer = Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent)
    ids = np.array(tokenizer.encode(TINYSHAKESPEARE.read_text(encoding="utf-8")[:6000]))
    data = write_tokens(tmp_path / "data", ids[:1000], ids[1000:1300], vocab_size=49152,
                        tokenizer_source=str(ORIGINAL_TOKENIZER.parent))
    config = quick_config(data, tmp_path / "run", "tiny", steps=6, eval_every=3, sample_every=3, sample_tokens=8,
                          eval_tokens=128, prompts=["ROMEO:", "The king"], lr=1e-2)
    train(config, progress=False)
    rows = metrics(tmp_path / "run")
    val = [r for r in rows if "val_loss" in r]
    samples = [r for r in rows if "samples" in r]
    assert [r["step"] for r in val] == [3, 6] and [r["step"] for r in samples] == [3, 6]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in val)
    png = (tmp_path / "run" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    model_config, state_dict = checkpoint_model(tmp_path / "run")
    model = build_model(model_config, state_dict, "run")
    assert (latest_checkpoint(tmp_path / "run") / "tokenizer.json").is_file()
    with torch.no_grad():
        val_tokens = torch.from_numpy(ids[1000:1300].astype(np.int64))
        x, y = val_tokens[:128].view(4, 32), val_tokens[1:129].view(4, 32)  # 128 tokens = 4 windows of 32
        expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
        assert val[-1]["val_loss"] == pytest.approx(expected, rel=1e-5)
        for prompt, text in samples[-1]["samples"].items():
            sequence = tokenizer.encode(prompt)
            for _ in range(8):  # greedy without a cache, the whole sequence each time
                token = int(model(torch.tensor([sequence]))[0, -1].argmax())
                if token == 0:
                    break
                sequence.append(token)
            assert text == tokenizer.decode(sequence[len(tokenizer.encode(prompt)) :])


def test_bf16_autocast_trains(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    data, model = corpus
    rows = train(quick_config(data, tmp_path / "run", model, steps=25, dtype="bf16", lr=1e-2), progress=False)
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0
    weights = checkpoint_tensors(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in weights.values())  # master weights stay fp32


def test_compiled_blocks_train_like_eager(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    """--compile compiles each decoder block; the loss (a custom autograd function) stays eager. Compiling the
    whole model and loss together gave all-zero gradients on torch 2.11 + CUDA (notes/train_demo.md)."""
    data, model = corpus
    settings = dict(steps=3, warmup=1, eval_every=3)
    eager = train(quick_config(data, tmp_path / "eager", model, **settings), progress=False)
    compiled = train(quick_config(data, tmp_path / "compiled", model, compile=True, **settings), progress=False)
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], abs=1e-5, rel=0)
    assert [r["grad_norm"] for r in compiled] == pytest.approx([r["grad_norm"] for r in eager], rel=1e-4)
    weights = checkpoint_tensors(tmp_path / "compiled")
    assert weights.keys() == checkpoint_tensors(tmp_path / "eager").keys()  # no `_orig_mod.` in the keys
    val = [[r["val_loss"] for r in metrics(tmp_path / name) if "val_loss" in r] for name in ("eager", "compiled")]
    assert val[1] == pytest.approx(val[0], abs=1e-5)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_resume_with_a_different_shape_names_the_field(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    data, model = corpus
    run = tmp_path / "run"
    train(quick_config(data, run, model, steps=4), progress=False)
    for field, value, shown in [("batch_size", 8, "--batch-size is 8, but the run was trained with 4"),
                                ("seq_len", 16, "--seq-len is 16, but the run was trained with 32"),
                                ("seed", 1, "--seed is 1, but the run was trained with 8")]:
        with pytest.raises(ValueError, match=shown):
            train(quick_config(data, run, model, steps=8, **{field: value}), resume=True, progress=False)
    wider = tmp_path / "wider.json"
    wider.write_text(json.dumps({**TINY_MODEL, "hidden_size": 96}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"model hidden_size is 96 in --model .*wider.json, but the run's model "
                                         r"has 64"):
        train(quick_config(data, run, wider, steps=8), resume=True, progress=False)
    checkpoint = load_checkpoint(run)
    with pytest.raises(ValueError, match="world size .* is 2, but the run was trained with 1"):
        check_resume(checkpoint.train_config, checkpoint, world_size=2, train_tokens=600)
    with pytest.raises(ValueError, match="has 599 tokens, but the run was trained on 600"):
        check_resume(checkpoint.train_config, checkpoint, world_size=1, train_tokens=599)
    with pytest.raises(ValueError, match="already holds a run"):
        train(quick_config(data, run, model, steps=8), progress=False)
    with pytest.raises(ValueError, match="at step 4; nothing to do with --steps 4"):
        train(quick_config(data, run, model, steps=4), resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no such run or checkpoint directory"):
        train(quick_config(data, tmp_path / "nothing", model), resume=True, progress=False)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(quick_config(data, tmp_path / "empty_run", model), resume=True, progress=False)


def test_bad_data_and_settings_are_clear_errors(tmp_path: Path) -> None:
    model = tiny_model_json(tmp_path)
    empty = write_tokens(tmp_path / "empty", np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="train.bin: no training tokens"):
        train(quick_config(empty, tmp_path / "run", model), progress=False)
    short = write_tokens(tmp_path / "short", np.arange(20), np.arange(5))
    with pytest.raises(ValueError, match="20 tokens, fewer than one sequence of --seq-len 32"):
        train(quick_config(short, tmp_path / "run", model), progress=False)
    wide = write_tokens(tmp_path / "wide", np.arange(200), np.arange(50), vocab_size=49152)
    with pytest.raises(ValueError, match="token ids up to 49151, but the model .* has only 256 embeddings"):
        train(quick_config(wide, tmp_path / "run", model), progress=False)
    with pytest.raises(ValueError, match="missing: no such data directory"):
        train(quick_config(tmp_path / "missing", tmp_path / "run", model), progress=False)
    truncated = write_tokens(tmp_path / "truncated", np.arange(200), np.arange(50))
    with open(truncated / "train.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"train.bin: 401 bytes, but the manifest says 200 tokens \(400 bytes\)"):
        TokenData.open(truncated)
    data = byte_corpus(tmp_path / "data")
    with pytest.raises(ValueError, match="--batch-size 4 must be divisible by --grad-accum 3"):
        train(quick_config(data, tmp_path / "run", model, grad_accum=3), progress=False)
    with pytest.raises(ValueError, match="--seq-len 256 exceeds the model's context length 128"):
        train(quick_config(data, tmp_path / "run", model, seq_len=256), progress=False)
    with pytest.raises(ValueError, match="--model 'huge': not a preset"):
        train(quick_config(data, tmp_path / "run", "huge"), progress=False)
    with pytest.raises(ValueError, match="--keep-last 1: must be at least 2"):
        TrainConfig(keep_last=1)
    with pytest.raises(ValueError, match="--schedule 'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="--lr -1.0: must be a positive number"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({"learning_rate": 1.0})


def test_nan_loss_stops_before_saving_and_keeps_the_last_checkpoint(tmp_path: Path,
                                                                   corpus: tuple[Path, Path]) -> None:
    data, model = corpus
    run = tmp_path / "run"
    train(quick_config(data, run, model, steps=4), progress=False)
    good = latest_checkpoint(run)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    # lr 1e30 turns the weights into ~1e30 after one step; the next forward overflows.
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the (loss|gradient norm) is (nan|inf); stopping "
                                                 r"without saving \(lower --lr\? the last good checkpoint is .*"
                                                 + good.name):
        train(quick_config(data, run, model, steps=40, lr=1e30, warmup=0), resume=True, progress=False)
    assert list_checkpoints(run) == [good]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    rows = train(quick_config(data, run, model, steps=6), resume=True, progress=False)  # still resumable
    assert [r["step"] for r in rows] == [5, 6] and all(math.isfinite(r["loss"]) for r in rows)


# ---- the command line --------------------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "smollm2", "train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def test_cli_resume_keeps_settings_and_reports_mismatches(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    from smollm2.cli import main

    data, model = corpus
    run = tmp_path / "run"
    flags = ["--data", str(data), "--model", str(model), "--batch-size", "4", "--seq-len", "32", "--warmup", "5",
             "--eval-every", "0", "--sample-every", "0", "--device", "cpu", "--log-every", "1000"]
    assert main(["train", *flags, "--out", str(run), "--steps", "8", "--stop-at", "3"]) == 0
    assert main(["train", "--resume", str(run), "--stop-at", "5"]) == 0
    assert main(["train", "--resume", str(run)]) == 0  # on to --steps 8 of the saved settings
    assert [row["step"] for row in metrics(run) if "loss" in row] == list(range(1, 9))
    train(quick_config(data, tmp_path / "straight", model, steps=8), progress=False)
    assert train_losses(run) == train_losses(tmp_path / "straight")
    assert load_checkpoint(run).train_config.stop_at is None
    assert main(["train", "--resume", str(run), "--batch-size", "8", "--steps", "12"]) == 2  # one-line error


def test_sigint_finishes_the_step_saves_and_exits_zero(tmp_path: Path, corpus: tuple[Path, Path]) -> None:
    data, model = corpus
    run = tmp_path / "run"
    process = subprocess.Popen(
        _cli("--data", str(data), "--out", str(run), "--model", str(model), "--steps", "100000", "--batch-size", "4",
             "--seq-len", "32", "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--device", "cpu"),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopping on a signal" in output
    last = metrics(run)[-1]["step"]
    assert 3 <= last < 100000
    checkpoint = load_checkpoint(run)
    assert checkpoint.step == last and checkpoint.path.name == f"step_{last:06d}"
