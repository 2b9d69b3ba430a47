"""`moe train` and `moe generate` from the command line: the happy path, and every bad input
answered by one line on stderr, exit status 2, no traceback, nothing overwritten."""

import json
import subprocess
import sys

import pytest
import yaml
from train_helpers import REPO, micro_config, write_corpus

from moe import load_config
from moe.cli import main
from moe.shipped_configs import DEFAULT_CONFIG

FAST = ["--steps", "3", "--batch-size", "2", "--eval-batches", "1", "--no-progress", "--no-plots"]


@pytest.fixture
def setup(tmp_path):
    config = tmp_path / "micro.yaml"
    config.write_text(yaml.safe_dump(micro_config().to_dict()))
    return config, write_corpus(tmp_path), tmp_path / "run"


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def error_of(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_train_then_generate(setup, capsys):
    config, corpus, run_dir = setup
    assert main(["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST]) == 0
    out = capsys.readouterr().out
    assert "validation loss: 5.5" in out and "bits per byte" in out and "max/mean" in out
    assert (run_dir / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert main(["generate", "--ckpt", str(run_dir), "--prompt", "def ", "--max-new-tokens", "20"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text.encode()) >= 5


def test_without_config_it_trains_the_shipped_tiny_on_the_default_corpus(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "--out", str(run_dir), "--steps", "1", "--batch-size", "1", "--eval-batches", "1"]
    assert main([*argv, "--seq-len", "16", "--no-progress", "--no-plots"]) == 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"] == load_config(DEFAULT_CONFIG).to_dict() and record["config"]["name"] == "tiny"
    assert record["data"].startswith("python stdlib (") and "run " + str(run_dir) in capsys.readouterr().out


def test_a_time_limit_stop_is_said_in_one_line(setup, capsys):
    config, corpus, run_dir = setup
    assert (
        main(
            ["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST, "--time-limit", "0"]
        )
        == 0
    )
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("stopped by --time-limit 0 s at step 1 of 3; the checkpoint is saved: --resume ")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "config file not found"),
        ("hidden_size: [1, 2\n", "malformed config"),
        ("hidden_sise: 64\n", "unknown config key 'hidden_sise'"),
        ("moe:\n  top_k: 99\n", "config key 'moe.top_k' = 99"),
    ],
)
def test_bad_configs(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    if content is not None:
        config.write_text(content)
    err = error_of(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"), *FAST])
    assert err.startswith("moe train: error:") and message in err
    assert not (tmp_path / "run").exists()


def test_bad_data(setup, capsys, tmp_path):
    config, corpus, run_dir = setup
    (tmp_path / "empty").mkdir()
    err = error_of(
        capsys, ["train", "--config", str(config), "--data", str(tmp_path / "empty"), "--out", str(run_dir), *FAST]
    )
    assert "holds no non-empty files" in err
    small_vocab = tmp_path / "v64.yaml"
    small_vocab.write_text(yaml.safe_dump(micro_config(vocab_size=64).to_dict()))
    err = error_of(capsys, ["train", "--config", str(small_vocab), "--data", str(corpus), "--out", str(run_dir), *FAST])
    assert "is outside the vocabulary (config vocab_size = 64)" in err
    assert not run_dir.exists()


def test_an_existing_run_is_neither_overwritten_nor_resumed_from_another_config(setup, capsys, tmp_path):
    config, corpus, run_dir = setup
    assert main(["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST]) == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    err = error_of(capsys, ["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST])
    assert "holds another run" in err and "--resume" in err and "--overwrite" in err
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump(micro_config(hidden_size=48).to_dict()))
    err = error_of(capsys, ["train", "--config", str(wider), "--data", str(corpus), "--resume", str(run_dir), *FAST])
    assert "was trained with another config: hidden_size: checkpoint 32, --config 48" in err
    assert snapshot(run_dir) == before


def test_generate_bad_inputs(setup, capsys, tmp_path):
    config, corpus, run_dir = setup
    err = error_of(capsys, ["generate", "--ckpt", str(tmp_path / "nothing"), "--prompt", "x"])
    assert "checkpoint not found" in err
    small_vocab = tmp_path / "v128.yaml"
    small_vocab.write_text(yaml.safe_dump(micro_config(vocab_size=128).to_dict()))
    ascii_corpus = tmp_path / "ascii.txt"
    ascii_corpus.write_text("plain ascii text, over and over. " * 300)
    assert main(["train", "--config", str(small_vocab), "--data", str(ascii_corpus), "--out", str(run_dir), *FAST]) == 0
    err = error_of(capsys, ["generate", "--ckpt", str(run_dir), "--prompt", "café"])
    assert "prompt token id 195 is outside the vocabulary (vocab_size 128)" in err
    weights = run_dir / "checkpoints" / "step_00000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    err = error_of(capsys, ["generate", "--ckpt", str(run_dir), "--prompt", "x"])
    assert "step_00000003/model.safetensors: contents differ from the checksum" in err and "truncated or corrupt" in err


@pytest.mark.slow
def test_the_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moe", "train", "--config", str(tmp_path / "missing.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"moe train: error: config file not found: {tmp_path / 'missing.yaml'} ")
