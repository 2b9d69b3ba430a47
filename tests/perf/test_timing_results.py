import json
import re
import time

import pytest
import torch

from moe.perf import device_peaks, results, timing

CPU = torch.device("cpu")


def test_measure_excludes_warmup_and_reports_the_median():
    calls = []

    def fn():
        calls.append(len(calls))
        time.sleep(0.05 if len(calls) <= 2 else 0.002)  # two slow warm-up calls

    measured = timing.measure(fn, CPU, warmup=2, repeats=5)
    assert len(calls) == 7
    assert 0.002 <= measured.median_s < 0.04  # the slow warm-up calls are not in it
    assert measured.p20_s <= measured.median_s <= measured.p80_s
    assert (measured.warmup, measured.repeats, measured.timer) == (2, 5, "time.perf_counter")


def test_summary_statistics_by_hand():
    t = timing._summary([5.0, 1.0, 3.0, 2.0, 4.0], 0, 5, "x")
    assert (t.median_s, t.p20_s, t.p80_s) == (3.0, pytest.approx(1.8), pytest.approx(4.2))
    one = timing._summary([2.0], 0, 1, "x")
    assert (one.median_s, one.p20_s, one.p80_s) == (2.0, 2.0, 2.0)


def test_measure_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        timing.measure(lambda: None, CPU, repeats=0)


def test_matmul_peak_counts_2n3_flops():
    peak = timing.matmul_peak(CPU, "fp32", n=64, warmup=1, repeats=3)
    assert peak["n"] == 64 and peak["dtype"] == "fp32"
    assert peak["tflops"] == pytest.approx(2 * 64**3 / peak["timing"]["median_s"] / 1e12)


def test_cpu_is_labelled_and_has_no_datasheet_peak():
    env = results.environment(CPU)
    assert env["label"] == "cpu" and env["device_type"] == "cpu" and env["datasheet"] is None
    assert re.fullmatch(r"cpu-[a-z0-9-]+", env["device_slug"])
    assert env["torch"] == torch.__version__
    assert env["commit"] is None or re.fullmatch(r"[0-9a-f]{40}", env["commit"])
    assert timing.pick_dtype("auto", CPU) == "fp32"
    with pytest.raises(ValueError, match="--dtype"):
        timing.pick_dtype("int3", CPU)


@pytest.mark.parametrize(
    "name, key, bf16",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm", 989.4),
        ("NVIDIA H100 PCIe", "h100-pcie", 756.5),
        ("NVIDIA H100 NVL", "h100-nvl", 835.5),
        ("NVIDIA H800", "h800-sxm", 989.4),
        ("NVIDIA H200", "h200-sxm", 989.4),
        ("NVIDIA GH200 480GB", "gh200", 989.4),
        ("NVIDIA A100-SXM4-80GB", "a100", 312.0),
        ("NVIDIA B200", "b200", 2250.0),
        ("h100-sxm", "h100-sxm", 989.4),
    ],
)
def test_datasheet_lookup(name, key, bf16):
    assert device_peaks.lookup(name).key == key
    assert device_peaks.datasheet_tflops(name, "bf16") == bf16


def test_unknown_devices_have_no_datasheet_peak():
    assert device_peaks.lookup("AMD EPYC") is None
    assert device_peaks.datasheet_tflops("AMD EPYC", "fp32") is None
    assert device_peaks.datasheet_tflops("NVIDIA A100", "fp8") is None  # Ampere has no FP8


def test_save_writes_one_json_per_device_and_bench(tmp_path):
    env = results.environment(CPU)
    result = results.record("train", env, {"name": "tiny"}, {"dtype": "fp32"}, {"tokens_per_s": 1.5})
    path = results.save(result, "train-tiny", tmp_path)
    assert path == tmp_path / env["device_slug"] / "train-tiny.json"
    assert json.loads(path.read_text()) == result
    assert sorted(p.name for p in path.parent.iterdir()) == ["train-tiny.json"]  # no temporary left
    assert set(result) == {"schema", "bench", "environment", "config", "settings", "results"}
