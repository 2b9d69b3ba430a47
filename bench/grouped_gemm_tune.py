"""Tile-config sweep for the GEMM kernels: `python bench/grouped_gemm.py --tune`.

Shapes: M = routed rows, E = experts, d = model dim, f = expert hidden dim, n_in = 2f; the
problems come in the two expert shapes at the ends of the full configs (SHAPES): Ling-1T's
expert-parallel share (E 8, d 8192, f 2048) and Qwen3-30B-A3B's whole fine-grained layer (E 128,
d 2048, f 768), so that one table entry serves both. Rows per expert pick the shape class (see
moe_kernels/tuning.py): decode 16, small 128, large 4096 (Ling-1T) or 2048 (Qwen3: 32K tokens).

For each bf16 (16-bit) shape class of each kernel kind, every candidate config
that fits in shared memory is compiled, checked against the current table's
result (relative error <= 1e-2) and timed with do_bench (median) on the
representative problems below; the fastest in total wins:

    rows       [M, d] x [E, d, 2f] (up projection) and [M, f] x [E, f, d] (down)
    swiglu_up  the expert FFN up kernel: gather, two accumulators, SwiGLU epilogue
    act_backward  the expert FFN dh kernel (moe_ffn's): gathered dy [M, d] x w_out^T [E, d, f],
               SwiGLU backward epilogue that reads z [M, 2f] and the routing weights
    dw         dB of both projections: [M, d]^T [M, 2f] and [M, f]^T [M, d] per expert,
               and (Ling-1T's shape) the up projection's dB again with skewed routing (expert 0
               holds half the rows)

Then the opt-in options of the kind (OPTIONS: SPLIT 2 and 4 for dw; TMA, PERSISTENT 1 and both
for the row-tiled kinds; see moe_kernels/tuning.py) are tried on the TOP_TILES fastest tile configs;
an option enters the table only if it wins (absent fields mean SPLIT 1, TMA and PERSISTENT off).

The winners replace this GPU family's section of the table (fp32 classes keep the
"default" entries); `_provenance` records device, versions, commit and date.
On a remote GPU machine pass --table under $OUT and copy the file back.
"""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

import torch
import triton
import triton.testing

from moe_kernels.ffn_kernels import launch_act_backward, launch_up
from moe_kernels.gemm_dw import launch_dw
from moe_kernels.gemm_rows import launch_rows
from moe_kernels.tuning import (
    KINDS,
    ROW_KINDS,
    TABLE_PATH,
    device_family,
    dump_table,
    get_config,
    load_table,
    section_for,
)

DEVICE, DTYPE = "cuda", torch.bfloat16
# (E, d, f, rows per expert by shape class): the two ends of the full configs (module doc)
SHAPES = (
    (8, 8192, 2048, {"decode": 16, "small": 128, "large": 4096}),
    (128, 2048, 768, {"decode": 16, "small": 128, "large": 2048}),
)
E, _, _, ROWS_PER_GROUP = SHAPES[0]  # the class of a launch: rows per group as the table reads it
SMEM_LIMIT = 200 * 1024  # H100: 227 KB per block; keep room for the epilogue's layout conversions
TOLERANCE = 1e-2
# opt-in fields worth trying per kind (each on the fastest tile configs; default values are implied)
ROW_OPTIONS = [{"TMA": True}, {"PERSISTENT": 1}, {"TMA": True, "PERSISTENT": 1}]
OPTIONS = {**dict.fromkeys(ROW_KINDS, ROW_OPTIONS), "dw": [{"SPLIT": 2}, {"SPLIT": 4}]}
TOP_TILES = 3


def candidates(kind: str, cls: str) -> list[dict]:
    """Configs worth trying for one kernel kind and shape class (bf16 operands)."""
    if kind == "dw":  # BLOCK_M = rows reduced per step, BLOCK_K x BLOCK_N = output tile
        row_steps = {"decode": (16, 32), "small": (32, 64), "large": (32, 64, 128)}[cls]
        grid = itertools.product(row_steps, (64, 128, 256), (64, 128), (3, 4))
        shapes = [(bm, bn, bk, st, (bk * bm + bm * bn) * 2 * st, bk * bn) for bm, bn, bk, st in grid]
    else:
        b_tiles = 2 if kind == "swiglu_up" else 1
        row_tiles = {"decode": (16, 32), "small": (32, 64, 128), "large": (64, 128, 256)}[cls]
        col_tiles = (32, 64, 128) if kind == "swiglu_up" else (64, 128, 256)
        grid = itertools.product(row_tiles, col_tiles, (64, 128), (3, 4))
        shapes = [
            (bm, bn, bk, st, (bm * bk + b_tiles * bk * bn) * 2 * st, b_tiles * bm * bn) for bm, bn, bk, st in grid
        ]
    return [
        {
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "GROUP_M": 8,
            "num_warps": 8 if acc >= 128 * 128 else 4,
            "num_stages": st,
        }
        for bm, bn, bk, st, smem, acc in shapes
        if smem <= SMEM_LIMIT and acc <= 256 * 128
    ]


def problems(kind: str, cls: str) -> list:
    """Closures `run(config) -> output` on the representative problems of a class."""
    runs = []
    for e, d, f, rows_per_group in SHAPES:
        runs += shape_problems(kind, e, d, f, rows_per_group[cls], skewed=e == SHAPES[0][0])
    return runs


