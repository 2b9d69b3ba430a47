"""Tile configurations of the GEMM kernels, read from data (gemm_configs.json).

Shapes: M = rows, G = groups, rows per group = M / G (known from shapes, no sync).

A configuration is chosen per launch by (kernel kind, dtype class, shape class):

    kind         "rows"       row GEMMs with one accumulator (grouped_mm forward and dA,
                              the expert FFN's down projection, its dx GEMM, gelu up)
                 "swiglu_up"  the expert FFN's up projection: two accumulators (gate, up)
                 "act_backward"  the expert FFN's dh GEMM with the activation's backward in its
                              epilogue, which loads z's tiles and holds several fp32 tiles: its
                              registers run out at tiles a plain row GEMM fills well (128 x 256
                              spills on sm_90 even in halves; see ffn_epilogues.py)
                 "dw"         weight gradients: one program per (group, K tile, N tile),
                              BLOCK_M rows reduced per step, a BLOCK_K x BLOCK_N output tile
    dtype class  "16bit" (fp16, bf16) or "fp32"
    shape class  "decode" (<= 32 rows per group), "small" (<= 256), "large"

Every configuration has the FIELDS; some kinds accept OPTIONAL_FIELDS, off when absent:
    "SPLIT" (dw, int >= 1, default 1)       split each group's rows over SPLIT programs (gemm_dw.py)
    "TMA"   (row-tiled kinds, bool, false)  load B (and a row GEMM's A) through tensor descriptors
                                            (gemm_rows.py, ffn_kernels.py)
    "PERSISTENT" (row-tiled kinds, int >= 1, off)  launch that many programs per SM, each looping
                                            over tiles in a flattened loop (schedule.py's tile_loops)
They are opt-in: an entry carries them only when a tuning run measured them faster.
`force_options` turns them on for every launch, over the table, so that a benchmark can
measure them at real shapes before a tuning run has decided (bench/moe_layer.py --kernel-options).

The JSON holds one section per GPU family (matched as a substring of the device
name's slug, e.g. "h100" in "nvidia-h100-80gb-hbm3"; SECTION_ALIASES lends a
family's section to another with the same compute die) and a "default" section;
`bench/grouped_gemm.py --tune` rewrites a family's section from measurements.
Under TRITON_INTERPRET=1 one small configuration (INTERPRET_CONFIG) is used for all.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("gemm_configs.json")
ROW_KINDS = ("rows", "swiglu_up", "act_backward")  # one program per (row tile, column tile)
KINDS = (*ROW_KINDS, "dw")
FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
# optional field -> the kinds that read it (absent: SPLIT 1, TMA and PERSISTENT off, as the launchers read them)
OPTIONAL_FIELDS = {"SPLIT": ("dw",), "TMA": ROW_KINDS, "PERSISTENT": ROW_KINDS}
# a GPU without a section of its own uses the section of the same compute die: the H200 is
# the H100's GH100 (same SMs, shared memory and registers per SM; more and faster HBM), so
# tiles that fit and win on one fit on the other. A tuned "h200" section, once written, wins.
SECTION_ALIASES = {"h200": "h100"}
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
        order = FIELDS + tuple(OPTIONAL_FIELDS)  # optional fields kept when present
        lines = [
            f"    {json.dumps(key)}: {json.dumps({f: cfg[f] for f in order if f in cfg})}"
            for key, cfg in sorted(entries.items())
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
            problem = config_problem(key, cfg)
            if problem:
                raise ValueError(f"{path}: config {section}/{key}: {problem}")
    return table


def config_problem(key: str, cfg: dict) -> str:
    """What is wrong with the configuration `cfg` for table key `key` ('' if nothing)."""
    kind = key.split("/")[0]
    missing = [f for f in FIELDS if f not in cfg]
    extra = [f for f in cfg if f not in FIELDS and kind not in OPTIONAL_FIELDS.get(f, ())]
    if missing or extra:
        allowed = [f for f, kinds in OPTIONAL_FIELDS.items() if kind in kinds]
        return f"needs the fields {FIELDS}, may have {allowed}; missing {missing}, not allowed {extra}"
    for field in ("SPLIT", "PERSISTENT"):
        if field in cfg and (type(cfg[field]) is not int or cfg[field] < 1):
            return f"{field} must be an integer >= 1, got {cfg[field]!r}"
    if "TMA" in cfg and type(cfg["TMA"]) is not bool:
        return f"TMA must be true or false, got {cfg['TMA']!r}"
    return ""


def section_for(device_name: str, sections: Iterable[str]) -> str:
    """The table section a device uses: the longest section name found in the device name's slug,
    else an alias's target (SECTION_ALIASES) present in `sections`, else "default"."""
    slug = device_slug(device_name)
    names = [s for s in sections if not s.startswith("_") and s != "default"]
    matches = [s for s in names if s in slug]
    if matches:
        return max(matches, key=len)
    aliased = [target for alias, target in SECTION_ALIASES.items() if alias in slug and target in names]
    return aliased[0] if aliased else "default"


@functools.cache
def _section_for(device_name: str) -> str:
    return section_for(device_name, load_table())


_FORCED: dict = {}  # optional field -> value, over the table (force_options)


def force_options(fields: dict) -> None:
    """Every later launch of a kind that reads one of `fields` (OPTIONAL_FIELDS) takes its value,
    whatever the table says; {} goes back to the table. Process-wide, for benchmarks."""
    for field, value in fields.items():
        kinds = OPTIONAL_FIELDS.get(field)
        if kinds is None:
            raise ValueError(f"unknown tile option {field!r}; expected one of {list(OPTIONAL_FIELDS)}")
        problem = config_problem(f"{kinds[0]}/16bit/large", {**dict.fromkeys(FIELDS, 1), field: value})
        if problem:
            raise ValueError(problem)
    _FORCED.clear()
    _FORCED.update(fields)


def forced_options() -> dict:
    """The options force_options turned on ({} when the table decides)."""
    return dict(_FORCED)


def table_config(key: str, section: str) -> dict:
    """The configuration of `key` in a section of the table, or the "default" section's where it has none."""
    table = load_table()
    return table.get(section, {}).get(key) or table["default"][key]


def get_config(kind: str, dtype: torch.dtype, m: int, g: int, device: torch.device, interpret: bool) -> dict:
    """The tile configuration for one launch (a dict with the FIELDS, and maybe OPTIONAL_FIELDS)."""
    if interpret:
        cfg = INTERPRET_CONFIG
    else:
        cfg = table_config(config_key(kind, dtype, m, g), _section_for(torch.cuda.get_device_name(device)))
    if _FORCED:
        cfg = {**cfg, **{f: v for f, v in _FORCED.items() if kind in OPTIONAL_FIELDS[f]}}
    return cfg
