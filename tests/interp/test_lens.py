"""The logit lens (smollm2/interp/lens.py): its last layer is the model's logits, its first the embedding through
the head, and bad input is refused."""

from __future__ import annotations

import pytest
import torch

from smollm2.config import Config
from smollm2.interp.lens import logit_lens, residual_streams, unembed
from smollm2.model import SmolLM2


@pytest.fixture
def model(tiny_config: Config) -> SmolLM2:
    model = SmolLM2(tiny_config)
    model.init_weights()
    return model.eval()


def test_the_lens_at_the_last_layer_is_the_models_logits(model: SmolLM2, tiny_config: Config) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (1, 9))
    streams, logits = residual_streams(model, ids)
    assert len(streams) == tiny_config.num_hidden_layers + 1
    with torch.no_grad():
        assert torch.equal(unembed(model, streams[-1]), logits)  # the same ops on the same tensor: to the bit
        assert torch.equal(unembed(model, streams[0]), unembed(model, model.model.embed_tokens(ids)))
        plain = model(ids)
    assert torch.equal(logits, plain)
    lens = logit_lens(model, ids[0], k=3)
    probs = plain[0].float().softmax(-1)
    top_p, top_i = probs.topk(3, dim=-1)
    assert torch.equal(lens.top_ids[-1], top_i)
    assert torch.allclose(lens.top_probs[-1], top_p, atol=1e-6)
    assert lens.answer_id == int(plain[0, -1].argmax()) and lens.answer_ranks[-1] == 1
    assert abs(lens.answer_probs[-1] - float(probs[-1].max())) <= 1e-6
    entropy = -(probs * probs.log()).sum(-1)
    assert torch.allclose(lens.entropies[-1], entropy, atol=1e-4)


def test_the_answers_rank_per_layer(model: SmolLM2, tiny_config: Config) -> None:
    ids = torch.randint(0, tiny_config.vocab_size, (1, 6))
    streams, _ = residual_streams(model, ids)
    answer = 17
    lens = logit_lens(model, ids, answer=answer)
    with torch.no_grad():
        for b, resid in enumerate(streams):
            last = unembed(model, resid)[0, -1]
            assert lens.answer_ranks[b] == int((last > last[answer]).sum()) + 1
    data = lens.to_dict()
    assert [layer["layer"] for layer in data["layers"]] == ["embed", "block 0", "block 1"]
    assert data["answer"]["id"] == answer and len(data["layers"][0]["positions"]) == 6


def test_bad_input(model: SmolLM2) -> None:
    with pytest.raises(ValueError, match="one non-empty prompt"):
        logit_lens(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one non-empty prompt"):
        logit_lens(model, [])
    with pytest.raises(ValueError, match=r"token ids must lie in 0..255"):
        logit_lens(model, [1, 300])
    with pytest.raises(ValueError, match="k must be between 1 and 256"):
        logit_lens(model, [1, 2], k=0)
    with pytest.raises(ValueError, match="answer must be a token id"):
        logit_lens(model, [1, 2], answer=256)
