"""Hostile input to `moe train`: flags out of range, config names that climb out of runs/, data
that is not a regular file or too short, tampered checkpoints, and two trainers on one folder.
Each is refused with one line (exit status 2 from the command line) before the run folder is
touched, so the next, corrected command is not refused as "holds another run"."""

import errno
import json
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from train_helpers import REPO, fast_args, micro_config, write_corpus

from moe.cli import main
from moe.errors import InputError
from moe.io.files import seal_trainer_state
from moe.train import run
from moe.train.byte_files import ByteFiles
from moe.train.data import BatchSampler, TokenView, check_vocab, load_corpus, split_ranges
from moe.train.metrics import MetricsLog
from moe.train.run_folder import default_run_dir, rng_state, set_rng_state
from moe.train.run_lock import RunLock

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


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-lr", "-0.1"], "--min-lr must be in [0, --lr 0.003], got -0.1"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--lr", "inf"], "--lr must be a positive number, got inf"),
        (["--stop-at", "0"], "--stop-at must be a step from 1 to --steps 3, got 0"),
        (["--stop-at", "-3"], "--stop-at must be a step from 1 to --steps 3, got -3"),
        (["--stop-at", "9"], "--stop-at must be a step from 1 to --steps 3, got 9"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--steps", "-1"], "--steps must be a positive integer, got -1"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--grad-accum", "-2"], "--grad-accum must be a positive integer"),
        (["--warmup-steps", "-1"], "--warmup-steps must be a non-negative integer"),
        (["--time-limit", "-5"], "--time-limit must be a number of seconds >= 0"),
        (["--time-limit", "nan"], "--time-limit must be a number of seconds >= 0"),
        (["--keep-last", "0"], "--keep-last must be a positive integer"),
        (["--val-fraction", "0"], "--val-fraction must be in [0.01, 0.99]"),
        (["--val-fraction", "1.0"], "--val-fraction must be in [0.01, 0.99]"),
        (["--eval-every", "0"], "--eval-every must be a positive integer"),
        (["--beta2", "1"], "--beta2 must be in [0, 1)"),
        (["--grad-clip", "-1"], "--grad-clip must be a number >= 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a number >= 0"),
        (["--seed", "-1"], "--seed must be a non-negative integer"),
        (["--token-dtype", "int8"], "--token-dtype must be one of uint16, uint32"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device: use auto, cpu"),
        (["--device", "cuda:99"], "--device cuda:99"),
        (["--seq-len", "64"], "--seq-len 64 exceeds the config's max_seq_len (32)"),
        (["--dist-timeout", "0"], "--dist-timeout must be positive seconds"),
    ],
)
def test_bad_flags_are_one_line_and_touch_nothing(setup, capsys, flags, message):
    config, corpus, run_dir = setup
    err = error_of(
        capsys, ["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST, *flags]
    )
    assert message in err
    assert not run_dir.exists()


def test_a_bad_flag_on_a_resume_changes_nothing_and_the_fixed_command_runs(setup, capsys):
    config, corpus, run_dir = setup
    base = ["train", "--config", str(config), "--data", str(corpus), *FAST]
    assert main([*base, "--out", str(run_dir), "--stop-at", "2"]) == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    for bad in (["--stop-at", "-3"], ["--lr", "nan"], ["--stop-at", "1"], ["--steps", "2"]):
        err = error_of(capsys, [*base, "--resume", str(run_dir), *bad])
        assert "--" in err
        assert snapshot(run_dir) == before, bad
    assert main([*base, "--resume", str(run_dir)]) == 0
    assert json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer.json").read_text())["step"] == 3


def test_train_args_from_python_are_typed():
    from moe.train import TrainArgs

    with pytest.raises(InputError, match=r"--steps must be an int, got '10'"):
        TrainArgs(steps="10")
    with pytest.raises(InputError, match=r"--batch-size must be an int, got True"):
        TrainArgs(batch_size=True)
    assert TrainArgs(lr=1).lr == 1.0 and isinstance(TrainArgs(lr=1).lr, float)


# --------------------------------------------------------------------------- the run folder


@pytest.mark.parametrize("name", ["../..", "..", ".", "", "/etc", "a/b", "a\\b", ".hidden", "-rf", "x\ny"])
def test_a_config_name_cannot_place_the_run_outside_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path / "..")
    config = micro_config()
    config.name = name  # as a hand-written config.json could have it
    args = fast_args(tmp_path, steps=2)
    args.out = None
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(InputError, match=r"cannot name a folder under runs/.*or pass --out DIR"):
        run(config, args)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # not even runs/ was made


