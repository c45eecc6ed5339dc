"""Tests for smollm2/lm_eval_adapter.py: lm-eval's request API on our model (log-likelihoods against plain
forwards on the real weights, rolling windows, greedy generation), and `python -m smollm2.lm_eval_adapter` on
a small YAML task over a local jsonl, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, require

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from smollm2.config import Config  # noqa: E402
from smollm2.eval.lm_eval_adapter import SmolLM2LM  # noqa: E402
from smollm2.eval.tasks import split_context_continuation  # noqa: E402
from smollm2.model import SmolLM2  # noqa: E402
from smollm2.tokenizer import Tokenizer  # noqa: E402
from smollm2.weights import save_pretrained  # noqa: E402

INSTRUCT_DIR = SHARED_DATA / "smollm2-135m-instruct"

# A tiny multiple-choice task: lm-eval renders "Question: ...\nAnswer:" and scores " {choice}" for each choice.
DOCS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "gold": 0},
    {"question": "How many legs does a dog have?", "choices": ["two", "four", "six"], "gold": 1},
    {"question": "What do bees make?", "choices": ["milk", "honey", "silk"], "gold": 1},
    {"question": "Which is the largest planet?", "choices": ["Mars", "Jupiter", "Venus", "Earth"], "gold": 1},
]


def _request(kind: str, args: tuple, idx: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


@torch.no_grad()
def _reference(model: SmolLM2, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p, all argmax) from one full forward; the log-softmax in float64 (see eval/test_scoring.py)."""
    ids = [*context, *continuation]
    logits = model(torch.tensor([ids]))[0]
    logprobs = logits.double().log_softmax(-1)
    positions = range(len(context) - 1, len(ids) - 1)
    return (sum(float(logprobs[t, ids[t + 1]]) for t in positions),
            all(int(logits[t].argmax()) == ids[t + 1] for t in positions))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[SmolLM2, Tokenizer, Path]:
    """A random 2-layer model with the real SmolLM2-Instruct tokenizer, saved in the original layout."""
    torch.manual_seed(0)
    config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    model = SmolLM2(config)
    model.init_weights()
    tokenizer = Tokenizer.from_dir(require(INSTRUCT_DIR))
    directory = save_pretrained(model, tmp_path_factory.mktemp("models") / "tiny", tokenizer)
    return model.eval(), tokenizer, directory


def test_registered_as_smollm2() -> None:
    assert get_model("smollm2") is SmolLM2LM


@pytest.mark.slow
def test_loglikelihood_on_the_real_model(real) -> None:
    model, tokenizer = real
    lm = SmolLM2LM(model=model, tokenizer=tokenizer, batch_size=2)
    requests = [(f"Question: {doc['question']}\nAnswer:", f" {choice}") for doc in DOCS for choice in doc["choices"]]
    requests.append(("The capital of France is", " Paris"))
    results = lm.loglikelihood([_request("loglikelihood", args, i) for i, args in enumerate(requests)],
                               disable_tqdm=True)
    assert len(results) == len(requests)
    greedy = []
    for (context, continuation), (logprob, is_greedy) in zip(requests, results, strict=True):
        # lm-eval's split (TemplateLM._encode_pair) is lighteval's: the same token rows as `smollm2 evaluate`.
        ids = split_context_continuation(context, continuation, tokenizer.encode)
        expected, expected_greedy = _reference(model, *ids)
        assert logprob == pytest.approx(expected, abs=1e-4, rel=0)
        assert is_greedy == expected_greedy
        greedy.append(is_greedy)
    assert greedy[-1] is True  # " Paris" is SmolLM2-Instruct's top token here, "red" for the sky is not
    assert greedy[2] is False
    # An empty context scores the text after "<|endoftext|>", SmolLM2's document separator.
    ((logprob, _),) = lm.loglikelihood([_request("loglikelihood", ("", "Hello world"))], disable_tqdm=True)
    assert logprob == pytest.approx(_reference(model, [0], tokenizer.encode("Hello world"))[0], abs=1e-4, rel=0)


