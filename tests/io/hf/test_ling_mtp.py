"""Ling 2.0's multi-token-prediction layers in Hugging Face folders: where they are (after
num_hidden_layers in the authors' code; the last n of them in an older reading), read into and
written from our MTP modules, and the folders that fit neither reading refused by name."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re

import pytest
import torch
from hf_utils import randomize_
from safetensors import safe_open
from safetensors.torch import save_file

from moe import ModelConfig, MoEConfig, Transformer
from moe.errors import InputError
from moe.io.hf import FAMILIES, load_hf

LING = FAMILIES["bailing_moe_v2"]
CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=32,
    qk_norm=True,
    rope_fraction=0.5,
    first_k_dense=1,
    num_mtp_layers=1,
    moe=MoEConfig(
        num_experts=4,
        top_k=2,
        expert_ffn_size=8,
        num_shared_experts=1,
        score_func="sigmoid",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        expert_bias=True,
    ),
)
wired = pytest.mark.skipif(
    "for_tensors" not in inspect.getsource(load_hf),
    reason="load_hf does not call Family.for_tensors yet (see moe/io/hf/bailing_moe_v2.py)",
)


def tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def renumbered(weights: dict, old: int, new: int) -> dict:
    return {re.sub(rf"^model\.layers\.{old}\.", f"model.layers.{new}.", n): t.clone() for n, t in weights.items()}


def write(folder, config: dict, weights: dict):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(Transformer(CONFIG), seed=1, stacked_in_dim=True).eval()
    folder = tmp_path_factory.mktemp("ling-mtp") / "ling"
    model.save_pretrained(folder, format="hf", family="bailing_moe_v2")
    return model, folder


def assert_same_weights(ours: Transformer, theirs: Transformer) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_export_writes_the_mtp_layer_after_the_decoder_layers(exported):
    model, folder = exported
    config, on_disk = json.loads((folder / "config.json").read_text()), tensors(folder)
    assert (config["num_hidden_layers"], config["num_nextn_predict_layers"]) == (2, 1)
    for part in ("enorm", "hnorm", "eh_proj", "final_layernorm", "input_layernorm", "attention.dense"):
        assert f"model.layers.2.{part}.weight" in on_disk, part
    assert torch.equal(on_disk["model.layers.2.eh_proj.weight"], model.mtp[0].eh_proj.weight)
    assert torch.equal(on_disk["model.layers.2.final_layernorm.weight"], model.mtp[0].norm.weight)
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in on_disk  # the MTP block is a MoE layer
    assert not any(n.startswith("model.layers.2.") and "embed" in n for n in on_disk)  # no embedding copy


def test_the_family_places_each_layout(exported):
    _, folder = exported
    config, names = json.loads((folder / "config.json").read_text()), list(tensors(folder))
    after = LING.for_tensors(config, names)
    assert (after["num_hidden_layers"], list(LING.mtp_layers(after))) == (2, [2])
    as_last = {**config, "num_hidden_layers": 3}  # the same tensors read as "the last 1 of 3"
    with pytest.warns(UserWarning, match=r"last 1 of num_hidden_layers = 3"):
        last = LING.for_tensors(as_last, names)
    assert (last["num_hidden_layers"], list(LING.mtp_layers(last))) == (2, [2])
    assert LING.to_config(last, "x").num_layers == 2 and LING.to_config(last, "x").num_mtp_layers == 1


@wired
def test_round_trip_is_exact(exported):
    model, folder = exported
    loaded = Transformer.from_hf(folder)
    assert (loaded.config.num_layers, loaded.config.num_mtp_layers) == (2, 1)
    assert_same_weights(model, loaded)


@wired
def test_the_mtp_layer_as_the_last_of_num_hidden_layers_loads_the_same_model(exported, tmp_path):
    model, folder = exported
    config = json.loads((folder / "config.json").read_text())
    folder_b = write(tmp_path / "last", {**config, "num_hidden_layers": 3}, tensors(folder))
    with pytest.warns(UserWarning, match="last 1 of num_hidden_layers"):
        loaded = Transformer.from_hf(folder_b)
    assert_same_weights(model, loaded)


@wired
def test_a_config_that_counts_mtp_layers_the_folder_lacks_loads_without_them(tmp_path):
    model = randomize_(Transformer(dataclasses.replace(CONFIG, num_mtp_layers=0)), seed=2, stacked_in_dim=True)
    model.save_pretrained(tmp_path / "plain", format="hf", family="bailing_moe_v2")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    folder = write(tmp_path / "counted", {**config, "num_nextn_predict_layers": 1}, tensors(tmp_path / "plain"))
    with pytest.warns(UserWarning, match="holds none"):
        loaded = Transformer.from_hf(folder)
    assert (loaded.config.num_layers, len(loaded.mtp)) == (2, 0)
    assert_same_weights(model, loaded)


@wired
def test_mtp_tensors_in_both_places_are_refused_naming_the_conventions(exported, tmp_path):
    _, folder = exported
    config, weights = json.loads((folder / "config.json").read_text()), tensors(folder)
    both = {**weights, **renumbered({n: t for n, t in weights.items() if "layers.2." in n}, 2, 1)}
    with pytest.raises(InputError, match=r"layer\(s\) \[1, 2\] fit neither convention.*\[2\].*\[1\]"):
        Transformer.from_hf(write(tmp_path / "both", config, both))


def test_a_marker_at_an_unrelated_layer_is_refused(exported):
    _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    names = [*tensors(folder), "model.layers.0.hnorm.weight"]
    with pytest.raises(InputError, match=r"layer\(s\) \[0, 2\]"):
        LING.for_tensors(config, names)


@wired
def test_a_partial_mtp_layer_is_refused_naming_the_missing_tensor(exported, tmp_path):
    _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    kept = {n: t for n, t in tensors(folder).items() if n != "model.layers.2.enorm.weight"}
    with pytest.raises(InputError, match=r"missing: model\.layers\.2\.enorm\.weight"):
        Transformer.from_hf(write(tmp_path / "partial", config, kept))