def test_plain_config_names_map_into_runs():
    assert default_run_dir("tiny").as_posix() == "runs/tiny"
    assert default_run_dir("qwen3-moe-mini_v2.1+x").as_posix() == "runs/qwen3-moe-mini_v2.1+x"


# --------------------------------------------------------------------------- data


def test_data_that_is_not_a_regular_file_is_refused_by_name(setup, capsys, tmp_path):
    config, corpus, run_dir = setup
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it would block forever
    argv = ["train", "--config", str(config), "--out", str(run_dir), *FAST, "--data"]
    assert "is a FIFO: --data takes a regular file or a folder of them" in error_of(capsys, [*argv, str(fifo)])
    assert "/dev/null is a character device" in error_of(capsys, [*argv, "/dev/null"])
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text " * 1000)
    os.mkfifo(folder / "b.fifo")
    assert f"data {folder / 'b.fifo'} is a FIFO" in error_of(capsys, [*argv, str(folder)])
    (folder / "b.fifo").unlink()
    (folder / "c.txt").symlink_to(tmp_path / "gone.txt")
    assert "broken symbolic link" in error_of(capsys, [*argv, str(folder)])
    assert not run_dir.exists()


def test_empty_short_and_malformed_data_are_one_line(setup, capsys, tmp_path):
    config, corpus, run_dir = setup
    argv = ["train", "--config", str(config), "--out", str(run_dir), *FAST, "--data"]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in error_of(capsys, [*argv, str(tmp_path / "empty.txt")])
    (tmp_path / "short.txt").write_bytes(b"x" * 300)
    err = error_of(capsys, [*argv, str(tmp_path / "short.txt")])
    assert "short.txt is too short: its validation split has 30 tokens" in err and "--seq-len 32" in err
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    assert "bad.npy: not a readable .npy token file" in error_of(capsys, [*argv, str(tmp_path / "bad.npy")])
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "obj.npy: not a readable .npy token file" in error_of(capsys, [*argv, str(tmp_path / "obj.npy")])
    assert not run_dir.exists()


def test_a_data_file_of_gigabytes_is_mapped_not_read(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 4 GiB of zero bytes that take no disk
        f.truncate(4 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    corpus = load_corpus(big)
    check_vocab(corpus, 256)
    view = TokenView(corpus.tokens, split_ranges(len(corpus.tokens), 0.1)[0])
    x, _ = BatchSampler(view, 8, 64).next_batch()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert len(corpus.tokens) == 4 << 30 and x.shape == (8, 64) and int(x.sum()) == 0
    assert grown_mib < 200, grown_mib  # the old reader held all 4 GiB


def test_a_data_file_that_shrinks_during_training_is_named(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"a" * 100)
    (tmp_path / "b.txt").write_bytes(b"b" * 100)
    files = ByteFiles([tmp_path / "a.txt", tmp_path / "b.txt"])
    (tmp_path / "b.txt").write_bytes(b"b" * 10)
    assert files[np.array([5, 105])].tolist() == [97, 98]
    with pytest.raises(InputError, match=r"b.txt is shorter than when the run opened it \(100 bytes\)"):
        files[np.array([150])]


# --------------------------------------------------------------------------- resuming a tampered checkpoint


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("step", -1, "'step' = -1 is not a count"),
        ("step", "2", "'step' = '2' is not a count"),
        ("step", 2.5, "'step' = 2.5 is not a count"),
        ("step", 10**30, "'step' = 1000000000000000000000000000000 is not a count"),
        ("tokens", -64, "'tokens' = -64 is not a count"),
        ("elapsed_s", float("nan"), "'elapsed_s' = nan is not a duration in seconds"),
        ("data", {"position": -5, "seed": 0, "rank": 0}, "'data.position' must be a non-negative integer, got -5"),
        ("data", [1, 2], "'data' must be the data sampler's state"),
    ],
)
def test_a_tampered_trainer_json_is_refused_before_use(tmp_path, key, value, message):
    run(micro_config(), fast_args(tmp_path, steps=4, stop_at=2))
    run_dir = tmp_path / "run"
    state_file = run_dir / "checkpoints" / "step_00000002" / "trainer.json"
    state = json.loads(state_file.read_text())
    state[key] = value
    state_file.write_text(json.dumps(state))
    before = snapshot(run_dir)
    with pytest.raises(InputError, match="trainer.json: contents differ from its own checksum"):
        run(micro_config(), fast_args(tmp_path, steps=4, resume=str(run_dir)))
    # resealed (as a careful forger would), the field itself is checked
    state_file.write_bytes(seal_trainer_state(state))
    before = snapshot(run_dir)
    with pytest.raises(InputError, match="trainer.json: " + message.replace("(", r"\(").replace(")", r"\)")):
        run(micro_config(), fast_args(tmp_path, steps=4, resume=str(run_dir)))
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    "state, message",
    [
        ({"torch": "!!!"}, "'rng.torch' is not base64"),
        ({"torch": "AAAA"}, "'rng.torch' holds 3 bytes, not the 5056 of an RNG state"),
        ({"torch": 5}, "'rng' is not an RNG state"),
        ([1], "'rng' is not an RNG state"),
        ({"torch": rng_state()["torch"], "cuda": "x"}, "'rng.cuda' is not a list"),
    ],
)
def test_a_corrupt_rng_state_is_refused_and_not_applied(state, message):
    before = torch.get_rng_state()
    with pytest.raises(InputError, match="step_9/trainer.json: " + re.escape(message)):
        set_rng_state(state, "step_9/trainer.json")
    assert torch.equal(torch.get_rng_state(), before)


