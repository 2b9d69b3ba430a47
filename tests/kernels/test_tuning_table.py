"""The tile-config table (moe_kernels/gemm_configs.json) is complete, well-formed and stable on rewrite.

Shapes: M = rows, G = groups; the shape class comes from rows per group M / G.
"""

import json

import torch

from moe_kernels.tuning import FIELDS, KINDS, TABLE_PATH, config_key, device_family, dump_table, load_table


def test_default_section_covers_every_launch():
    table = load_table()
    for kind in KINDS:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for m, g in ((16, 8), (1024, 8), (65536, 8)):  # decode, small, large
                assert config_key(kind, dtype, m, g) in table["default"]


def test_every_config_is_launchable():
    for section, entries in load_table().items():
        if section.startswith("_"):
            continue
        for key, cfg in entries.items():
            assert set(cfg) == set(FIELDS), (section, key)
            for block in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[block] >= 16 and cfg[block] & (cfg[block] - 1) == 0, (section, key, block)  # tl.dot
            assert cfg["num_warps"] in (1, 2, 4, 8, 16), (section, key)


def test_rewrite_is_lossless():
    text = TABLE_PATH.read_text()
    assert dump_table(json.loads(text)) == text


def test_device_family_names_the_section():
    assert device_family("NVIDIA H100 80GB HBM3") == "h100"
    assert device_family("NVIDIA H200") == "h200"
