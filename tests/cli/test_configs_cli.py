"""`moe configs`, `moe --version`, and the one config convention of every subcommand:
`--config NAME_OR_PATH`, with the older positional path kept for inspect, calibrate and bench."""

import contextlib
import importlib.metadata
import io
import json
from pathlib import Path

import pytest

import moe
import moe.cli.configs
from moe.cli import main
from moe.cli.configs import FAMILIES
from moe.perf import flops
from moe.shipped_configs import shipped_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAST = ["--warmup", "0", "--repeats", "1"]


def status_of(argv):
    """main's exit status, also where argparse exits (a refused flag, --version)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def json_of(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def listed():
    """`moe configs --json`, run once: it counts every shipped config (seconds on a busy CPU)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["configs", "--json"]) == 0
    return json.loads(out.getvalue())["configs"]


def test_configs_lists_every_shipped_config_with_its_sizes(listed):
    files = sorted(CONFIGS.glob("*.yaml")) + sorted((CONFIGS / "full").glob("*.yaml"))
    assert [r["name"] for r in listed] == [p.stem for p in files]
    by_name = {r["name"]: r for r in listed}
    for path in (CONFIGS / "tiny.yaml", CONFIGS / "full" / "mixtral-8x7b.yaml"):  # as moe.perf.flops counts
        counts = flops.count(moe.load_config(path))
        row = by_name[path.stem]
        assert (row["params_total"], row["params_active"]) == (counts.params_total, counts.params_active)
    dsv3 = by_name["deepseek-v3"]
    assert round(dsv3["params_total"] / 1e9) == 671 and dsv3["scale"] == "full" and dsv3["family"] == "DeepSeek-V3"
    assert dsv3["routing"] == "256 routed, top-8, sigmoid, 1 shared, 8 groups keep 4"
    mini = by_name["mixtral-mini"]
    assert mini["scale"] == "CPU" and mini["routing"] == "8 routed, top-2, softmax" and mini["family"] == "Mixtral-8x7B"
    for row in listed:
        assert 0 < row["params_active"] < row["params_total"], row["name"]
        assert Path(row["path"]).is_file() and moe.load_config(row["name"]).name == row["name"]


def test_every_shipped_config_names_its_model():
    # A config added to configs/ needs its line in moe/cli/configs.py FAMILIES.
    assert set(FAMILIES) == set(shipped_configs())


def test_configs_table_has_a_row_per_config(capsys, monkeypatch, listed):
    by_name = {r["name"]: r for r in listed}
    monkeypatch.setattr(moe.cli.configs, "_describe", lambda name, path: by_name[name])  # counted once, above
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "scale", "params", "active", "model", "routing"]
    rows = {line.split()[0]: line for line in lines[1 : 1 + len(shipped_configs())]}
    assert set(rows) == set(shipped_configs())
    assert "671.03 B" in rows["deepseek-v3"] and " full " in rows["deepseek-v3"]
    assert "Mixtral-8x7B" in rows["mixtral-mini"] and " CPU " in rows["mixtral-mini"]
    assert rows["tiny"].endswith("8 routed, top-2, sigmoid, 1 shared")


def test_version_is_the_distribution_version(capsys):
    assert status_of(["--version"]) == 0
    out = capsys.readouterr().out
    try:
        expected = importlib.metadata.version("moe-reference")
    except importlib.metadata.PackageNotFoundError:
        expected = moe.__version__
    assert out.startswith(f"moe-reference {expected} (torch ")
    assert expected == moe.__version__  # pyproject.toml reads its version from moe.__version__


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "--config", "deepseek-v3"],
        ["inspect", "deepseek-v3"],
        ["inspect", "--config", str(CONFIGS / "full" / "deepseek-v3.yaml")],
        ["inspect", str(CONFIGS / "full" / "deepseek-v3.yaml")],
        ["inspect", "deepseek-v3", "--config", "deepseek-v3"],  # the same config twice is one config
    ],
)
def test_inspect_takes_a_name_or_a_path_either_way(capsys, argv):
    report = json_of(capsys, argv)
    assert report["name"] == "deepseek-v3" and round(report["params_total"] / 1e9) == 671


@pytest.mark.parametrize("form", [["--config", "tiny"], ["tiny"]])
def test_bench_takes_a_name_either_way(capsys, form):
    argv = ["bench", "infer", *form, "--batch-size", "1", "--prompt-len", "4", "--new-tokens", "2", *FAST]
    result = json_of(capsys, argv)
    assert result["config"] == {"name": "tiny", "path": "tiny"}


@pytest.mark.parametrize("form", [["--config", "deepseek-v3"], ["deepseek-v3"]])
def test_calibrate_takes_a_name_either_way(capsys, form):
    argv = ["calibrate", *form, "--scale", "64", "--timed-seq-len", "8", "--ep", "64", *FAST]
    result = json_of(capsys, argv)
    assert result["config"] == {"name": "deepseek-v3", "path": "deepseek-v3"}
    assert [c["count"] for c in result["results"]["components"]] == [61, 58, 3, 1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect"], "no config given: --config NAME_OR_PATH"),
        (["bench", "train"], "no config given"),
        (["calibrate"], "no config given"),
        (["inspect", "tiny", "--config", "mixtral-mini"], "two configs given: 'tiny' and --config 'mixtral-mini'"),
        (["inspect", "--config", "no-such-config"], "nor a shipped config name"),
    ],
)
def test_a_missing_or_doubled_config_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
