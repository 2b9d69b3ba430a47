"""One PNG per model from bench/moe_layer.py's JSON: grouped bars of forward+backward expert-GEMM
TFLOP/s, implementations x shapes, with the dense bf16 torch.mm measured in the same run as a line
and each shape's roofline (that peak, or its compulsory bytes at the measured bandwidth) as a bar.

An implementation that was unavailable, wrong or failed for a shape has no bar there; the legend
says why for the whole model when it never ran.

    python bench/moe_layer_plot.py bench/results/<device>/moe_layer.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def plot_models(result: dict, folder: Path, stem: str = "moe_layer") -> list[Path]:
    """Write <stem>_<model>.png into folder for every model with cases; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["results"]["cases"]
    dense = result["results"].get("dense_peak") or {}
    peak = dense.get("tflops")
    impls = list(dict.fromkeys(r["impl"] for r in cases))
    paths = []
    for model in dict.fromkeys(r["model"] for r in cases):
        rows = [r for r in cases if r["model"] == model]
        shapes = sorted({(r["experts"], r["rows"], r["routing"]) for r in rows})
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shapes) + 2), 4.5))
        width = 0.8 / max(1, len(impls))
        for i, impl in enumerate(impls):
            mine = {(r["experts"], r["rows"], r["routing"]): r for r in rows if r["impl"] == impl}
            values = [mine[s]["forward_backward_tflops"] if _ok(mine.get(s)) else 0.0 for s in shapes]
            label = impl if any(values) else f"{impl} ({_why_not(mine.values())})"
            ax.bar([j + i * width for j in range(len(shapes))], values, width, label=label[:70])
        bounds = [_roof(rows, s) for s in shapes]
        if any(bounds):  # the case's roofline: a short black bar over its group of bars
            ax.hlines(
                [b or float("nan") for b in bounds],
                [j - width / 2 for j in range(len(shapes))],
                [j + width * (len(impls) - 0.5) for j in range(len(shapes))],
                color="black",
                linewidth=2,
                label="roofline (peak or compulsory bytes)",
            )
        if peak:
            ax.axhline(
                peak, color="black", linestyle="--", linewidth=1, label=f"dense {dense.get('dtype', '')} mm {peak:.3g}"
            )
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"E{e} R{_rows(r)}\n{rt}" for e, r, rt in shapes], fontsize=7)
        ax.set_ylabel("expert-GEMM TFLOP/s, forward + backward")
        first = rows[0]
        ax.set_title(
            f"{model}: d {first['d']}, f {first['f']}, top-{first['top_k']} on {result['environment']['device']}",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(folder) / f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _roof(rows: list[dict], shape: tuple) -> float | None:
    """The forward+backward roofline bound of the case `shape`, if the run measured one."""
    for r in rows:
        if (r["experts"], r["rows"], r["routing"]) == shape and r.get("roofline"):
            return r["roofline"]["forward_backward"]["bound_tflops"]
    return None


def _rows(r: int) -> str:
    return f"{r // 1024}K" if r % 1024 == 0 else str(r)


def _ok(row: dict | None) -> bool:
    return bool(row) and row["status"] == "ok"


def _why_not(rows) -> str:
    statuses = [r["status"] for r in rows]
    return statuses[0].split(":")[0] if statuses else "not run"


if __name__ == "__main__":
    source = Path(sys.argv[1])
    for p in plot_models(json.loads(source.read_text()), source.parent):
        print(p)
