"""bench/activation_memory.py: what it counts is what autograd keeps, fake runs agree with real
ones, bytes per routed row do not depend on the token count, and parameters stay out."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moe

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("activation_memory", ROOT / "bench" / "activation_memory.py")
am = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = am  # dataclasses look their module up by name
_spec.loader.exec_module(am)

D = 64
SMALL = moe.MoEConfig(num_experts=8, top_k=2, expert_ffn_size=48, num_shared_experts=1, score_func="sigmoid")


def triton_on_cpu(dtype=torch.float32) -> bool:
    import moe_kernels

    return moe_kernels.triton_available("cpu", dtype)[0]


class _KeepOnCtx(torch.autograd.Function):
    """Keeps a tensor as a ctx attribute, where saved_tensors_hooks never see it."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = x.sum(dim=1)  # [4] fp32: 16 bytes
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.ones(6))

    def forward(self, x):
        w = x * self.p  # saves x and p (excluded); w [4, 6] fp32 = 96 bytes
        gate, up = w.chunk(2, dim=-1)
        return _KeepOnCtx.apply(gate * up)  # mul saves two views of w's one storage


def test_a_storage_counts_once_params_and_input_are_left_out_and_ctx_attributes_count():
    x = torch.randn(4, 6, requires_grad=True)
    log, _, _ = am.measure(_Toy(), x)
    assert log.packed == 4  # x, p, gate, up
    assert sorted(s.nbytes for s in log.saved.values()) == [16, 96]
    assert {s.component for s in log.saved.values()} == {"routed", "ctx of _KeepOnCtxBackward"}
    everything, _, _ = am.measure(_Toy(), x, exclude_kept=False)
    assert everything.bytes() == log.bytes() + x.untyped_storage().nbytes() + 6 * 4


@pytest.mark.parametrize(
    "backend, dtype",
    [("torch", torch.bfloat16), ("torch", torch.float32), ("triton", torch.float32)],
)
def test_fake_mode_counts_what_a_real_run_keeps(backend, dtype):
    if backend == "triton" and not triton_on_cpu(dtype):
        pytest.skip("Triton cannot run on CPU here (TRITON_INTERPRET=1 is set by conftest without CUDA)")
    fake = am.case("small", SMALL, D, backend, dtype, fake=True, tokens=(16, 32))
    real = am.case("small", SMALL, D, backend, dtype, fake=False, tokens=(16, 32), expand_experts=False)
    assert fake["ran"] == real["ran"] == backend
    assert fake["measured_dtype"] == real["measured_dtype"] == str(dtype).removeprefix("torch.")
    assert sorted(map(str, fake["breakdown"])) == sorted(map(str, real["breakdown"]))
    assert fake["bytes_per_row"] == real["bytes_per_row"] > 0


def test_expanded_expert_weights_keep_what_full_weights_keep():
    full = am.case("small", SMALL, D, "eager", torch.bfloat16, tokens=(8, 16), expand_experts=False)
    expanded = am.case("small", SMALL, D, "eager", torch.bfloat16, tokens=(8, 16), expand_experts=True)
    assert full["breakdown"] == expanded["breakdown"]


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_bytes_per_routed_row_do_not_depend_on_the_token_count(backend):
    tokens = [(4, 8), (4, 24), (8, 40)] if backend == "eager" else [(64, 128), (64, 4096)]
    cases = [am.case("small", SMALL, D, backend, torch.bfloat16, tokens=t) for t in tokens]
    assert len({c["bytes_per_row"] for c in cases}) == 1
    assert len({c["fixed_bytes"] for c in cases}) == 1
    # and the total at each count is fixed + per-row * rows, exactly
    for c in cases:
        assert c["total_bytes"] == c["fixed_bytes"] + c["bytes_per_row"] * c["rows"]


def test_fake_torch_and_real_eager_keep_the_same_per_row_and_routing_skew_changes_nothing():
    biased = dataclasses.replace(SMALL, expert_bias=True)
    eager = am.case("small", biased, D, "eager", torch.bfloat16, tokens=(4, 12))
    skewed = am.case("small", biased, D, "eager", torch.bfloat16, tokens=(4, 12), routing="zipf")
    torch_ = am.case("small", biased, D, "torch", torch.bfloat16, tokens=(512, 1024))
    assert eager["bytes_per_row"] == skewed["bytes_per_row"] == torch_["bytes_per_row"]


def test_torch_backend_keeps_the_permuted_rows_and_the_preactivation():
    """By hand, for one layer without shared experts: grouped_mm keeps its input rows, the
    permuted x [R, d], and SwiGLU's backward needs the pre-activation [R, 2f] (gate | up)."""
    d, f, T, K = 64, 48, 16, 2
    cfg = moe.MoEConfig(num_experts=4, top_k=K, expert_ffn_size=f)
    c = am.case("hand", cfg, d, "torch", torch.bfloat16, tokens=(8, T))
    R = T * K
    kept = {
        (tuple(shape), dtype, nbytes) for shape, dtype, nbytes, component in c["breakdown"] if component == "routed"
    }
    assert ((R, d), "bfloat16", R * d * 2) in kept
    assert any(dtype == "bfloat16" and nbytes == R * 2 * f * 2 for _, dtype, nbytes in kept)
    assert c["bytes_per_row_by_component"]["routed"] >= (d + 2 * f) * 2
    assert "shared_experts" not in c["bytes_per_row_by_component"]


def test_parameters_are_excluded_doubling_experts_changes_no_per_row_figure():
    cfg = moe.MoEConfig(num_experts=4, top_k=2, expert_ffn_size=48, num_shared_experts=1)
    x = torch.randn(16, D, requires_grad=True)
    layer = am.build_real(cfg, D, torch.float32, expand_experts=False)
    log, _, _ = am.measure(layer, x)
    everything, _, _ = am.measure(layer, x, exclude_kept=False)
    for weight in (layer.experts.w_in, layer.experts.w_out):  # saved by the GEMMs, and left out
        assert am.storage_key(weight) in everything.saved
        assert am.storage_key(weight) not in log.saved
    small = am.case("e4", cfg, D, "torch", torch.bfloat16, tokens=(32, 64))
    double = am.case("e8", dataclasses.replace(cfg, num_experts=8), D, "torch", torch.bfloat16, tokens=(32, 64))
    for component in ("routed", "shared_experts"):
        assert small["bytes_per_row_by_component"][component] == double["bytes_per_row_by_component"][component]
    one_expert = D * 2 * 48 * 2  # bf16 w_in of one expert: counting weights would add at least this
    assert abs(double["fixed_bytes"] - small["fixed_bytes"]) < one_expert


def test_a_fallback_is_reported_not_measured():
    if triton_on_cpu(torch.bfloat16):
        pytest.skip("the interpreter takes bf16 here: no fallback to provoke")
    c = am.case("small", SMALL, D, "triton", torch.bfloat16, fake=False, tokens=(4, 8))
    assert c["ran"] == "torch" and c["status"].startswith("fell back")


def test_smoke_run_writes_json_and_png(tmp_path, capsys):
    assert am.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*/activation_memory-smoke.json")
    result = json.loads(path.read_text())
    cases = result["results"]["cases"]
    assert [c["backend"] for c in cases] == list(am.BACKENDS)
    runnable = [c for c in cases if c["backend"] != "triton" or triton_on_cpu(torch.float16)]
    assert all(c["status"] == "ok" and c["ran"] == c["backend"] for c in runnable), [c["status"] for c in cases]
    assert path.with_suffix(".png").stat().st_size > 0
    assert "tiny" in capsys.readouterr().out
