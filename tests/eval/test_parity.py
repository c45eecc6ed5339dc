"""`smollm2 compare`: the report on the real weights, its JSON and plot, the CLI, and a forced disagreement.

The real comparison runs once (module scope) on the session's `real` / `hf_real` models; every other check
reads that report or recomputes one value independently.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smollm2.eval.parity as compare
from conftest import REPO
from smollm2 import Config, cli
from smollm2.commands import compare as command

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "def fibonacci(n):")
NEW_TOKENS = 8
TOLERANCE = 1e-4
N_PARAMETERS_135M = 134_515_008
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JSON_KEYS = {"source", "versions", "tolerance", "max_new_tokens", "timings_s", "config", "modules", "parameters",
             "parameters_total", "embeddings", "layers", "final_norm", "prompts", "failures",
             "first_divergent_layer", "ok"}


@pytest.fixture(scope="module")
def report(real, hf_real) -> compare.Report:
    model, tokenizer = real
    return compare.build_report(prompts=PROMPTS, max_new_tokens=NEW_TOKENS, tolerance=TOLERANCE,
                                model=model, tokenizer=tokenizer, reference=hf_real)


# ---- the report on the real weights ------------------------------------------------------------------------


def test_parameter_counts(report, real):
    model, _ = real
    total = report.parameters_total
    assert total["ours"] == total["transformers"] == N_PARAMETERS_135M == model.config.num_parameters()
    assert sum(row.ours for row in report.parameters) == total["ours"]
    rows = {row.name: row for row in report.parameters}
    assert rows["model.embed_tokens.weight"].ours == 49152 * 576
    q = rows["model.layers.*.self_attn.q_proj.weight"]
    assert (q.count, q.shape, q.ours) == (30, [576, 576], 30 * 576 * 576)
    head = rows["lm_head.weight"]  # tied: listed, pointed at the embedding, counted zero times
    assert (head.tied_to, head.ours, head.transformers) == ("model.embed_tokens.weight", 0, 0)
    assert all(row.max_abs_diff is not None and row.max_abs_diff <= TOLERANCE for row in report.parameters)


def test_every_block_agrees(report):
    assert [layer.name for layer in report.layers] == [f"block {i}" for i in range(30)]
    for state in (report.embeddings, *report.layers, report.final_norm):
        assert state.max_abs_diff <= TOLERANCE, state
        assert state.max_abs_value > 0  # the hooks saw real activations, not empty tensors
    assert report.first_divergent_layer is None


def test_hidden_states_line_up(real, hf_real):
    """transformers' hidden_states[-1] is the final norm's output, not the last block's: check our mapping."""
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    ours, logits_ours = compare.ours_forward(model, ids)
    theirs, logits_theirs = compare.transformers_forward(hf_real, ids)
    assert len(ours) == len(theirs) == 32  # embeddings, 30 blocks, final norm
    with torch.no_grad():
        assert torch.equal(theirs[-1], hf_real.model.norm(theirs[-2]))
        assert torch.equal(ours[-1], model.hidden(ids))
        assert torch.equal(ours[0], model.model.embed_tokens(ids))
        assert torch.equal(logits_ours, model(ids))
    assert not torch.allclose(theirs[-2], theirs[-1])  # the last block's raw output really is a different tensor
    for a, b in zip(ours, theirs, strict=True):
        assert (a - b).abs().max().item() <= TOLERANCE
    assert (logits_ours - logits_theirs).abs().max().item() <= TOLERANCE


def test_logits_and_top5(report, real, hf_real):
    _, tokenizer = real
    for result in report.prompts:
        assert result.input_ids == tokenizer.encode(result.prompt)
        assert result.logits_max_abs_diff <= TOLERANCE and result.last_logits_max_abs_diff <= TOLERANCE
        with torch.no_grad():
            probs = hf_real(torch.tensor([result.input_ids])).logits[0, -1].softmax(-1)
        expected = probs.topk(5)
        assert [t.id for t in result.top_transformers] == expected.indices.tolist()
        assert [t.id for t in result.top_ours] == expected.indices.tolist()
        assert [t.prob for t in result.top_ours] == pytest.approx(expected.values.tolist(), abs=1e-6)
        assert [t.text for t in result.top_ours] == [tokenizer.decode([i]) for i in expected.indices.tolist()]


