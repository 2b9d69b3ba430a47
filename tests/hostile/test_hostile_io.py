"""Hostile checkpoint and model folders: each test builds one in tmp_path and expects one clear
error (InputError, or FileNotFoundError / OSError naming the path; exit status 2 through the
command line), with nothing read from outside the folder, nothing that hangs, nothing
overwritten. Both layouts are attacked: ours (save_pretrained, training checkpoints) and
Hugging Face's (from_hf). docs/reliability.md lists the cases."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from train_helpers import fast_args, micro_config

from moe import ModelConfig, MoEConfig, Transformer
from moe.cli import main
from moe.errors import InputError
from moe.io import checkpoint as ckpt
from moe.io.files import TRAINER_CHECKSUM, seal_trainer_state, sha256
from moe.io.hf import save_hf, writer
from moe.io.sharded import read_full_model
from moe.train import TrainArgs, run
from moe.train.step import build_optimizer

TINY = ModelConfig(  # exportable as qwen3_moe, so one model serves both layouts
    vocab_size=40,
    hidden_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qk_norm=True,
    first_k_dense=1,
    intermediate_size=20,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_size=8),
)
SHARD_BYTES = 4000  # a dozen shards of TINY
NORM = {"ours": "norm.weight", "hf": "model.norm.weight"}  # a [24] float32 tensor in either layout


def make_folder(layout: str, directory: Path, sharded: bool = False) -> Path:
    """TINY saved in `layout` ("ours" or "hf"), one file or sharded."""
    torch.manual_seed(0)
    model = Transformer(TINY)
    if layout == "ours":
        ckpt.save_pretrained(model, directory, max_shard_bytes=SHARD_BYTES if sharded else ckpt.MAX_SHARD_BYTES)
    else:
        save_hf(model, directory, **({"max_shard_bytes": SHARD_BYTES} if sharded else {}))
    return directory


def load(layout: str, directory: Path):
    return Transformer.from_pretrained(directory) if layout == "ours" else Transformer.from_hf(directory)


def rewrite_header(path: Path, edit) -> None:
    """Apply `edit` to the JSON header of a safetensors file, keeping its data bytes."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])


