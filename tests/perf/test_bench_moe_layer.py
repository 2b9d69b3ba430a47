"""bench/moe_layer.py: the side-by-side comparison's machinery, on CPU.

The real shapes need a GPU; --cpu-smoke runs every implementation that can run here on a tiny fp32
shape (ours through the Triton interpreter and on torch, transformers' grouped_mm experts; SonicMoE
recorded as unavailable) and --with-wrong adds one that is 5% off, which must be recorded wrong and
not timed.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import moe_layer  # noqa: E402
import moe_layer_cases  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
TIMED = ("forward", "backward", "forward_backward")


def run_bench(tmp_path, *flags, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), *flags, "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={"TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow  # a subprocess that runs ~40 checked and timed calls, some through the Triton interpreter
def test_every_implementation_is_checked_then_timed_and_a_wrong_one_is_not_timed(tmp_path):
    proc = run_bench(tmp_path, "--cpu-smoke", "--with-wrong")
    assert proc.returncode == 0, proc.stderr
    (result_file,) = tmp_path.glob("*/moe_layer.json")
    result = json.loads(result_file.read_text())
    cases = result["results"]["cases"]
    assert {c["routing"] for c in cases} == {"balanced", "zipf"}
    by_impl = {name: [c for c in cases if c["impl"] == name] for name in {c["impl"] for c in cases}}
    assert set(by_impl) == {"ours-triton", "ours-torch", "transformers", "sonicmoe", "wrong"}

    runnable = ["ours-triton", "ours-torch"] + (["transformers"] if HAS_TRANSFORMERS else [])
    for name in runnable:
        for c in by_impl[name]:
            assert c["status"] == "ok", (name, c["status"])
            assert set(c["rel_err"]) == {"out", "dx", "dw_in", "dw_out", "d_routing_weight"}
            assert max(c["rel_err"].values()) < 1e-4, (name, c["rel_err"])  # fp32 against fp32
            assert c["routing_weight_grad"] is True
            for key in TIMED:
                assert c[key]["median_s"] > 0 and c[f"{key}_tflops"] > 0 and c[f"{key}_of_peak"] > 0
                assert c[f"{key}_of_roofline"] > 0 and c["roofline"][key]["bound"] in ("compute", "memory")
    triton_ran = importlib.util.find_spec("triton") is not None
    if triton_ran:  # the interpreter ran the kernels: no "falls back to torch" warning
        assert all(not c["warnings"] for c in by_impl["ours-triton"])
    assert all(c["status"].startswith("unavailable: SonicMoE needs a CUDA GPU") for c in by_impl["sonicmoe"])

    for c in by_impl["wrong"]:  # the check can fail: recorded with its error, never timed
        assert c["status"].startswith("wrong: relative error")
        assert c["rel_err"]["out"] == pytest.approx(0.05, rel=1e-3)
        assert not any(key in c for key in TIMED)

    assert result["results"]["dense_peak"]["tflops"] > 0 and result["results"]["bandwidth"]["bytes_per_s"] > 0
    assert result["settings"]["tolerance"] == moe_layer.TOLERANCE and result["settings"]["smoke"] is True
    assert result["results"]["skipped"] == []
    assert (result_file.parent / "moe_layer_smoke.png").stat().st_size > 0


@pytest.mark.slow  # a subprocess that runs the Triton kernels through the interpreter
def test_forced_kernel_options_run_checked_and_are_saved_apart(tmp_path):
    options = '{"TMA": true, "PERSISTENT": 1}'
    proc = run_bench(tmp_path, "--cpu-smoke", "--impl", "ours-triton", "--kernel-options", options)
    assert proc.returncode == 0, proc.stderr
    (result_file,) = tmp_path.glob("*/moe_layer-persistent1-tma.json")
    result = json.loads(result_file.read_text())
    assert result["settings"]["kernel_options"] == {"TMA": True, "PERSISTENT": 1}
    assert result["settings"]["impls"] == ["ours-triton"]
    cases = result["results"]["cases"]
    assert cases and {c["impl"] for c in cases} == {"ours-triton"}
    assert all(c["status"] == "ok" and max(c["rel_err"].values()) < 1e-4 for c in cases)
    assert not list(tmp_path.glob("*/moe_layer.json")), "the table's run is not overwritten"


@pytest.mark.parametrize(
    "flag, said",
    [('{"PERSISTENT": 0}', "PERSISTENT must be an integer >= 1"), ('{"WARPS": 2}', "unknown tile option 'WARPS'")],
)
def test_bad_kernel_options_are_refused_in_one_line(tmp_path, capsys, flag, said):
    assert moe_layer.main(["--cpu-smoke", "--kernel-options", flag, "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--kernel-options: ") and said in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.json"))
    with pytest.raises(SystemExit) as exit_:
        moe_layer.parse(["--kernel-options", "[1, 2]"])
    assert exit_.value.code == 2


def test_forced_options_end_with_the_run(tmp_path):
    from moe_kernels.tuning import forced_options

    assert (
        moe_layer.main(
            ["--cpu-smoke", "--budget-s", "0", "--kernel-options", '{"SPLIT": 2}', "--results-dir", str(tmp_path)]
        )
        == 0
    )
    assert forced_options() == {}
    (result_file,) = tmp_path.glob("*/moe_layer-split2.json")
    assert json.loads(result_file.read_text())["settings"]["kernel_options"] == {"SPLIT": 2}


def test_cases_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    assert moe_layer.main(["--cpu-smoke", "--budget-s", "0", "--results-dir", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("*/moe_layer.json")
    result = json.loads(result_file.read_text())
    assert result["results"]["cases"] == []
    skipped = result["results"]["skipped"]
    assert len(skipped) == 2 and all("time budget" in s["reason"] for s in skipped)


def test_refuses_a_cpu_without_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


def test_shapes_come_from_the_full_configs():
    shapes = {name: moe_layer_cases.model_shape(name) for name in moe_layer_cases.MODELS}
    assert shapes["ling-1t"] == {"d": 8192, "f": 2048, "experts_total": 256, "top_k": 8}
    assert shapes["mixtral-8x7b"] == {"d": 4096, "f": 14336, "experts_total": 8, "top_k": 2}
    # fine-grained models whole on one GPU, the big ones as expert-parallel shares
    assert moe_layer_cases.local_experts(shapes["qwen3-30b-a3b"]) == (128,)
    assert moe_layer_cases.local_experts(shapes["ling-flash-2.0"]) == (256,)
    assert moe_layer_cases.local_experts(shapes["deepseek-v3"]) == (8, 32)

    cases = moe_layer_cases.grid(shapes, moe_layer_cases.ROWS, quick=False)
    assert [c.rows for c in cases] == sorted(c.rows for c in cases)  # every model's small cases first
    assert {c.model for c in cases if c.rows == 4096} == set(moe_layer_cases.MODELS)
    # top-8 of 8 local experts: every token takes every expert, so there is no skewed variant
    assert {c.routing for c in cases if c.model == "ling-1t" and c.experts == 8} == {"balanced"}
    quick = moe_layer_cases.grid(shapes, moe_layer_cases.QUICK_ROWS, quick=True)
    assert {(c.model, c.experts) for c in quick} >= {("ling-1t", 32), ("mixtral-8x7b", 8)}
    assert sum(moe_layer_cases.estimate_s(c) for c in cases) < 300  # leaves room in `gpu_session.sh full`
    # the published anchor's shape first: Liger's E 128, d 2048, f 768, top-8, 32K tokens
    anchored = moe_layer_cases.grid(shapes, moe_layer_cases.ROWS, quick=False, anchors=True)
    assert anchored[1:] == cases
    first = anchored[0]
    assert (first.experts, first.d, first.f, first.top_k, first.tokens) == (128, 2048, 768, 8, 32768)


def test_roofline_counts_the_compulsory_bytes_and_takes_the_slower_side():
    case = moe_layer_cases.Case("t", d=1024, f=512, experts=32, top_k=4, rows=4096, routing="balanced")
    weights, act, routing = 32 * 3 * 1024 * 512 * 2, 1024 * 1024 * 2, 4096 * 12  # T = 1024 tokens
    counted = moe_layer_cases.compulsory_bytes(case, experts_used=32)
    assert counted["forward"] == weights + 2 * act + routing
    assert counted["backward"] == 2 * weights + 3 * act + routing + 4096 * 4
    assert counted["forward_backward"] == counted["forward"] + counted["backward"]
    assert moe_layer_cases.compulsory_bytes(case, experts_used=8)["forward"] == counted["forward"] - weights * 3 // 4

    flops = 6 * 4096 * 1024 * 512  # forward
    fast_memory = moe_layer_cases.roofline(case, 32, peak_tflops=100.0, bytes_per_s=1e15)
    assert fast_memory["forward"]["bound"] == "compute"
    assert fast_memory["forward"]["bound_tflops"] == pytest.approx(100.0)
    slow_memory = moe_layer_cases.roofline(case, 32, peak_tflops=100.0, bytes_per_s=1e9)
    assert slow_memory["backward"]["bound"] == "memory"
    assert slow_memory["forward"]["bound_tflops"] == pytest.approx(flops / (counted["forward"] / 1e9) / 1e12)


@pytest.mark.parametrize("kind", ["balanced", "zipf"])
def test_routing_picks_distinct_experts_with_the_intended_load(kind):
    case = moe_layer_cases.Case("t", 16, 8, experts=16, top_k=4, rows=4096, routing=kind)
    idx, weight = moe_layer_cases.routing(case, torch.device("cpu"))
    assert idx.shape == weight.shape == (1024, 4)
    assert all(len(set(row)) == 4 for row in idx.tolist())  # K distinct experts per token
    torch.testing.assert_close(weight.sum(-1), torch.ones(1024))
    load = torch.bincount(idx.flatten(), minlength=16)
    if kind == "balanced":
        assert load.tolist() == [256] * 16
    else:
        assert load[0] > 2 * load.float().mean() and load[0] == load.max()


def test_the_reference_is_the_weighted_sum_of_each_tokens_expert_ffns():
    torch.manual_seed(0)
    E, D, F = 3, 5, 4
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    x, g = torch.randn(2, D), torch.randn(2, D)
    idx, w = torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.7, 0.3], [0.4, 0.6]])

    def ffn(e, v):
        h = v @ w_in[e]
        return (torch.nn.functional.silu(h[:F]) * h[F:]) @ w_out[e]

    expected = torch.stack([sum(w[t, k] * ffn(idx[t, k], x[t]) for k in range(2)) for t in range(2)])
    ref = moe_layer_cases.reference(x, idx, w, w_in, w_out, g)
    torch.testing.assert_close(ref["out"], expected)
    assert ref["dx"].shape == x.shape and ref["dw_in"].shape == w_in.shape and ref["d_routing_weight"].shape == w.shape
    assert ref["dw_in"][1].abs().sum() > 0  # expert 1 got a token


def test_sonicmoe_weights_compute_our_experts_in_its_own_convention():
    """No GPU here runs SonicMoE; what the bench hands it is held to SonicMoE's own torch path
    (sonicmoe/moe.py: h = F.linear(x, c_fc[e]); silu(h[..., ::2]) * h[..., 1::2]; F.linear(., c_proj[e]))."""
    import moe_layer_peers as peers

    torch.manual_seed(1)
    E, D, F = 3, 6, 4
    w_in, w_out = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    x, g = torch.randn(4, D), torch.randn(4, D)
    idx, w = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2]]), torch.rand(4, 2)
    c_fc, c_proj = (p.requires_grad_() for p in peers.sonic_weights(w_in, w_out))
    assert c_fc.shape == (E, 2 * F, D) and c_proj.shape == (E, D, F) and c_fc.is_contiguous()

    out = torch.zeros(4, D)
    for t in range(4):
        for k in range(2):
            h = torch.nn.functional.linear(x[t], c_fc[idx[t, k]])
            a = torch.nn.functional.silu(h[..., ::2]) * h[..., 1::2]
            out[t] += w[t, k] * torch.nn.functional.linear(a, c_proj[idx[t, k]])
    ref = moe_layer_cases.reference(x, idx, w, w_in, w_out, g)
    torch.testing.assert_close(out, ref["out"])
    dw_in, dw_out = peers.sonic_to_ours(torch.autograd.grad(out, (c_fc, c_proj), g))
    torch.testing.assert_close(dw_in, ref["dw_in"])
    torch.testing.assert_close(dw_out, ref["dw_out"])


@pytest.mark.slow  # starts a Python child
def test_the_sonicmoe_probe_reports_why_it_cannot_run(monkeypatch):
    """The probe runs SonicMoE in a child process (a crash there must not end the run); here the child
    finds no CUDA, and the reason comes back as text for the JSON instead of an exception."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    reason = moe_layer.probe_sonic(torch.device("cuda"), timeout_s=120, autotune=False)
    if importlib.util.find_spec("sonicmoe") is None:
        assert reason.startswith("sonicmoe is not installed")
        # what the child says where it is installed but cannot run: pretend it is installed
        monkeypatch.setattr(moe_layer.importlib.util, "find_spec", lambda name: object())
        reason = moe_layer.probe_sonic(torch.device("cuda"), timeout_s=120, autotune=False)
    assert reason.startswith("the probe raised") and "CUDA" in reason, reason
