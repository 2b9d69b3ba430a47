"""The opt-in Hopper variants (TMA loads of B, split dW) compile for sm_90, with the instructions they exist for.

Like test_sm90_build.py: the real Triton compiler builds each variant for an H100/H200
(sm_90) without a GPU, with the H100 table's tiles and launch-like specialisation,
in a subprocess that imports the kernels without TRITON_INTERPRET. The PTX must hold
wgmma (Hopper's warpgroup MMA) for the 16-bit tiles and, for TMA, the bulk tensor
copy `cp.async.bulk.tensor`. Run this file as a script to see each variant's
shared memory and MMA / copy instructions.
"""

import importlib.util
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# Ling-1T-like sizes: d = 8192, f = 2048, 8 local experts, 32K routed rows
M, D, F, E = 32768, 8192, 2048, 8
TMA_COPY, WGMMA = "cp.async.bulk.tensor", "wgmma.mma_async"


def _rows(dt, k, n, block_k, block_n, scatter=False, transposed=False):
    """Pointers (None: absent), integer arguments and the descriptor type of a TMA row GEMM
    (transposed: B = W^T with the descriptor of W [G, N, K], as for dA and dx)."""
    pointers = {"a_ptr": dt, "b_ptr": dt, "c_ptr": dt, "c_rows_ptr": "*i64" if scatter else None, "offs_ptr": "*i32"}
    block = (block_n, block_k) if transposed else (block_k, block_n)
    pointers["b_desc"] = f"tensordesc<{dt[1:]}[1,{block[0]},{block[1]}]>"
    ints = dict(M=M, N=n, K=k, G=E, n_row_tiles=265, stride_am=k, stride_ak=1, stride_bg=k * n, stride_bk=n)
    ints.update(stride_bn=1, stride_cm=n, stride_cn=1)
    return pointers, ints


def _dw(dt, gather_a=False):
    pointers = {"a_ptr": dt, "a_rows_ptr": "*i64" if gather_a else None, "dy_ptr": dt, "dy_rows_ptr": None}
    pointers.update(out_ptr="*fp32", offs_ptr="*i32")  # the split's fp32 workspace [S, G, K, N]
    ints = dict(M=M, K=D, N=F, stride_am=D, stride_ak=1, stride_dm=F, stride_dn=1, stride_og=D * F, stride_ok=F)
    ints.update(stride_on=1, stride_os=E * D * F)
    return pointers, ints


def _ffn(kind, block_k, block_n):
    """The expert FFN kernels with a descriptor of their weights (test_sm90_build.py's arguments)."""
    from test_sm90_build import _act_backward, _up

    if kind == "up":
        pointers, ints = _up(2 * F, weighted=True)
        pointers["w_desc"] = f"tensordesc<bf16[1,{block_k},{block_n}]>"
    else:  # dh: the descriptor of w_out [E, f, d], tiles [BLOCK_N of f, BLOCK_K of d] transposed in the kernel
        pointers, ints = _act_backward(2 * F, weighted=True)
        pointers["w_desc"] = f"tensordesc<bf16[1,{block_n},{block_k}]>"
    return pointers, ints


def variants():
    """name -> (kernel, pointers, ints, constexprs, tuning key, instructions the PTX must hold)."""
    from moe_kernels.ffn_kernels import ffn_act_backward_kernel, ffn_up_kernel
    from moe_kernels.gemm_dw import grouped_dw_kernel, sum_splits_kernel
    from moe_kernels.gemm_rows import grouped_rows_kernel
    from moe_kernels.tuning import load_table

    h100 = load_table()["h100"]

    def tiles(key):
        return h100[key]["BLOCK_K"], h100[key]["BLOCK_N"]

    gemm = {"BLOCK_G": 16, "EVEN_K": True, "PRECISION": "ieee"}
    large, decode, small = "rows/16bit/large", "rows/16bit/decode", "rows/16bit/small"
    return {
        "grouped_mm forward bf16, TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", D, F, *tiles(large)),
            gemm,
            large,
            (WGMMA, TMA_COPY),
        ),
        "grouped_mm forward fp16, TMA": (
            grouped_rows_kernel,
            *_rows("*fp16", D, F, *tiles(small)),
            gemm,
            small,
            (WGMMA, TMA_COPY),
        ),
        "grouped_mm dA / ffn dx bf16, TMA of W^T": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, *tiles(large), transposed=True),
            {**gemm, "B_TRANSPOSED": True},
            large,
            (WGMMA, TMA_COPY),
        ),
        "grouped_mm decode ragged K, TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", 100, F, *tiles(decode)),
            {**gemm, "EVEN_K": False},
            decode,
            (TMA_COPY,),
        ),
        "ffn down (scatter), TMA": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, *tiles(large), scatter=True),
            gemm,
            large,
            (WGMMA, TMA_COPY),
        ),
        "moe_ffn up swiglu, TMA": (
            ffn_up_kernel,
            *_ffn("up", *tiles("swiglu_up/16bit/large")),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": True},
            "swiglu_up/16bit/large",
            (WGMMA, TMA_COPY),
        ),
        "moe_ffn dh + ds, TMA of w_out^T": (
            ffn_act_backward_kernel,
            *_ffn("dh", *tiles(large)),
            {**gemm, "ACTIVATION": "swiglu"},
            large,
            (WGMMA, TMA_COPY),
        ),
        "grouped_mm dB bf16, SPLIT": (
            grouped_dw_kernel,
            *_dw("*bf16"),
            {"PRECISION": "ieee"},
            "dw/16bit/large",
            (WGMMA,),
        ),
        "ffn dW_in (gather x), SPLIT": (
            grouped_dw_kernel,
            *_dw("*bf16", gather_a=True),
            {"PRECISION": "ieee"},
            "dw/16bit/small",
            (WGMMA,),
        ),
        "split sum to bf16": (
            sum_splits_kernel,
            {"ws_ptr": "*fp32", "out_ptr": "*bf16"},
            dict(numel=E * D * F, S=4),
            {"BLOCK": 1024},
            None,
            (),
        ),
    }


def build(name: str) -> tuple[str, list[str]]:
    """Compile one variant for sm_90; (summary line, missing required instructions)."""
    from test_sm90_build import compile_sm90

    from moe_kernels.tuning import load_table

    kernel, pointers, ints, constexprs, key, required = variants()[name]
    cfg = load_table()["h100"][key] if key else {"num_warps": 4, "num_stages": 2}
    compiled = compile_sm90(kernel, pointers, ints, constexprs, cfg)
    ptx = compiled.asm["ptx"]
    found = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync|cp\.async\.bulk\.tensor\.\w+)", ptx)))
    missing = [ins for ins in required if ins not in ptx]
    line = f"{name:40s} {key or '-':18s} shared {compiled.metadata.shared:6d} B  {', '.join(found) or 'no mma'}"
    return line, missing


def main() -> int:
    import triton

    print(f"triton {triton.__version__}")
    failed = 0
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for line, missing in pool.map(build, variants()):
            print(line + (f"  MISSING {missing}" if missing else ""))
            failed += bool(missing)
    return 1 if failed else 0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests launch the kernels for real")
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA backend in triton")
def test_hopper_options_build_for_sm90_with_tma_and_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    assert done.stdout.count("\n") == 1 + len(variants()), done.stdout


if __name__ == "__main__":
    sys.exit(main())
