"""`moe train --tensorboard`: the event files hold the metrics.jsonl rows, a resume purges what the
interrupted run wrote after its checkpoint, and a missing package names the extra to install."""

import shutil
import sys

import numpy as np
import pytest
from train_helpers import fast_args, micro_config

from moe.extras import MissingExtra
from moe.io import checkpoint as ckpt
from moe.train import run
from moe.train import tensorboard_log as tb_mod
from moe.train.metrics import read_rows
from moe.train.tensorboard_log import TRAIN_SCALARS, heatmap_image

EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def expected(rows, kind, key):
    """(step, value as float32): TensorBoard stores scalars in single precision."""
    return [(r["step"], float(np.float32(r[key]))) for r in rows if r["kind"] == kind and r.get(key) is not None]


def test_events_equal_metrics_rows_and_a_resume_purges_the_lost_steps(tmp_path):
    common = dict(steps=12, log_every=2, eval_every=4, save_every=5, tensorboard=True)
    run(micro_config(), fast_args(tmp_path, **common))  # checkpoints at 5, 10, 12
    run_dir = tmp_path / "run"
    for late in ckpt.checkpoint_dirs(run_dir / "checkpoints")[1:]:
        shutil.rmtree(late)  # as if killed after step 12's events but with step 5 the last checkpoint
    run(micro_config(), fast_args(tmp_path, resume=str(run_dir), **common))

    rows = read_rows(run_dir / "metrics.jsonl")
    acc = events(run_dir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [2, 4, 6, 8, 10, 12]
    for key in TRAIN_SCALARS:
        assert scalars(acc, f"train/{key}") == expected(rows, "train", key), key
    assert scalars(acc, "eval/val_loss") == expected(rows, "eval", "val_loss")
    assert scalars(acc, "eval/val_bpb") == expected(rows, "eval", "val_bpb")
    for layer in (1, 2):
        want = [
            (r["step"], float(np.float32(max(e["load"]) * len(e["load"]))))
            for r in rows
            if r["kind"] == "train"
            for e in r["layers"]
            if e["layer"] == layer
        ]
        assert scalars(acc, f"load_max_mean/layer_{layer}") == want
    # The heatmap at every evaluation after the first, once per step despite the resume.
    images = acc.Images("expert_load")
    assert [e.step for e in images] == [4, 8, 12]
    assert all(e.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and e.width > 0 for e in images)


def test_heatmap_without_matplotlib_is_the_bare_grid(tmp_path, monkeypatch):
    grid = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    image = heatmap_image(grid)
    assert image.shape == (2 * 16, 4 * 16) and image.dtype == np.float32
    assert image[0, 0] == 1.0 and image[0, 16 * 3] == 0.0 and image[16, 16] == pytest.approx(0.4)
    monkeypatch.setattr(tb_mod.importlib.util, "find_spec", lambda name: None)
    run(micro_config(), fast_args(tmp_path, steps=4, log_every=1, eval_every=2, tensorboard=True))
    [first, second] = events(tmp_path / "run").Images("expert_load")
    assert (first.step, second.step) == (2, 4) and (first.height, first.width) == (2 * 16, 4 * 16)


def test_missing_tensorboard_names_the_extra_before_touching_the_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    with pytest.raises(MissingExtra, match=r"--tensorboard needs tensorboard.*moe-reference\[tensorboard\]"):
        run(micro_config(), fast_args(tmp_path, steps=2, tensorboard=True))
    assert not (tmp_path / "run").exists()


def test_missing_matplotlib_skips_the_plots_with_a_note_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    summary = run(micro_config(), fast_args(tmp_path, steps=2, plots=True))
    out = capsys.readouterr().out
    assert "plots skipped: --plots needs matplotlib" in out and "pip install 'moe-reference[plots]'" in out
    assert summary["plots"] == [] and not (tmp_path / "run" / "loss.png").exists()
