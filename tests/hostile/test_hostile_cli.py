"""The command line against hostile flags, closed pipes and failures (docs/reliability.md).

What the user can fix (InputError, MissingExtra, an OSError naming its path, a refused flag) is
one line on stderr and exit status 2; a closed stdout ends quietly; anything else is a bug and
keeps its traceback."""

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moe.cli.configs
import moe.cli.inspect_config
from moe.cli import main
from moe.errors import InputError
from moe.extras import MissingExtra

REPO = Path(__file__).resolve().parents[2]


def status_of(argv):
    """main's exit status, also where argparse exits on a refused flag."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line_error(capsys, argv):
    status = status_of(argv)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err, (status, err)
    return err


def failing_inspect(monkeypatch, error):
    """`moe inspect` whose work raises `error` (the parser reads the module's main when it is built)."""

    def fail(args):
        raise error

    monkeypatch.setattr(moe.cli.inspect_config, "main", fail)


# --------------------------------------------------------------------------- flags


def test_calibrate_refuses_ep_zero(capsys):
    # `args.ep or 8` once turned --ep 0 into 8 without a word.
    err = one_line_error(capsys, ["calibrate", "deepseek-v3", "--ep", "0"])
    assert "argument --ep: must be a positive integer, got '0'" in err


CALIBRATE = ["calibrate", "deepseek-v3"]


@pytest.mark.parametrize(
    "command, flag, value",
    [
        (CALIBRATE, "--tokens", "nan"),
        (CALIBRATE, "--tokens", "-1e12"),
        (CALIBRATE, "--tokens", "inf"),
        (CALIBRATE, "--price", "NaN"),
        (CALIBRATE, "--price", "-2"),
        (CALIBRATE, "--overlap", "nan"),
        (CALIBRATE, "--overlap", "1.5"),
        (CALIBRATE, "--ib-gbps", "0"),
        (CALIBRATE, "--nvlink-gbps", "-inf"),
        (CALIBRATE, "--global-batch-tokens", "nan"),
        (CALIBRATE, "--gpus", "-8"),
        (CALIBRATE, "--gpus-per-node", "0"),
        (CALIBRATE, "--seq-len", "0"),
        (CALIBRATE, "--scale", "0"),
        (CALIBRATE, "--timed-seq-len", "-1"),
        (CALIBRATE, "--micro-batch", "0"),
        (CALIBRATE, "--warmup", "-1"),
        (CALIBRATE, "--repeats", "0"),
        (CALIBRATE, "--ep", "2.5"),
        (["bench", "train", "tiny"], "--batch-size", "-4"),
        (["bench", "train", "tiny"], "--seq-len", "0"),
        (["bench", "infer", "tiny"], "--prompt-len", "0"),
        (["bench", "infer", "tiny"], "--new-tokens", "-1"),
        (["bench", "layers", "tiny"], "--repeats", "nan"),
        (["bench", "layers", "tiny"], "--warmup", "-3"),
        (["inspect", "tiny"], "--seq-len", "0"),
        (["inspect", "tiny"], "--seq-len", "1e9"),
    ],
)
def test_bad_numbers_are_refused_in_one_line(capsys, command, flag, value):
    err = one_line_error(capsys, [*command, f"{flag}={value}"])  # `=`: argparse takes a lone "-1e12" for a flag
    assert f"argument {flag}: " in err and repr(value) in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "tiny", "--scale", "1000"], "--scale 1000 is more than the hidden size 96"),
        (["calibrate", "tiny", "--seq-len", "64", "--timed-seq-len", "128"], "longer than the training context"),
        (["calibrate", "deepseek-v3", "--ep", "3"], "--ep 3 must divide the 256 experts"),
        (["calibrate", "deepseek-v3", "--ep", "256", "--gpus", "64"], "must divide the GPU count 64"),
        (["bench", "train", "tiny", "--backend", "cuda"], "--backend: unknown expert backend 'cuda'"),
    ],
)
def test_values_the_config_rules_out_are_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, argv)


def test_a_backend_asked_for_by_name_needs_its_package(capsys, monkeypatch):
    # Without Triton the "triton" backend would quietly run torch's path under Triton's label.
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    err = one_line_error(capsys, ["bench", "layers", "tiny", "--backends", "eager,triton"])
    assert "pip install 'moe-reference[triton]'" in err


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bug", [KeyError("layers"), ValueError("a bug"), TypeError("a bug"), IndexError(3)])
def test_a_bug_keeps_its_traceback(monkeypatch, bug):
    # KeyError and ValueError were once printed as one line, hiding the tool's own bugs.
    failing_inspect(monkeypatch, bug)
    with pytest.raises(type(bug)):
        main(["inspect", "tiny"])


