"""`moe convert` carries the tokenizer files across in both directions, reads hub cache
snapshots, and writes into an empty folder (refusals: tests/hostile/test_hostile_io.py)."""

import torch

from moe import ModelConfig, MoEConfig, Transformer
from moe.cli import convert, main
from moe.io.hf import save_hf

TINY = ModelConfig(
    vocab_size=40,
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qk_norm=True,
    first_k_dense=1,
    intermediate_size=20,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8),
)
TOKENIZER = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"eos_token": "</s>"}',
    "merges.txt": b"#version: 0.2\na b\n",
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "generation_config.json": b'{"eos_token_id": 2}',
}


def hf_folder(directory):
    torch.manual_seed(0)
    model = Transformer(TINY)
    save_hf(model, directory)
    for name, data in TOKENIZER.items():
        (directory / name).write_bytes(data)
    (directory / "README.md").write_text("a model card: not a tokenizer file")
    return model


def test_tokenizer_files_are_carried_both_ways(tmp_path, capsys):
    model = hf_folder(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-progress"]) == 0
    assert "tokenizer: tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--no-progress"]) == 0
    for folder in ("ours", "back"):
        names = {p.name for p in (tmp_path / folder).iterdir()}
        assert set(TOKENIZER) <= names and "README.md" not in names, folder
        for name, data in TOKENIZER.items():
            assert (tmp_path / folder / name).read_bytes() == data, (folder, name)
    back = Transformer.from_hf(tmp_path / "back")
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_a_tokenizer_file_over_the_size_cap_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    hf_folder(tmp_path / "hf")
    monkeypatch.setattr(convert, "TOKENIZER_FILE_BYTES", 20)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-progress"]) == 2
    assert "more than a tokenizer file may have" in capsys.readouterr().err
    assert not (tmp_path / "ours").exists()


def test_an_empty_destination_folder_is_written(tmp_path):
    hf_folder(tmp_path / "hf")
    (tmp_path / "ours").mkdir()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-progress"]) == 0
    assert (tmp_path / "ours" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "ours"]


def test_a_hub_cache_snapshot_converts_and_its_files_arrive_as_files(tmp_path):
    """huggingface_hub's cache layout: snapshots/REV/<file> are symlinks into ../../blobs/."""
    staging = tmp_path / "download"
    model = hf_folder(staging)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(staging.iterdir())):
        path.rename(repo / "blobs" / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    assert main(["convert", str(snapshot), str(tmp_path / "ours"), "--no-progress"]) == 0
    assert not (tmp_path / "ours" / "tokenizer.json").is_symlink()
    assert (tmp_path / "ours" / "tokenizer.json").read_bytes() == TOKENIZER["tokenizer.json"]
    loaded = Transformer.from_pretrained(tmp_path / "ours")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
