"""`moe bench infer --batch-sizes`: each batch size's prefill and decode set against the
memory-bandwidth floor; the figures must agree with each other (no timing goals here)."""

import json
from pathlib import Path

import pytest

from moe import Transformer, load_config
from moe.cli import main
from moe.perf import floor

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
ARGS = ["bench", "infer", "--config", TINY, "--prompt-len", "6", "--new-tokens", "3", "--warmup", "0", "--repeats", "1"]


def test_batch_sizes_report_floor_fields(capsys):
    assert main([*ARGS, "--batch-sizes", "1,2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    res, settings = result["results"], result["settings"]
    assert settings["batch_sizes"] == [1, 2] and settings["batch_size"] == 1
    bandwidth = res["bandwidth"]["bytes_per_s"]
    assert bandwidth > 0
    assert [row["batch_size"] for row in res["batches"]] == [1, 2]
    config = load_config(TINY)
    model = Transformer(config)
    one_expert = floor.expert_bytes(model.moe_layers()[0])
    for row in res["batches"]:
        B = row["batch_size"]
        for kind, tokens in (("prefill", B * 6), ("decode", B)):
            r = row[kind]
            assert r["tokens_per_step"] == tokens
            assert r["tokens_per_s"] == pytest.approx(tokens / r["step_s"])
            assert r["bytes_per_step"] == pytest.approx(
                sum(r["bytes"][k] for k in ("experts", "shared", "embedding", "kv_cache"))
            )
            assert r["floor_s"] == pytest.approx(r["bytes_per_step"] / bandwidth)
            assert r["ratio"] == pytest.approx(r["step_s"] / r["floor_s"])
            assert r["bytes"]["shared"] == floor.shared_bytes(model)
            assert r["bytes"]["experts"] == pytest.approx(sum(r["bytes"]["distinct_experts"]) * one_expert)
    # one decode token per sequence picks exactly top_k experts in each MoE layer
    decode_1 = res["batches"][0]["decode"]["bytes"]
    assert decode_1["distinct_experts"] == [config.moe.top_k] * len(model.moe_layers())
    # the cache read grows with the batch: 2 sequences read twice the positions of 1
    kv = [row["decode"]["bytes"]["kv_cache"] for row in res["batches"]]
    assert kv[1] == pytest.approx(2 * kv[0])
    # the figures of the first batch size keep their old names
    assert res["decode_ms_per_step"] == pytest.approx(res["batches"][0]["decode"]["step_s"] * 1e3)
    assert res["prefill"] == res["batches"][0]["prefill"]["timing"]


def test_table_shows_the_floor(capsys):
    assert main([*ARGS, "--batch-sizes", "1"]) == 0
    out = capsys.readouterr().out
    assert "floor ms" in out and "ratio" in out and "GB/s measured" in out


@pytest.mark.parametrize("bad", ["0", "1,,2", "a", "1,-8"])
def test_bad_batch_sizes_are_refused(capsys, bad):
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "--batch-sizes", bad])
    assert e.value.code == 2
    assert "--batch-sizes" in capsys.readouterr().err
