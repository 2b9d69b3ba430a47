"""Datasheet peaks of accelerators: the number on the box, for MFU against it.

Figures are dense tensor-core TFLOP/s per GPU (no 2:4 structured sparsity, which NVIDIA's
headline numbers double), by compute dtype. MFU in this project is always reported twice:
against the device's own measured dense matmul peak (moe.perf.timing.matmul_peak) and against
this table. A CPU has no datasheet peak here: its MFU against the datasheet is "n/a".
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    tflops: dict[str, float]  # dense TFLOP/s per GPU by dtype ("bf16", "fp16", "fp8", "tf32", "fp32")
    source: str


_HOPPER = {"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9}

SPECS = {
    spec.key: spec
    for spec in [
        # NVIDIA H100 datasheet, SXM5 column, as copied by glennklockwood.com/garden/processors/H100
        # (docs/published_configs.md, Part D): 989.4 BF16 dense, 1,979 with sparsity.
        DeviceSpec("h100-sxm", "NVIDIA H100 SXM", dict(_HOPPER), "NVIDIA H100 datasheet (SXM5)"),
        # Same datasheet, PCIe and NVL columns (sparse figures halved: 1,513 -> 756.5, 1,671 -> 835.5).
        DeviceSpec(
            "h100-pcie",
            "NVIDIA H100 PCIe",
            {"bf16": 756.5, "fp16": 756.5, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.2},
            "NVIDIA H100 datasheet (PCIe)",
        ),
        DeviceSpec(
            "h100-nvl",
            "NVIDIA H100 NVL",
            {"bf16": 835.5, "fp16": 835.5, "fp8": 1670.5, "tf32": 417.5, "fp32": 60.0},
            "NVIDIA H100 datasheet (NVL, per GPU)",
        ),
        # The export variant of the H100 SXM: the same tensor cores, NVLink cut to 400 GB/s.
        DeviceSpec(
            "h800-sxm",
            "NVIDIA H800 SXM",
            dict(_HOPPER),
            "assumed equal to H100 SXM compute (NVLink 400 GB/s); no primary datasheet found",
        ),
        # The H100 die with HBM3e (141 GB, 4.8 TB/s): same compute.
        DeviceSpec("h200-sxm", "NVIDIA H200 SXM", dict(_HOPPER), "NVIDIA H200 datasheet (SXM)"),
        DeviceSpec("gh200", "NVIDIA GH200", dict(_HOPPER), "NVIDIA GH200 datasheet (H100 compute)"),
        DeviceSpec(
            "a100",
            "NVIDIA A100",
            {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
            "NVIDIA A100 datasheet (SXM4 and PCIe share the tensor-core peak)",
        ),
        # HGX B200 at 1,000 W: BF16 2,250 dense / 4,500 sparse (glennklockwood.com/garden/processors/B200).
        DeviceSpec(
            "b200",
            "NVIDIA B200",
            {"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "tf32": 1100.0, "fp32": 80.0},
            "NVIDIA HGX B200 datasheet (1,000 W)",
        ),
    ]
}

# torch.cuda.get_device_name() spellings -> key; first match wins, so the specific come first
# ("NVIDIA GH200 480GB" also contains "H200"; "NVIDIA H100 80GB HBM3" is the SXM part).
_NAME_PATTERNS = [
    (r"GH200", "gh200"),
    (r"H100.*PCIe", "h100-pcie"),
    (r"H100.*NVL", "h100-nvl"),
    (r"H100", "h100-sxm"),
    (r"H800", "h800-sxm"),
    (r"H200", "h200-sxm"),
    (r"A100", "a100"),
    (r"B200", "b200"),
]


def lookup(device_name: str) -> DeviceSpec | None:
    """The spec of a device by its reported name or by key ("h100-sxm"); None if unknown (CPUs)."""
    if device_name in SPECS:
        return SPECS[device_name]
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return SPECS[key]
    return None


def datasheet_tflops(device_name: str, dtype: str) -> float | None:
    """Dense TFLOP/s of `device_name` in `dtype` ("bf16", "fp32", ...), or None when not listed."""
    spec = lookup(device_name)
    return None if spec is None else spec.tflops.get(dtype)
