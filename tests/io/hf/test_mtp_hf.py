"""DeepSeek-V3's multi-token-prediction layer (model.layers.{L}.*) read into and written from
our MTP modules; the module checked against a reference that reads the tensors by their names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from hf_utils import randomize_
from safetensors import safe_open
from safetensors.torch import save_file

from moe import ModelConfig, MoEConfig, Transformer
from moe.errors import InputError
from moe.mtp import mtp_logits

CONFIG = ModelConfig(
    vocab_size=64,
    hidden_size=24,
    num_layers=3,
    num_heads=4,
    q_lora_rank=12,
    intermediate_size=40,
    first_k_dense=1,
    attention="mla",
    kv_lora_rank=8,
    qk_nope_head_dim=4,
    qk_rope_head_dim=4,
    v_head_dim=6,
    rope_interleave=True,
    latent_norm_eps=1e-6,
    num_mtp_layers=1,
    moe=MoEConfig(
        num_experts=8,
        top_k=2,
        expert_ffn_size=16,
        num_shared_experts=1,
        score_func="sigmoid",
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        expert_bias=True,
    ),
)


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_(Transformer(CONFIG), seed=1, stacked_in_dim=True).eval()
    folder = tmp_path_factory.mktemp("mtp") / "deepseek-mtp"
    model.save_pretrained(folder, format="hf", family="deepseek_v3")
    return model, folder


def test_export_writes_the_mtp_layer_under_the_published_names(exported):
    model, folder = exported
    on_disk = tensors(folder)
    assert json.loads((folder / "config.json").read_text())["num_nextn_predict_layers"] == 1
    L = CONFIG.num_layers
    for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm"):
        assert f"model.layers.{L}.{part}.weight" in on_disk
    assert torch.equal(on_disk[f"model.layers.{L}.eh_proj.weight"], model.mtp[0].eh_proj.weight)
    assert torch.equal(on_disk[f"model.layers.{L}.shared_head.head.weight"], model.lm_head.weight)
    assert torch.equal(on_disk[f"model.layers.{L}.embed_tokens.weight"], model.embed_tokens.weight)
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in on_disk
    assert f"model.layers.{L}.self_attn.kv_a_proj_with_mqa.weight" in on_disk


def test_round_trip_is_exact(exported):
    model, folder = exported
    loaded = Transformer.from_hf(folder)
    assert loaded.config.num_mtp_layers == 1
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


@torch.no_grad()
def test_mtp_input_matches_a_reference_that_reads_the_checkpoint_names(exported):
    """h' = eh_proj([enorm(embed(t_{i+1})); hnorm(norm(h_i))]) as vLLM's DeepSeekMultiTokenPredictorLayer
    computes it from the published tensors (embedding half first; the main model's normed output),
    then the layer's block."""
    _, folder = exported
    model, w = Transformer.from_hf(folder), tensors(folder)
    L, eps = CONFIG.num_layers, CONFIG.norm_eps

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    x = torch.randint(0, 64, (2, 9))
    h = rms(model.hidden(x), w["model.norm.weight"])[:, :-1]
    emb = torch.nn.functional.embedding(x[:, 1:], w[f"model.layers.{L}.embed_tokens.weight"])
    cat = torch.cat((rms(emb, w[f"model.layers.{L}.enorm.weight"]), rms(h, w[f"model.layers.{L}.hnorm.weight"])), -1)
    expected_in = cat @ w[f"model.layers.{L}.eh_proj.weight"].T
    seen = []
    handle = model.mtp[0].block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    out = mtp_logits(model, model.hidden(x), x)[0]
    handle.remove()
    torch.testing.assert_close(seen[0], expected_in, atol=1e-5, rtol=1e-5)
    block_out = model.mtp[0].block(expected_in, torch.arange(8))
    head = w[f"model.layers.{L}.shared_head.head.weight"]
    torch.testing.assert_close(out, rms(block_out, w[f"model.layers.{L}.shared_head.norm.weight"]) @ head.T)


def test_a_config_that_counts_mtp_layers_the_folder_lacks_loads_without_them(tmp_path):
    model = randomize_(Transformer(dataclasses.replace(CONFIG, num_mtp_layers=0)), seed=2, stacked_in_dim=True)
    model.save_pretrained(tmp_path, format="hf", family="deepseek_v3")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    assert len(Transformer.from_hf(tmp_path).mtp) == 0  # what transformers saves: no layer L tensors


def test_a_partial_mtp_layer_is_refused_naming_the_missing_tensors(exported, tmp_path):
    _, folder = exported
    kept = {n: t for n, t in tensors(folder).items() if not n.endswith("hnorm.weight")}
    save_file(kept, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(InputError, match=r"missing: model\.layers\.3\.hnorm\.weight"):
        Transformer.from_hf(tmp_path)
