"""Preference pairs: the HH parser, every accepted format, the reply-only loss mask id by id, bad input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from smollm2.loading import load_tokenizer
from smollm2.tokenizer import Tokenizer
from smollm2.train.chat_data import IGNORE, end_of_turn_id, render
from smollm2.train.preference_data import collate_pairs, load_pairs, pair_messages, parse_hh, read_pairs

HH_PROMPT = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you want to?\n\nHuman: I locked myself out."
CHOSEN_HH = HH_PROMPT + "\n\nAssistant: Call a locksmith."
REJECTED_HH = HH_PROMPT + "\n\nAssistant: Use a bobby pin: Human: and push the pins up."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()[0]


def write(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def test_hh_transcripts_become_chat_turns() -> None:
    assert parse_hh(CHOSEN_HH, "chosen") == [
        {"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Why do you want to?"},
        {"role": "user", "content": "I locked myself out."}, {"role": "assistant", "content": "Call a locksmith."}]
    # "Human:" inside a turn (no blank line before it) is text, not a turn
    prompt, chosen, rejected = pair_messages({"chosen": CHOSEN_HH, "rejected": REJECTED_HH})
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert prompt[-1]["content"] == "I locked myself out."
    assert chosen == [{"role": "assistant", "content": "Call a locksmith."}]
    assert rejected == [{"role": "assistant", "content": "Use a bobby pin: Human: and push the pins up."}]
    with pytest.raises(ValueError, match="should begin with"):
        parse_hh("Human: hi\n\nAssistant: hello", "chosen")
    with pytest.raises(ValueError, match="does not end with an assistant turn"):
        pair_messages({"chosen": CHOSEN_HH + "\n\nHuman: thanks", "rejected": REJECTED_HH})


def test_every_format_gives_the_same_pair() -> None:
    user = {"role": "user", "content": "Hi"}
    good, bad = {"role": "assistant", "content": "Hello!"}, {"role": "assistant", "content": "Go away."}
    expected = ([user], [good], [bad])
    assert pair_messages({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) == expected
    assert pair_messages({"prompt": [user], "chosen": [good], "rejected": [bad]}) == expected
    assert pair_messages({"messages": [user], "chosen": "Hello!", "rejected": [bad]}) == expected
    assert pair_messages({"chosen": [user, good], "rejected": [user, bad]}) == expected  # implicit prompt
    assert pair_messages({"prompt": "Hi", "chosen": [user, good], "rejected": [user, bad]}) == expected  # UltraFeedback
    assert pair_messages({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
                          "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}) == expected


def test_the_loss_counts_the_reply_tokens_only(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """Checked id by id: a multi-turn prompt (with an assistant turn of its own) and a reply; only the reply's
    content and its <|im_end|> are trained, and they are exactly the counted labels of the batch."""
    path = write(tmp_path / "pairs.jsonl", {"chosen": CHOSEN_HH, "rejected": REJECTED_HH})
    (pair,), skipped = read_pairs(path, tokenizer, max_len=1024)
    assert skipped == {}
    prompt_messages = parse_hh(HH_PROMPT, "prompt")
    prompt_ids, _ = render(tokenizer, prompt_messages)
    end = end_of_turn_id(tokenizer)
    for example, reply in ((pair.chosen, "Call a locksmith."), (pair.rejected, pair_messages(
            {"chosen": CHOSEN_HH, "rejected": REJECTED_HH})[2][0]["content"])):
        header = tokenizer.encode("<|im_start|>assistant\n")
        content = tokenizer.encode(reply, allow_special=False)
        tail = tokenizer.encode("\n")
        assert list(example.ids) == prompt_ids + header + content + [end] + tail
        assert list(example.trained) == ([False] * (len(prompt_ids) + len(header)) + [True] * (len(content) + 1)
                                         + [False] * len(tail))
        assert example.line == 1
    x, y = collate_pairs([pair], pad_id=0)
    assert x.shape[0] == 2  # chosen row, then rejected
    for row, example in enumerate((pair.chosen, pair.rejected)):
        n = len(example.ids) - 1
        assert x[row, :n].tolist() == list(example.ids[:-1])
        assert y[row].tolist() == [t if keep else IGNORE for t, keep in zip(example.ids[1:], example.trained[1:],
                                                                               strict=True)] + [IGNORE] * (
            y.shape[1] - n)
    # the prompt's own assistant turn ("Why do you want to?") is rendered but never trained
    why = tokenizer.encode("Why do you want to?", allow_special=False)
    start = next(i for i in range(len(pair.chosen.ids)) if list(pair.chosen.ids[i : i + len(why)]) == why)
    assert not any(pair.chosen.trained[start : start + len(why) + 1])


def test_gzip_skips_and_split(tokenizer: Tokenizer, tmp_path: Path) -> None:
    long_reply = "word " * 300
    records = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(9)]
    records.insert(3, {"prompt": "Long?", "chosen": long_reply, "rejected": "Short."})
    records.insert(5, {"chosen": CHOSEN_HH + "\n\nHuman: more?\n\nAssistant: Sure.", "rejected": REJECTED_HH})
    records.insert(7, {"chosen": HH_PROMPT + "\n\nAssistant: ", "rejected": REJECTED_HH})
    path = tmp_path / "pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a trailing blank line is ignored
    data = load_pairs(path, tokenizer, max_len=128, val_fraction=0.25, seed=3)
    assert data.skipped == {"longer than --max-len 128 tokens": [4],
                            "conversations that differ before their last reply": [6],
                            "conversations that end with an empty reply": [8]}
    assert len(data.train) == 7 and len(data.val) == 2
    assert sorted(p.line for p in data.train + data.val) == [1, 2, 3, 5, 7, 9, 10, 11, 12]
    again = load_pairs(path, tokenizer, max_len=128, val_fraction=0.25, seed=3)
    assert [p.line for p in again.val] == [p.line for p in data.val]  # seeded


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"pairs.jsonl:2: not JSON"),
    ("[1, 2]", r"pairs.jsonl:2: expected a JSON object"),
    (json.dumps({"prompt": "Hi", "chosen": "Hello"}), r"pairs.jsonl:2: missing 'rejected'"),
    (json.dumps({"prompt": "Hi"}), r"pairs.jsonl:2: missing 'chosen' and 'rejected'"),
    (json.dumps({"prompt": "Hi", "chosen": "  ", "rejected": "No."}), r"pairs.jsonl:2: empty 'chosen' reply"),
    (json.dumps({"prompt": "Hi", "chosen": [], "rejected": "No."}), r"pairs.jsonl:2: empty 'chosen' reply"),
    (json.dumps({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}),
     r"pairs.jsonl:2: chosen and rejected are the same reply"),
    (json.dumps({"chosen": CHOSEN_HH, "rejected": CHOSEN_HH}),
     r"pairs.jsonl:2: chosen and rejected are the same conversation"),
    (json.dumps({"prompt": "Hi", "chosen": [{"role": "user", "content": "x"}], "rejected": "No."}),
     r"pairs.jsonl:2: 'chosen' has a user message"),
    (json.dumps({"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}], "rejected": "No."}),
     r"pairs.jsonl:2: 'chosen' message 1 needs a 'role'"),
    (json.dumps({"prompt": 3, "chosen": "a", "rejected": "b"}), r"pairs.jsonl:2: 'prompt' must be a string"),
    (json.dumps({"chosen": "Human: hi", "rejected": "Human: ho"}), r"pairs.jsonl:2: 'chosen' is not an HH"),
])
def test_bad_lines_name_the_file_and_line(tokenizer: Tokenizer, tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "pairs.jsonl", {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}, line)
    with pytest.raises(ValueError, match=message):
        read_pairs(path, tokenizer, max_len=64)


def test_bad_files(tokenizer: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_pairs(tmp_path / "missing.jsonl", tokenizer, max_len=64)
    path = write(tmp_path / "long.jsonl", {"prompt": "Fine?", "chosen": "Yes. " * 100, "rejected": "No."})
    with pytest.raises(ValueError, match=r"no preference pairs; 1 longer than --max-len 16 tokens"):
        read_pairs(path, tokenizer, max_len=16)
    with pytest.raises(ValueError, match="leaves no training pairs"):
        load_pairs(write(tmp_path / "one.jsonl", {"prompt": "a", "chosen": "b", "rejected": "c"}), tokenizer, 64,
                   0.5, 0)
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n')[:-12])
    with pytest.raises(ValueError, match=r"broken.jsonl.gz: cannot read it"):
        read_pairs(broken, tokenizer, max_len=64)