def test_greedy_continuations_identical(report, real):
    model, tokenizer = real
    for result in report.prompts:
        assert result.greedy_identical and result.first_divergent_token is None
        assert result.greedy_ours == result.greedy_transformers
        n = len(result.greedy_ours)
        assert n == NEW_TOKENS or result.greedy_ours[-1] == tokenizer.eos_id
        assert result.text_ours == tokenizer.decode(result.greedy_ours)
        # Our cached loop against one uncached forward pass: each token is the argmax after its prefix.
        ids = torch.tensor([result.input_ids + result.greedy_ours[:-1]])
        with torch.no_grad():
            argmax = model(ids)[0, len(result.input_ids) - 1:].argmax(-1).tolist()
        assert argmax == result.greedy_ours


def test_config_and_module_rows(report):
    config = {row.field: row for row in report.config}
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        assert config[name].match and config[name].architectural, config[name]
    assert config["rope_theta"].transformers == 100000.0  # read from transformers 5's rope_parameters
    modules = {row.path: row for row in report.modules}
    assert (modules[""].ours, modules[""].transformers) == ("SmolLM2", "LlamaForCausalLM")
    block = modules["model.layers.*"]
    assert (block.count, block.ours, block.transformers) == (30, "Block", "LlamaDecoderLayer")
    assert modules["model.layers.*.mlp.down_proj"].ours == "Linear(1536->576)"
    assert modules["model.rotary_emb"].ours is None  # ours computes RoPE in functions, not a module
    order = [row.path for row in report.modules]
    assert order.index("model.rotary_emb") == order.index("model.norm") + 1  # slotted in after its neighbour
    assert report.ok and report.failures == []


def test_config_difference_is_flagged(real, hf_real):
    model, _ = real
    theirs = hf_real.config.__class__(**{**hf_real.config.to_dict(), "num_key_value_heads": 9})
    rows = {row.field: row for row in compare.compare_configs(model.config.to_dict(), theirs)}
    assert not rows["num_key_value_heads"].match and rows["num_key_value_heads"].architectural
    assert rows["hidden_size"].match
    assert not rows["initializer_range"].architectural  # training metadata: shown, never a failure


# ---- outputs: JSON, plot, terminal ---------------------------------------------------------------------------


