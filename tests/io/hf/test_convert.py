"""`moe convert`: both directions, dtype and sharding options, progress bars, one-line errors."""

import argparse

import pytest
import torch
from hf_utils import randomize_
from safetensors.torch import load_file

from moe import ModelConfig, MoEConfig, Transformer
from moe.cli import main
from moe.cli.convert import parse_size
from moe.io.hf import save_hf

LING_LIKE = ModelConfig(
    vocab_size=40,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qk_norm=True,
    rope_fraction=0.5,
    first_k_dense=1,
    intermediate_size=20,
    moe=MoEConfig(
        num_experts=4,
        top_k=2,
        expert_ffn_size=8,
        num_shared_experts=1,
        score_func="sigmoid",
        n_group=2,
        topk_group=1,
        expert_bias=True,
    ),
)


def hf_folder(directory):
    model = randomize_(Transformer(LING_LIKE), seed=0, stacked_in_dim=True)
    save_hf(model, directory)
    return model


def test_hf_to_hf_in_bf16_with_shards_and_progress(tmp_path, capsys):
    model = hf_folder(tmp_path / "src")
    code = main(
        [
            "convert",
            str(tmp_path / "src"),
            str(tmp_path / "dst"),
            "--to",
            "hf",
            "--dtype",
            "bfloat16",
            "--max-shard-size",
            "20KB",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert "wrote" in out and "saving" in err and "loading" in err
    shards = sorted((tmp_path / "dst").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "dst" / "model.safetensors.index.json").is_file()
    tensors = {k: v for shard in shards for k, v in load_file(shard).items()}
    assert tensors["model.word_embeddings.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    loaded = Transformer.from_hf(tmp_path / "dst")
    torch.testing.assert_close(
        loaded.layers[1].ffn.experts.w_in, model.layers[1].ffn.experts.w_in.bfloat16(), rtol=0, atol=0
    )


def test_hf_to_ours_and_back_is_exact(tmp_path):
    pytest.importorskip("moe.io.checkpoint", reason="our own checkpoint format (moe/io/checkpoint.py) is not here")
    model = hf_folder(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--no-progress"]) == 0
    back = Transformer.from_hf(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "dst")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    hf_folder(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "src"), "--to", "hf"]) == 2
    assert "same folder" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", "hf", "--family", "mixtral"]) == 2
    assert "cannot export as mixtral" in capsys.readouterr().err


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5kb", 1500), ("4096", 4096)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5 parsecs", "-1GB", "0"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size(text)