@pytest.mark.parametrize(
    "error, line",
    [
        (InputError("bad.yaml: unknown config key 'foo'"), "moe inspect: error: bad.yaml: unknown config key 'foo'"),
        (MissingExtra("plots need matplotlib: pip install 'moe-reference[plots]'"), "moe-reference[plots]"),
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/model.safetensors"),
            f"moe inspect: error: /data/run/model.safetensors: {os.strerror(errno.ENOSPC)}",
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/root/secret.yaml"),
            f"/root/secret.yaml: {os.strerror(errno.EACCES)}",
        ),
        (
            OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/step.tmp", None, "/mnt/ro/step"),
            f"/mnt/ro/step.tmp -> /mnt/ro/step: {os.strerror(errno.EROFS)}",
        ),
        (InputError("first line\nsecond line"), "moe inspect: error: first line second line"),
    ],
)
def test_what_the_user_can_fix_is_one_line(capsys, monkeypatch, error, line):
    failing_inspect(monkeypatch, error)
    assert line in one_line_error(capsys, ["inspect", "tiny"])


def test_a_real_os_error_names_its_path(capsys, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the results folder should go")
    argv = ["bench", "infer", "tiny", "--batch-size", "1", "--prompt-len", "2", "--new-tokens", "1"]
    err = one_line_error(capsys, argv + ["--warmup", "0", "--repeats", "1", "--save", "--results-dir", str(blocker)])
    assert str(blocker) in err


def test_moe_debug_shows_the_traceback(capsys, monkeypatch):
    failing_inspect(monkeypatch, InputError("bad input"))
    monkeypatch.setenv("MOE_DEBUG", "1")
    with pytest.raises(InputError, match="bad input"):
        main(["inspect", "tiny"])
    monkeypatch.setenv("MOE_DEBUG", "0")  # "0" means off
    assert "bad input" in one_line_error(capsys, ["inspect", "tiny"])


def test_a_torchrun_rank_names_itself(capsys, monkeypatch):
    failing_inspect(monkeypatch, InputError("bad input"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert "moe inspect: error (rank 3): bad input" in one_line_error(capsys, ["inspect", "tiny"])


def test_argparse_errors_are_one_line_without_usage(capsys):
    assert "moe: error: argument COMMAND: invalid choice: 'nope'" in one_line_error(capsys, ["nope"])
    assert "unrecognized arguments: --no-such-flag" in one_line_error(capsys, ["inspect", "tiny", "--no-such-flag"])


# --------------------------------------------------------------------------- closed pipes


def test_a_closed_pipe_inside_a_command_ends_quietly(capsys, monkeypatch):
    failing_inspect(monkeypatch, BrokenPipeError(errno.EPIPE, "Broken pipe"))
    assert main(["inspect", "tiny"]) == 141
    assert capsys.readouterr().err == ""


class ClosedPipe(io.TextIOBase):
    """A stdout whose reader has gone (`moe configs | head -1` after head exited)."""

    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


@pytest.mark.parametrize("argv", [["configs"], ["configs", "--json"], ["inspect", "deepseek-v3"]])
def test_printing_into_a_closed_pipe_ends_quietly(capsys, monkeypatch, argv):
    # The rows are what `moe configs` prints, not how it counts them: one fixed row saves the counting.
    row = {"name": "x", "path": "x.yaml", "scale": "CPU", "family": "-", "params_total": 2, "params_active": 1}
    monkeypatch.setattr(moe.cli.configs, "_describe", lambda name, path: {**row, "routing": "dense"})
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(argv) == 141
    assert capsys.readouterr().err == ""


def test_a_process_whose_stdout_is_closed_exits_quietly(tmp_path):
    # The whole process, interpreter exit included (its last flush of stdout must not complain
    # either). The pipe's reader is closed before the command writes, so the write fails with
    # EPIPE whatever the timing.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "err", "w+") as err:
        done = subprocess.run(
            [sys.executable, "-m", "moe", "inspect", "--config", "deepseek-v3"],
            stdout=write_end,
            stderr=err,
            cwd=tmp_path,
            env=env,
            timeout=300,
        )
        os.close(write_end)
        err.seek(0)
        stderr = err.read()
    assert done.returncode == 141 and stderr == "", (done.returncode, stderr)
