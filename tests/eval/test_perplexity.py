"""Perplexity: window bookkeeping, the chunked loss against full logits, and the real model against transformers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import smollm2.eval.perplexity as perplexity_module
from conftest import ORIGINAL_TOKENIZER, REPO, TINYSHAKESPEARE, require
from smollm2.config import Config
from smollm2.eval.perplexity import perplexity, windows
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.train.prepare import encode_file, load_tokens, prepare
from smollm2.weights import save_pretrained


@pytest.mark.parametrize("n,seq_len,stride", [(2, 4, None), (10, 4, None), (13, 4, None), (17, 4, 1), (17, 4, 3),
                                              (50, 8, 5), (9, 8, 2), (100, 1, None)])
def test_windows_predict_every_token_once(n, seq_len, stride) -> None:
    stride = stride or seq_len
    scored = []
    for k, w in enumerate(windows(n, seq_len, stride)):
        assert 1 <= w.length <= seq_len and w.start + w.length + 1 <= n
        targets = list(range(w.start + 1 + w.scored_from, w.start + 1 + w.length))
        scored += targets
        if k == 0:
            assert w.start == 0 and w.scored_from == 0
        else:
            assert len(targets) <= stride
            # every scored token sees at least seq_len - stride tokens before it (or the whole stream so far)
            assert w.scored_from >= min(seq_len - stride, w.start + w.scored_from)
    assert scored == list(range(1, n))
    if stride == seq_len:  # non-overlapping windows: window k starts at k * seq_len
        assert [w.start for w in windows(n, seq_len)] == list(range(0, n - 1, seq_len))


def test_windows_reject_bad_sizes() -> None:
    with pytest.raises(ValueError, match="1 <= stride <= seq_len"):
        windows(10, 4, 5)
    with pytest.raises(ValueError, match="seq_len=0"):
        windows(10, 0)


def reference_nll(model: SmolLM2, tokens: torch.Tensor, seq_len: int, stride: int | None) -> tuple[float, int]:
    """Full-vocabulary log-softmax over each whole window, one window at a time."""
    total, count = 0.0, 0
    for w in windows(len(tokens), seq_len, stride):
        x = tokens[w.start:w.start + w.length][None]
        y = tokens[w.start + 1:w.start + w.length + 1]
        logprobs = torch.log_softmax(model(x)[0].double(), dim=-1)  # (T, vocab)
        nll = -logprobs[torch.arange(w.length), y]
        total += nll[w.scored_from:].sum().item()
        count += w.length - w.scored_from
    return total / count, count


@pytest.mark.parametrize("seq_len,stride,batch_size", [(16, None, 1), (16, None, 3), (16, 5, 2), (7, 7, 4)])
def test_perplexity_equals_full_logits(tiny_config, monkeypatch, seq_len, stride, batch_size) -> None:
    model = SmolLM2(tiny_config)
    model.init_weights()
    tokens = torch.randint(0, tiny_config.vocab_size, (83,))
    expected, count = reference_nll(model, tokens, seq_len, stride)
    monkeypatch.setattr(perplexity_module, "LOGIT_ROWS", 5)  # many logit chunks per batch
    for ids in (tokens, tokens.numpy().astype(np.uint16)):
        result = perplexity(model, ids, seq_len, batch_size, stride=stride)
        assert result.tokens == count == 82
        assert result.nll == pytest.approx(expected, rel=1e-6)
        assert result.ppl == pytest.approx(math.exp(expected), rel=1e-6)
    # A random model is close to uniform over 256 tokens; a model that memorised nothing can't do better.
    assert abs(result.nll - math.log(tiny_config.vocab_size)) < 1.0


def test_perplexity_rejects_bad_input(tiny_config) -> None:
    model = SmolLM2(tiny_config)
    with pytest.raises(ValueError, match="need at least 2 tokens"):
        perplexity(model, np.array([5], dtype=np.uint16), 8)
    with pytest.raises(ValueError, match="must be 1-D"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), 8)
    with pytest.raises(ValueError, match="seq_len 129 is longer than the model's 128 positions"):
        perplexity(model, torch.zeros(300, dtype=torch.long), 129)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\) for this model, found 0..300"):
        perplexity(model, torch.tensor([0, 300, 2]), 8)


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("n_tokens,seq_len,stride,batch_size", [(160, 80, None, 2), (120, 64, 32, 2)])
def test_perplexity_equals_transformers(real, hf_real, n_tokens, seq_len, stride, batch_size) -> None:
    """transformers' own loss (labels=, which shifts them and averages) over the same windows."""
    model, tokenizer = real
    text = require(TINYSHAKESPEARE).read_text(encoding="utf-8")
    tokens = torch.tensor(tokenizer.encode(text[-3000:])[:n_tokens])
    ours = perplexity(model, tokens, seq_len, batch_size, stride=stride)

    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(len(tokens), seq_len, stride):
            input_ids = tokens[w.start:w.start + w.length + 1][None]
            labels = input_ids.clone()
            labels[:, :w.scored_from + 1] = -100  # label j is predicted at position j - 1
            n = int((labels != -100).sum())
            total += hf_real(input_ids=input_ids, labels=labels).loss.item() * n
            count += n
    assert ours.tokens == count == n_tokens - 1
    assert ours.nll == pytest.approx(total / count, rel=1e-4)
    assert ours.ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 1.5 < ours.nll < 6  # a trained model on Shakespeare: far better than uniform (10.8)


