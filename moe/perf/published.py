"""Published and claimed training figures that `moe calibrate` sets its projection beside.

Each figure is tied to the config it describes (ModelConfig.name) and says where it comes
from; docs/published_configs.md (Parts D and E) has the sources in full and how far each was
verified. "seed claim" rows are numbers from the seed articles (shared/seeds/), repeated here
only to be checked, never as facts.
"""

from __future__ import annotations

from .projection import Claim

DAYS = 24.0  # GPU-hours per GPU-day

CLAIMS = [
    Claim(
        "DeepSeek-V3, all training stages",
        "deepseek-v3",
        "gpu_hours",
        2.788e6,
        hardware="h800-sxm",
        gpus=2048,
        tokens=14.8e12,
        source="deepseek-ai/DeepSeek-V3 README.md: 2.788M H800 GPU hours",
        note="includes context extension and post-training (about 0.12M); FP8 mixed precision",
    ),
    Claim(
        "DeepSeek-V3 pre-training (about 180K GPU-h per 1T tokens)",
        "deepseek-v3",
        "gpu_hours",
        2.664e6,
        hardware="h800-sxm",
        gpus=2048,
        tokens=14.8e12,
        source="deepseek-ai/DeepSeek-V3 README.md: 2.664M H800 GPU hours for 14.8T tokens",
        note="FP8 mixed precision, DualPipe overlap, node-limited routing",
    ),
    Claim(
        "Megatron-Core DeepSeek-V3 on 1,024 H100",
        "deepseek-v3",
        "tflops_per_gpu",
        330.0,
        338.0,
        hardware="h100-sxm",
        gpus=1024,
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md (NeMo 25.09)",
        note="FP8 (330 with 128x128 blockwise scaling), seq 4096, TP2 PP8 VP4 EP64; Megatron's own FLOP "
        "formula; a 368 TFLOP/s figure was not found in the stored sources",
    ),
    Claim(
        "Megatron-Core DeepSeek-V3 on 1,024 H100",
        "deepseek-v3",
        "tokens_per_s_per_gpu",
        1297.0,
        hardware="h100-sxm",
        gpus=1024,
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md (NeMo 25.09)",
        note="FP8, seq 4096",
    ),
    Claim(
        "Megatron-Core Qwen3-30B-A3B on H100",
        "qwen3-30b-a3b",
        "tflops_per_gpu",
        121.0,
        241.0,
        hardware="h100-sxm",
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md",
        note="range over the listed recipes (precision, parallel layout)",
    ),
    Claim(
        "Ling-mini-2.0 on 8 x 80 GB GPUs, no MTP",
        "ling-mini-2.0",
        "tokens_per_s_per_gpu",
        128298 / 8,
        kind="derived",
        gpus=8,
        source="inclusionAI/Ling-V2 README.md: 128,298 tokens/s on 8 GPUs",
        note="GPU model not named (80 GB), so no implied MFU",
    ),
    Claim(
        "seed 002: Ling-1T trained in 120 days on 40,000 H100",
        "ling-1t",
        "gpu_hours",
        40000 * 120 * DAYS,
        kind="seed claim",
        hardware="h100-sxm",
        gpus=40000,
        tokens=20e12,
        source="shared/seeds/002 executive summary and section 1.2 ('$400M')",
        note="the seed states no token count; 20T is the released Ling-1T card's (20T+)",
    ),
    Claim(
        "seed 002: 'MoE 10T, 2T active', 5e26 FLOP in 120 days on 40,000 H100",
        "seed-speculated-ling-10t",
        "gpu_hours",
        40000 * 120 * DAYS,
        kind="seed claim",
        hardware="h100-sxm",
        gpus=40000,
        flops=5e26,
        source="shared/seeds/002 executive summary and 'evolution' table (5e26 FLOP, est.)",
        note="a speculated model, not the released Ling-1T; the work is the seed's own FLOP estimate",
    ),
    Claim(
        "seed 000: DBRX in 800K GPU-hours",
        "dbrx",
        "gpu_hours",
        800e3,
        kind="seed claim",
        hardware="h100-sxm",
        gpus=12384,
        tokens=12e12,
        source="shared/seeds/000 (survey table)",
        note="12T tokens from the transformers DBRX docs; the GPU count is the seed's",
    ),
    Claim(
        "seed 000: DBRX on 12,384 H100 for about 3 months",
        "dbrx",
        "gpu_hours",
        12384 * 90 * DAYS,
        kind="seed claim",
        hardware="h100-sxm",
        gpus=12384,
        tokens=12e12,
        source="shared/seeds/000 (survey table)",
        note="3 months read as 90 days; the same seed also says 800K GPU-hours, 33x less",
    ),
]


def claims_for(config_name: str) -> list[Claim]:
    return [c for c in CLAIMS if c.config == config_name]
