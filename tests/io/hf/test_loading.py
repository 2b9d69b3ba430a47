"""Checkpoint folders: refusals with the tensor's or key's name, shards, layouts, dtypes, MTP
layers, export refusals. Checkpoints come from our own export, so transformers is not needed."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hf_utils import randomize_
from safetensors.torch import load_file, save_file

from moe import ModelConfig, MoEConfig, Transformer
from moe.io.hf import save_hf

QWEN_LIKE = ModelConfig(
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
DEEPSEEK_LIKE = ModelConfig(
    vocab_size=40,
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    attention="mla",
    q_lora_rank=8,
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=4,
    rope_interleave=True,
    first_k_dense=1,
    moe=MoEConfig(
        num_experts=4, top_k=2, expert_ffn_size=8, num_shared_experts=1, score_func="sigmoid", expert_bias=True
    ),
)


def export(config, directory, seed=0, **kwargs):
    model = randomize_(Transformer(config), seed=seed, stacked_in_dim=True).eval()
    save_hf(model, directory, **kwargs)
    return model


def rewrite(directory, edit):
    """Apply `edit` to the tensors of a one-file checkpoint."""
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_tensors_are_all_named_in_one_line(tmp_path):
    export(QWEN_LIKE, tmp_path)

    def damage(t):
        del t["model.layers.1.mlp.experts.2.up_proj.weight"]
        t["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
        t["model.layers.1.self_attn.k_norm.weight"] = torch.ones(5)

    rewrite(tmp_path, damage)
    with pytest.raises(ValueError) as err:
        Transformer.from_hf(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert "missing: model.layers.1.mlp.experts.2.up_proj.weight" in message
    assert "unexpected: model.layers.0.mlp.extra.weight" in message
    assert "wrong shape: model.layers.1.self_attn.k_norm.weight [5] (expected [6])" in message


def test_long_lists_are_cut_with_a_count(tmp_path):
    export(QWEN_LIKE, tmp_path)
    rewrite(tmp_path, lambda t: [t.pop(n) for n in [n for n in t if ".experts." in n]])
    with pytest.raises(ValueError, match=r"missing: .*\(\+4 more\)"):
        Transformer.from_hf(tmp_path)


@pytest.mark.parametrize(
    "model_type, architecture, match",
    [
        ("llama", "LlamaForCausalLM", "unsupported model_type 'llama'"),
        ("bailing_moe", "BailingMoeForCausalLM", "unsupported model_type 'bailing_moe'"),  # Ling 1.0
    ],
)
def test_unsupported_families_are_refused_by_name(tmp_path, model_type, architecture, match):
    export(QWEN_LIKE, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type=model_type, architectures=[architecture])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        Transformer.from_hf(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(hidden_act="gelu"), "'hidden_act' = 'gelu' is not supported"),
        (dict(use_sliding_window=True), "'use_sliding_window' = True is not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "'rope_scaling.type' = 'llama3'"),
        (dict(num_experts=None, num_local_experts=None), "lacks required key.*num_experts"),
    ],
)
def test_unsupported_config_settings_name_the_key(tmp_path, edit, match):
    export(QWEN_LIKE, tmp_path)
    config = {**json.loads((tmp_path / "config.json").read_text()), **edit}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        Transformer.from_hf(tmp_path)


def test_fp8_deepseek_checkpoints_are_refused(tmp_path):
    export(DEEPSEEK_LIKE, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method' = 'fp8' is not supported: dequantize"):
        Transformer.from_hf(tmp_path)


class _Tripwire:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoints_are_refused_without_being_opened(tmp_path):
    export(QWEN_LIKE, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    tripwire = tmp_path / "unpickled"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire(tripwire)))
    with pytest.raises(ValueError, match=r"only pickle checkpoints \(pytorch_model.bin\); moe never unpickles"):
        Transformer.from_hf(tmp_path)
    assert not tripwire.exists()


def test_missing_folder_config_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        Transformer.from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_hf(tmp_path)
    export(QWEN_LIKE, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        Transformer.from_hf(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_are_named(tmp_path, damage):
    export(QWEN_LIKE, tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt or truncated safetensors file"):
        Transformer.from_hf(tmp_path)


def test_integer_tensors_are_refused(tmp_path):
    export(QWEN_LIKE, tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(24, dtype=torch.int8)}))
    with pytest.raises(ValueError, match=r"not a float dtype: model.norm.weight \(I8\)"):
        Transformer.from_hf(tmp_path)


def test_sharded_export_loads_identically_and_reexport_removes_stale_shards(tmp_path):
    model = export(QWEN_LIKE, tmp_path, max_shard_bytes=4000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = Transformer.from_hf(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    save_hf(model, tmp_path, overwrite=True)  # one shard now: the old ones and the index must go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    export(QWEN_LIKE, tmp_path, max_shard_bytes=4000)
    sorted(tmp_path.glob("*.safetensors"))[1].unlink()
    with pytest.raises(FileNotFoundError, match="names shard\\(s\\) that do not exist: model-00002"):
        Transformer.from_hf(tmp_path)


def test_bf16_loading_keeps_biases_and_rope_in_fp32(tmp_path):
    model = export(DEEPSEEK_LIKE, tmp_path)
    low = Transformer.from_hf(tmp_path, dtype=torch.bfloat16)
    assert low.embed_tokens.weight.dtype == torch.bfloat16 and low.layers[1].ffn.experts.w_in.dtype == torch.bfloat16
    assert low.layers[1].ffn.router.expert_bias.dtype == torch.float32
    assert low.layers[0].attn.rotary.inv_freq.dtype == torch.float32
    for name, tensor in model.state_dict().items():  # rounded once, straight from the fp32 file
        expected = tensor if name.endswith("expert_bias") else tensor.to(torch.bfloat16)
        assert torch.equal(low.state_dict()[name], expected), name
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))  # fixed: no flaky near-ties
    with torch.no_grad():  # bf16 arithmetic: close on average (a near-tie may route differently)
        assert (low(ids).float() - model(ids)).abs().mean() < 0.03


def test_a_partial_mtp_layer_is_refused_by_name_and_other_extra_layers_too(tmp_path):
    # num_nextn_predict_layers = 1 with only some of layer 2's MTP tensors: loading it would build an
    # MTP module from random weights, so the missing ones are named (tests/io/hf/test_mtp_hf.py loads
    # whole MTP layers).
    export(DEEPSEEK_LIKE, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    rewrite(
        tmp_path,
        lambda t: t.update(
            {"model.layers.2.eh_proj.weight": torch.zeros(24, 48), "model.layers.2.enorm.weight": torch.ones(24)}
        ),
    )
    with pytest.raises(ValueError, match=r"missing: model.layers.2.embed_tokens.weight, model.layers.2.hnorm.weight"):
        Transformer.from_hf(tmp_path)
    rewrite(tmp_path, lambda t: t.update({"model.layers.3.enorm.weight": torch.ones(24)}))
    with pytest.raises(ValueError, match=r"unexpected: model.layers.3.enorm.weight"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Transformer.from_hf(tmp_path)


@pytest.mark.parametrize(
    "family, config, match",
    [
        ("mixtral", QWEN_LIKE, "cannot export as mixtral: the model has dense FFN layers"),
        ("qwen3_moe", DEEPSEEK_LIKE, "cannot export as qwen3_moe: the model has MLA attention"),
        ("deepseek_v3", QWEN_LIKE, "cannot export as deepseek_v3: the model has grouped-query attention"),
        (
            None,
            ModelConfig(
                vocab_size=40,
                hidden_size=24,
                num_layers=1,
                num_heads=4,
                attention_bias=True,
                moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8),
            ),
            "no Hugging Face family fits",
        ),
    ],
)
def test_export_refuses_what_the_family_cannot_express(tmp_path, family, config, match):
    with pytest.raises(ValueError, match=match):
        save_hf(Transformer(config), tmp_path, family=family)
    assert not tmp_path.joinpath("config.json").exists()


def test_export_refuses_to_drop_a_nonzero_selection_bias(tmp_path):
    config = ModelConfig(
        vocab_size=40,
        hidden_size=24,
        num_layers=1,
        num_heads=4,
        qk_norm=True,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8, expert_bias=True),
    )
    model = Transformer(config)
    save_hf(model, tmp_path / "zero")  # an all-zero bias changes nothing: exported as qwen3_moe
    model.layers[0].ffn.router.expert_bias[1] = 0.5
    with pytest.raises(ValueError, match=r"has no tensor for layers.0.ffn.router.expert_bias"):
        save_hf(model, tmp_path / "nonzero")


PEAK_RSS = """
import sys, moe

