"""Tests for smollm2/evaluate.py and `smollm2 evaluate`: per-choice log-likelihoods against transformers on the
real weights, the batched (shared-context, KV-cached) path against plain one-request forwards, the chat-template
prompt, and the command line end to end on a tiny model with hand-made data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA, require
from smollm2 import cli
from smollm2.config import Config
from smollm2.eval.scoring import default_chat_template, encode_item, render_context, score_groups, score_items
from smollm2.eval.tasks import TASKS, Item, load_task
from smollm2.model import SmolLM2
from smollm2.tokenizer import Tokenizer
from smollm2.weights import save_pretrained

EVAL_DATA = SHARED_DATA / "eval"
INSTRUCT_DIR = SHARED_DATA / "smollm2-135m-instruct"
BASE_DIR = SHARED_DATA / "smollm2-135m"


@torch.no_grad()
def _reference_logprob(logits: torch.Tensor, ids: list[int], n_context: int) -> float:
    """sum of log p(ids[t] | ids[:t]) over the continuation, from one row of full-sequence logits.

    The log-softmax is taken in float64: in float32 it has a bias of ~+7e-6 per token over a 49152-way vocabulary
    (measured against float64), which alone passes 1e-4 on a 30-token HellaSwag ending.
    """
    logprobs = logits[: len(ids) - 1].double().log_softmax(-1)
    return sum(float(logprobs[t, ids[t + 1]]) for t in range(n_context - 1, len(ids) - 1))


@torch.no_grad()
def _plain_scores(model: SmolLM2, requests: list[tuple[list[int], list[int]]]) -> list[float]:
    """One full forward per request, no cache, no batching: the path score_groups must reproduce."""
    out = []
    for context, continuation in requests:
        ids = [*context, *continuation]
        out.append(_reference_logprob(model(torch.tensor([ids]))[0], ids, len(context)))
    return out


# --- against transformers on the real weights -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.hf
@pytest.mark.parametrize("task", sorted(TASKS))
def test_choice_logprobs_match_transformers(task: str, real, hf_real) -> None:
    model, tokenizer = real
    items = load_task(task, require(EVAL_DATA), limit=2)
    # Both prompt styles: the card's Instruct column (chat template) and its base column (plain query).
    for item, chat_template in ((items[0], True), (items[1], False)):
        requests = encode_item(item, tokenizer, chat_template)
        (result,) = score_items(model, tokenizer, [item], chat_template=chat_template)
        # transformers scores the same token rows in one right-padded batch with an attention mask.
        rows = [[*context, *continuation] for context, continuation in requests]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        with torch.no_grad():
            logits = hf_real(input_ids=ids, attention_mask=mask).logits
        expected = [_reference_logprob(logits[i], rows[i], len(requests[i][0])) for i in range(len(rows))]
        assert result.logprobs == pytest.approx(expected, abs=1e-4, rel=0)
        assert result.n_tokens == tuple(len(continuation) for _, continuation in requests)
        # Scores of different choices differ by far more than the tolerance, so the picks are the reference's.
        assert result.pred == max(range(len(expected)), key=expected.__getitem__)


@pytest.mark.slow
def test_batched_equals_one_by_one(real) -> None:
    model, tokenizer = real
    data = require(EVAL_DATA)
    # Mixed tasks: contexts of very different lengths, 2 to 5 choices, one-token and 30-token continuations.
    items = [*load_task("winogrande", data, limit=1), *load_task("arc_challenge", data, limit=2),
             *load_task("hellaswag", data, limit=1), *load_task("commonsense_qa", data, limit=1)]
    groups = [encode_item(item, tokenizer, chat_template=i % 2 == 0) for i, item in enumerate(items)]
    context = groups[2][0][0]
    # lighteval's merge case: a context that lost its last token to the continuation, in the same group as
    # the full context (their shared prefix is one token shorter); and a one-token continuation.
    groups.append([(context, [tokenizer.encode(" A")[0]]), (context[:-1], [context[-1], *tokenizer.encode(" B")])])
    alone = [[_plain_scores(model, [request])[0] for request in group] for group in groups]
    batched = score_groups(model, groups)
    assert [len(scores) for scores in batched] == [len(group) for group in groups]
    assert [s.logprob for scores in batched for s in scores] == pytest.approx(sum(alone, []), abs=5e-5, rel=0)
    # Only the chat-template items: now every context starts with the same system turn, which runs once.
    chat = [i for i in range(len(items)) if i % 2 == 0]
    batched = score_groups(model, [groups[i] for i in chat])
    expected = [score for i in chat for score in alone[i]]
    assert [s.logprob for scores in batched for s in scores] == pytest.approx(expected, abs=5e-5, rel=0)
    # (score_items' batching into several passes is checked on the tiny model in the command-line test.)


@pytest.mark.slow
def test_greedy_flag(real) -> None:
    model, tokenizer = real
    context = tokenizer.encode("The capital of France is")
    with torch.no_grad():
        logits = model(torch.tensor([context]))[0, -1]
    best, worst = int(logits.argmax()), int(logits.argmin())
    scores = score_groups(model, [[(context, [best]), (context, [worst])]])[0]
    assert (scores[0].greedy, scores[1].greedy) == (True, False)
    assert scores[0].logprob == pytest.approx(float(logits.double().log_softmax(-1)[best]), abs=1e-5)


# --- prompt ---------------------------------------------------------------------------------------------


def test_chat_template_prompt_for_one_item() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.from_dir(require(INSTRUCT_DIR))
    item = Item(context="Question: Which gas do plants take in?\nAnswer:",
                choices=(" Carbon dioxide", " Oxygen"), gold=0, id="t")
    expected = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nQuestion: Which gas do plants take in?\nAnswer:<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_context(item.context, tokenizer, chat_template=True) == expected
    assert render_context(item.context, tokenizer, chat_template=False) == item.context
    hf = transformers.AutoTokenizer.from_pretrained(str(INSTRUCT_DIR))
    assert hf.apply_chat_template([{"role": "user", "content": item.context}], tokenize=False,
                                  add_generation_prompt=True) == expected
    requests = encode_item(item, tokenizer, chat_template=True)
    for (context, continuation), choice in zip(requests, item.choices, strict=True):
        # The template's final "\n" moves onto the continuation (lighteval rstrips the context).
        assert tokenizer.decode(context) == expected[:-1]
        assert tokenizer.decode(continuation) == "\n" + choice
        assert context + continuation == hf(expected + choice, add_special_tokens=False)["input_ids"]
        assert context == hf(expected[:-1], add_special_tokens=False)["input_ids"]


def test_default_chat_template() -> None:
    instruct, base = Tokenizer.from_dir(require(INSTRUCT_DIR)), Tokenizer.from_dir(require(BASE_DIR))
    assert default_chat_template(instruct, "SmolLM2-135M-Instruct.Q4_1.gguf") is True
    assert default_chat_template(instruct, "checkpoints/run1") is False
    assert default_chat_template(base, "HuggingFaceTB/SmolLM2-135M-Instruct") is False  # no template to use
    with pytest.raises(ValueError, match="no chat template"):
        render_context("q", base, chat_template=True)


# --- the command line on a tiny model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer model with the real SmolLM2-Instruct tokenizer, saved in the original layout."""
    torch.manual_seed(0)
    config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    model = SmolLM2(config)
    model.init_weights()
    directory = tmp_path_factory.mktemp("models") / "tiny-instruct"
    return save_pretrained(model, directory, Tokenizer.from_dir(require(INSTRUCT_DIR)))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _hand_made_data(root: Path) -> Path:
    # Choices of very different lengths, so acc (raw sums) and acc_norm (per character) can disagree.
    piqa = [("How do you open a jar?", "Twist the lid.", "Ask a friend to hold the jar while you twist the lid off."),
            ("How do you cool soup?", "Put it in the oven.", "Stir it and wait."),
            ("How do you dry a towel?", "Hang it up.", "Put it in a bucket of water overnight and hope.")]
    _write_jsonl(root / "piqa" / "valid.jsonl", [{"goal": g, "sol1": a, "sol2": b} for g, a, b in piqa])
    (root / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n", encoding="utf-8")
    for task, folder, name in (("arc_easy", "arc_easy", "ARC-Easy-test.hf.jsonl"),
                               ("arc_challenge", "arc_challenge", "ARC-Challenge-test.hf.jsonl")):
        rows = [{"id": f"{task}-{i}", "question": q, "answerKey": key,
                 "choices": {"text": texts, "label": ["A", "B", "C"]}}
                for i, (q, texts, key) in enumerate([
                    ("What do plants need to grow?", ["sunlight and water", "darkness", "salt"], "A"),
                    ("Which is a mammal?", ["shark", "whale", "trout"], "B")])]
        _write_jsonl(root / folder / name, rows)
    return root


def test_cli_end_to_end_on_a_tiny_model(tiny_instruct: Path, tmp_path: Path, capsys) -> None:
    data = _hand_made_data(tmp_path / "eval")
    out = tmp_path / "results.json"
    rc = cli.main(["evaluate", "--tasks", "piqa,arc_easy,arc_challenge", "--source", str(tiny_instruct),
                   "--data-dir", str(data), "--json", str(out), "--batch-size", "2"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "ARC (Average)" in stdout and "37.3" in stdout and "43.9" in stdout  # the card's ARC row
    report = json.loads(out.read_text())
    assert report["config"]["chat_template"] is True  # an "instruct" model with a template: on by default
    assert set(report["results"]) == {"piqa", "arc_easy", "arc_challenge"}

    from smollm2 import load

    model, tokenizer = load(tiny_instruct)
    for task, predictions in report["predictions"].items():
        items = load_task(task, data)
        assert [p["id"] for p in predictions] == [item.id for item in items]
        for item, p in zip(items, predictions, strict=True):
            # The sums are what one plain forward per choice gives, and the picks are their argmaxes.
            expected = _plain_scores(model, encode_item(item, tokenizer, chat_template=True))
            assert p["logprobs"] == pytest.approx(expected, abs=1e-4, rel=0)
            normed = [s / len(c.removeprefix(" ")) for s, c in zip(p["logprobs"], item.choices, strict=True)]
            assert p["pred"] == max(range(len(normed)), key=p["logprobs"].__getitem__)
            assert p["pred_norm"] == max(range(len(normed)), key=normed.__getitem__)
        result = report["results"][task]
        assert result["n"] == len(items)
        assert result["acc"] == sum(p["pred"] == p["gold"] for p in predictions) / len(items)
        assert result["acc_norm"] == sum(p["pred_norm"] == p["gold"] for p in predictions) / len(items)
        low, high = result["acc_norm_ci"]
        assert 0 <= low <= result["acc_norm"] <= high <= 1
    arc = report["card"]["arc"]
    expected_arc = 50 * (report["results"]["arc_easy"]["acc_norm"] + report["results"]["arc_challenge"]["acc_norm"])
    assert arc == {"measured": pytest.approx(expected_arc), "instruct": 37.3, "base": 43.9}

    # --no-chat-template scores the bare query: different numbers, same items.
    rc = cli.main(["evaluate", "--tasks", "piqa", "--source", str(tiny_instruct), "--data-dir", str(data),
                   "--json", str(out), "--no-chat-template", "--limit", "2"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["chat_template"] is False and report["results"]["piqa"]["n"] == 2
    items = load_task("piqa", data, limit=2)
    expected = [_plain_scores(model, encode_item(item, tokenizer, chat_template=False)) for item in items]
    for p, e in zip(report["predictions"]["piqa"], expected, strict=True):
        assert p["logprobs"] == pytest.approx(e, abs=1e-4, rel=0)

    # --quantize int8: the same items scored by the int8 model, as the library's int8 model scores them.
    rc = cli.main(["evaluate", "--tasks", "piqa", "--source", str(tiny_instruct), "--data-dir", str(data),
                   "--json", str(out), "--no-chat-template", "--limit", "2", "--quantize", "int8"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["config"]["quantize"] == "int8"
    int8_model, _ = load(tiny_instruct, quantize="int8")
    expected = [_plain_scores(int8_model, encode_item(item, tokenizer, chat_template=False)) for item in items]
    for p, e in zip(report["predictions"]["piqa"], expected, strict=True):
        assert p["logprobs"] == pytest.approx(e, abs=2e-2, rel=1e-3)  # bf16 activations: batched vs one by one


def _cli_error(argv: list[str], capsys) -> str:
    rc = cli.main(["evaluate", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err  # one line
    return err


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    data = tmp_path / "eval"
    (data / "piqa").mkdir(parents=True)
    bad = data / "piqa" / "valid.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n{"goal": "g", "sol1":\n', encoding="utf-8")
    (data / "piqa" / "valid-labels.lst").write_text("0\n1\n", encoding="utf-8")
    # Data errors come before the model loads: no --source is needed to see them.
    err = _cli_error(["--tasks", "piqa", "--data-dir", str(data)], capsys)
    assert f"{bad}, line 2: invalid JSON" in err
    err = _cli_error(["--tasks", "arc_easy", "--data-dir", str(data)], capsys)
    assert "ARC-Easy-test.hf.jsonl" in err  # the missing file is named
    err = _cli_error(["--tasks", "piqa,triviaqa", "--data-dir", str(data)], capsys)
    assert "unknown task(s) triviaqa" in err
    err = _cli_error(["--tasks", "piqa", "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert "nowhere: no such directory" in err
    err = _cli_error(["--tasks", "piqa", "--data-dir", str(data), "--limit", "-1"], capsys)
    assert "limit must be None or an int >= 0, got -1" in err
    err = _cli_error(["--tasks", "piqa", "--data-dir", str(data), "--batch-size", "0"], capsys)
    assert "--batch-size must be at least 1" in err


def test_score_groups_rejects_bad_requests(tiny_instruct: Path) -> None:
    from smollm2 import load

    model, _ = load(tiny_instruct)
    with pytest.raises(ValueError, match="empty context"):
        score_groups(model, [[([], [5])]])
    with pytest.raises(ValueError, match="exceed the model's context length 512"):
        score_groups(model, [[([1] * 500, [2] * 14)]])
    with pytest.raises(ValueError, match="batch size must be at least 1"):
        next(score_items(model, Tokenizer.from_dir(tiny_instruct), [], chat_template=False, batch_size=0))
