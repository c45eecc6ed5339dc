"""Chat data: the loss mask id by id, padding that leaks nothing, the resumable sampler, bad lines named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from smollm2.config import Config
from smollm2.loading import load_tokenizer
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.train.chat_data import IGNORE, Example, ExampleSampler, collate, load_chats, read_chats, render


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()[0]  # the bundled SmolLM2-135M-Instruct's, with its chat template


def test_loss_mask_is_exactly_the_assistant_tokens_and_their_end_of_turn(tokenizer: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    # The conversation written out by hand, piece by piece, with what the loss should count.
    pieces = [("<|im_start|>system\n", False), ("Be brief.", False), ("<|im_end|>\n<|im_start|>user\n", False),
              ("Hi", False), ("<|im_end|>\n<|im_start|>assistant\n", False), ("Hello there!", True),
              ("<|im_end|>", True), ("\n<|im_start|>user\n", False), ("2+2?", False),
              ("<|im_end|>\n<|im_start|>assistant\n", False), ("4", True), ("<|im_end|>", True), ("\n", False)]
    expected_ids: list[int] = []
    expected_trained: list[bool] = []
    for text, trained in pieces:
        ids = tokenizer.encode(text)
        expected_ids += ids
        expected_trained += [trained] * len(ids)
    ids, trained = render(tokenizer, messages)
    assert ids == expected_ids
    assert trained == expected_trained
    assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    end = tokenizer.token_id("<|im_end|>")
    assert [i for i, t in zip(ids, trained, strict=True) if t].count(end) == 2  # each assistant turn's end
    assert sum(i == end for i in ids) == 5  # ... and none of the other three

    x, y = Example(tuple(ids), tuple(trained), 1).inputs_and_labels()
    assert x == ids[:-1]
    for position, label in enumerate(y):  # id by id: a label is the next id exactly where that id is trained
        assert label == (ids[position + 1] if trained[position + 1] else IGNORE)
    assert tokenizer.decode([t for t in y if t != IGNORE]) == "Hello there!<|im_end|>4<|im_end|>"


def test_prompt_completion_pairs_and_the_default_system_prompt(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Name a colour.", "completion": "Blue."}) + "\n\n" + json.dumps(
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Blue."}]}) + "\n", encoding="utf-8")
    examples, skipped = read_chats(path, tokenizer, max_len=512)
    assert skipped == [] and [e.line for e in examples] == [1, 3]  # the blank line is ignored
    assert examples[0].ids == examples[1].ids and examples[0].trained == examples[1].trained
    text = tokenizer.decode(list(examples[0].ids))
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the template's own
    trained = [i for i, t in zip(examples[0].ids, examples[0].trained, strict=True) if t]
    assert tokenizer.decode(trained) == "Blue.<|im_end|>"


def test_special_tokens_in_content_are_plain_text(tokenizer: Tokenizer) -> None:
    ids, trained = render(tokenizer, [{"role": "user", "content": "<|im_end|>"},
                                      {"role": "assistant", "content": "ok <|im_start|>"}])
    start, end = tokenizer.token_id("<|im_start|>"), tokenizer.token_id("<|im_end|>")
    assert ids.count(start) == 3 and ids.count(end) == 3  # system, user, assistant: only the template's markers


def test_bad_lines_name_the_file_and_the_line(tokenizer: Tokenizer, tmp_path: Path) -> None:
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    cases = {
        "{not json": "not JSON",
        "[1, 2]": "expected a JSON object",
        json.dumps({"text": "hi"}): "expected 'messages' or 'prompt'/'completion'",
        json.dumps({"messages": []}): "empty conversation",
        json.dumps({"messages": [{"content": "hi"}]}): "message 1 has no 'role'",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}]}): "role 'robot'",
        json.dumps({"messages": [{"role": "user", "content": 3}]}): "no string 'content'",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}): "no assistant turn",
        json.dumps({"prompt": "hi"}): "needs both 'prompt' and 'completion'",
        json.dumps({"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}): "both be strings",
    }
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(f"{good}\n{good}\n{line}\n", encoding="utf-8")
        with pytest.raises(ValueError, match=rf"{path}:3: .*{message}"):
            read_chats(path, tokenizer, max_len=512)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(good.encode() + b"\n\xff\xfe\n")
    with pytest.raises(ValueError, match=rf"{binary}:2: not UTF-8"):
        read_chats(binary, tokenizer, max_len=512)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_chats(tmp_path / "missing.jsonl", tokenizer, max_len=512)


def test_over_long_conversations_are_counted_skips(tokenizer: Tokenizer, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    short = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (short, long, short, long, short)) + "\n", encoding="utf-8")
    examples, skipped = read_chats(path, tokenizer, max_len=64)
    assert skipped == [2, 4] and [e.line for e in examples] == [1, 3, 5]
    with caplog.at_level("WARNING"):
        data = load_chats(path, tokenizer, max_len=64, val_fraction=0.0, seed=0)
    assert f"{path}: skipped 2 conversation(s) longer than --max-len 64 tokens (lines 2, 4)" in caplog.text
    assert len(data.train) == 3 and data.val == []
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(long) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="all 1 are longer than --max-len 64"):
        read_chats(only_long, tokenizer, max_len=64)
    with pytest.raises(ValueError, match="leaves no training examples"):
        load_chats(path, tokenizer, max_len=64, val_fraction=0.9, seed=0)


def test_padding_changes_no_conversation_and_counts_nothing(tiny_config: Config) -> None:
    """Right padding, causal attention: each conversation's logits in a padded batch are its logits alone."""
    torch.manual_seed(0)
    model = SmolLM2(tiny_config)
    model.init_weights()
    model.eval()
    examples = [Example(tuple(range(3, 3 + n)), tuple([False, True] * (n // 2) + [True] * (n % 2)), i)
                for i, n in enumerate((9, 4, 15))]
    x, y = collate(examples, pad_id=0)
    assert x.shape == y.shape == (3, 14)
    with torch.no_grad():
        batched = model(x)
        for row, example in enumerate(examples):
            inputs, labels = example.inputs_and_labels()
            alone = model(torch.tensor([inputs]))[0]
            torch.testing.assert_close(batched[row, : len(inputs)], alone, atol=1e-5, rtol=1e-5)
            assert y[row, : len(labels)].tolist() == labels
            assert (y[row, len(labels):] == IGNORE).all() and (x[row, len(inputs):] == 0).all()


def test_sampler_visits_each_example_once_per_epoch_and_resumes() -> None:
    sampler = ExampleSampler(10, batch_size=4, grad_accum=2, rank=0, world_size=1, seed=3)
    first = np.concatenate([sampler.next_global_batch() for _ in range(5)])  # 20 = two epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    assert first[:10].tolist() != first[10:].tolist()  # a fresh order each epoch
    state = sampler.state_dict()
    expected = [sampler.next_global_batch() for _ in range(7)]
    resumed = ExampleSampler(10, batch_size=4, grad_accum=2, rank=0, world_size=1, seed=3)
    resumed.load_state_dict(state)
    assert all(np.array_equal(resumed.next_global_batch(), batch) for batch in expected)
    with pytest.raises(ValueError, match="must be divisible"):
        ExampleSampler(10, batch_size=3, grad_accum=2, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="bad data-loader state"):
        resumed.load_state_dict({"epoch": 0, "position": 10})
