"""`moe bench` and `moe calibrate` end to end on CPU, at sizes that take a second or two."""

import json
import math
import re
from pathlib import Path

import pytest

from moe.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
DSV3 = str(CONFIGS / "full" / "deepseek-v3.yaml")
FAST = ["--warmup", "0", "--repeats", "2"]
ENV_KEYS = {
    "label",
    "device",
    "device_type",
    "device_slug",
    "datasheet",
    "threads",
    "load_average_1m",
    "torch",
    "cuda",
    "triton",
    "transformers",
    "python",
    "platform",
    "commit",
    "dirty",
    "timestamp",
}


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_record(result, bench):
    assert result["schema"] == "moe.bench/1" and result["bench"] == bench
    assert set(result["environment"]) == ENV_KEYS
    assert result["environment"]["label"] == "cpu"
    for key in ("median_s", "p20_s", "p80_s", "warmup", "repeats", "timer"):
        assert key in result["results"]["matmul_peak"]["timing"]
    assert result["results"]["datasheet_tflops"] is None  # a CPU has none


def test_bench_train_json_and_saved_file(capsys, tmp_path):
    argv = [
        "bench",
        "train",
        "--config",
        TINY,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        *FAST,
        "--save",
        "--results-dir",
        str(tmp_path),
    ]
    result = run_json(capsys, argv)
    check_record(result, "train")
    res = result["results"]
    assert res["tokens_per_step"] == 32
    assert res["tokens_per_s"] == pytest.approx(32 / res["step"]["median_s"])
    assert res["achieved_tflops"] == pytest.approx(res["tokens_per_s"] * res["train_flops_per_token"] / 1e12)
    assert res["mfu"]["measured"] == pytest.approx(res["achieved_tflops"] / res["matmul_peak"]["tflops"])
    assert res["mfu"]["datasheet"] is None
    assert math.isfinite(res["last_loss"]) and res["peak_memory"]["bytes"] > 0
    saved = tmp_path / result["environment"]["device_slug"] / "train-tiny.json"
    assert json.loads(saved.read_text())["results"] == res


def test_bench_infer_prefill_and_decode(capsys):
    result = run_json(
        capsys,
        ["bench", "infer", "--config", TINY, "--batch-size", "2", "--prompt-len", "8", "--new-tokens", "3", *FAST],
    )
    check_record(result, "infer")
    res = result["results"]
    assert res["prefill_tokens_per_s"] == pytest.approx(16 / res["prefill"]["median_s"])
    assert res["decode_tokens_per_s"] == pytest.approx(6 / res["decode"]["median_s"])
    assert res["prefill_mfu"]["measured"] > 0


def test_bench_layers_times_each_layer_and_backend(capsys):
    result = run_json(
        capsys,
        [
            "bench",
            "layers",
            "--config",
            TINY,
            "--batch-size",
            "1",
            "--seq-len",
            "16",
            "--backends",
            "eager,torch",
            *FAST,
        ],
    )
    check_record(result, "layers")
    rows = [(r["layer"], r["backend"]) for r in result["results"]["layers"]]
    assert rows == [("attention", None), ("dense", None), ("head", None), ("moe", "eager"), ("moe", "torch")]
    for r in result["results"]["layers"]:
        fb = r["forward_backward"]
        assert fb["tflops"] == pytest.approx(fb["tokens_per_s"] * r["train_flops_per_token"] / 1e12)


def test_bench_prints_a_labelled_table(capsys):
    assert (
        main(["bench", "infer", "--config", TINY, "--batch-size", "1", "--prompt-len", "4", "--new-tokens", "2", *FAST])
        == 0
    )
    out = capsys.readouterr().out
    assert "[CPU: not representative of a GPU]" in out and "decode" in out and "prefill" in out


