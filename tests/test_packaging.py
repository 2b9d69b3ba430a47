"""The wheel: what it carries, and that an installed copy works on its own, outside the repository.

The wheel is built from a copy of what the build reads (pyproject.toml, README.md, moe/,
moe_kernels/, configs/), so no stale build/ folder of the checkout leaks into it, and installed
with `pip install --no-deps --target T`; the commands then run from a folder outside the
repository with PYTHONPATH=T, taking torch and the rest from this virtualenv.
"""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import moe

pytestmark = pytest.mark.slow  # a wheel build, an install and a few processes: about a minute on 2 CPU cores

REPO = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ["pyproject.toml", "README.md", "moe", "moe_kernels", "configs"]
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def offline_build() -> bool:
    """Whether this virtualenv can build the wheel itself (setuptools >= 70.1: no `wheel` package needed)."""
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2]) >= (70, 1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():  # moe/configs is a relative link to ../configs: copied as a link, it still points there
            shutil.copytree(path, src / name, symlinks=True, ignore=SKIP)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    isolation = ["--no-build-isolation"] if offline_build() else []
    done = pip("wheel", "--no-deps", *isolation, "-w", str(out), str(src), cwd=out)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = out.glob("moe_reference-*.whl")
    return built


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    done = pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel), cwd=target)
    assert done.returncode == 0, done.stdout + done.stderr
    return target


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder outside the repository (the tests' tmp_path is)."""
    assert REPO not in tmp_path.parents
    return tmp_path


def run(argv: list[str], target: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "MOE_DEBUG": "1"}  # a failure shows its traceback
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_wheel_carries_our_two_packages_and_every_shipped_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"moe", "moe_kernels"}  # never a top-level `kernels`: that is Hugging Face's
    configs = {f"moe/configs/{p.relative_to(REPO / 'configs').as_posix()}" for p in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs == {n for n in names if n.startswith("moe/configs/")}
    assert {"moe/py.typed", "moe_kernels/py.typed"} <= names
    for package in ("moe", "moe_kernels"):  # every module and data file of the source
        wanted = {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*") if p.suffix in (".py", ".json")}
        wanted = {w for w in wanted if "__pycache__" not in w and not w.startswith("moe/configs/")}
        assert wanted <= names, sorted(wanted - names)


def test_the_wheel_metadata_names_the_extras(wheel):
    (meta,) = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(wheel).read(meta).decode()
    assert "\nName: moe-reference\n" in text and f"\nVersion: {moe.__version__}\n" in text
    extras = set(re.findall(r"^Provides-Extra: (\S+)$", text, re.M))
    assert extras == {"hf", "plots", "tensorboard", "triton", "dev"}
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    core = sorted(r.split(">")[0].split(";")[0].strip() for r in requires if "extra ==" not in r)
    assert core == ["einops", "numpy", "pyyaml", "safetensors", "torch", "tqdm"]  # triton is an extra
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires)


def test_the_installed_copy_imports_from_the_target(target, outside):
    code = "import moe, moe_kernels, moe.shipped_configs as s; print(moe.__file__, moe_kernels.__file__, s.CONFIG_DIR)"
    done = run([sys.executable, "-c", code], target, outside)
    assert done.returncode == 0, done.stderr
    paths = [Path(p) for p in done.stdout.split()]
    assert all(target in p.parents for p in paths), (target, paths)
    assert not paths[2].is_symlink() and (paths[2] / "full" / "deepseek-v3.yaml").is_file()


def test_the_installed_copy_inspects_a_shipped_config(target, outside):
    done = run([sys.executable, "-m", "moe", "inspect", "--config", "deepseek-v3"], target, outside)
    assert done.returncode == 0, done.stderr
    assert "671.03 B" in done.stdout and "61 (3 dense, 58 MoE)" in done.stdout


def test_the_installed_console_script_lists_the_configs(target, outside):
    script = target / "bin" / "moe"
    assert script.is_file()
    done = run([sys.executable, str(script), "configs"], target, outside)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip()}
    assert {"tiny", "deepseek-v3", "ling-1t", "seed-speculated-ling-10t"} <= listed
    done = run([sys.executable, str(script), "--version"], target, outside)
    assert done.stdout.startswith(f"moe-reference {moe.__version__} "), done.stdout + done.stderr


