import os

import torch

# Triton kernels run on CPU tensors through its interpreter; the variable must be set before
# anything imports triton, so it is set here, before test modules are collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
