from pathlib import Path

import pytest

from moe import load_config
from moe.perf import device_peaks
from moe.perf.projection import (
    Claim,
    Cluster,
    Component,
    ModelShape,
    all_to_all_seconds_per_token,
    compare,
    fsdp_seconds_per_token,
    implied_tflops_per_gpu,
    project,
    projected_value,
    training_run,
)
from moe.perf.published import CLAIMS, claims_for

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def shape(**kw):
    base = dict(hidden_size=1000, top_k=2, moe_layers=3, dense_params=1e9, expert_params=8e9, flops_per_token=1e10)
    return ModelShape(**{**base, **kw})


def cluster(**kw):
    base = dict(gpus=16, gpus_per_node=8, ep_degree=16, nvlink_GBps=100.0, ib_GBps=10.0, global_batch_tokens=16_000)
    return Cluster(**{**base, **kw})


def test_all_to_all_by_hand():
    # 4 (dispatch + combine, fwd + bwd) x K=2 x D=1000 x 2 bytes x 3 layers = 48,000 bytes per token.
    # EP over 16 GPUs, 8 per node: 7/16 of it over NVLink (100 GB/s), 8/16 over InfiniBand (10 GB/s).
    assert all_to_all_seconds_per_token(shape(), cluster()) == pytest.approx(max(21_000 / 100e9, 24_000 / 10e9))
    # Inside one node nothing crosses InfiniBand: 3/4 of the bytes over NVLink.
    assert all_to_all_seconds_per_token(shape(), cluster(ep_degree=4)) == pytest.approx(36_000 / 100e9)
    assert all_to_all_seconds_per_token(shape(), cluster(ep_degree=1)) == 0.0
    # FP8 dispatch halves it.
    assert all_to_all_seconds_per_token(shape(), cluster(a2a_bytes=1.0)) == pytest.approx(12_000 / 10e9)


def test_fsdp_by_hand():
    # Per parameter 2 + 2 (two bf16 all-gathers) + 4 (fp32 reduce-scatter) = 8 bytes, ring (n-1)/n.
    # Non-expert: 1e9 x 8 x 15/16 = 7.5e9. Experts: 8e9 / EP 4 = 2e9 per rank over 16/4 = 4 GPUs:
    # 2e9 x 8 x 3/4 = 12e9. 19.5e9 bytes over InfiniBand (two nodes) at 10 GB/s for 1,000 tokens per GPU.
    c = cluster(ep_degree=4)
    assert c.tokens_per_gpu_step == 1000
    assert fsdp_seconds_per_token(shape(), c) == pytest.approx(19.5e9 / 10e9 / 1000)
    # One node: NVLink.
    c = cluster(gpus=8, ep_degree=4, global_batch_tokens=8000)
    moved = 1e9 * 8 * 7 / 8 + 2e9 * 8 * 1 / 2
    assert fsdp_seconds_per_token(shape(), c) == pytest.approx(moved / 100e9 / 1000)


def test_project_adds_compute_and_exposed_communication():
    parts = [Component("attention", 4, 1e-4, 1e9), Component("moe", 3, 2e-4, 2e9), Component("head", 1, 1e-4, 1e9)]
    compute = 4 * 1e-4 + 3 * 2e-4 + 1e-4
    s, c = shape(), cluster(ep_degree=4)
    comm = all_to_all_seconds_per_token(s, c) + fsdp_seconds_per_token(s, c)
    p = project(parts, s, c, {"measured": 100.0, "datasheet": None})
    assert p.compute_s == pytest.approx(compute)
    assert p.seconds_per_token == pytest.approx(compute + comm)
    assert p.tokens_per_s_per_gpu == pytest.approx(1 / (compute + comm))
    assert p.achieved_tflops == pytest.approx(p.tokens_per_s_per_gpu * 1e10 / 1e12)
    assert p.mfu == {"measured": pytest.approx(p.achieved_tflops / 100.0), "datasheet": None}
    assert p.step_s == pytest.approx((compute + comm) * 1000)
    assert p.gpu_hours_per_trillion == pytest.approx(1e12 * (compute + comm) / 3600)
    # Full overlap hides what fits under the compute, and no more.
    hidden = project(parts, s, Cluster(**{**c.__dict__, "overlap": 1.0}))
    assert hidden.seconds_per_token == pytest.approx(max(compute, comm))
    half = project(parts, s, Cluster(**{**c.__dict__, "overlap": 0.5}))
    assert half.exposed_comm_s == pytest.approx(comm - 0.5 * min(comm, compute))


def test_training_run_by_hand():
    parts = [Component("dense", 1, 1e-3, 1e9)]
    p = project(parts, shape(moe_layers=0, expert_params=0), cluster(gpus=8, ep_degree=1, global_batch_tokens=8e9))
    p.seconds_per_token = 1e-3  # 1,000 tokens/s/GPU; overwrite the tiny FSDP term for round numbers
    p.tokens_per_s_per_gpu = 1000.0
    run = training_run(p, tokens=1e12, gpus=100, price_per_gpu_hour=2.0)
    assert run.gpu_hours == pytest.approx(1e9 / 3600)
    assert run.days == pytest.approx(1e9 / 3600 / 100 / 24)
    assert run.cost == pytest.approx(2e9 / 3600)


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(ep_degree=3), "divide"),
        (dict(overlap=1.5), "overlap"),
        (dict(ib_GBps=0.0), "ib_GBps"),
        (dict(gpus=0), "gpus"),
    ],
)
def test_cluster_rejects_impossible_settings(kw, key):
    with pytest.raises(ValueError, match=key):
        cluster(**kw)