def test_the_installed_copy_trains(target, outside):
    (outside / "data.txt").write_text("def f(x):\n    return x + 1\n" * 400)
    argv = [sys.executable, "-m", "moe", "train", "--config", "tiny", "--steps", "2", "--batch-size", "2"]
    argv += ["--seq-len", "32", "--eval-batches", "1", "--no-progress", "--no-plots"]
    done = run(argv + ["--data", "data.txt", "--out", "run"], target, outside)
    assert done.returncode == 0, done.stderr
    assert (outside / "run" / "checkpoints" / "step_00000002" / "model.safetensors").is_file()


def test_hugging_faces_kernels_installs_beside_ours(target, outside):
    # transformers imports Hugging Face's `kernels` (the kernel hub); ours is `moe_kernels`, so both coexist.
    done = pip("install", "--no-deps", "--target", str(target), "kernels", cwd=outside)
    if done.returncode != 0:
        pytest.skip(f"pip could not install Hugging Face's kernels here (no network?): {done.stderr.strip()[-300:]}")
    code = "import kernels, moe_kernels; print(kernels.__file__); print(moe_kernels.__file__); kernels.get_kernel"
    done = run([sys.executable, "-c", code], target, outside)
    missing = re.search(r"No module named '([\w.]+)'", done.stderr)
    if done.returncode != 0 and missing and missing.group(1).split(".")[0] not in ("kernels", "moe_kernels"):
        pytest.skip(f"Hugging Face's kernels needs {missing.group(1)}, which this virtualenv lacks")
    assert done.returncode == 0, done.stderr
    theirs, ours = (Path(line) for line in done.stdout.split())
    assert theirs == target / "kernels" / "__init__.py" and ours == target / "moe_kernels" / "__init__.py"


# --------------------------------------------------------------------------- the README's Python, as written

# The model folder the README's Hugging Face examples name, made here: a tiny random Qwen3-MoE with a
# word-level tokenizer.json and a chat template (no download).
MAKE_HF_FOLDER = """
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

words = "Mixture-of-Experts models route each token to a few experts".split() + ["<|im_end|>"]
vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(words))}}
tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece()
fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="<|im_end|>")
torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
Qwen3MoeForCausalLM(config).save_pretrained("Qwen3-30B-A3B")
fast.save_pretrained("Qwen3-30B-A3B")
"""


def readme_programs() -> list[str]:
    """The README's ```python blocks that are whole programs (they start with an import); the others
    continue the block before them."""
    found = re.findall(r"^( *)```python\n(.*?)^\1```", (REPO / "README.md").read_text(), re.S | re.M)
    blocks = [textwrap.dedent(body) for _, body in found]  # a block inside a list item is indented
    return [b for b in blocks if b.startswith(("import ", "from "))]


def test_the_readme_has_the_python_examples_this_test_runs():
    programs = readme_programs()
    assert len(programs) >= 5
    assert any("from_hf" in p for p in programs) and any("experts_interface" in p for p in programs)


@pytest.mark.parametrize("index", range(len(readme_programs())))
def test_every_readme_python_example_runs_as_written_from_the_installed_copy(index, target, outside):
    pytest.importorskip("transformers", reason="the README's Hugging Face examples need moe-reference[hf]")
    program = readme_programs()[index]
    if "Qwen3-30B-A3B" in program:
        made = run([sys.executable, "-c", MAKE_HF_FOLDER], target, outside)
        assert made.returncode == 0, made.stderr
    done = run([sys.executable, "-c", program], target, outside)
    assert done.returncode == 0, f"README example {index} failed:\n{program}\n{done.stderr[-3000:]}"