def test_resume_without_config_takes_the_checkpoints(setup, capsys):
    config, corpus, run_dir = setup
    assert (
        main(["train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir), *FAST, "--stop-at", "2"])
        == 0
    )
    assert main(["train", "--data", str(corpus), "--resume", str(run_dir), *FAST]) == 0
    assert "run " + str(run_dir) + ": step 3" in capsys.readouterr().out


# --------------------------------------------------------------------------- two trainers, one folder


def test_a_held_lock_refuses_a_second_trainer_and_a_stale_one_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = RunLock(run_dir)
    holder.acquire()
    lock_text = json.loads((run_dir / ".lock").read_text())
    assert lock_text == {"pid": os.getpid(), "host": os.uname().nodename}
    # flock locks belong to an open file: a second open in this process conflicts like another process.
    with pytest.raises(InputError, match=rf"is in use by another trainer \(held by pid {os.getpid()} on host "):
        run(micro_config(), fast_args(tmp_path, steps=2, overwrite=True))
    holder.release()
    assert not run_dir.exists()  # the holder made the folder and wrote nothing else: it is gone
    # A lock file left by a process that died: its flock went with it, the file is taken over.
    run_dir.mkdir()
    (run_dir / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))
    assert run(micro_config(), fast_args(tmp_path, steps=2))["step"] == 2
    assert not (run_dir / ".lock").exists()  # released at the end


@pytest.mark.slow
def test_two_trainer_processes_on_one_folder(setup):
    config, corpus, run_dir = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "moe", "train", "--config", str(config), "--data", str(corpus), "--out", str(run_dir)]
    first = subprocess.Popen(
        [*argv, "--steps", "100000", "--save-every", "2", "--log-every", "1", "--eval-every", "1000"]
        + ["--batch-size", "2", "--eval-batches", "1", "--no-progress", "--no-plots"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "checkpoints").glob("step_*[0-9]")) and first.poll() is None:
            assert time.monotonic() < deadline, "the first trainer wrote no checkpoint in time"
            time.sleep(0.2)
        assert first.poll() is None, first.stderr.read()
        # --overwrite would delete the first run's files: the lock is taken before anything is deleted.
        second = subprocess.run(
            [*argv, *FAST, "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
        )
        rows_seen = (run_dir / "metrics.jsonl").read_text().count("\n")
        [line] = second.stderr.strip().splitlines()
        assert second.returncode == 2, second.stderr
        assert f"is in use by another trainer (held by pid {first.pid} on host {os.uname().nodename}" in line
        assert (run_dir / "run.json").is_file() and list((run_dir / "checkpoints").glob("step_*[0-9]"))
        time.sleep(1.0)
        assert (run_dir / "metrics.jsonl").read_text().count("\n") >= rows_seen > 0  # still growing, never cut
        assert first.poll() is None  # the first trainer never noticed
        first.kill()  # SIGKILL: no cleanup runs, the lock file stays behind, its flock is gone
        first.wait(timeout=30)
        assert (run_dir / ".lock").exists()
        third = subprocess.run(
            [*argv, *FAST, "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
        )
        assert third.returncode == 0, third.stderr
        assert json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer.json").read_text())["step"] == 3
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=30)


def test_a_full_disk_names_the_metrics_file(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")  # what a real write says: no path

        def close(self):
            pass

    log._file = FullDisk()
    with pytest.raises(OSError, match="No space left on device") as caught:
        log.write({"kind": "eval", "step": 0})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "metrics.jsonl")