def test_json_has_the_documented_keys(report, tmp_path):
    path = tmp_path / "report.json"
    command.write_json(report, path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert set(data) == JSON_KEYS
    assert all(key in compare.__doc__ for key in JSON_KEYS)  # the keys are the ones the module documents
    assert data["ok"] is True and data["failures"] == [] and data["first_divergent_layer"] is None
    assert data["parameters_total"] == {"ours": N_PARAMETERS_135M, "transformers": N_PARAMETERS_135M}
    assert [layer["max_abs_diff"] for layer in data["layers"]] == [layer.max_abs_diff for layer in report.layers]
    assert [p["prompt"] for p in data["prompts"]] == list(PROMPTS)
    assert data["prompts"][1]["greedy_ours"] == report.prompts[1].greedy_ours
    assert data["prompts"][0]["top_ours"][0]["id"] == report.prompts[0].top_ours[0].id
    assert (data["tolerance"], data["max_new_tokens"]) == (TOLERANCE, NEW_TOKENS)


def test_plot_writes_a_png(report, tmp_path):
    path = tmp_path / "layers.png"
    command.plot(report, path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000


def test_terminal_report_fits_100_columns(report):
    from rich.console import Console

    out = io.StringIO()
    command.render(report, Console(file=out, width=100))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100
    top1 = repr(report.prompts[0].top_ours[0].text)  # shown as ' Paris', quotes and all
    first_word = report.prompts[0].text_ours.split()[0]
    for expected in ("134,515,008", "AGREE", "LlamaDecoderLayer", "rotary_emb", top1, first_word):
        assert expected in text, expected


# ---- disagreement ------------------------------------------------------------------------------------------


def test_a_perturbed_layer_is_pinpointed(real, hf_real, monkeypatch, tmp_path, capsys):
    """Nudge one weight of block 7 in our model: the CLI exits 1 and the report names block 7 first."""
    model, tokenizer = real
    weight = model.model.layers[7].mlp.down_proj.weight
    saved = weight.detach().clone()
    monkeypatch.setattr("smollm2.loading.load", lambda source=None, **kw: (model, tokenizer))
    monkeypatch.setattr(compare, "load_transformers", lambda source=None: hf_real)
    out = tmp_path / "broken.json"
    try:
        with torch.no_grad():
            weight[0, 0] += 0.5
        code = cli.main(["compare", "--prompts", PROMPTS[0], "--max-new-tokens", "2", "--json", str(out)])
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert torch.equal(weight, saved)
    assert code == 1
    assert "DISAGREE" in capsys.readouterr().out
    broken = json.loads(out.read_text(encoding="utf-8"))
    assert broken["ok"] is False and broken["first_divergent_layer"] == 7
    diffs = [layer["max_abs_diff"] for layer in broken["layers"]]
    assert all(d <= TOLERANCE for d in diffs[:7]) and diffs[7] > TOLERANCE
    assert broken["embeddings"]["max_abs_diff"] <= TOLERANCE
    down = next(row for row in broken["parameters"] if row["name"] == "model.layers.*.mlp.down_proj.weight")
    assert down["differing"] == ["model.layers.7.mlp.down_proj.weight"]
    assert down["max_abs_diff"] == pytest.approx(0.5)
    assert any("model.layers.7.mlp.down_proj.weight" in line for line in broken["failures"])
    assert any("block 7" in line for line in broken["failures"])


# ---- the command line ----------------------------------------------------------------------------------------


def test_command_line_run(report, tmp_path):
    """`python -m smollm2 compare` on the bundled GGUF, as a user runs it; exit code 0 and the same numbers."""
    out, png = tmp_path / "report.json", tmp_path / "layers.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "smollm2", "compare", "--prompts", PROMPTS[0], "--max-new-tokens", "4",
         "--json", str(out), "--plot", str(png)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "AGREE" in result.stdout and "134,515,008" in result.stdout
    data = json.loads(out.read_text(encoding="utf-8"))
    assert set(data) == JSON_KEYS and data["ok"] is True and len(data["layers"]) == 30
    assert data["timings_s"]["load_ours"] > 0 and data["timings_s"]["load_transformers"] > 0
    # Same prompt as the in-process report: the same tokens, cut at 4.
    assert data["prompts"][0]["greedy_ours"] == report.prompts[0].greedy_ours[:4]
    assert data["prompts"][0]["greedy_transformers"] == data["prompts"][0]["greedy_ours"]
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_directory_source(tiny_dir, tmp_path, capsys):
    """An original-layout directory: ours via smollm2.load, transformers via from_pretrained(dir)."""
    out = tmp_path / "tiny.json"
    code = cli.main(["compare", "--source", str(tiny_dir), "--prompts", "Hello world", "--max-new-tokens", "5",
                     "--json", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert code == 0, data["failures"]
    assert len(data["layers"]) == 2 and data["source"] == str(tiny_dir)
    expected = Config.from_json(tiny_dir / "config.json").num_parameters()
    assert data["parameters_total"]["ours"] == data["parameters_total"]["transformers"] == expected
    assert data["prompts"][0]["greedy_ours"] == data["prompts"][0]["greedy_transformers"]
    assert "AGREE" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real) -> Path:
    """A 2-layer random model with the real tokenizer, saved in the original's layout."""
    from smollm2 import SmolLM2, save_pretrained

    config = Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = SmolLM2(config)
    model.init_weights()
    return save_pretrained(model, tmp_path_factory.mktemp("tiny"), real[1])


def test_missing_transformers_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(compare.MissingExtra, match=r"pip install 'smollm2\[compare\]'"):
        compare.build_report(prompts=PROMPTS)
    assert cli.main(["compare"]) == 2  # before any loading: it fails at once
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "transformers" in err and "pip install" in err


def test_bad_options_are_user_errors(tmp_path, capsys):
    assert cli.main(["compare", "--tolerance", "-1"]) == 2
    assert "tolerance" in capsys.readouterr().err
    assert cli.main(["compare", "--json", str(tmp_path / "missing" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_nan_counts_as_disagreement(report):
    """A NaN compares False with everything: the verdict must still call it a difference."""
    layers = [dataclasses.replace(layer) for layer in report.layers]
    layers[3].max_abs_diff = float("nan")
    broken = dataclasses.replace(report, layers=layers, failures=[])
    compare.judge(broken)
    assert not broken.ok and broken.first_divergent_layer == 3
    assert report.ok  # the original is untouched
