"""Config: config.json round trips, presets, and every unsupported setting rejected by name."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, require
from smollm2.config import Config, preset


def test_original_config_json_is_the_135m_preset() -> None:
    instruct = Config.from_json(require(SHARED_DATA / "smollm2-135m-instruct" / "config.json"))
    assert instruct == preset("135m")
    base = Config.from_json(require(SHARED_DATA / "smollm2-135m" / "config.json"))
    # the base model ends documents with <|endoftext|> (id 0), the instruct model turns with <|im_end|>
    assert (base.bos_token_id, base.eos_token_id) == (0, 0)
    assert dataclasses.replace(base, bos_token_id=1, eos_token_id=2, pad_token_id=2) == preset("135m")


def test_round_trip(tmp_path: Path) -> None:
    for name in ("135m", "360m", "1.7b", "tiny"):
        path = tmp_path / f"{name}.json"
        preset(name).to_json(path)
        assert Config.from_json(path) == preset(name)


def test_transformers_reads_our_config_json(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    preset("360m").to_json(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_key_value_heads, hf.num_hidden_layers) == (960, 5, 32)
    hf.save_pretrained(tmp_path / "again")  # and transformers 5's spelling (rope_parameters, dtype) reads back
    assert Config.from_json(tmp_path / "again" / "config.json") == preset("360m")


def original() -> dict:
    return json.loads(require(SHARED_DATA / "smollm2-135m" / "config.json").read_text())


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("hidden_act", "gelu"),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_interleaved", True),
    ("pretraining_tp", 2),
    ("model_type", "mistral"),
])
def test_unsupported_settings_are_named(field: str, value: object) -> None:
    data = original() | {field: value}
    with pytest.raises(ValueError, match=f"{field}=.*not supported"):
        Config.from_dict(data)


def test_rope_parameters_type_rejected() -> None:
    data = original() | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported"):
        Config.from_dict(data)


def test_unknown_field_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['sliding_window'\]"):
        Config.from_dict(original() | {"sliding_window": 4096})


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": 7}, "hidden_size=576 is not divisible by num_attention_heads=7"),
    ({"num_key_value_heads": 2}, "num_attention_heads=9 is not divisible by num_key_value_heads=2"),
    ({"hidden_size": -576}, "hidden_size must be a positive integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive finite number"),
    ({"head_dim": 32}, "head_dim=32 is not supported"),
])
def test_inconsistent_values(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Config.from_dict(original() | changes)


def test_missing_field_and_bad_json(tmp_path: Path) -> None:
    data = original()
    del data["hidden_size"]
    with pytest.raises(ValueError, match=r"missing required config field\(s\) \['hidden_size'\]"):
        Config.from_dict(data)
    path = tmp_path / "config.json"
    path.write_text("{'not': json}")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        Config.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        Config.from_json(path)
    with pytest.raises(ValueError, match="config file not found"):
        Config.from_json(tmp_path / "absent.json")


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset '7b'"):
        preset("7b")