def test_calibrate_projects_deepseek_v3_on_cpu(capsys, tmp_path):
    argv = [
        "calibrate",
        DSV3,
        "--scale",
        "64",
        "--timed-seq-len",
        "16",
        "--ep",
        "64",
        *FAST,
        "--save",
        "--results-dir",
        str(tmp_path),
    ]
    result = run_json(capsys, argv)
    check_record(result, "calibrate")
    res = result["results"]
    assert res["kind"] == "projection" and res["scaled"] is True
    assert result["assumptions"][0].startswith("CPU RUN")
    assert [c["kind"] for c in res["components"]] == ["attention", "moe", "dense", "head"]
    assert [c["count"] for c in res["components"]] == [61, 58, 3, 1]
    # The components are the whole model: their FLOPs add up to moe.flops' count.
    assert sum(c["count"] * c["full_flops_per_token"] for c in res["components"]) == pytest.approx(
        res["model_flops_per_token"]
    )
    p = res["projection"]
    assert p["tokens_per_s_per_gpu"] == pytest.approx(1 / p["seconds_per_token"])
    assert p["seconds_per_token"] == pytest.approx(p["compute_s"] + p["exposed_comm_s"])
    assert p["exposed_comm_s"] == pytest.approx(p["all_to_all_s"] + p["fsdp_s"])  # overlap 0 by default
    assert p["mfu"]["datasheet"] is None
    run = res["training_run"]
    assert run["gpu_hours"] == pytest.approx(p["gpu_hours_per_trillion"])  # --tokens defaults to 1e12
    assert run["cost"] == pytest.approx(run["gpu_hours"] * 2.0)
    labels = [r["label"] for r in res["comparison"]]
    assert "DeepSeek-V3 pre-training (about 180K GPU-h per 1T tokens)" in labels
    for row in res["comparison"]:  # a CPU is orders of magnitude from any GPU figure
        assert row["off_by_more_than_2x"] is True
    assert (tmp_path / result["environment"]["device_slug"] / "calibrate-deepseek-v3.json").is_file()


def test_calibrate_table_names_its_assumptions_and_flags(capsys):
    assert (
        main(
            [
                "calibrate",
                DSV3,
                "--scale",
                "64",
                "--timed-seq-len",
                "16",
                "--ep",
                "64",
                "--overlap",
                "0.5",
                "--tokens",
                "14.8e12",
                *FAST,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for text in (
        "[CPU]",
        "CPU RUN",
        "not a measurement",
        "overlap of communication with compute: 50%",
        "1.48e+13 tokens on 2048 GPUs",
        "OFF BY MORE THAN 2x",
        "Megatron-Core DeepSeek-V3",
    ):
        assert text in out, text
    assert re.search(r"MFU vs datasheet peak +n/a", out)


def test_calibrate_refuses_a_layer_timed_faster_than_the_matmul_peak():
    from moe.perf.calibrate import check_plausible

    measured = [{"kind": "attention", "timed_tflops": 400.0}, {"kind": "moe", "timed_tflops": 1514.0}]
    with pytest.raises(ValueError, match="the moe layer ran at 1514 TFLOP/s, faster than the 789 TFLOP/s"):
        check_plausible(measured, 789.0, "NVIDIA H100")
    check_plausible(measured[:1], 789.0, "NVIDIA H100")  # slower than the peak: accepted


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "train", "--config", "nope.yaml"], "not found"),
        (
            ["bench", "train", "--config", TINY, "--batch-size", "0"],
            "argument --batch-size: must be a positive integer",
        ),
        (["bench", "train", "--config", DSV3], "GiB"),  # refuses before allocating 671B weights
        (["bench", "layers", "--config", TINY, "--backends", "cuda"], "unknown expert backend"),
        (["calibrate", DSV3, "--ep", "3"], "must divide"),
        (["calibrate", DSV3, "--overlap", "2"], "argument --overlap: must be between 0 and 1"),
        (["calibrate", TINY, "--tokens", "0"], "argument --tokens: must be positive"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    try:
        status = main(argv)
    except SystemExit as e:  # a flag argparse refused
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_decode_bench_can_restart_from_a_shallow_copy_of_the_cache():
    # `moe bench infer` times every decode repeat from a shallow copy of one prefilled cache; that
    # is only right while KVCache.update leaves the tensors it holds untouched.
    import torch

    from moe import Transformer, load_config

    model = Transformer(load_config(TINY)).eval()
    base = model.new_cache()
    with torch.no_grad():
        model(torch.randint(256, (2, 5)), base)
        held = [tuple(t.clone() for t in layer) for layer in base.layers]
        copy = model.new_cache()
        copy.layers, copy.seq_len = list(base.layers), base.seq_len
        model(torch.randint(256, (2, 1)), copy)
    assert base.seq_len == 5 and copy.seq_len == 6
    for kept, now in zip(held, base.layers):
        assert all(torch.equal(a, b) for a, b in zip(kept, now))
