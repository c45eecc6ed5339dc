"""Completions with `logprobs` and `echo`, several prompts in one request, and vLLM's tokenizer routes: what
lm-eval's `local-completions` model needs to evaluate a model through our server. Every log-probability is
checked against log_softmax of the model's own logits; the lm-eval run against the server gives the numbers
lm-eval gives on the model in-process (tests/eval/test_lm_eval_adapter.py's task)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from serve_utils import instruct_tokenizer, live_server, tiny_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from smollm2.inference.generate import prompt_logprobs  # noqa: E402
from smollm2.serve import create_app  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(), instruct_tokenizer()


@pytest.fixture(scope="module")
def url(tiny):
    with live_server(create_app(*tiny, model_name="tiny", context_length=512)) as url:
        yield url


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"model": "tiny", **body} if path.startswith("/v1") else body, timeout=60)


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T - 1,) log p(ids[t] | ids[:t]) from one plain forward, in float64."""
    logprobs = model(torch.tensor([ids]))[0].double().log_softmax(-1)
    return logprobs[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_prompt_logprobs_equal_log_softmax_of_the_logits(tiny, monkeypatch) -> None:
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    monkeypatch.setattr("smollm2.inference.generate.PROMPT_LOGPROBS_CHUNK", 5)  # several chunks of positions
    records = prompt_logprobs(model, ids, top=3)
    assert [r.token for r in records] == ids[1:]
    expected = reference_logprobs(model, ids)
    assert torch.allclose(torch.tensor([r.logprob for r in records], dtype=torch.float64), expected, atol=1e-5)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].double().log_softmax(-1)
    for t, record in enumerate(records):
        assert [i for i, _ in record.top] == logits[t].topk(3).indices.tolist()
        assert [lp for _, lp in record.top] == sorted((lp for _, lp in record.top), reverse=True)
    with pytest.raises(ValueError, match="top must be >= 0"):
        prompt_logprobs(model, ids, top=-1)