def finishes(fn, folder: Path, seconds: float = 30.0) -> BaseException | None:
    """Run fn in a thread and return what it raised; fail if it is still blocked after `seconds`
    (then open every FIFO under `folder` for writing, which releases a reader stuck on one)."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in (p for p in folder.rglob("*") if p.is_fifo()):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"the loader still blocks after {seconds} s: it opened a FIFO or a device")
    return outcome[0]


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text
    return text


LAYOUTS = pytest.mark.parametrize("layout", ["ours", "hf"])
INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- paths that leave the folder


@LAYOUTS
@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_an_index_that_names_a_file_outside_the_folder_is_refused(tmp_path, layout, how):
    folder = make_folder(layout, tmp_path / "model", sharded=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    index = json.loads((folder / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(folder / first, outside / first)  # a valid shard: a loader that follows the name would succeed
    target = f"../elsewhere/{first}" if how == "dotdot" else str(outside / first)
    index["weight_map"] = {k: target if v == first else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    (folder / first).unlink()
    with pytest.raises(InputError, match="points outside the folder") as err:
        load(layout, folder)
    assert first in one_line(err.value)


@LAYOUTS
def test_a_symlink_out_of_the_folder_is_refused(tmp_path, layout):
    folder = make_folder(layout, tmp_path / "model")
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "model.safetensors", outside)  # the real weights, outside: following the link would load
    (folder / "model.safetensors").symlink_to(outside)
    with pytest.raises(
        InputError, match=r"model.safetensors: a symlink to .*outside.safetensors.*, outside the folder"
    ):
        load(layout, folder)


@LAYOUTS
@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_special_files_named_like_weights_are_refused_without_reading(tmp_path, layout, kind):
    folder = make_folder(layout, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.unlink()
    if kind == "dev_zero":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero here")
        weights.symlink_to("/dev/zero")  # outside, and endless: reading it would never finish
    elif kind == "fifo":
        os.mkfifo(weights)  # opening it for reading would wait forever for a writer
    else:
        weights.mkdir()
    error = finishes(lambda: load(layout, folder), folder)
    assert isinstance(error, InputError), repr(error)
    message = one_line(error)
    expected = {"dev_zero": "outside the folder", "fifo": "a FIFO", "folder": "a folder"}[kind]
    assert "model.safetensors" in message and expected in message


@pytest.mark.parametrize(
    "weight_map, error, match",
    [
        (["model-00001-of-00002.safetensors"], InputError, "is not a map"),
        ({"model.norm.weight": 7}, InputError, "maps to 7"),
        ({"model.norm.weight": None}, InputError, "maps to None"),
        ({"model.norm.weight": "model-00009-of-00009.safetensors"}, FileNotFoundError, "model-00009-of-00009"),
    ],
)
@LAYOUTS
def test_a_malformed_weight_map_is_one_line(tmp_path, layout, weight_map, error, match):
    folder = make_folder(layout, tmp_path / "model", sharded=True)
    index = json.loads((folder / INDEX).read_text())
    (folder / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))
    with pytest.raises(error, match=match) as err:
        load(layout, folder)
    one_line(err.value)


# --------------------------------------------------------------------------- sizes, dtypes, shapes


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def header_longer_than_the_file(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])


def offsets_past_the_end(path: Path) -> None:
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + 10**9]

    rewrite_header(path, edit)


def huge_tensor(path: Path) -> None:
    def edit(header):
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [2**40, 2**20]  # 4 PB claimed for a few bytes of data

    rewrite_header(path, edit)


@LAYOUTS
@pytest.mark.parametrize("damage", [truncate, header_longer_than_the_file, offsets_past_the_end, huge_tensor])
def test_sizes_that_do_not_fit_the_file_are_refused_before_allocation(tmp_path, layout, damage):
    folder = make_folder(layout, tmp_path / "model")
    damage(folder / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors: .*(truncated or corrupt|corrupt or truncated)") as err:
        load(layout, folder)
    one_line(err.value)


@LAYOUTS
def test_a_tensor_retyped_f32_to_i32_is_refused_naming_it(tmp_path, layout):
    folder = make_folder(layout, tmp_path / "model")
    name = NORM[layout]
    rewrite_header(folder / "model.safetensors", lambda h: h[name].update(dtype="I32"))  # same bytes, read as ints
    expected = {
        "ours": rf"model.safetensors: tensor '{name}' is int32 but the model expects float32",
        "hf": rf"not a float dtype: {name} \(I32\) in model.safetensors",
    }[layout]
    with pytest.raises(InputError, match=expected) as err:
        load(layout, folder)
    one_line(err.value)


@LAYOUTS
def test_a_reshaped_tensor_is_refused_naming_it(tmp_path, layout):
    folder = make_folder(layout, tmp_path / "model")
    name = NORM[layout]
    rewrite_header(folder / "model.safetensors", lambda h: h[name].update(shape=[4, 6]))  # same byte count
    expected = {
        "ours": rf"tensor '{name}' has shape \(4, 6\) but the model built from the config expects \(24,\)",
        "hf": rf"wrong shape: {name} \[4, 6\] \(expected \[24\]\) in model.safetensors",
    }[layout]
    with pytest.raises(InputError, match=expected):
        load(layout, folder)


def test_a_sharded_layout_claiming_a_huge_tensor_allocates_nothing(tmp_path):
    """A training checkpoint written by several ranks, forged: its one rank claims to hold the
    first 2 rows of a [2**40, 4] tensor. The rows must tile the tensor before it is allocated."""
    folder = tmp_path / "step_00000000"
    folder.mkdir()
    name = "model-rank00000-of-00001.safetensors"
    layout = {"w": {"shape": [2**40, 4], "start": 0}}
    save_file({"w": torch.ones(2, 4)}, folder / name, metadata={"format": "pt", "layout": json.dumps(layout)})
    state = {
        "step": 0,
        "rng": [{}],
        "parallel": {"world": 1, "dp": 1, "ep": 1},
        "sha256": {name: sha256((folder / name).read_bytes())},
    }
    (folder / "trainer.json").write_bytes(seal_trainer_state(state))
    with pytest.raises(InputError, match=r"rows 2..1099511627775 of 'w' are in no rank's file"):
        read_full_model(folder)


# --------------------------------------------------------------------------- training checkpoints


def saved_checkpoint(root: Path, step: int = 1):
    torch.manual_seed(0)
    model = Transformer(micro_config())
    optimizer = build_optimizer(model, TrainArgs())
    return ckpt.save_checkpoint(root, step, model, optimizer, {"tokens": 64}), model, optimizer


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s.update(step=2), "differ from its own checksum"),  # an edit that leaves valid JSON
        (lambda s: s.pop(TRAINER_CHECKSUM), "no 'trainer_sha256'"),
        ("reseal", "'step' = 7 but the folder is step_00000001"),
        ("reseal-negative", r"'step' = -3 is not a count"),
        ("reseal-string", r"'tokens' = '64' is not a count"),
        ("reseal-sha", "'sha256' = .* is not a map of file names to sha256 digests"),
    ],
)
def test_an_edited_trainer_json_is_detected(tmp_path, edit, match):
    path, model, _ = saved_checkpoint(tmp_path)
    state = json.loads((path / "trainer.json").read_text())
    if callable(edit):
        edit(state)
        (path / "trainer.json").write_text(json.dumps(state))
    else:  # a consistent checksum over a bad value: the fields are checked too
        state.update(
            {
                "reseal": {"step": 7},
                "reseal-negative": {"step": -3},
                "reseal-string": {"tokens": "64"},
                "reseal-sha": {"sha256": {"model.safetensors": "not a digest"}},
            }[edit]
        )
        (path / "trainer.json").write_bytes(seal_trainer_state(state))
    with pytest.raises(InputError, match=match):
        ckpt.load_checkpoint(path, Transformer(model.config))
    with pytest.raises(InputError, match=match):
        Transformer.from_pretrained(path)  # what `moe generate --ckpt` reads


def test_leftovers_of_crashed_saves_are_cleared_and_never_block_resume(tmp_path):
    run(micro_config(), fast_args(tmp_path, steps=4, save_every=2, eval_every=100))
    root = tmp_path / "run" / "checkpoints"
    (root / "step_00000006.tmp").mkdir()  # a save killed mid-write: a partial file in its folder
    (root / "step_00000006.tmp" / "model.safetensors.tmp").write_bytes(b"\x00" * 100)
    (root / "step_00000008.tmp").write_bytes(b"partial")  # not even a folder
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    (root / "step_00000010.tmp").symlink_to(precious)  # a leftover that points out: unlinked, never followed
    summary = run(
        micro_config(), fast_args(tmp_path, steps=6, save_every=2, eval_every=100, resume=str(tmp_path / "run"))
    )
    assert summary["step"] == 6
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]
    assert (precious / "keep.txt").read_text() == "mine"


# --------------------------------------------------------------------------- disk full


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC simulated at the first write of the second save (runs everywhere)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("tells the checkpoint's writes apart through /proc/self/fd (Linux)")
    first, model, optimizer = saved_checkpoint(tmp_path)
    real_write = os.write

    def full_disk(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as err:
        ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {"tokens": 128}, keep_last=1)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and "step_00000002.tmp" in err.value.filename
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the temporary folder is gone
    twin = Transformer(model.config)
    assert ckpt.load_checkpoint(first, twin, build_optimizer(twin, TrainArgs()))["step"] == 1
    ckpt.save_checkpoint(tmp_path, 2, model, optimizer, {"tokens": 128}, keep_last=1)  # space again: it saves
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step_00000002"]


@pytest.mark.parametrize("to", ["hf", "moe"])
def test_convert_onto_a_full_disk_simulated_leaves_the_destination_as_it_was(tmp_path, capsys, monkeypatch, to):
    """ENOSPC simulated (runs everywhere): in our writer's os.write, or as safetensors reports it."""
    src = make_folder("hf" if to == "moe" else "ours", tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("the previous conversion")

    def full_disk(fd, data):  # our writer (write_atomic)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_safetensors(tensors, filename, metadata=None):  # Hugging Face's writer (save_file)
        Path(filename).write_bytes(b"half a shard")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    if to == "moe":
        monkeypatch.setattr(os, "write", full_disk)
    else:
        monkeypatch.setattr(writer, "save_file", full_disk_safetensors)
    assert main(["convert", str(src), str(dst), "--overwrite", "--no-progress"]) == 2
    monkeypatch.undo()
    assert "model.safetensors: No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # no staging folder left behind
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a folder on a tmpfs of that many bytes; skipped where mounting is not allowed."""
    mounts = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(mounts)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounts.append(point)
        return point

    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=False)


def test_a_real_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_files(tmp_path, small_tmpfs):
    probe, model, optimizer = saved_checkpoint(tmp_path / "probe")
    size = sum(f.stat().st_size for f in probe.iterdir())
    disk = small_tmpfs(int(size * 1.5) // 4096 * 4096 + 4096)  # one checkpoint fits, two do not
    first = ckpt.save_checkpoint(disk, 1, model, optimizer, {"tokens": 64}, keep_last=1)
    with pytest.raises(OSError) as err:
        ckpt.save_checkpoint(disk, 2, model, optimizer, {"tokens": 128}, keep_last=1)
    assert err.value.errno == errno.ENOSPC and str(disk / "step_00000002.tmp") in err.value.filename
    assert sorted(p.name for p in disk.iterdir()) == ["step_00000001"]
    twin = Transformer(model.config)
    assert ckpt.load_checkpoint(first, twin, build_optimizer(twin, TrainArgs()))["step"] == 1


@pytest.mark.parametrize("to", ["hf", "moe"])
def test_convert_onto_a_full_disk_leaves_the_destination_as_it_was(tmp_path, small_tmpfs, capsys, to):
    src = make_folder("hf" if to == "moe" else "ours", tmp_path / "src")
    size = sum(f.stat().st_size for f in src.iterdir())
    disk = small_tmpfs(size // 2 // 4096 * 4096)  # half the model fits
    (disk / "dst").mkdir()
    (disk / "dst" / "old.txt").write_text("the previous conversion")
    assert main(["convert", str(src), str(disk / "dst"), "--overwrite", "--no-progress"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in disk.iterdir()) == ["dst"]  # no staging folder left behind
    assert (disk / "dst" / "old.txt").read_text() == "the previous conversion"


# --------------------------------------------------------------------------- nothing overwritten


def test_convert_refuses_a_non_empty_destination(tmp_path, capsys):
    src = make_folder("hf", tmp_path / "src")
    dst = make_folder("ours", tmp_path / "dst")  # another model
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    assert main(["convert", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_convert_overwrite_swaps_in_a_complete_folder(tmp_path, capsys):
    src = make_folder("hf", tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.safetensors").write_bytes(b"an older conversion")
    assert main(["convert", str(src), str(dst), "--overwrite", "--no-progress"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]  # the old folder and the staging one are gone
    for name, tensor in Transformer.from_hf(src).state_dict().items():
        assert torch.equal(Transformer.from_pretrained(dst).state_dict()[name], tensor), name


@pytest.mark.parametrize("where", ["same", "dst_inside_src", "src_inside_dst"])
def test_convert_refuses_folders_inside_each_other(tmp_path, capsys, where):
    outer = make_folder("hf", tmp_path / "outer")
    if where == "same":
        src, dst, match = outer, outer, "same folder"
    elif where == "dst_inside_src":
        src, dst, match = outer, outer / "converted", "inside the source folder"
    else:
        src, dst, match = make_folder("hf", tmp_path / "outer" / "inner"), outer, "inside the destination folder"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["convert", str(src), str(dst), "--to", "hf", "--overwrite", "--no-progress"]) == 2
    assert match in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_convert_refuses_a_tokenizer_file_that_leaves_the_folder(tmp_path, capsys):
    src = make_folder("hf", tmp_path / "src")
    (tmp_path / "secret.txt").write_text("not a tokenizer")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    assert main(["convert", str(src), str(tmp_path / "dst"), "--no-progress"]) == 2
    assert "tokenizer.json: a symlink to" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt", "src"]


def test_save_pretrained_refuses_a_folder_that_holds_a_checkpoint(tmp_path):
    path, model, _ = saved_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(InputError, match=r"is not empty \(it holds config.json, model.safetensors"):
        ckpt.save_pretrained(model, path)
    with pytest.raises(InputError, match="is not empty"):
        save_hf(Transformer(TINY), path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
