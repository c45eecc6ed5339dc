"""Activation patching (smollm2/interp/patching.py): the batched runs equal one patch at a time through
smollm2.hooks, patching the only corrupted token at the embedding recovers everything, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

import smollm2
from smollm2 import hooks
from smollm2.config import Config
from smollm2.interp.patching import activation_patching, logit_diff
from smollm2.model import SmolLM2


@pytest.fixture
def model(tiny_config: Config) -> SmolLM2:
    model = SmolLM2(tiny_config)
    model.init_weights()
    return model.eval()


def prompts(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(3, config.vocab_size, (7,))
    corrupt = clean.clone()
    corrupt[2] = (clean[2] + 5) % config.vocab_size
    return clean, corrupt


def test_batched_patching_equals_one_patch_at_a_time(model: SmolLM2, tiny_config: Config) -> None:
    clean, corrupt = prompts(tiny_config)
    answer, wrong = 10, 20
    result = activation_patching(model, clean, corrupt, answer, wrong)
    assert result.resid.shape == (2, 7) and result.heads.shape == (2, 4)
    span = result.clean_diff - result.corrupt_diff
    with torch.no_grad(), smollm2.capture(model, ["blocks.*.hook_resid_pre", "blocks.*.attn.hook_z"]) as acts:
        model(clean[None])
    with torch.no_grad():
        for layer, pos in [(0, 2), (1, 2), (1, 6), (1, 0)]:
            with hooks.edit(model, {f"blocks.{layer}.hook_resid_pre": hooks.patch(acts, positions=[pos])}):
                d = float(logit_diff(model(corrupt[None], output="last_logits")[0], answer, wrong))
            assert abs((d - result.corrupt_diff) / span - float(result.resid[layer, pos])) <= 1e-4, (layer, pos)
        for layer, head in [(0, 1), (1, 3)]:
            with hooks.edit(model, {f"blocks.{layer}.attn.hook_z": hooks.patch(acts, heads=[head])}):
                d = float(logit_diff(model(corrupt[None], output="last_logits")[0], answer, wrong))
            assert abs((d - result.corrupt_diff) / span - float(result.heads[layer, head])) <= 1e-4, (layer, head)
    # At the embedding only the corrupted position differs: patching it is the clean run, the others nothing.
    assert abs(float(result.resid[0, 2]) - 1.0) <= 1e-4
    assert result.resid[0, [0, 1, 3, 4, 5, 6]].abs().max() <= 1e-4
    # Before the corrupted position nothing can differ, at any layer (causal attention).
    assert result.resid[:, :2].abs().max() <= 1e-4


def test_without_heads(model: SmolLM2, tiny_config: Config) -> None:
    clean, corrupt = prompts(tiny_config)
    result = activation_patching(model, clean.tolist(), corrupt.tolist(), 10, 20, heads=False)
    assert result.heads is None and result.to_dict()["heads_z"] is None
    assert len(result.to_dict()["resid_pre"]) == 2


def test_bad_input(model: SmolLM2, tiny_config: Config) -> None:
    clean, corrupt = prompts(tiny_config)
    with pytest.raises(ValueError, match="same number of tokens, got 7 and 6"):
        activation_patching(model, clean, corrupt[:6], 10, 20)
    with pytest.raises(ValueError, match="must differ"):
        activation_patching(model, clean, corrupt, 10, 10)
    with pytest.raises(ValueError, match="wrong token must be an id"):
        activation_patching(model, clean, corrupt, 10, 999)
    with pytest.raises(ValueError, match="same logit difference"):
        activation_patching(model, clean, clean, 10, 20)
    with pytest.raises(ValueError, match="clean prompt must be one non-empty"):
        activation_patching(model, [], corrupt, 10, 20)
