import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# Test helpers (train_helpers.py) live here; test files in subfolders import them by name.
sys.path.insert(0, str(TESTS))

# Triton kernels run on CPU tensors through its interpreter. The variable must be set before
# triton is first imported (triton.jit reads it when a kernel is decorated); importing torch
# does not import triton, so setting it here, before test modules are collected, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Marks by folder (registered in pyproject.toml): `make test-fast` deselects slow and distributed.
FOLDER_MARKS = {
    TESTS / "distributed": ("distributed", "slow"),  # each test spawns a process group on gloo
    TESTS / "kernels": ("kernels",),
    TESTS / "hostile": ("hostile",),  # the adversarial suite (docs/reliability.md)
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by these marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for folder, marks in FOLDER_MARKS.items():
            if item.path.is_relative_to(folder):
                for mark in marks:
                    item.add_marker(mark)
