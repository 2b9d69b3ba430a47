"""The config dataclasses document every field, and the size fields name their letter of the shape
legend (docs/architecture.md), so a reader can go from a YAML key to the tensor shapes it sets."""

import dataclasses
import re
from pathlib import Path

import pytest

from moe import ModelConfig, MoEConfig

LEGEND = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
LETTERS = {
    MoEConfig: {"num_experts": "E", "top_k": "K", "expert_ffn_size": "F", "n_group": "G"},
    ModelConfig: {
        "vocab_size": "V",
        "hidden_size": "D",
        "num_layers": "L",
        "num_heads": "H",
        "num_kv_heads": "Hkv",
        "head_dim": "Dh",
        "kv_lora_rank": "C",
        "qk_nope_head_dim": "Dn",
        "qk_rope_head_dim": "Dr",
        "v_head_dim": "Dv",
    },
}


@pytest.mark.parametrize("cls", [MoEConfig, ModelConfig])
def test_every_field_is_documented(cls):
    doc = cls.__doc__
    undocumented = [f.name for f in dataclasses.fields(cls) if not re.search(rf"(^|\s){f.name}[:,]", doc, re.M)]
    assert not undocumented


@pytest.mark.parametrize("cls", [MoEConfig, ModelConfig])
def test_size_fields_name_their_legend_letter(cls):
    legend = LEGEND.read_text()
    for name, letter in LETTERS[cls].items():
        assert re.search(rf"^\s+{name}: {letter}\b", cls.__doc__, re.M), f"{name} should say it sets {letter}"
        assert f"`{letter}`" in legend, f"{letter} is not in the legend of docs/architecture.md"