def kib(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

moe.Transformer.from_hf(sys.argv[1])  # a tiny one first: lazy imports and one-time setup
before = kib("VmRSS")
model = moe.Transformer.from_hf(sys.argv[2])
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(before * 1024, kib("VmHWM") * 1024, weights)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
def test_loading_makes_no_second_copy_of_the_weights(tmp_path):
    """A loader that materialises the checkpoint and then copies it into the model peaks at twice
    the weights. Ours allocates each tensor once and maps one shard at a time, so the peak is the
    weights plus about one shard (clean file pages, which the kernel could drop anyway)."""
    config = ModelConfig(
        vocab_size=256,
        hidden_size=512,
        num_layers=2,
        num_heads=8,
        moe=MoEConfig(num_experts=16, top_k=2, expert_ffn_size=1024),
    )
    save_hf(Transformer(config), tmp_path / "big", max_shard_bytes=40 * 10**6)
    save_hf(Transformer(dataclasses.replace(config, hidden_size=16)), tmp_path / "tiny")
    size = sum(f.stat().st_size for f in (tmp_path / "big").glob("*.safetensors"))
    assert size > 200 * 10**6
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", PEAK_RSS, str(tmp_path / "tiny"), str(tmp_path / "big")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    before, peak, weights = map(int, result.stdout.split())
    assert weights > 0.99 * size
    growth = peak - before
    assert growth < 1.4 * size, f"loading {size / 1e6:.0f} MB grew the peak RSS by {growth / 1e6:.0f} MB"


def test_mixtral_sliding_window_is_refused_unless_it_spans_the_context(tmp_path):
    config = ModelConfig(
        vocab_size=40,
        hidden_size=24,
        num_layers=1,
        num_heads=4,
        max_seq_len=128,
        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8),
    )
    export(config, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    for window, ok in ((128, True), (64, False)):
        (tmp_path / "config.json").write_text(json.dumps({**hf, "sliding_window": window}))
        if ok:
            assert Transformer.from_hf(tmp_path).config.max_seq_len == 128
        else:
            with pytest.raises(ValueError, match="'sliding_window' = 64 is not supported"):
                Transformer.from_hf(tmp_path)
