"""The tile-config table (moe_kernels/gemm_configs.json) is complete, well-formed and stable on rewrite.

Shapes: M = rows, G = groups; the shape class comes from rows per group M / G.
"""

import json

import pytest
import torch

from moe_kernels.tuning import (
    FIELDS,
    KINDS,
    TABLE_PATH,
    config_key,
    config_problem,
    device_family,
    dump_table,
    load_table,
    section_for,
)

TILES = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


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
            assert config_problem(key, cfg) == "", (section, key)
            assert set(FIELDS) <= set(cfg), (section, key)
            for block in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                assert cfg[block] >= 16 and cfg[block] & (cfg[block] - 1) == 0, (section, key, block)  # tl.dot
            assert cfg["num_warps"] in (1, 2, 4, 8, 16), (section, key)


def test_rewrite_is_lossless():
    text = TABLE_PATH.read_text()
    assert dump_table(json.loads(text)) == text


def test_device_family_names_the_section():
    assert device_family("NVIDIA H100 80GB HBM3") == "h100"
    assert device_family("NVIDIA H200") == "h200"


def test_h200_uses_the_h100_section_until_it_has_its_own():
    """Same GH100 compute die: the alias lends h100's tiles; a section tuned on the H200 wins."""
    shipped = load_table()
    assert section_for("NVIDIA H200", shipped) == "h100"
    assert section_for("NVIDIA H200 NVL", shipped) == "h100"
    assert section_for("NVIDIA H100 80GB HBM3", shipped) == "h100"
    assert section_for("NVIDIA A100-SXM4-80GB", shipped) == "default"
    assert section_for("NVIDIA H200", ["default", "h100", "h200"]) == "h200"
    assert section_for("NVIDIA H200", ["default"]) == "default", "an alias needs its target section"


@pytest.mark.parametrize(
    "key, extra, problem",
    [
        ("dw/16bit/large", {"SPLIT": 4}, ""),
        ("rows/16bit/large", {"TMA": True}, ""),
        ("rows/16bit/large", {"SPLIT": 2}, "not allowed ['SPLIT']"),
        ("swiglu_up/16bit/large", {"TMA": True}, ""),
        ("dw/16bit/large", {"TMA": True}, "not allowed ['TMA']"),
        ("dw/16bit/large", {"SPLIT": 0}, "SPLIT must be an integer >= 1"),
        ("dw/16bit/large", {"SPLIT": 2.0}, "SPLIT must be an integer >= 1"),
        ("rows/16bit/large", {"TMA": 1}, "TMA must be true or false"),
        ("swiglu_up/16bit/small", {"PERSISTENT": 2, "TMA": True}, ""),
        ("dw/16bit/large", {"PERSISTENT": 1}, "not allowed ['PERSISTENT']"),
        ("rows/16bit/large", {"PERSISTENT": 0}, "PERSISTENT must be an integer >= 1"),
        ("rows/16bit/large", {"PERSISTENT": True}, "PERSISTENT must be an integer >= 1"),
        ("dw/16bit/large", {"BLOCK_X": 1}, "not allowed ['BLOCK_X']"),
    ],
)
def test_optional_fields_belong_to_their_kind(key, extra, problem):
    found = config_problem(key, {**TILES, **extra})
    assert (problem in found and found) if problem else found == ""


def test_optional_fields_survive_a_rewrite_and_bad_ones_are_refused(tmp_path):
    table = {
        "default": {"dw/16bit/large": {**TILES, "SPLIT": 2}, "rows/16bit/large": {**TILES, "TMA": True}},
        "h100": {"rows/16bit/small": dict(TILES)},
    }
    path = tmp_path / "configs.json"
    path.write_text(dump_table(table))
    assert load_table(path) == table
    assert dump_table(load_table(path)) == path.read_text()
    bad = tmp_path / "bad.json"  # another path: load_table caches by path
    no_stages = {k: v for k, v in TILES.items() if k != "num_stages"}
    bad.write_text(json.dumps({"default": {"dw/16bit/large": {**no_stages, "SPLIT": 2}}}))
    with pytest.raises(ValueError, match=r"default/dw/16bit/large: needs the fields .* missing \['num_stages'\]"):
        load_table(bad)


def test_forced_options_reach_the_kinds_that_read_them_and_nothing_else():
    from moe_kernels import tuning

    device = torch.device("cpu")
    try:
        tuning.force_options({"TMA": True, "PERSISTENT": 2})
        assert tuning.get_config("rows", torch.float16, 64, 4, device, True) == {
            **tuning.INTERPRET_CONFIG,
            "TMA": True,
            "PERSISTENT": 2,
        }
        assert tuning.get_config("dw", torch.float16, 64, 4, device, True) == tuning.INTERPRET_CONFIG
        for bad, problem in (({"PERSISTENT": 0}, "PERSISTENT must be"), ({"WARP_SPEC": 1}, "unknown tile option")):
            with pytest.raises(ValueError, match=problem):
                tuning.force_options(bad)
        assert tuning.forced_options() == {"TMA": True, "PERSISTENT": 2}, "a refused call changes nothing"
    finally:
        tuning.force_options({})
    assert tuning.forced_options() == {}
    assert tuning.get_config("rows", torch.float16, 64, 4, device, True) == tuning.INTERPRET_CONFIG