# ---- the command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    """A 2-layer model over the real 49152-token vocabulary, saved in the original's layout."""
    config = Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    return save_pretrained(model, tmp_path_factory.mktemp("model"),
                           Tokenizer.from_dir(require(ORIGINAL_TOKENIZER).parent))


def _smollm2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smollm2", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180)


def test_cli_eval(tmp_path, small_model_dir) -> None:
    from smollm2.loading import load

    text = require(TINYSHAKESPEARE).read_text(encoding="utf-8")[:6000]
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    model, tokenizer = load(small_model_dir)
    prepare(tmp_path / "t.txt", tmp_path / "data", val_fraction=0.2, tokenizer=tokenizer)
    val = load_tokens(tmp_path / "data", "val")
    expected = perplexity(model, val, 64, 4)

    done = _smollm2("eval", "--data", str(tmp_path / "data"), "--source", str(small_model_dir), "--seq-len", "64",
                    "--json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == expected.tokens == len(val) - 1
    assert result["nll"] == pytest.approx(expected.nll, rel=1e-6)
    assert result["ppl"] == pytest.approx(expected.ppl, rel=1e-6)

    # A raw text file, the first 100 tokens, a sliding window.
    ids = encode_file(tmp_path / "t.txt", tokenizer)
    expected = perplexity(model, ids[:100], 32, 4, stride=16)
    done = _smollm2("eval", "--data", str(tmp_path / "t.txt"), "--source", str(small_model_dir), "--seq-len", "32",
                    "--stride", "16", "--max-tokens", "100")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == (
        f"perplexity {expected.ppl:.4f}  (loss {expected.nll:.4f} nats/token over 99 predicted tokens; "
        "windows of 32, stride 16)")



def test_cli_eval_errors(tmp_path, small_model_dir, capsys) -> None:
    from smollm2.cli import main

    assert main(["eval", "--data", str(tmp_path / "nothing"), "--source", str(small_model_dir)]) == 2
    assert capsys.readouterr().err == f"smollm2 eval: error: --data {tmp_path / 'nothing'}: no such file or directory\n"
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    assert main(["eval", "--data", str(tmp_path / "empty.txt"), "--source", str(small_model_dir)]) == 2
    assert capsys.readouterr().err == (f"smollm2 eval: error: {tmp_path / 'empty.txt'}: 0 tokens, too few to measure "
                                       "perplexity (need at least 2)\n")
