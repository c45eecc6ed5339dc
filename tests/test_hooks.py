"""Hook points (smollm2/hooks.py): captured activations against transformers' on the same weights, edits that
must change nothing (bitwise) or exactly what they say, a KV cache and batches, and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import smollm2
from smollm2 import hooks as H
from smollm2.config import Config
from smollm2.kv_cache import KVCache
from smollm2.model import SmolLM2, no_hook, sdpa_attention


def tiny(config: Config) -> SmolLM2:
    model = SmolLM2(config)
    model.init_weights()
    with torch.no_grad():  # norms away from 1, so that a point before/after a norm's weight tells apart
        for module in model.modules():
            if isinstance(module, smollm2.model.RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    return model.eval()


def all_unhooked(model: SmolLM2) -> bool:
    return all(getattr(m, "hook", no_hook) is no_hook for m in model.modules()) and all(
        block.self_attn.attention is sdpa_attention for block in model.model.layers)


@pytest.fixture
def gqa_config(tiny_config: Config) -> Config:
    return dataclasses.replace(tiny_config, hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                               num_hidden_layers=3)


# ---- against transformers -------------------------------------------------------------------------------------


def test_hidden_states_and_patterns_equal_transformers(gqa_config: Config) -> None:
    pytest.importorskip("transformers")
    from test_model import hf_twin

    hf, ours = hf_twin(gqa_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # norms away from 1 (then ours get the same through the twin)
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    ours.load_state_dict(hf.state_dict())
    hf.set_attn_implementation("eager")
    ids = torch.randint(0, gqa_config.vocab_size, (2, 9))
    L = gqa_config.num_hidden_layers
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
        with smollm2.capture(ours, ["blocks.*.hook_resid_pre", "blocks.*.attn.pattern", "ln_final.normalized",
                                    "hook_logits"]) as acts:
            logits = ours(ids)
    assert len(out.hidden_states) == L + 1 and len(out.attentions) == L
    for i in range(L):  # transformers' hidden_states[i] is the input of layer i
        assert (acts[f"blocks.{i}.hook_resid_pre"] - out.hidden_states[i]).abs().max() <= 1e-5, i
        assert acts[f"blocks.{i}.attn.hook_pattern"].shape == (2, 6, 9, 9)
        assert (acts[f"blocks.{i}.attn.hook_pattern"] - out.attentions[i]).abs().max() <= 1e-5, i
    # ... and its last one is the final norm's output: our normalized point times the norm's weight
    final = acts["ln_final.hook_normalized"] * ours.model.norm.weight
    assert (final - out.hidden_states[L]).abs().max() <= 1e-5
    assert (acts["hook_logits"] - out.logits).abs().max() <= 1e-5
    assert torch.equal(acts["hook_logits"], logits)


@pytest.mark.slow
@pytest.mark.hf
def test_real_weights_hidden_states_equal_transformers(real, hf_real) -> None:
    model, tokenizer = real
    ids = torch.tensor([tokenizer.encode("When Mary and John went to the store, John gave a drink to")])
    with torch.no_grad():
        expected = hf_real(ids, output_hidden_states=True).hidden_states
        with smollm2.capture(model, "blocks.*.hook_resid_post") as acts:
            model(ids)
    worst = max((acts[f"blocks.{i}.hook_resid_post"] - expected[i + 1]).abs().max().item() for i in range(29))
    assert worst <= 1e-5 * max(1.0, max(h.abs().max().item() for h in expected))  # |h| reaches ~2e4 at block 11
    assert all_unhooked(model)


# ---- what hooks must not change, and what edits must change ---------------------------------------------------


def test_add_zero_everywhere_changes_nothing_bitwise(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
    with torch.no_grad():
        plain = model(ids)
        every = [n for n in H.hook_names(model) if not n.endswith(("hook_attn_scores", "hook_pattern"))]
        with H.edit(model, {name: H.add(0.0) for name in every}):
            hooked = model(ids)
        after = model(ids)
    assert torch.equal(plain, hooked) and torch.equal(plain, after)
    assert all_unhooked(model)


def test_the_explicit_attention_agrees_with_sdpa(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 8))
    with torch.no_grad():
        plain = model(ids)
        with smollm2.capture(model, "blocks.*.attn.hook_pattern") as acts:
            explicit = model(ids)
    assert (plain - explicit).abs().max() <= 1e-5
    pattern = acts["blocks.1.attn.hook_pattern"]  # (B, head, query, key): rows sum to 1, nothing from the future
    assert torch.allclose(pattern.sum(-1), torch.ones(2, 4, 8), atol=1e-6)
    assert pattern.triu(1).abs().max() == 0
    assert all_unhooked(model)


def test_patching_the_whole_clean_residual_at_the_last_layer_gives_the_clean_logits(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    clean = torch.randint(0, tiny_config.vocab_size, (1, 8))
    corrupt = clean.clone()
    corrupt[0, 2] = (clean[0, 2] + 1) % tiny_config.vocab_size
    last = tiny_config.num_hidden_layers - 1
    with torch.no_grad():
        with smollm2.capture(model, [f"blocks.{last}.hook_resid_pre", f"blocks.{last}.hook_resid_post"]) as acts:
            clean_logits = model(clean)
        corrupt_logits = model(corrupt)
        assert not torch.equal(clean_logits, corrupt_logits)
        for name in acts:
            with H.edit(model, {name: H.patch(acts)}):
                assert torch.equal(model(corrupt), clean_logits), name
        with H.edit(model, {f"blocks.{last}.hook_resid_pre": H.patch(acts, positions=[0, 1])}):
            early = model(corrupt)  # the positions the corruption had not reached yet: nothing changes
        assert torch.equal(early, corrupt_logits)


def test_zeroing_a_head_of_z_is_removing_its_columns_of_o_proj(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    hd = tiny_config.head_dim
    with torch.no_grad():
        with H.edit(model, {"blocks.0.attn.hook_z": H.zero(heads=[1])}), \
                smollm2.capture(model, ["blocks.0.attn.hook_z", "blocks.0.hook_attn_out"]) as acts:
            model(ids)
        z = acts["blocks.0.attn.hook_z"]  # (B, T, head, hd): the edited one
        assert z[:, :, 1].abs().max() == 0 and z[:, :, 0].abs().max() > 0
        w = model.model.layers[0].self_attn.o_proj.weight.clone()
        w[:, hd: 2 * hd] = 0
        expected = z.reshape(2, 6, -1) @ w.T
    assert (acts["blocks.0.hook_attn_out"] - expected).abs().max() <= 1e-5


def test_add_at_one_position_changes_that_position_and_later_only(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 6))
    direction = torch.randn(tiny_config.hidden_size)
    with torch.no_grad():
        plain = model(ids)
        with H.edit(model, {"blocks.1.hook_resid_pre": H.add(direction, positions=3)}):
            steered = model(ids)
    assert torch.equal(steered[:, :3], plain[:, :3])  # causal: positions before 3 cannot see it
    assert (steered[:, 3] - plain[:, 3]).abs().max() > 1e-3


def test_replace_and_in_place_edits(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 5))
    shape = (2, 5, tiny_config.intermediate_size)

    def halve(x: torch.Tensor, name: str) -> None:
        assert name == "blocks.0.mlp.hook_post"
        x.mul_(0.5)  # in place, returning None

    with torch.no_grad():
        with H.edit(model, {"blocks.0.mlp.hook_post": H.replace(torch.zeros(shape))}), \
                smollm2.capture(model, "blocks.0.hook_mlp_out") as zeroed:
            model(ids)
        with smollm2.capture(model, ["blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out"]) as plain:
            model(ids)
        with H.edit(model, {"blocks.0.mlp.hook_post": halve}), \
                smollm2.capture(model, "blocks.0.hook_mlp_out") as halved:
            model(ids)
    assert zeroed["blocks.0.hook_mlp_out"].abs().max() == 0
    assert (halved["blocks.0.hook_mlp_out"] - 0.5 * plain["blocks.0.hook_mlp_out"]).abs().max() <= 1e-6


def test_nested_contexts_run_in_the_order_opened(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 4))
    with torch.no_grad(), smollm2.capture(model, "blocks.0.hook_attn_out") as before:
        with H.edit(model, {"blocks.0.hook_attn_out": H.zero()}):
            with smollm2.capture(model, "blocks.0.hook_attn_out") as after:
                model(ids)
        assert model.model.layers[0].hook is not no_hook  # the outer capture is still open
    assert before["blocks.0.hook_attn_out"].abs().max() > 0
    assert after["blocks.0.hook_attn_out"].abs().max() == 0
    assert all_unhooked(model)


# ---- a KV cache, batches, generation ------------------------------------------------------------------------------


def test_prefill_and_decode_steps_read_like_one_forward(gqa_config: Config) -> None:
    model = tiny(gqa_config)
    ids = torch.randint(0, gqa_config.vocab_size, (2, 10))
    names = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_rot_k", "blocks.2.attn.hook_pattern",
             "blocks.0.attn.hook_z", "hook_logits"]
    with torch.no_grad():
        with smollm2.capture(model, names) as whole:
            model(ids)
        cache = KVCache(gqa_config, 2, 16)
        with smollm2.capture(model, names) as steps:
            model(ids[:, :6], cache=cache)
            for t in range(6, 10):
                model(ids[:, t:t + 1], cache=cache, start=t)
    assert [tuple(t.shape) for t in steps.calls("blocks.2.attn.hook_pattern")] == [
        (2, 6, 6, 6), (2, 6, 1, 7), (2, 6, 1, 8), (2, 6, 1, 9), (2, 6, 1, 10)]
    for name in names:
        assert steps[name].shape == whole[name].shape, name
        assert (steps[name] - whole[name]).abs().max() <= 1e-5, name


def test_each_row_of_a_batch_is_its_own_run(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (3, 7))
    with torch.no_grad():
        with smollm2.capture(model, ["blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post"]) as batch:
            model(ids)
        for row in range(3):
            with smollm2.capture(model, ["blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_post"]) as one:
                model(ids[row:row + 1])
            for name in one:
                assert (batch[name][row] - one[name][0]).abs().max() <= 1e-5, (name, row)


def test_generate_runs_eagerly_through_the_hooks_and_the_compiled_step_comes_back(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    calls = []

    def fake_step(*args: object) -> torch.Tensor:  # stands in for a compiled step: hooks must bypass it
        calls.append(args)
        raise AssertionError("the compiled step ran while hooks were set")

    model.compiled_step = fake_step
    prompt = [5, 6, 7]
    with smollm2.capture(model, "blocks.0.hook_resid_pre") as acts:
        tokens = list(smollm2.generate(model, prompt, max_new_tokens=4, ignore_eos=True))
    assert model.compiled_step is fake_step and not calls
    assert [tuple(t.shape) for t in acts.calls("blocks.0.hook_resid_pre")] == [(1, 3, 64)] + [(1, 1, 64)] * 3
    assert acts["blocks.0.hook_resid_pre"].shape == (1, 6, 64)
    model.compiled_step = None
    assert list(smollm2.generate(model, prompt, max_new_tokens=4, ignore_eos=True)) == tokens


# ---- bad input ------------------------------------------------------------------------------------------------------


def test_bad_names_list_the_valid_ones(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    with pytest.raises(ValueError, match=r"did you mean 'blocks.0.attn.hook_pattern'.*blocks.\{0..1\}.hook_resid_pre"):
        with smollm2.capture(model, ["blocks.0.attn.hook_patern"]):
            pass
    with pytest.raises(ValueError, match=r"the model has 2 blocks, blocks.0 to blocks.1"):
        H.resolve(model, "blocks.2.hook_resid_pre")
    with pytest.raises(ValueError, match=r"matches no hook point.*hook_logits"):
        H.resolve(model, "blocks.*.hook_nothing")
    with pytest.raises(ValueError, match=r"unknown hook point 'resid_pre'"):
        H.resolve(model, "resid_pre")
    with pytest.raises(TypeError, match="strings"):
        H.resolve(model, [3])
    with pytest.raises(TypeError, match="must be callable"):
        with H.edit(model, {"hook_embed": 0.0}):
            pass
    with pytest.raises(TypeError, match="SmolLM2"):
        with smollm2.capture(torch.nn.Linear(2, 2), "hook_embed"):
            pass
    assert all_unhooked(model)
    assert H.resolve(model, ["blocks.1.attn.pattern", "blocks.1.attn.hook_pattern"]) == ["blocks.1.attn.hook_pattern"]
    assert len(H.hook_names(model)) == 18 * 2 + 3


def test_bad_edits_say_what_is_wrong(tiny_config: Config) -> None:
    model = tiny(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (1, 5))
    with torch.no_grad(), smollm2.capture(model, "blocks.0.hook_resid_pre") as clean:
        model(ids)
    cases = [
        ({"blocks.0.hook_resid_pre": lambda x, name: x[:, :2]}, r"returned \(1, 2, 64\), expected .*\(1, 7, 64\)"),
        ({"blocks.0.hook_resid_pre": H.patch(clean)}, r"source is \(1, 5, 64\).*\(1, 7, 64\).*same number of tokens"),
        ({"blocks.0.hook_attn_out": H.patch(clean)}, r"no activation at blocks.0.hook_attn_out"),
        ({"blocks.0.hook_resid_pre": H.zero(heads=[0])}, r"has no head axis"),
        ({"blocks.0.attn.hook_z": H.zero(heads=[4])}, r"heads \[4\] out of range .* size 4"),
        ({"blocks.0.hook_resid_pre": H.add(torch.ones(3))}, r"cannot add a tensor of shape \(3,\)"),
    ]
    longer = torch.randint(0, tiny_config.vocab_size, (1, 7))
    for edits, message in cases:
        with pytest.raises(ValueError, match=message), torch.no_grad(), H.edit(model, edits):
            model(longer)
        assert all_unhooked(model)


def test_a_models_own_attention_function_comes_back(tiny_config: Config) -> None:
    """A fast path's attention (compiled_step.kernel_attention, say) is swapped for the explicit one only while
    the pattern is hooked, and only on the layers hooked there."""
    model = tiny(tiny_config)
    calls = []

    def own(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        calls.append(q.shape)
        return sdpa_attention(q, k, v, mask)

    for block in model.model.layers:
        block.self_attn.attention = own
    ids = torch.randint(0, tiny_config.vocab_size, (1, 4))
    with torch.no_grad(), smollm2.capture(model, ["blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z"]) as acts:
        model(ids)
        assert model.model.layers[1].self_attn.attention is not own
    assert len(calls) == 1  # block 0 kept its own function; block 1 attended explicitly
    assert acts["blocks.1.attn.hook_pattern"].shape == (1, 4, 4, 4)
    assert all(block.self_attn.attention is own for block in model.model.layers)
