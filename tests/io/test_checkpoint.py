import json
import re
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from train_helpers import REPO, micro_config

from moe import Transformer
from moe.errors import InputError
from moe.io import checkpoint as ckpt
from moe.train import TrainArgs
from moe.train.step import build_optimizer


def trained_model(seed=0, **config):
    """A model and optimizer after two real steps, with non-trivial router biases."""
    torch.manual_seed(seed)
    model = Transformer(micro_config(**config))
    optimizer = build_optimizer(model, TrainArgs())
    for _ in range(2):
        ids = torch.randint(0, 256, (2, 17))
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        (loss + model.aux_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        for layer in model.moe_layers():
            layer.router.expert_bias.add_(torch.randn(4))  # stands in for many bias updates
            layer.load_since_update.zero_()
    return model, optimizer


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(a.eval()(ids), b.eval()(ids))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"tie_embeddings": True},
        {"attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8},
    ],
)
def test_save_pretrained_round_trip_is_exact(tmp_path, config):
    model, _ = trained_model(**config)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = Transformer.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert_same_model(model, loaded)
    if config.get("tie_embeddings"):
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_sharded_save_round_trip_and_cleanup(tmp_path):
    model, _ = trained_model()
    ckpt.save_pretrained(model, tmp_path, max_shard_bytes=40_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert_same_model(model, Transformer.from_pretrained(tmp_path))
    (tmp_path / "README.md").write_text("not ours")
    with pytest.raises(InputError, match="is not empty .*pass overwrite=True"):
        ckpt.save_pretrained(model, tmp_path)  # a folder that holds a model is not written into unasked
    ckpt.save_pretrained(model, tmp_path, overwrite=True)  # unsharded again: the old shards must not linger
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert_same_model(model, Transformer.from_pretrained(tmp_path))


def test_loading_another_config_names_the_tensor_and_shapes(tmp_path):
    model, _ = trained_model()
    model.save_pretrained(tmp_path)
    other = Transformer(micro_config(hidden_size=48))
    with pytest.raises(
        ValueError,
        match=r"tensor 'embed_tokens.weight' has shape \(256, 32\) but the model "
        r"built from the config expects \(256, 48\)",
    ):
        ckpt.load_model_state(other, ckpt.read_model_tensors(tmp_path), str(tmp_path))
    deeper = Transformer(micro_config(num_layers=4))
    with pytest.raises(ValueError, match=r"has no tensor 'layers.3.attn_norm.weight'"):
        ckpt.load_model_state(deeper, ckpt.read_model_tensors(tmp_path), str(tmp_path))


def test_truncated_or_corrupt_safetensors_give_a_clear_error(tmp_path):
    model, _ = trained_model()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file, truncated or corrupt"):
        Transformer.from_pretrained(tmp_path)
    weights.write_bytes(b"\x05" + data[1:])  # header length byte wrong
    with pytest.raises(ValueError, match="truncated or corrupt"):
        Transformer.from_pretrained(tmp_path)


def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    model, optimizer = trained_model()
    tensors = safetensors.torch.load(safetensors.torch.save(ckpt.optimizer_tensors(model, optimizer)))
    assert "layers.1.ffn.experts.w_in.exp_avg_sq" in tensors and "norm.weight.step" in tensors
    twin, _ = trained_model(seed=1)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, TrainArgs())
    ckpt.load_optimizer_tensors(twin, twin_opt, tensors, "test")
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, twin_opt.state[q][key]), (name, key)
    ids = torch.randint(0, 256, (2, 9))
    for m, opt in ((model, optimizer), (twin, twin_opt)):  # the next step is the same too
        m.train()
        m(ids).square().mean().backward()
        opt.step()
    assert_same_model(model, twin)


def test_training_checkpoints_keep_the_last_n(tmp_path):
    model, optimizer = trained_model()
    for step in (10, 20, 30, 40):
        path = ckpt.save_checkpoint(tmp_path, step, model, optimizer, {"marker": step}, keep_last=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000030", "step_00000040"]
    assert ckpt.resolve_checkpoint(tmp_path) == path
    twin = Transformer(model.config)
    state = ckpt.load_checkpoint(path, twin, build_optimizer(twin, TrainArgs()))
    assert state["step"] == 40 and state["marker"] == 40
    assert_same_model(model, twin)


def test_a_corrupt_checkpoint_file_is_caught_by_its_checksum(tmp_path):
    model, optimizer = trained_model()
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensor data: the header still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="contents differ from the checksum"):
        ckpt.load_checkpoint(path, Transformer(model.config))
    with pytest.raises(ValueError, match="contents differ from the checksum"):
        Transformer.from_pretrained(path)  # what `moe generate --ckpt` reads


def test_a_run_killed_during_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    # The child saves step 1, then is SIGKILLed halfway through writing step 2's optimizer file.
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}, {str(REPO / "tests" / "io")!r}]
        from test_checkpoint import trained_model
        from moe.io import checkpoint
        model, optimizer = trained_model()
        checkpoint.save_checkpoint({str(tmp_path)!r}, 1, model, optimizer, {{}}, keep_last=1)
        real_write = checkpoint.write_atomic
        def dying_write(path, data):
            if path.name == "optimizer.safetensors":
                with open(path.with_name(path.name + ".tmp"), "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real_write(path, data)
        checkpoint.write_atomic = dying_write
        model.lm_head.weight.data.add_(1.0)
        checkpoint.save_checkpoint({str(tmp_path)!r}, 2, model, optimizer, {{}}, keep_last=1)
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "step_00000002.tmp").is_dir()  # the torn save is there, under its temporary name
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000001"]
    latest = ckpt.resolve_checkpoint(tmp_path)
    expected, expected_opt = trained_model()
    model = Transformer(expected.config)
    optimizer = build_optimizer(model, TrainArgs())
    assert ckpt.load_checkpoint(latest, model, optimizer)["step"] == 1
    assert_same_model(expected, model)
    ckpt.save_checkpoint(tmp_path, 3, model, optimizer, {}, keep_last=1)  # the next save clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


def test_nothing_is_ever_unpickled():
    source = "\n".join(p.read_text() for p in (REPO / "moe").rglob("*.py"))
    assert not re.search(r"torch\.load\(|torch\.save\(|\bimport pickle\b|allow_pickle=True", source)
    assert "allow_pickle=False" in (REPO / "moe" / "train" / "data.py").read_text()  # np.load refuses pickles
