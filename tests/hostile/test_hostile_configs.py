"""Hostile configs: our YAML/JSON configs and Hugging Face config.json files built to hang, exhaust
memory or crash the loader. Each must be refused fast (well under a second of work) with one short
InputError line naming the file and the key, never a traceback, a MemoryError or a blocked read."""

import json
import math
import os
import threading
import time

import pytest

from moe import ModelConfig, MoEConfig, load_config
from moe.errors import InputError
from moe.io.hf import load_hf
from moe.shipped_configs import MAX_CONFIG_BYTES, MAX_YAML_BYTES, read_config_file, shipped_configs

FAST = 2.0  # seconds; generous for a loaded CI machine, minutes below what the unguarded code took


def refused(path, match=None, loader=load_config):
    """The InputError `loader(path)` raises, checked to be fast, one line and short."""
    start = time.perf_counter()
    with pytest.raises(InputError, match=match) as info:
        loader(path)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < FAST, f"took {elapsed:.1f}s"
    assert "\n" not in message and len(message) < 400 + len(str(path)), message
    return message


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------- the file itself


def billion_laughs(key):
    """9 levels of 9 aliases: 9**9 = 387M strings once expanded (the old loader quoted them all)."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + f"\n{key}: *i\n"


@pytest.mark.parametrize("key", ["moe_layers", "name", "unknown_key"])
def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, key):
    message = refused(write(tmp_path, billion_laughs(key)), "YAML alias")
    assert "line 2" in message


def test_even_a_harmless_alias_or_merge_key_is_refused(tmp_path):
    refused(write(tmp_path, "hidden_size: &h 64\nintermediate_size: *h\n"), r"alias \(\*name\) at line 2")
    refused(write(tmp_path, "moe:\n  <<: {top_k: 1}\n"), r"merge key \(<<\) at line 2")


@pytest.mark.parametrize(
    "text, match",
    [
        ("hidden_size: 64\nnum_heads: 4\nhidden_size: 32\n", "duplicate key 'hidden_size' at line 3"),
        ("moe:\n  top_k: 1\n  num_experts: 4\n  top_k: 2\n", "duplicate key 'top_k' at line 4"),
        ('hidden_size: 64\n"hidden_size": 64\n', "duplicate key 'hidden_size' at line 2"),
    ],
)
def test_yaml_duplicate_keys_are_named_with_their_line(tmp_path, text, match):
    refused(write(tmp_path, text), match)


@pytest.mark.parametrize("text", ['{"hidden_size": 64, "hidden_size": 32}', '{"moe": {"top_k": 1, "top_k": 2}}'])
def test_json_duplicate_keys_are_named(tmp_path, text):
    key = "hidden_size" if "hidden" in text else "top_k"
    refused(write(tmp_path, text, "c.json"), f"duplicate key '{key}'")


@pytest.mark.parametrize("suffix, limit", [(".yaml", MAX_YAML_BYTES), (".json", MAX_CONFIG_BYTES)])
def test_an_oversized_file_is_refused_before_it_is_read(tmp_path, suffix, limit):
    sparse = tmp_path / f"huge{suffix}"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of holes: reading it would take minutes
    refused(sparse, f"over the {limit}-byte limit")
    refused(write(tmp_path, "#" * (limit + 1), f"c{suffix}"), f"over the {limit}-byte limit")


def test_a_fifo_a_device_and_a_folder_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    results = []

    def attempt():  # in a thread: a blocking open would hang the test, not fail it
        for loader in (load_config, read_config_file):
            for path in (fifo, "/dev/zero", tmp_path):
                try:
                    loader(path if loader is load_config else type(fifo)(path))
                except InputError as e:
                    results.append(str(e))

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(FAST)
    assert not thread.is_alive(), "reading a FIFO or a device blocked"
    assert len(results) == 6 and all("not a regular file" in r for r in results), results


@pytest.mark.parametrize(
    "text, suffix, match",
    [
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", ".yaml", "nested more than"),
        ('{"x": ' + "[" * 200_000 + "]" * 200_000 + "}", ".json", "nested too deeply"),
        ("num_layers: " + "9" * 5000 + "\n", ".yaml", "malformed config"),
        ('{"num_layers": ' + "9" * 5000 + "}", ".json", "malformed config"),
        (b"name: \xff\xfe\n", ".yaml", "not UTF-8"),
        ('{"norm_eps": NaN}', ".json", "NaN is not a JSON number"),
        ('{"norm_eps": -Infinity}', ".json", "-Infinity is not a JSON number"),
        ("moe: [unclosed\n", ".yaml", "malformed config: .* at line 2"),
        ("- 1\n- 2\n", ".yaml", "must be a mapping"),
        ("!!python/object/apply:os.system ['true']\n", ".yaml", "malformed config"),
    ],
)
def test_malformed_files_are_one_line(tmp_path, text, suffix, match):
    refused(write(tmp_path, text, "c" + suffix), match)


# --------------------------------------------------------------------------- the values


@pytest.mark.parametrize(
    "text, key",
    [
        ("vocab_size: 1099511627776\n", "vocab_size"),
        ("hidden_size: 1099511627776\n", "hidden_size"),
        ("num_layers: 1000000000\n", "num_layers"),
        ("max_seq_len: 1099511627776\n", "max_seq_len"),
        ("num_heads: 1099511627776\nhidden_size: 64\nhead_dim: 8\n", "num_heads"),
        ("intermediate_size: 1099511627776\n", "intermediate_size"),
        ("moe:\n  num_experts: 100000000\n", "moe.num_experts"),
        ("moe:\n  top_k: 100000000\n", "moe.top_k"),
        ("moe:\n  expert_ffn_size: 1099511627776\n", "moe.expert_ffn_size"),
        ("moe:\n  num_shared_experts: 65536\n", "moe.num_shared_experts"),
        ("num_layers: 10000\nmoe:\n  num_experts: 65536\n", "moe.num_experts"),
        ("num_layers: 4\nmoe_pattern: 99999-99999\n", "moe_pattern"),
        ("num_layers: 4\nmoe_pattern: " + "1-" * 200 + "1\n", "moe_pattern"),
        ("moe_layers: [0, 0, 1]\n", "moe_layers"),
        ("moe:\n  capacity_factor: 1.0e+300\n", "moe.capacity_factor"),
        ("rope_scaling: {type: yarn, factor: 1.0e+300, original_max_position_embeddings: 8}\n", "rope_scaling.factor"),
        ("name: ../../etc\n", "name"),
        ("name: ''\n", "name"),
    ],
)
def test_absurd_sizes_are_refused_by_key(tmp_path, text, key):
    refused(write(tmp_path, text), f"config key '{key}'")


@pytest.mark.parametrize(
    "text, key",
    [
        ("norm_eps: .nan\n", "norm_eps"),
        ("norm_eps: 0\n", "norm_eps"),
        ("norm_eps: 1.0e+6\n", "norm_eps"),
        ("init_std: -0.02\n", "init_std"),
        ("init_std: .inf\n", "init_std"),
        ("rope_theta: -.inf\n", "rope_theta"),
        ("rope_theta: 1\n", "rope_theta"),
        ("rope_fraction: 2.0\n", "rope_fraction"),
        ("latent_norm_eps: -1.0e-6\n", "latent_norm_eps"),
        ("moe:\n  routed_scaling_factor: 0\n", "moe.routed_scaling_factor"),
        ("moe:\n  z_loss_coef: -1.0\n", "moe.z_loss_coef"),
        ("moe:\n  aux_loss_coef: .nan\n", "moe.aux_loss_coef"),
        ("moe:\n  bias_update_rate: -.inf\n", "moe.bias_update_rate"),
        ("moe:\n  capacity_factor: .nan\n", "moe.capacity_factor"),
        ("moe:\n  capacity_factor: 9.0\n", "moe.capacity_factor"),  # above num_experts = 8
        ("rope_scaling: {type: yarn, factor: .nan, original_max_position_embeddings: 8}\n", "rope_scaling.factor"),
        ("rope_scaling: {type: yarn, factor: 2, original_max_position_embeddings: 8, beta_fast: 0}\n", "beta_fast"),
        ("rope_scaling: {type: yarn, factor: 2, original_max_position_embeddings: 8, mscale: -1}\n", "mscale"),
    ],
)
def test_nan_inf_and_out_of_range_floats_are_refused_by_key(tmp_path, text, key):
    refused(write(tmp_path, text), f"config key '[a-z_.]*{key}'")


@pytest.mark.parametrize(
    "text, key",
    [
        ("num_layers: true\n", "num_layers"),
        ("hidden_size: '64'\n", "hidden_size"),
        ("hidden_size: 64.0\n", "hidden_size"),
        ("moe:\n  num_experts: 1.0e+8\n", "moe.num_experts"),
        ("moe:\n  top_k: 2.5\n", "moe.top_k"),
        ("moe:\n  top_k: null\n", "moe.top_k"),
        ("moe:\n  norm_topk_prob: 1\n", "moe.norm_topk_prob"),
        ("moe:\n  score_func: [softmax]\n", "moe.score_func"),
        ("moe_layers: [0, true]\n", "moe_layers"),
        ("moe: 8\n", "moe"),
        ("rope_scaling: {type: yarn, factor: 2, original_max_position_embeddings: '8'}\n", "rope_scaling.orig"),
        ("num_layers: '" + "9" * 60_000 + "'\n", "num_layers"),
    ],
)
def test_wrong_types_are_refused_by_key_with_a_short_excerpt(tmp_path, text, key):
    message = refused(write(tmp_path, text), f"config key '{key}")
    assert len(message) < 400 + len(str(tmp_path))


def test_every_shipped_config_stays_valid():
    names = shipped_configs()
    assert "seed-speculated-ling-10t" in names and "deepseek-v3" in names
    for name in names:
        assert isinstance(load_config(name), ModelConfig)


def test_limits_hold_for_direct_construction_too():
    with pytest.raises(InputError, match="config key 'num_experts' = 100000000 must be <= 65536"):
        MoEConfig(num_experts=10**8, top_k=1)
    with pytest.raises(InputError, match="config key 'moe.top_k'"):
        ModelConfig(moe={"num_experts": 4, "top_k": 5})
    assert not math.isnan(MoEConfig(capacity_factor=8).capacity_factor)  # exactly num_experts is allowed


# --------------------------------------------------------------------------- Hugging Face config.json


QWEN = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 12,
}


def hf_folder(tmp_path, edit, text=None):
    """A folder with only a config.json: a refusal must come before any weight file is looked for."""
    (tmp_path / "config.json").write_text(text if text is not None else json.dumps({**QWEN, **edit}))
    return tmp_path


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"num_experts": 1e8}, "'num_experts' = 100000000.0 must be an integer"),
        ({"num_experts": 10**8}, "'num_experts' = 100000000 must be <= 65536"),
        ({"num_hidden_layers": "32"}, "'num_hidden_layers' = '32' must be an integer"),
        ({"num_hidden_layers": 10**12}, "'num_hidden_layers' = 1000000000000 must be <="),
        ({"num_hidden_layers": True}, "'num_hidden_layers' = True must be an integer"),
        ({"vocab_size": 2**40}, "'vocab_size'"),
        ({"moe_intermediate_size": -1}, "'moe_intermediate_size' = -1 must be >= 1"),
        ({"mlp_only_layers": list(range(20_000))}, "'mlp_only_layers'"),
        ({"mlp_only_layers": [0, "1"]}, r"'mlp_only_layers\[1\]' = '1' must be an integer"),
        ({"decoder_sparse_step": 0}, "'decoder_sparse_step' = 0"),
        ({"rms_norm_eps": None}, "'rms_norm_eps' = None must not be null"),
        ({"rms_norm_eps": -1.0}, r"'rms_norm_eps' \(our norm_eps\) = -1.0 must be in"),
        ({"rope_theta": "1e6"}, "'rope_theta' = '1e6' must be a finite number"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": [1]}}, "'rope_parameters.rope_theta'"),
        ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' = 'yes' must be a boolean"),
        ({"model_type": ["qwen3_moe"]}, "'model_type' = \\['qwen3_moe'\\] must be a string"),
        ({"architectures": "Qwen3MoeForCausalLM"}, "'architectures'"),
        ({"torch_dtype": {"x": 1}}, "'torch_dtype'"),
        ({"num_experts_per_tok": 5}, r"'num_experts_per_tok' \(our moe.top_k\) = 5 must be <= num_experts"),
        ({"num_attention_heads": 3}, r"'num_attention_heads' \(our num_heads\) = 3 must be divisible"),
        ({"num_local_experts": 8}, "'num_local_experts' = 8 contradicts num_experts = 4"),
        ({"num_experts": None, "num_local_experts": "8"}, "'num_local_experts' = '8' must be an integer"),
        ({"hidden_act": "x" * 100_000}, "'hidden_act' = 'xxxxx.*chars\\) is not supported"),
    ],
)
def test_hostile_hf_config_json_is_refused_by_key_before_any_weight_is_looked_for(tmp_path, edit, match):
    message = refused(hf_folder(tmp_path, edit), match, loader=load_hf)
    assert "config.json" in message


def test_hf_config_json_with_nan_is_refused(tmp_path):
    text = json.dumps({**QWEN, "rms_norm_eps": float("nan")})  # json writes NaN, and json.loads reads it back
    refused(hf_folder(tmp_path, {}, text), "'rms_norm_eps' = nan must be a finite number", loader=load_hf)


def test_missing_hf_keys_take_the_familys_defaults_not_ours():
    from moe.io.hf import family_of

    hf = {k: v for k, v in QWEN.items() if k not in ("num_experts_per_tok", "num_key_value_heads")}
    config = family_of(hf).to_config({**hf, "num_experts": 8}, name="q")
    # Qwen3MoeConfig: top-8 and 4 KV heads; ours would be top-2 and multi-head attention.
    assert (config.moe.top_k, config.kv_heads, config.moe.norm_topk_prob) == (8, 4, False)
    with pytest.raises(InputError, match=r"'num_experts_per_tok' \(our moe.top_k\) = 8 must be <= num_experts \(4\)"):
        family_of(hf).to_config({**hf, "num_experts": 4}, name="q")  # top-8 of 4 cannot be: refused, by name
