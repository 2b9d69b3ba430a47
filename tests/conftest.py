import os
import sys
from pathlib import Path

import torch

# Test helpers (train_helpers.py) live here; test files in subfolders import them by name.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Triton kernels run on CPU tensors through its interpreter. The variable must be set before
# triton is first imported (triton.jit reads it when a kernel is decorated); importing torch
# does not import triton, so setting it here, before test modules are collected, is enough.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
