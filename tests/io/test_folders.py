"""moe/io/files.py: closed folders (what may be read from one), atomic writes that clean up after
themselves, folder swaps, the sealed trainer.json, and what a killed save leaves."""

import errno
import json
import os

import pytest

from moe.errors import InputError
from moe.io import checkpoint as ckpt
from moe.io.files import (
    TRAINER_CHECKSUM,
    check_destination,
    folder_file,
    read_file,
    read_trainer_state,
    seal_trainer_state,
    swap_folder,
    write_atomic,
)


def test_a_symlink_that_stays_inside_the_folder_is_followed(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "real.safetensors").write_bytes(b"x")
    (tmp_path / "model.safetensors").symlink_to("sub/real.safetensors")
    assert folder_file(tmp_path, "model.safetensors") == tmp_path / "model.safetensors"
    assert folder_file(tmp_path, "sub/real.safetensors") == tmp_path / "sub" / "real.safetensors"


@pytest.mark.parametrize("name", ["sub/../model.safetensors", "/etc/hostname", "", "a\0b", 7, None])
def test_names_that_could_leave_the_folder_are_refused_by_their_form(tmp_path, name):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(InputError, match="outside the folder|is not a file name"):
        folder_file(tmp_path, name)


def test_a_hub_cache_snapshot_may_point_into_its_blobs(tmp_path):
    """huggingface_hub's cache: snapshots/REV/<file> are symlinks to ../../blobs/<sha>."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "blobs" / "f00d").write_bytes(b"{}")
    (repo / "snapshots" / "abc123" / "config.json").symlink_to("../../blobs/f00d")
    assert folder_file(repo / "snapshots" / "abc123", "config.json").name == "config.json"
    (tmp_path / "secret").write_bytes(b"x")
    (repo / "snapshots" / "abc123" / "other.json").symlink_to(tmp_path / "secret")  # blobs/ only
    with pytest.raises(InputError, match="outside the folder"):
        folder_file(repo / "snapshots" / "abc123", "other.json")


def test_reads_are_capped_by_the_file_size_before_reading(tmp_path):
    (tmp_path / "big.json").write_bytes(b"{}" + b" " * 1000)
    assert read_file(tmp_path / "big.json", limit=2000).startswith(b"{}")
    with pytest.raises(InputError, match="1,002 bytes, more than the 1,000"):
        read_file(tmp_path / "big.json", limit=1000)
    with pytest.raises(FileNotFoundError, match="not found: .*missing"):
        read_file(tmp_path / "missing")


def test_a_failed_write_removes_its_temporary_file_and_names_the_path(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def no_space(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(OSError) as err:
        write_atomic(target, b"new contents")
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"] and target.read_bytes() == b"old"


def test_a_leftover_temporary_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "file.bin.tmp").symlink_to(victim)
    write_atomic(tmp_path / "out" / "file.bin", b"new")
    assert victim.read_bytes() == b"precious" and (tmp_path / "out" / "file.bin").read_bytes() == b"new"


def test_swap_folder_replaces_whole_and_puts_the_old_back_on_failure(tmp_path, monkeypatch):
    old, new = tmp_path / "dst", tmp_path / "new"
    for folder, text in ((old, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    real_rename, calls = os.rename, []

    def second_fails(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error", str(b))
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError):
        swap_folder(new, old)
    monkeypatch.undo()
    assert (old / "f").read_text() == "old" and (new / "f").read_text() == "new"
    swap_folder(new, old)
    assert (old / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_check_destination(tmp_path):
    check_destination(tmp_path / "absent", False, "hint")
    check_destination(tmp_path, False, "hint")  # empty
    (tmp_path / "a").write_text("x")
    with pytest.raises(InputError, match=r"is not empty \(it holds a\): hint"):
        check_destination(tmp_path, False, "hint")
    check_destination(tmp_path, True, "hint")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_destination(tmp_path / "a", True, "hint")


def test_trainer_state_seals_its_own_content(tmp_path):
    folder = tmp_path / "step_00000005"
    folder.mkdir()
    state = {"step": 5, "tokens": 80, "elapsed_s": 1.25, "sha256": {}, "data": {0: [1, 2]}}  # int keys become strings
    (folder / "trainer.json").write_bytes(seal_trainer_state(state))
    assert read_trainer_state(folder) == {**state, "data": {"0": [1, 2]}}
    text = (folder / "trainer.json").read_text()
    assert json.loads(text)[TRAINER_CHECKSUM]
    (folder / "trainer.json").write_text(text.replace('"tokens": 80', '"tokens": 81'))
    with pytest.raises(InputError, match="differ from its own checksum"):
        read_trainer_state(folder)


def test_clear_leftovers_removes_temporary_folders_only(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000002.tmp").mkdir()
    (tmp_path / "step_00000002.tmp" / "model.safetensors.tmp").write_bytes(b"half")
    (tmp_path / "step_00000003.tmp").write_bytes(b"")
    assert ckpt.clear_leftovers(tmp_path) == ["step_00000002.tmp", "step_00000003.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert ckpt.clear_leftovers(tmp_path / "absent") == []


def test_checkpoint_dirs_ignore_symlinks(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000009").symlink_to(tmp_path / "elsewhere")  # pruning would rmtree through it
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000001"]
