import json
import math
import shutil

import pytest
import torch
from train_helpers import fast_args, micro_config

from moe import Transformer
from moe.errors import InputError
from moe.io import checkpoint as ckpt
from moe.train import TrainArgs, TrainingDiverged, run
from moe.train import trainer as train_mod  # the Trainer looks train_step up here: the NaN test patches it
from moe.train.metrics import read_rows
from moe.train.step import lr_at


def train_rows(run_dir):
    return [r for r in read_rows(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    args = TrainArgs(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, args) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4)
    assert lr_at(55, args) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine


def test_training_lowers_validation_loss_and_logs_the_documented_rows(tmp_path):
    args = fast_args(tmp_path, steps=60, eval_every=30, save_every=30, log_every=5, plots=True)
    summary = run(micro_config(), args)
    assert summary["val_loss_start"] == pytest.approx(math.log(256), abs=0.1)  # uniform guess at the start
    assert summary["val_loss"] < summary["val_loss_start"] - 1.5
    assert summary["val_bpb"] == pytest.approx(summary["val_loss"] / math.log(2))
    run_dir = tmp_path / "run"
    rows = read_rows(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 30, 60]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(5, 61, 5))
    row = train[-1]
    assert {
        "loss",
        "aux_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "drop_rate",
        "load_max_mean",
        "layers",
        "tokens",
        "elapsed_s",
    } <= row.keys()
    assert row["tokens"] == 60 * 4 * 32 and row["aux_loss"] > 0 and row["tokens_per_s"] > 0
    assert [entry["layer"] for entry in row["layers"]] == [1, 2]  # layer 0 is dense
    for entry in row["layers"]:
        assert len(entry["load"]) == 4 and sum(entry["load"]) == pytest.approx(1, abs=1e-5)
        assert {"drop_rate", "z_loss", "switch_aux"} <= entry.keys()
    assert row["load_max_mean"] == pytest.approx(max(max(e["load"]) * 4 for e in row["layers"]))
    for png in ("loss.png", "expert_load.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["plots"] and set(summary["load"]) == {1, 2}
    # The aux-loss-free bias moved, and the accumulated load was consumed by the last update.
    model = Transformer.from_pretrained(summary["checkpoint"])
    assert all(layer.router.expert_bias.abs().sum() > 0 for layer in model.moe_layers())
    assert json.loads((run_dir / "run.json").read_text())["config"]["name"] == "micro"


@pytest.mark.slow
def test_resume_20_plus_20_equals_40_steps_exactly(tmp_path):
    config = micro_config()
    common = dict(steps=40, grad_accum=2, save_every=10, eval_every=10)
    straight = run(config, fast_args(tmp_path / "a", **common))
    run(config, fast_args(tmp_path / "b", stop_at=20, **common))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "b" / "run" / "checkpoints")][-1] == "step_00000020"
    resumed = run(config, fast_args(tmp_path / "b", resume=str(tmp_path / "b" / "run"), **common))
    keys = ("step", "loss", "aux_loss", "grad_norm", "lr", "tokens")
    a = [tuple(r[k] for k in keys) for r in train_rows(tmp_path / "a" / "run")]
    b = [tuple(r[k] for k in keys) for r in train_rows(tmp_path / "b" / "run")]
    assert len(a) == 40 and a == b  # exact: CPU fp32 with the same data, RNG and optimizer state
    assert resumed["val_loss"] == straight["val_loss"]
    for name, tensor in Transformer.from_pretrained(straight["checkpoint"]).state_dict().items():
        assert torch.equal(tensor, Transformer.from_pretrained(resumed["checkpoint"]).state_dict()[name]), name


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    args = fast_args(tmp_path, steps=12, save_every=5, eval_every=100)
    run(micro_config(), args)  # checkpoints at 5, 10, 12
    run_dir = tmp_path / "run"
    for late in ckpt.checkpoint_dirs(run_dir / "checkpoints")[1:]:
        shutil.rmtree(late)  # as if the run had been killed between step 5 and its next save
    run(micro_config(), fast_args(tmp_path, steps=12, save_every=5, eval_every=100, resume=str(run_dir)))
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, 13))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = train_mod.train_step
    calls = []

    def poisoned_step(model, *args):
        calls.append(1)
        out = real_step(model, *args)
        if len(calls) >= 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "train_step", poisoned_step)
    args = fast_args(tmp_path, steps=20, save_every=5, log_every=4)
    with pytest.raises(TrainingDiverged, match=r"nan or inf at step 7;.*step_00000005"):
        run(micro_config(), args)
    kept = ckpt.checkpoint_dirs(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000005"]
    assert ckpt.load_checkpoint(kept[0], Transformer(micro_config()))["step"] == 5
    assert all(math.isfinite(r["loss"]) for r in train_rows(tmp_path / "run"))


def test_refuses_to_overwrite_another_run_unless_asked(tmp_path):
    run(micro_config(), fast_args(tmp_path, steps=2))
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(
        InputError,
        match=r"holds another run \(run.json, metrics.jsonl, checkpoints\); "
        r"pass --resume",
    ):
        run(micro_config(), fast_args(tmp_path, steps=2))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    summary = run(micro_config(), fast_args(tmp_path, steps=3, overwrite=True))
    assert summary["step"] == 3 and [r["step"] for r in train_rows(run_dir)] == [1, 2, 3]


def test_resume_with_another_config_names_the_keys_and_touches_nothing(tmp_path):
    run(micro_config(), fast_args(tmp_path, steps=2))
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(
        InputError, match=r"step_00000002 was trained with another config: hidden_size: checkpoint 32, "
    ):
        run(micro_config(hidden_size=64), fast_args(tmp_path, steps=4, resume=str(run_dir)))
    # Routing alone differs: the tensors have the same shapes, so only the config check can see it.
    other_routing = micro_config()
    other_routing.moe.top_k = 1
    with pytest.raises(InputError, match=r"another config: moe.top_k: checkpoint 2, --config 1; resume with"):
        run(other_routing, fast_args(tmp_path, steps=4, resume=str(run_dir)))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    # The name only names the run folder, and the backend computes the same experts: both may differ.
    renamed = micro_config(name="renamed")
    renamed.moe.backend = "eager" if micro_config().moe.backend != "eager" else "torch"
    assert run(renamed, fast_args(tmp_path, steps=3, resume=str(run_dir)))["step"] == 3


def test_time_limit_stops_and_saves(tmp_path):
    summary = run(micro_config(), fast_args(tmp_path, steps=50, time_limit=0.0))
    assert summary["step"] == 1 and summary["checkpoint"].endswith("step_00000001")
    assert summary["stopped_by"] == "time_limit" and summary["steps"] == 50
    stopped = run(micro_config(), fast_args(tmp_path / "b", steps=50, stop_at=2))
    assert (stopped["stopped_by"], stopped["step"]) == ("stop_at", 2)
    done = run(micro_config(), fast_args(tmp_path / "c", steps=2, time_limit=1e6))
    assert (done["stopped_by"], done["step"]) == ("steps", 2)


def test_resume_refuses_a_stop_or_an_end_that_the_checkpoint_already_passed(tmp_path):
    run(micro_config(), fast_args(tmp_path, steps=10, stop_at=4))
    run_dir = tmp_path / "run"
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(InputError, match=r"--stop-at 3 is not after the checkpoint's step 4"):
        run(micro_config(), fast_args(tmp_path, steps=10, stop_at=3, resume=str(run_dir)))
    with pytest.raises(InputError, match=r"is at step 4, which already reaches --steps 4: nothing is left"):
        run(micro_config(), fast_args(tmp_path, steps=4, resume=str(run_dir)))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"token id 1\d\d in .*corpus.txt is outside the vocabulary "
        r"\(config vocab_size = 64\)",
    ):
        run(micro_config(vocab_size=64), fast_args(tmp_path, steps=2))
    assert not (tmp_path / "run").exists()