def test_loglikelihood_rolling(tiny) -> None:
    model, tokenizer, _ = tiny
    text = "One two three four five six seven eight nine ten eleven twelve."
    tokens = tokenizer.encode(text)
    assert len(tokens) > 12
    lm = SmolLM2LM(model=model, tokenizer=tokenizer)
    (whole,) = lm.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))], disable_tqdm=True)
    assert whole == pytest.approx(_reference(model, [0], tokens)[0], abs=1e-4, rel=0)
    # With room for 5 tokens, windows predict 5 new tokens each from the 5 tokens before the window's last one.
    short = SmolLM2LM(model=model, tokenizer=tokenizer, max_length=5, batch_size=3)
    (windowed,) = short.loglikelihood_rolling([_request("loglikelihood_rolling", (text,))], disable_tqdm=True)
    padded = [0, *tokens]  # "<|endoftext|>" first, so the first token is predicted too
    expected, first = 0.0, 1
    while first < len(padded):
        last = min(first + 4, len(padded) - 1)
        expected += _reference(model, padded[max(0, last - 5) : first], padded[first : last + 1])[0]
        first = last + 1
    assert windowed == pytest.approx(expected, abs=1e-4, rel=0)
    assert windowed != pytest.approx(whole, abs=1e-3)  # the short windows really did lose context


@torch.no_grad()
def _greedy_by_hand(model: SmolLM2, tokenizer: Tokenizer, context: str, n: int) -> str:
    """n greedy tokens, one full forward per token, no cache."""
    ids = tokenizer.encode(context)
    start = len(ids)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return tokenizer.decode(ids[start:])


def test_generate_until_is_greedy(tiny) -> None:
    model, tokenizer, _ = tiny
    contexts = ["Once upon a time", "The quick brown fox jumps over the lazy dog because"]
    expected = [_greedy_by_hand(model, tokenizer, context, 12) for context in contexts]
    lm = SmolLM2LM(model=model, tokenizer=tokenizer, batch_size=2)  # both contexts in one left-padded batch
    texts = lm.generate_until([_request("generate_until", (c, {"until": [], "max_gen_toks": 12})) for c in contexts],
                              disable_tqdm=True)
    assert texts == expected
    full = expected[0]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    (text,) = lm.generate_until([_request("generate_until", (contexts[0], {"until": [stop], "max_gen_toks": 12}))],
                                disable_tqdm=True)
    assert text == full[: full.index(stop)]


def test_lm_eval_command_on_a_local_task(tiny, tmp_path: Path) -> None:
    model, tokenizer, model_dir = tiny
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_qa.yaml").write_text(
        "task: smollm2_tiny_qa\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf-home")}
    command = [sys.executable, "-m", "smollm2.lm_eval_adapter", "--model", "smollm2",
               "--model_args", f"source={model_dir}", "--tasks", "smollm2_tiny_qa", "--include_path", str(tasks),
               "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_smollm2_tiny_qa_*.jsonl")
    results = json.loads(results_file.read_text())["results"]["smollm2_tiny_qa"]
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)

    # Each choice's log-likelihood is what one plain forward gives, and acc / acc_norm follow from them.
    hits = hits_norm = 0
    for doc, sample in zip(DOCS, samples, strict=True):
        context = f"Question: {doc['question']}\nAnswer:"
        expected = [_reference(model, *split_context_continuation(context, f" {c}", tokenizer.encode))[0]
                    for c in doc["choices"]]
        got = [resp[0][0] for resp in sample["resps"]]
        assert [float(x) for x in got] == pytest.approx(expected, abs=1e-4, rel=0)
        pred = max(range(len(expected)), key=expected.__getitem__)
        # lm-eval's acc_norm divides by the characters of the choice (without the " " it prepends).
        normed = [lp / len(c) for lp, c in zip(expected, doc["choices"], strict=True)]
        hits += pred == doc["gold"]
        hits_norm += max(range(len(normed)), key=normed.__getitem__) == doc["gold"]
    assert results["acc,none"] == pytest.approx(hits / len(DOCS))
    assert results["acc_norm,none"] == pytest.approx(hits_norm / len(DOCS))
