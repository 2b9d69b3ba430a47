"""Every kernel variant compiles for an H100 (sm_90) with the real Triton compiler.

The interpreter runs the kernels' Python semantics only; layouts, tl.dot on bf16,
pipelining and register limits are checked by the GPU compiler (and ptxas, whose -v
report gives the bytes each variant spills to local memory). Triton can build
a cubin without a GPU (ptxas ships with it), so CI compiles every variant the
launchers produce, with the H100 table's tile configurations and the argument
specialisation a launch at MoE sizes would get (unit strides constant, pointers
and multiples of 16 marked divisible). The kernels must be imported *without*
TRITON_INTERPRET for that, hence the subprocess; run this file as a script to
see each variant's shared memory and MMA instructions.
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# Ling-1T-like sizes: d = 8192, f = 2048, 8 local experts, 32K routed rows
M, D, F, E = 32768, 8192, 2048, 8
# bytes per thread a hot kernel may spill: a few scalars (triton 3.6 spills 4-28 at some of the
# tuned tiles), never a share of a tile (one 128 x 128 fp32 tile is 256 bytes per thread of 8
# warps; the dh kernel at the row GEMM's 128 x 256 tiles spilled 8,772)
SPILL_LIMIT = 64


def _rows(dt, k, n, b_transposed=False, scatter=False):
    pointers = {"a_ptr": dt, "b_ptr": dt, "c_ptr": dt, "c_rows_ptr": "*i64" if scatter else None, "offs_ptr": "*i32"}
    b_strides = (1, n) if b_transposed else (n, 1)
    ints = dict(
        M=M,
        N=n,
        K=k,
        G=E,
        stride_am=k,
        stride_ak=1,
        stride_bg=k * n,
        stride_bk=b_strides[0],
        stride_bn=b_strides[1],
        stride_cm=n,
        stride_cn=1,
    )
    return pointers, ints


def _dw(dt, gather_a=False, gather_dy=False):
    pointers = {
        "a_ptr": dt,
        "a_rows_ptr": "*i64" if gather_a else None,
        "dy_ptr": dt,
        "dy_rows_ptr": "*i64" if gather_dy else None,
        "out_ptr": dt,
        "offs_ptr": "*i32",
    }
    ints = dict(
        M=M, K=D, N=F, stride_am=D, stride_ak=1, stride_dm=F, stride_dn=1, stride_og=D * F, stride_ok=F, stride_on=1
    )
    return pointers, ints


def _up(n_in, weighted=False):
    pointers = {
        "x_ptr": "*bf16",
        "row_token_ptr": "*i64",
        "w_ptr": "*bf16",
        "h_ptr": "*bf16",
        "z_ptr": "*bf16",
        "row_weight_ptr": "*fp32" if weighted else None,
        "offs_ptr": "*i32",
    }
    ints = dict(
        R=M,
        F=F,
        D=D,
        E=E,
        stride_xm=D,
        stride_xk=1,
        stride_wg=D * n_in,
        stride_wk=n_in,
        stride_wn=1,
        stride_hm=F,
        stride_hn=1,
        stride_zm=n_in,
        stride_zn=1,
    )
    return pointers, ints


def _act_backward(n_in, weighted=False):
    pointers = {
        "dy_ptr": "*bf16",
        "dy_rows_ptr": "*i64",
        "w_ptr": "*bf16",
        "z_ptr": "*bf16",
        "dz_ptr": "*bf16",
        "h_ptr": "*bf16",
        "row_weight_ptr": "*fp32" if weighted else None,
        "ds_ptr": "*fp32" if weighted else None,
        "offs_ptr": "*i32",
    }
    ints = dict(
        R=M,
        F=F,
        D=D,
        E=E,
        stride_dym=D,
        stride_dyk=1,
        stride_wg=F * D,
        stride_wk=1,
        stride_wn=D,
        stride_zm=n_in,
        stride_zn=1,
        stride_dzm=n_in,
        stride_dzn=1,
        stride_hm=F,
        stride_hn=1,
    )
    return pointers, ints


def variants():
    """name -> (kernel, pointer types (None: absent), integer arguments, constexprs, tuning key)."""
    from moe_kernels.ffn_kernels import ffn_act_backward_kernel, ffn_up_kernel
    from moe_kernels.gemm_dw import grouped_dw_kernel
    from moe_kernels.gemm_rows import grouped_rows_kernel
    from moe_kernels.permute import sum_rows_kernel

    gemm = {"BLOCK_G": 16, "EVEN_K": True, "PRECISION": "ieee"}
    return {
        "grouped_mm forward bf16": (grouped_rows_kernel, *_rows("*bf16", D, F), gemm, "rows/16bit/large"),
        "grouped_mm dA bf16 (B^T view)": (
            grouped_rows_kernel,
            *_rows("*bf16", F, D, b_transposed=True),
            gemm,
            "rows/16bit/large",
        ),
        "grouped_mm forward fp32": (grouped_rows_kernel, *_rows("*fp32", D, F), gemm, "rows/fp32/large"),
        "grouped_mm decode, ragged K": (
            grouped_rows_kernel,
            *_rows("*bf16", 100, F),
            {**gemm, "EVEN_K": False},
            "rows/16bit/decode",
        ),
        "ffn down (scatter)": (grouped_rows_kernel, *_rows("*bf16", F, D, scatter=True), gemm, "rows/16bit/large"),
        "grouped_mm dB bf16": (grouped_dw_kernel, *_dw("*bf16"), {"PRECISION": "ieee"}, "dw/16bit/large"),
        "grouped_mm dB fp32": (grouped_dw_kernel, *_dw("*fp32"), {"PRECISION": "ieee"}, "dw/fp32/large"),
        "ffn dW_in (gather x)": (
            grouped_dw_kernel,
            *_dw("*bf16", gather_a=True),
            {"PRECISION": "ieee"},
            "dw/16bit/large",
        ),
        "ffn dW_out (gather dy)": (
            grouped_dw_kernel,
            *_dw("*bf16", gather_dy=True),
            {"PRECISION": "ieee"},
            "dw/16bit/small",
        ),
        "ffn up swiglu": (
            ffn_up_kernel,
            *_up(2 * F),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": True},
            "swiglu_up/16bit/large",
        ),
        "ffn up swiglu decode, no z": (
            ffn_up_kernel,
            *_up(2 * F),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": False},
            "swiglu_up/16bit/decode",
        ),
        "moe_ffn up swiglu, weighted": (
            ffn_up_kernel,
            *_up(2 * F, weighted=True),
            {**gemm, "ACTIVATION": "swiglu", "STORE_Z": True},
            "swiglu_up/16bit/large",
        ),
        "ffn up gelu": (ffn_up_kernel, *_up(F), {**gemm, "ACTIVATION": "gelu", "STORE_Z": True}, "rows/16bit/large"),
        "ffn dh + swiglu backward": (
            ffn_act_backward_kernel,
            *_act_backward(2 * F),
            {**gemm, "ACTIVATION": "swiglu"},
            "act_backward/16bit/large",
        ),
        "moe_ffn dh + swiglu backward + ds": (
            ffn_act_backward_kernel,
            *_act_backward(2 * F, weighted=True),
            {**gemm, "ACTIVATION": "swiglu"},
            "act_backward/16bit/large",
        ),
        "ffn dh + gelu backward": (
            ffn_act_backward_kernel,
            *_act_backward(F),
            {**gemm, "ACTIVATION": "gelu"},
            "act_backward/16bit/small",
        ),
        "dx token sum": (
            sum_rows_kernel,
            {"src_ptr": "*bf16", "order_ptr": "*i64", "bounds_ptr": "*i64", "out_ptr": "*bf16"},
            dict(D=D, stride_sm=D, stride_sd=1, stride_om=D, stride_od=1),
            {"BLOCK_D": 1024},
            None,
        ),
    }


def compile_sm90(kernel, pointers: dict, ints: dict, constexprs: dict, cfg: dict):
    """Compile `kernel` for sm_90 as a launch would specialise it: pointers typed (None: absent,
    a constexpr) and marked 16-byte divisible, integers equal to 1 constant, multiples of 16
    marked divisible, the tile sizes of `cfg` as constexprs. Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {
        **{k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M") if k in kernel.arg_names},
        **constexprs,
    }
    signature, attrs = {}, {}
    for i, arg in enumerate(kernel.arg_names):
        if arg in pointers and pointers[arg] is not None:
            signature[arg] = pointers[arg]
            if pointers[arg].startswith("*"):  # a tensor descriptor has no divisibility
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in pointers:
            consts[arg] = None
        elif arg in ints and ints[arg] == 1:
            consts[arg] = 1
        elif arg in ints:
            signature[arg] = "i32"
            if ints[arg] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.setdefault(arg, "constexpr")
    source = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def spill_stores(ptx: str) -> int:
    """Bytes per thread that ptxas spills to local memory when it assembles `ptx` for sm_90a
    (its -v report), with the ptxas the installed Triton builds sm_90 with."""
    from triton.backends.nvidia import compiler

    ptxas = compiler.get_ptxas(90).path  # triton 3.9 ships two, per arch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(src.with_suffix(".cubin"))],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log))


def build(name: str) -> str:
    """Compile one variant for sm_90 as a launch would specialise it; a summary line."""
    from moe_kernels.tuning import table_config

    kernel, pointers, ints, constexprs, key = variants()[name]
    cfg = table_config(key, "h100") if key else {"num_warps": 4, "num_stages": 2}
    compiled = compile_sm90(kernel, pointers, ints, constexprs, cfg)
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "no mma"
    shared, spilled = compiled.metadata.shared, spill_stores(ptx)
    return f"{name:34s} {key or '-':26s} shared {shared:6d} B  spills {spilled:5d} B  {mma}"


def run_compiled(script: str) -> subprocess.CompletedProcess:
    """Run a test file as a script in a subprocess whose kernels the real compiler builds
    (TRITON_INTERPRET unset), with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)


def build_all() -> list[str]:
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return list(pool.map(build, variants()))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests launch the kernels for real")
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="no CUDA backend in triton")
def test_every_kernel_builds_for_sm90():
    done = run_compiled(__file__)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    # the hot kernels (16-bit tiles of 64+ rows per group) must lower to Hopper's warpgroup MMA,
    # not to the Ampere mma.sync that sm_90 also runs at a fraction of the rate, and keep their
    # tiles in registers: a spill to local memory costs an L1 round trip per value, in every tile
    lines = [line for line in done.stdout.splitlines() if "16bit/large" in line or "16bit/small" in line]
    assert len(lines) >= 10, done.stdout
    for line in lines:
        assert line.rstrip().endswith("wgmma"), line
        assert int(re.search(r"spills +(\d+) B", line).group(1)) <= SPILL_LIMIT, line


if __name__ == "__main__":
    print("\n".join(build_all()))
