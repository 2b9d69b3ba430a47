"""The side-by-side bench maps transformers' MoE blocks onto our layer exactly (bench/moe_vs_transformers.py)."""

import pytest
import torch

pytest.importorskip("transformers")
from bench import moe_vs_transformers as mvt  # noqa: E402

CPU = torch.device("cpu")
SHAPES = [
    mvt.Shape("qwen3_moe", 24, 12, 6, 2, 16),  # transformers grouped_mm needs 16-byte strides
    mvt.Shape("deepseek_v3", 24, 12, 16, 3, 16, n_group=4, topk_group=2, shared=1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.model)
def test_every_implementation_matches_transformers_eager(shape):
    result = mvt.check(shape, CPU, tokens=32)
    assert set(result["max_abs_diff"]) == {
        "transformers eager",
        "transformers batched_mm",
        "transformers grouped_mm",
        "moe eager",
        "moe torch",
    }
    assert all(d <= result["tolerance"] for d in result["max_abs_diff"].values())
    assert result["experts"] == shape.experts


def test_a_wrong_weight_mapping_is_caught(monkeypatch):
    right = mvt.ours_from

    def swapped_gate_and_up(hf, shape, backend):
        ours = right(hf, shape, backend)
        with torch.no_grad():
            ours.experts.w_in.copy_(ours.experts.w_in.roll(shape.ffn, dims=-1))
        return ours

    monkeypatch.setattr(mvt, "ours_from", swapped_gate_and_up)
    with pytest.raises(AssertionError, match="differ from transformers eager"):
        mvt.check(SHAPES[0], CPU, tokens=32)


def test_run_times_every_implementation():
    shape = SHAPES[1]
    result = mvt.run(shape, CPU, "fp32", warmup=0, repeats=1)
    assert [r["impl"] for r in result["rows"]] == [
        "transformers eager",
        "transformers batched_mm",
        "transformers grouped_mm",
        "moe eager",
        "moe torch",
    ]
    # Router 16x24, three experts plus one shared expert of 3 x 24 x 12 weights, 2 FLOPs per weight.
    assert result["forward_flops_per_token"] == 2 * (16 * 24 + 3 * 24 * 12 * 4)
    for row in result["rows"]:
        fb = row["forward_backward"]
        assert fb["tflops"] == pytest.approx(fb["tokens_per_s"] * 3 * result["forward_flops_per_token"] / 1e12)


def test_main_writes_a_bench_record(monkeypatch, capsys, tmp_path):
    import json

    monkeypatch.setitem(mvt.PRESETS, "cpu", SHAPES)
    argv = ["--json", "--warmup", "0", "--repeats", "1", "--save", "--results-dir", str(tmp_path)]
    assert mvt.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schema"] == "moe.bench/1" and result["bench"] == "moe_vs_transformers"
    assert result["environment"]["label"] == "cpu" and result["config"] == {"preset": "cpu"}
    assert [b["shape"]["model"] for b in result["results"]["blocks"]] == ["qwen3_moe", "deepseek_v3"]
    saved = tmp_path / result["environment"]["device_slug"] / "moe_vs_transformers-cpu.json"
    assert json.loads(saved.read_text()) == result


def test_an_implementation_out_of_memory_is_recorded_and_the_others_still_run(monkeypatch, capsys):
    timed = mvt._time

    def batched_mm_runs_out(module, x, *args):
        if getattr(getattr(module, "hf_config", None), "_experts_implementation", None) == "batched_mm":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 384.00 GiB.\nmore text")
        return timed(module, x, *args)

    monkeypatch.setattr(mvt, "_time", batched_mm_runs_out)
    result = mvt.run(SHAPES[0], CPU, "fp32", warmup=0, repeats=1)
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["transformers batched_mm"] == {
        "impl": "transformers batched_mm",
        "error": "out of memory: CUDA out of memory. Tried to allocate 384.00 GiB.",
    }
    assert all("forward_backward" in r for name, r in rows.items() if name != "transformers batched_mm")
    mvt._print(
        {
            "environment": {"device": "cpu", "label": "cpu", "transformers": "x", "torch": "y"},
            "settings": {"dtype": "fp32"},
            "results": {"blocks": [result]},
        }
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if "transformers batched_mm" in line)
    assert line.split()[:5] == ["transformers", "batched_mm", "out", "of", "memory:"] and line.endswith("384.00 GiB.")
