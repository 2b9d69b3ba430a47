import os

import torch

# The Triton interpreter must be switched on before triton is first imported
# (triton.jit reads it when a kernel is decorated); importing torch does not import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