def shape_problems(kind: str, e: int, d: int, f: int, rows_per_group: int, skewed: bool) -> list:
    """The problems of one expert shape: E experts of `rows_per_group` rows each (module doc)."""
    m = e * rows_per_group
    offs = torch.full((e,), rows_per_group, dtype=torch.int32, device=DEVICE).cumsum(0).to(torch.int32)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)

    runs = []
    if kind == "rows":
        for k, n in ((d, 2 * f), (f, d)):
            a, b, c = rand(m, k), rand(e, k, n, scale=k**-0.5), torch.empty(m, n, device=DEVICE, dtype=DTYPE)
            runs.append(lambda cfg, a=a, b=b, c=c: (launch_rows(a, b, c, offs, m, config=cfg), c)[1])
    elif kind == "swiglu_up":
        x, w_in = rand(m, d), rand(e, d, 2 * f, scale=d**-0.5)
        row_token = torch.randperm(m, device=DEVICE)
        h, z = (torch.empty(m, n, device=DEVICE, dtype=DTYPE) for n in (f, 2 * f))
        runs.append(lambda cfg: (launch_up(x, w_in, offs, row_token, h, z, "swiglu", config=cfg), h)[1])
    elif kind == "act_backward":
        dy, w_out, z = rand(m, d), rand(e, f, d, scale=d**-0.5), rand(m, 2 * f)
        dy_rows = torch.randperm(m, device=DEVICE)
        weight, ds = torch.rand(m, device=DEVICE), torch.empty(m, device=DEVICE)
        dz, h = torch.empty_like(z), torch.empty(m, f, device=DEVICE, dtype=DTYPE)
        runs.append(
            lambda cfg: (launch_act_backward(dy, w_out, offs, dy_rows, z, dz, h, "swiglu", weight, ds, cfg), dz)[1]
        )
    else:
        problems = [(d, 2 * f, offs), (f, d, offs)]
        if skewed:  # expert 0 holds half the rows, the other experts share the rest: the case SPLIT is for
            skew = [m // 2] + [m // 2 // (e - 1)] * (e - 1)
            skew[0] += m - sum(skew)
            problems.append((d, 2 * f, torch.tensor(skew, device=DEVICE).cumsum(0).to(torch.int32)))
        for k, n, o in problems:
            a, dy, out = rand(m, k), rand(m, n), torch.empty(e, k, n, device=DEVICE, dtype=DTYPE)
            runs.append(lambda cfg, a=a, dy=dy, out=out, o=o: (launch_dw(a, dy, out, o, m, config=cfg), out)[1])
    return runs


def time_config(runs: list, refs: list, cfg: dict) -> float | None:
    """Total median ms of `cfg` on the runs, or None if it fails to build or disagrees with refs."""
    try:
        outs = [run(cfg) for run in runs]
    except Exception as err:  # out of shared memory or registers, or a compiler error: not a candidate
        print(f"  skip {cfg}: {type(err).__name__}")
        return None
    errors = [(o.float() - r.float()).norm().item() / r.float().norm().item() for o, r in zip(outs, refs)]
    if max(errors) > TOLERANCE:
        print(f"  skip {cfg}: relative error {max(errors):.2e}")
        return None
    return sum(triton.testing.do_bench(lambda r=r: r(cfg), warmup=5, rep=20, return_mode="median") for r in runs)


def tune_class(kind: str, cls: str) -> tuple[dict, float]:
    """(best config, its total median ms) for one kind and shape class."""
    runs = problems(kind, cls)
    current = get_config(kind, DTYPE, E * ROWS_PER_GROUP[cls], E, torch.device(DEVICE), interpret=False)
    refs = [run(current).clone() for run in runs]
    timed = [(ms, cfg) for cfg in (current, *candidates(kind, cls)) if (ms := time_config(runs, refs, cfg)) is not None]
    timed.sort(key=lambda t: t[0])
    for base_ms, base in timed[:TOP_TILES]:
        for option in OPTIONS[kind]:
            cfg = {**base, **option}
            ms = time_config(runs, refs, cfg)
            if ms is not None:
                print(f"  {option}: {ms:.3f} ms against {base_ms:.3f} ms without, tiles {base}")
                timed.append((ms, cfg))
    best_ms, best = min(timed, key=lambda t: t[0])
    return best, best_ms


def tune_and_write(kinds: list[str] | None, commit: str, out_path: Path = TABLE_PATH) -> None:
    """Tune, then write the table (moe_kernels/gemm_configs.json with this GPU's section replaced) to out_path.

    The table is rewritten after every shape class, so a sweep stopped by a time limit keeps its winners."""
    section = device_family(torch.cuda.get_device_name(0))
    table = dict(load_table())
    # a new family's section starts from the section it used so far (an alias: H200 -> h100), so
    # classes left out of this run keep those tiles rather than falling back to "default"
    in_use = section_for(torch.cuda.get_device_name(0), table)
    entries = dict(table.get(section) or (table[in_use] if in_use != "default" else {}))
    provenance = dict(table.get("_provenance", {}))
    tuned = list(provenance.get(section, {}).get("tuned", []))
    for kind in kinds or KINDS:
        for cls in ROWS_PER_GROUP:
            best, ms = tune_class(kind, cls)
            entries[f"{kind}/16bit/{cls}"] = best
            tuned = sorted(set(tuned) | {f"{kind}/16bit/{cls}"})
            print(f"{kind}/16bit/{cls}: {best}  ({ms:.3f} ms on the representative problems)", flush=True)
            provenance[section] = {
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "triton": triton.__version__,
                "commit": commit,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "tuned": tuned,
            }
            out_path.write_text(dump_table({**table, section: entries, "_provenance": provenance}))
            load_table.cache_clear()
    print(f"wrote {out_path} with section {section!r} tuned")