def test_echo_with_no_new_tokens_scores_the_prompt(tiny, url) -> None:
    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPT)
    body = post(url, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2, "temperature": 0}).json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # nothing before it
    got = torch.tensor(logprobs["token_logprobs"][1:], dtype=torch.float64)
    assert torch.allclose(got, reference_logprobs(model, ids), atol=1e-5)
    for own, top in zip(logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True):
        assert len(top) <= 2 and max(top.values()) >= own - 1e-6  # the most likely is at least the token's own
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(PROMPT)
    assert "".join(logprobs["tokens"]) == PROMPT
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids),
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_echo_puts_the_prompt_before_the_completion(tiny, url) -> None:
    model, tokenizer = tiny
    plain = post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1}).json()["choices"][0]
    echoed = post(url, {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
                        "echo": True}).json()["choices"][0]
    n = len(tokenizer.encode(PROMPT))
    assert echoed["text"] == PROMPT + plain["text"]
    assert len(echoed["logprobs"]["tokens"]) == n + 4
    assert echoed["logprobs"]["tokens"][n:] == plain["logprobs"]["tokens"]
    assert echoed["logprobs"]["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    assert plain["logprobs"]["text_offset"][0] == 0 and echoed["logprobs"]["text_offset"][n] == len(PROMPT)
    # greedy: each generated token is the most likely one, and its own log-probability is the top one
    for own, top in zip(plain["logprobs"]["token_logprobs"], plain["logprobs"]["top_logprobs"], strict=True):
        assert max(top.values()) == pytest.approx(own, abs=1e-6)

    # streamed: the prompt first, in a chunk of its own, then the completion; the same logprobs in order
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
                            "echo": True, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [json.loads(line.removeprefix("data: "))["choices"][0] for line in lines]
    assert chunks[0]["text"] == PROMPT
    assert "".join(c["text"] for c in chunks) == echoed["text"]
    streamed = [c["logprobs"] for c in chunks if c["logprobs"]]
    assert sum((lp["tokens"] for lp in streamed), []) == echoed["logprobs"]["tokens"]
    assert sum((lp["text_offset"] for lp in streamed), []) == echoed["logprobs"]["text_offset"]


def test_several_prompts_get_one_choice_each(tiny, url) -> None:
    _, tokenizer = tiny
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    alone = [post(url, {"prompt": p, "max_tokens": 5, "temperature": 0}).json() for p in prompts]
    together = post(url, {"prompt": prompts, "max_tokens": 5, "temperature": 0}).json()
    assert [c["index"] for c in together["choices"]] == [0, 1, 2]
    assert [c["text"] for c in together["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert together["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert together["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    as_ids = post(url, {"prompt": [tokenizer.encode(p) for p in prompts], "max_tokens": 5, "temperature": 0,
                        "echo": True}).json()
    assert [c["text"] for c in as_ids["choices"]] == [p + a["choices"][0]["text"] for p, a in zip(prompts, alone,
                                                                                                  strict=True)]
    assert post(url, {"prompt": [[5, 6]], "max_tokens": 1}).json()["choices"][0]["index"] == 0  # lm-eval's shape


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"prompt": ["a", "b"], "stream": True}, "stream", "one prompt"),
    ({"prompt": "a", "max_tokens": 0, "echo": True, "stream": True}, "stream", "max_tokens 0"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"prompt": "a", "logprobs": 21}, "logprobs", "<= 20"),
    ({"prompt": "a", "logprobs": True}, "logprobs", "an integer"),
    ({"prompt": "a", "echo": "yes"}, "echo", "a boolean"),
    ({"prompt": ["a", ""]}, "prompt", "'prompt[1]' must not be empty"),
    ({"prompt": ["a", [1, 2]] * 40}, "prompt", "at most 64"),
    ({"prompt": [[1, 2], [3, 10**6]]}, "prompt", "token id 1000000 is outside"),
])
def test_bad_logprobs_echo_and_prompts_are_400(url, body, param, message) -> None:
    response = post(url, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


def test_tokenizer_routes(tiny, url) -> None:
    _, tokenizer = tiny
    got = post(url, {"prompt": PROMPT, "add_special_tokens": False}, "/tokenize").json()
    assert got["tokens"] == tokenizer.encode(PROMPT) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 512
    assert post(url, {"tokens": got["tokens"]}, "/detokenize").json() == {"prompt": PROMPT}
    info = httpx.get(f"{url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == tokenizer.decode([tokenizer.eos_id]) and info["chat_template"]
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"text": "a"}, "text"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")):
        response = post(url, body, path)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_tokenizer_routes_need_the_api_key(tiny) -> None:
    with live_server(create_app(*tiny, model_name="tiny", api_key="sesame")) as url:
        assert httpx.get(f"{url}/tokenizer_info", timeout=30).status_code == 401
        ok = httpx.get(f"{url}/tokenizer_info", headers={"Authorization": "Bearer sesame"}, timeout=30)
        assert ok.status_code == 200


def test_lm_eval_local_completions_against_the_server(tiny, url, tmp_path) -> None:
    """`lm_eval --model local-completions` with the server's own tokenizer (tokenizer_backend=remote) on a small
    local multiple-choice task: each choice's log-likelihood is what one forward of the model gives (1e-4, as
    lm-eval on the model in-process: tests/eval/test_lm_eval_adapter.py), and acc follows from them."""
    pytest.importorskip("lm_eval")
    import os
    import subprocess
    import sys

    from conftest import REPO

    model, tokenizer = tiny
    docs = [{"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "gold": 0},
            {"question": "How many legs does a dog have?", "choices": ["two", "four", "six"], "gold": 1},
            {"question": "What do bees make?", "choices": ["milk", "honey", "silk"], "gold": 1}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_qa.yaml").write_text(
        "task: smollm2_served_qa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "unused",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets"), "HF_HOME": str(tmp_path / "hf-home")}
    model_args = (f"model=tiny,base_url={url}/v1/completions,tokenizer_backend=remote,tokenized_requests=True,"
                  "num_concurrent=1,max_retries=1")
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "smollm2_served_qa", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out),
               "--log_samples"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_smollm2_served_qa_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    hits = 0
    for doc, sample in zip(docs, samples, strict=True):
        context = tokenizer.encode(f"Question: {doc['question']}\nAnswer:")
        expected = [float(reference_logprobs(model, [*context, *tokenizer.encode(f" {c}")])[len(context) - 1:].sum())
                    for c in doc["choices"]]
        assert [float(resp[0][0]) for resp in sample["resps"]] == pytest.approx(expected, abs=1e-4, rel=0)
        hits += max(range(len(expected)), key=expected.__getitem__) == doc["gold"]
    results = json.loads(results_file.read_text())["results"]["smollm2_served_qa"]
    assert results["acc,none"] == pytest.approx(hits / len(docs))
