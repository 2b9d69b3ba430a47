"""Tile configurations of the GEMM kernels, read from data (gemm_configs.json).

Shapes: M = rows, G = groups, rows per group = M / G (known from shapes, no sync).

A configuration is chosen per launch by (kernel kind, dtype class, shape class):

    kind         "rows"       row GEMMs with one accumulator (grouped_mm forward and dA,
                              the expert FFN's down projection, its dh and dx GEMMs, gelu up)
                 "swiglu_up"  the expert FFN's up projection: two accumulators (gate, up)
                 "dw"         weight gradients: one program per (group, K tile, N tile),
                              BLOCK_M rows reduced per step, a BLOCK_K x BLOCK_N output tile
    dtype class  "16bit" (fp16, bf16) or "fp32"
    shape class  "decode" (<= 32 rows per group), "small" (<= 256), "large"

The JSON holds one section per GPU family (matched as a substring of the device
name's slug, e.g. "h100" in "nvidia-h100-80gb-hbm3") and a "default" section;
`bench/grouped_gemm.py --tune` rewrites a family's section from measurements.
Under TRITON_INTERPRET=1 one small configuration (INTERPRET_CONFIG) is used for all.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("gemm_configs.json")
KINDS = ("rows", "swiglu_up", "dw")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# the interpreter's cost is per program and per block op, not per element: 32 keeps
# the test suite fast while the test shapes (37, 100, 600) still span partial tiles
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "num_warps": 1, "num_stages": 1}


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def shape_class(m: int, g: int) -> str:
    rows_per_group = m / max(g, 1)
    if rows_per_group <= 32:
        return "decode"
    return "small" if rows_per_group <= 256 else "large"


def config_key(kind: str, dtype: torch.dtype, m: int, g: int) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    return f"{kind}/{dtype_class(dtype)}/{shape_class(m, g)}"


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_family(name: str) -> str:
    """The first slug token with a digit: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    slug = device_slug(name)
    return next((tok for tok in slug.split("-") if any(c.isdigit() for c in tok)), slug)


def dump_table(table: dict) -> str:
    """JSON text of a table in gemm_configs.json's layout: one configuration per line."""
    blocks = []
    for section, entries in table.items():
        if section.startswith("_"):  # metadata: notes, provenance of tuned sections
            blocks.append(f"  {json.dumps(section)}: {json.dumps(entries)}")
            continue
        lines = [
            f"    {json.dumps(key)}: {json.dumps({f: cfg[f] for f in FIELDS})}" for key, cfg in sorted(entries.items())
        ]
        blocks.append(f"  {json.dumps(section)}: {{\n" + ",\n".join(lines) + "\n  }")
    return "{\n" + ",\n".join(blocks) + "\n}\n"


@functools.cache
def load_table(path: Path = TABLE_PATH) -> dict:
    with open(path) as f:
        table = json.load(f)
    for section, entries in table.items():
        if section.startswith("_"):
            continue
        for key, cfg in entries.items():
            if sorted(cfg) != sorted(FIELDS):
                raise ValueError(f"{path}: config {section}/{key} must have exactly the fields {FIELDS}")
    return table


@functools.cache
def _section_for(device_name: str) -> str:
    slug = device_slug(device_name)
    matches = [s for s in load_table() if not s.startswith("_") and s != "default" and s in slug]
    return max(matches, key=len) if matches else "default"


def get_config(kind: str, dtype: torch.dtype, m: int, g: int, device: torch.device, interpret: bool) -> dict:
    """The tile configuration for one launch (a dict with the FIELDS)."""
    if interpret:
        return INTERPRET_CONFIG
    key = config_key(kind, dtype, m, g)
    table = load_table()
    section = table[_section_for(torch.cuda.get_device_name(device))]
    return section.get(key) or table["default"][key]
