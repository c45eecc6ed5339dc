"""Tests for running the card's tasks: generation through the batching engine equals one-by-one greedy
(eval/generative.py generate_all, tiny random model), GSM8K and BBH answer rules on hand-made replies, MMLU
cloze log-likelihoods against transformers on the real weights, and `smollm2 evaluate` on a generative task."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, require
from smollm2.config import Config
from smollm2.eval import bbh, gsm8k, mmlu
from smollm2.eval.generative import GenItem, generate_all, generation_length, render_prompt
from smollm2.eval.scoring import encode_item, score_items
from smollm2.inference.generate import GenerationConfig, stream_text
from smollm2.model import SmolLM2


class ByteTokenizer:
    """Token id = byte value (as tests/inference/test_engine.py): every token is one byte of UTF-8 text."""

    eos_id = None
    chat_template = None

    def encode(self, text: str, **_: object) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(ids)

    def decode(self, ids: Sequence[int], **_: object) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


# --- answer rules: lighteval's, on hand-made generations ------------------------------------------------


@pytest.mark.parametrize(("reply", "answer", "correct"), [
    (" She sells 9 eggs.\n#### 42", "42", True),
    ("#### 42", "42", True),
    ("  #### 42  \n", "42", True),  # stripped first
    ("#### 4,2", "42", True),  # commas removed
    ("The answer is 42.", "[invalid]", False),  # lighteval needs "#### N": no other form counts
    ("42", "[invalid]", False),
    ("#### 42.0", "42.0", False),  # string equality: 42.0 is not 42
    ("#### 42.", "42.", False),  # the regex keeps a trailing dot
    ("#### -3", "-3", False),
    ("#### 42\n#### 7", "42", True),  # the first match
    ("", "[invalid]", False),
])
def test_gsm8k_answer_rule(reply: str, answer: str, correct: bool) -> None:
    gold = " Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n#### 42"
    assert gsm8k.extract_answer(reply.strip()) == answer
    assert gsm8k.is_correct(gold, reply) is correct
    assert gsm8k.extract_answer(" 1,234 apples\n#### 1,234") == "1234"
    assert gsm8k.is_correct(" x\n#### 1,234", "#### 1234") is True


def test_bbh_exact_match() -> None:
    assert bbh.is_correct("(A)", " (A) ") is True
    assert bbh.is_correct("(A)", "(A) because") is False
    assert bbh.is_correct("True", "true") is False
    assert bbh.is_correct("True", "") is False
    assert bbh.per_subtask(100) == 4 and bbh.per_subtask(None) is None


# --- the engine: batched equals one by one ----------------------------------------------------------------


def test_batched_generation_equals_one_by_one(tiny_config: Config) -> None:
    model = SmolLM2(tiny_config)
    model.init_weights()
    model.eval()
    tokenizer = ByteTokenizer()
    # A stop string the model is sure to write: two characters from the middle of its own greedy reply.
    probe = "".join(stream_text(model, tokenizer, tokenizer.encode("hello"), max_new_tokens=12, temperature=0.0,
                                ignore_eos=True))
    stop = probe[6:8]
    assert len(stop) == 2
    # Few-shot and zero-shot prompts of different lengths, stop strings, short and unbounded (to the context).
    items = [GenItem(f"t{i}", query, None, fewshot=shots, stop=stop_strings, max_new_tokens=size)
             for i, (query, shots, stop_strings, size) in enumerate([
                 ("Question: 1+1?\nAnswer:", (("Question: 2+2?\nAnswer:", " 4"),), ("Question",), 12),
                 ("Q", (), (), 5),
                 ("x" * 40, (("y", "z"),) * 3, (), None),
                 ("hello", (), (stop,), 12),
             ])]
    results = list(generate_all(model, tokenizer, items, chat_template=False,
                                score=lambda item, text: {"chars": len(text)}, max_batch=3))
    assert sorted(r.item.id for r in results) == [item.id for item in items]
    by_id = {r.item.id: r for r in results}
    for item in items:
        prompt = tokenizer.encode(render_prompt(item, tokenizer, chat_template=False))
        config = GenerationConfig(max_new_tokens=generation_length(item, len(prompt), 128), temperature=0.0,
                                  stop=item.stop)
        stream = stream_text(model, tokenizer, prompt, config=config)
        alone = "".join(stream)
        result = by_id[item.id]
        assert (result.text, result.finish_reason, result.prompt_tokens) == (alone, stream.finish_reason,
                                                                           len(prompt)), item.id
        assert result.score == {"chars": len(alone)}
    assert any(r.finish_reason == "length" for r in results) and any(r.finish_reason == "stop" for r in results)


# --- MMLU cloze against transformers on the real weights -----------------------------------------------------


@torch.no_grad()
def _reference_logprob(logits: torch.Tensor, ids: list[int], n_context: int) -> float:
    logprobs = logits[: len(ids) - 1].double().log_softmax(-1)  # float64: see tests/eval/test_scoring.py
    return sum(float(logprobs[t, ids[t + 1]]) for t in range(n_context - 1, len(ids) - 1))


@pytest.mark.slow
@pytest.mark.hf
def test_mmlu_choice_logprobs_match_transformers(real, hf_real) -> None:
    model, tokenizer = real
    items = mmlu.load_mmlu(require(SHARED_DATA / "eval"), limit=57)[:2]  # abstract_algebra, anatomy
    for item, chat_template in ((items[0], True), (items[1], False)):
        requests = encode_item(item, tokenizer, chat_template)
        (result,) = score_items(model, tokenizer, [item], chat_template=chat_template)
        rows = [[*context, *continuation] for context, continuation in requests]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            logits = hf_real(input_ids=ids, attention_mask=mask).logits
        expected = [_reference_logprob(logits[i], rows[i], len(requests[i][0])) for i in range(len(rows))]
        assert result.logprobs == pytest.approx(expected, abs=1e-4, rel=0)
        # The answer text is scored, not a letter: each continuation is " " + the choice's text.
        assert [tokenizer.decode(c) for _, c in requests][0].endswith(item.choices[0])
        assert result.pred_norm == max(range(4), key=lambda i: expected[i] / (len(item.choices[i]) - 1))


# --- the command line -----------------------------------------------------------------------------------------


def test_evaluate_command_gsm8k_tiny_model(tmp_path: Path) -> None:
    """`smollm2 evaluate --tasks gsm8k` end to end: a random 2-layer model with the real Instruct tokenizer."""
    from smollm2 import cli
    from smollm2.tokenizer import Tokenizer
    from smollm2.weights import save_pretrained

    config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    model = SmolLM2(config)
    model.init_weights()
    source = save_pretrained(model, tmp_path / "tiny-instruct",
                             Tokenizer.from_dir(require(SHARED_DATA / "smollm2-135m-instruct")))
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    rows = [json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
            for i in range(6)]
    (data / "gsm8k" / "test.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (data / "gsm8k" / "train.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.json"
    code = cli.main(["evaluate", "--tasks", "gsm8k", "--source", str(source), "--data-dir", str(data),
                     "--chat-template", "--max-batch", "2", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    result = report["results"]["gsm8k"]
    assert result["n"] == 2 and result["score"] == 0.0  # a random model writes no "#### N"
    assert sum(result["finish_reasons"].values()) == 2
    predictions = report["predictions"]["gsm8k"]
    assert [p["id"] for p in predictions] == ["gsm8k/0", "gsm8k/1"]  # file order, though they finish in any
    assert all(p["answer"] == "[invalid]" and p["correct"] is False for p in predictions)
    assert all(p["prompt_tokens"] > 100 for p in predictions)  # 5 exemplars in chat turns