def test_implied_throughput_of_published_figures():
    # DeepSeek-V3 pre-training: 14.8T tokens in 2.664M GPU-hours at 2.5e11 FLOPs/token.
    claim = Claim("x", "m", "gpu_hours", 2.664e6, tokens=14.8e12)
    lo, hi = implied_tflops_per_gpu(claim, 2.5e11)
    assert lo == hi == pytest.approx(14.8e12 * 2.5e11 / (2.664e6 * 3600) / 1e12)
    # A GPU-hour range: more hours, fewer FLOP/s (the ends swap).
    lo, hi = implied_tflops_per_gpu(Claim("x", "m", "gpu_hours", 1e6, 2e6, tokens=1e12), 1e11)
    assert (lo, hi) == (pytest.approx(1e23 / 2e6 / 3600 / 1e12), pytest.approx(1e23 / 1e6 / 3600 / 1e12))
    assert implied_tflops_per_gpu(Claim("x", "m", "tokens_per_s_per_gpu", 1000.0), 3e11) == (300.0, 300.0)
    assert implied_tflops_per_gpu(Claim("x", "m", "tflops_per_gpu", 330.0, 338.0), 1.0) == (330.0, 338.0)
    assert implied_tflops_per_gpu(Claim("x", "m", "gpu_hours", 1e6), 1e11) is None  # no work stated


def test_the_seed_10t_claim_needs_more_than_an_h100_bf16_peak():
    # 5e26 FLOP (the seed's own estimate) in 40,000 H100 x 120 days: the FLOP/s it implies per GPU
    # exceed the H100's dense BF16 peak; no config FLOP count enters this.
    claim = next(c for c in CLAIMS if c.config == "seed-speculated-ling-10t")
    assert claim.low == 40000 * 120 * 24
    lo, _ = implied_tflops_per_gpu(claim, 8e12)
    assert lo == pytest.approx(5e26 / (40000 * 120 * 24 * 3600) / 1e12)
    assert lo > device_peaks.datasheet_tflops("h100-sxm", "bf16") == 989.4


@pytest.mark.parametrize(
    "low, high, projected, ratio, off",
    [
        (100.0, None, 40.0, (2.5, 2.5), True),
        (100.0, None, 60.0, (100 / 60, 100 / 60), False),
        (100.0, None, 50.0, (2.0, 2.0), False),  # exactly 2x is not "more than"
        (100.0, None, 201.0, (100 / 201, 100 / 201), True),
        (100.0, 300.0, 40.0, (2.5, 7.5), True),
        (10.0, 100.0, 40.0, (0.25, 2.5), False),  # a range straddling the projection is not off
    ],
)
def test_off_by_more_than_2x(low, high, projected, ratio, off):
    result = compare(Claim("x", "m", "tflops_per_gpu", low, high), projected)
    assert result["ratio"] == pytest.approx(ratio)
    assert result["off_by_more_than_2x"] is off


def test_compare_without_a_projection():
    assert compare(Claim("x", "m", "gpu_hours", 1.0), None) == {
        "projected": None,
        "ratio": None,
        "off_by_more_than_2x": None,
    }


def test_projected_values_follow_the_claimed_metric():
    p = project(
        [Component("dense", 1, 1e-3, 1e9)], shape(moe_layers=0, expert_params=0, dense_params=0), cluster(ep_degree=1)
    )
    assert projected_value(Claim("x", "m", "tokens_per_s_per_gpu", 1.0), p, 1e10) == p.tokens_per_s_per_gpu
    assert projected_value(Claim("x", "m", "tflops_per_gpu", 1.0), p, 1e10) == p.achieved_tflops
    hours = projected_value(Claim("x", "m", "gpu_hours", 1.0, tokens=1e12), p, 1e10)
    assert hours == pytest.approx(1e12 / p.tokens_per_s_per_gpu / 3600)
    by_flops = projected_value(Claim("x", "m", "gpu_hours", 1.0, flops=1e22), p, 1e10)
    assert by_flops == pytest.approx(hours)  # 1e22 FLOPs at 1e10 per token = 1e12 tokens


def test_every_claim_names_a_shipped_config_and_a_known_device():
    names = {load_config(path).name for path in (CONFIGS / "full").glob("*.yaml")}
    for claim in CLAIMS:
        assert claim.config in names, claim.label
        assert claim.hardware is None or claim.hardware in device_peaks.SPECS, claim.label
        assert claim.metric in ("gpu_hours", "tflops_per_gpu", "tokens_per_s_per_gpu")
        assert claim.metric != "gpu_hours" or (claim.tokens or claim.flops), claim.label
        assert claim.high is None or claim.high >= claim.low
        assert claim.source and claim.kind in ("published", "derived", "seed claim")
    assert {c.label for c in claims_for("deepseek-v3")} >= {"DeepSeek-V3, all training stages"}
    assert claims_for("tiny") == []
