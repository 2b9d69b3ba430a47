"""Bad arguments fail early with a message naming the argument; value checks live apart;
environments where Triton cannot run say why.

Shapes: M = rows, K = in dim, N = out dim, G = groups, T = tokens, d, f, E = experts.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_testing import DEVICE

import moe_kernels


def _gmm_args(m=8, k=16, n=8, g=2):
    return (
        torch.randn(m, k, device=DEVICE),
        torch.randn(g, k, n, device=DEVICE),
        torch.tensor([3, m], dtype=torch.int32, device=DEVICE)[:g],
    )


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda a, b, o: (a, b, o.long()), TypeError, "offs must be torch.int32"),
        (lambda a, b, o: (a[:, :-1], b, o), ValueError, "disagree on K"),
        (lambda a, b, o: (a[None], b, o), ValueError, "a must be 2-D"),
        (lambda a, b, o: (a, b[0], o), ValueError, "b must be 3-D"),
        (lambda a, b, o: (a, b, o[:1]), ValueError, "offs must have shape [2]"),
        (lambda a, b, o: (a, b.half(), o), TypeError, "share a dtype"),
        (lambda a, b, o: (a.long(), b.long(), o), TypeError, "a must be float16, bfloat16 or float32"),
        (lambda a, b, o: (a[:, ::2], b[:, ::2], o), ValueError, "neither row- nor column-major"),
        (lambda a, b, o: (a, b, [3, 8]), TypeError, "offs must be a torch.Tensor"),
    ],
)
def test_grouped_mm_rejects(change, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        moe_kernels.grouped_mm(*change(*_gmm_args()))


def _ffn_args(activation="swiglu"):
    t, d, f, e = 4, 16, 8, 2
    n_in = 2 * f if activation == "swiglu" else f
    rows = torch.arange(t, device=DEVICE)
    return dict(
        x=torch.randn(t, d, device=DEVICE),
        w_in=torch.randn(e, d, n_in, device=DEVICE),
        w_out=torch.randn(e, f, d, device=DEVICE),
        offs=torch.tensor([2, 4], dtype=torch.int32, device=DEVICE),
        row_token=rows,
        row_slot=rows,
        num_slots=t,
        activation=activation,
    )


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(activation="relu"), ValueError, "activation must be"),
        (dict(w_in=torch.randn(2, 16, 8)), ValueError, "swiglu needs w_in"),
        (dict(row_slot=torch.arange(4, dtype=torch.int32)), TypeError, "row_slot must be torch.int64"),
        (dict(row_slot=torch.arange(3)), ValueError, "row_slot must have shape"),
        (dict(num_slots=3), ValueError, "num_slots must be an int >= R"),
        (dict(offs=torch.tensor([2, 4])), TypeError, "offs must be torch.int32"),
        (dict(x=torch.randn(4, 15)), ValueError, "needs w_in"),
    ],
)
def test_expert_ffn_rejects(change, error, words):
    args = _ffn_args()
    args.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(error, match=words):
        moe_kernels.expert_ffn(**args)


def test_value_checks_need_an_explicit_call():
    """Monotonicity and ranges cost a host sync, so they are a separate, explicit call."""
    with pytest.raises(ValueError, match="non-decreasing"):
        moe_kernels.check_offs(torch.tensor([3, 2, 8], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match=r"lie in \[0, 8\]"):
        moe_kernels.check_offs(torch.tensor([3, 9], dtype=torch.int32), 8)
    moe_kernels.check_offs(torch.tensor([0, 0, 8], dtype=torch.int32), 8)
    args = _ffn_args()
    with pytest.raises(ValueError, match="must not repeat a slot"):
        moe_kernels.check_routing(args["offs"], args["row_token"], torch.tensor([0, 1, 1, 2]), 4, 4)
    with pytest.raises(ValueError, match="row_token must lie in"):
        moe_kernels.check_routing(args["offs"], torch.tensor([0, 1, 2, 4]), args["row_slot"], 4, 4)
    moe_kernels.check_routing(args["offs"], args["row_token"], args["row_slot"], 4, 4)


def test_availability_report():
    ok, reason = moe_kernels.triton_available("cpu", torch.bfloat16)
    # on CPU the interpreter is on and bf16 is what it lacks; on a GPU machine the interpreter is off
    from moe_kernels.runtime import interpreting

    missing = "bfloat16" if interpreting() else "TRITON_INTERPRET"
    assert (ok, missing in reason) == (False, True), reason
    ok, reason = moe_kernels.triton_available(DEVICE, torch.float32)
    assert ok, reason


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    env = dict(env, PYTHONPATH=str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_without_triton_the_references_still_work():
    code = (
        "import sys; sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch, moe_kernels\n"
        "ok, reason = moe_kernels.triton_available()\n"
        "assert not ok and 'triton is not importable' in reason, reason\n"
        "a, b, offs = torch.randn(4, 8), torch.randn(1, 8, 8), torch.tensor([4], dtype=torch.int32)\n"
        "assert moe_kernels.grouped_mm_reference(a, b, offs).shape == (4, 8)\n"
        "try:\n"
        "    moe_kernels.grouped_mm(a, b, offs)\n"
        "except RuntimeError as err:\n"
        "    assert 'need triton' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('grouped_mm ran without triton')\n"
    )
    done = _run_python(code, dict(os.environ))
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_cpu_without_interpreter_refuses_clearly():
    """Without TRITON_INTERPRET the kernels are compiled for GPUs: CPU tensors are refused with the fix."""
    code = (
        "import torch, moe_kernels\n"
        "ok, reason = moe_kernels.triton_available('cpu')\n"
        "assert not ok and 'TRITON_INTERPRET=1' in reason, reason\n"
        "a, b = torch.randn(4, 8), torch.randn(1, 8, 8)\n"
        "try:\n"
        "    moe_kernels.grouped_mm(a, b, torch.tensor([4], dtype=torch.int32))\n"
        "except RuntimeError as err:\n"
        "    assert 'TRITON_INTERPRET=1' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('grouped_mm ran on CPU without the interpreter')\n"
    )
    done = _run_python(code, {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr
