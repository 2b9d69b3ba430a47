"""Plots of bench/grouped_gemm.py's JSON: TFLOP/s against routed rows, one PNG per model.

Shapes: M = routed rows (x axis, log scale), E = local experts (one column each).

Rows of panels: grouped_mm up and down projections and expert_ffn, forward and
backward; colours: implementations; solid lines balanced routing, dashed Zipf.
Drawn from the JSON only, so a plot can be redrawn without a GPU:
    python bench/grouped_gemm_plot.py bench/results/<gpu-slug>/grouped_gemm.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = [
    (op, proj, p)
    for op, proj in (("grouped_mm", "up"), ("grouped_mm", "down"), ("expert_ffn", "ffn"))
    for p in ("forward", "backward")
]
COLORS = {"triton": "tab:red", "torch": "tab:blue", "eager_loop": "tab:green", "dense_mm": "black"}
STYLES = {"balanced": "-", "zipf": "--"}


def plot(json_path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    data = json.loads(Path(json_path).read_text())
    timed = [r for r in data["results"] if r.get("tflops")]
    written = []
    for model in sorted({r["model"] for r in timed}):
        rows = [r for r in timed if r["model"] == model]
        experts = sorted({r["experts"] for r in rows})
        panels = [p for p in PANELS if any((r["op"], r["proj"], r["pass"]) == p for r in rows)]
        fig, axes = plt.subplots(
            len(panels), len(experts), figsize=(4 * len(experts), 3 * len(panels)), squeeze=False, sharex=True
        )
        for (op, proj, pass_), ax_row in zip(panels, axes):
            for e, ax in zip(experts, ax_row):
                for impl in COLORS:
                    for routing, style in STYLES.items():
                        pts = sorted(
                            (r["rows"], r["tflops"])
                            for r in rows
                            if (r["op"], r["proj"], r["pass"], r["experts"], r["impl"], r["routing"])
                            == (op, proj, pass_, e, impl, routing)
                        )
                        if pts:
                            ax.plot(*zip(*pts), style, color=COLORS[impl], marker="o", ms=3)
                ax.set_xscale("log", base=2)
                ax.set_title(f"{op}{' ' + proj if op == 'grouped_mm' else ''} {pass_}, E={e}", fontsize=9)
                ax.grid(alpha=0.3)
            ax_row[0].set_ylabel("TFLOP/s")
        for ax in axes[-1]:
            ax.set_xlabel("routed rows M")
        # a fixed legend: colour = implementation, line style = routing
        handles = [Line2D([], [], color=c, marker="o", ms=3, label=impl) for impl, c in COLORS.items()]
        handles += [
            Line2D([], [], color="grey", linestyle=ls, label=f"{routing} routing") for routing, ls in STYLES.items()
        ]
        fig.suptitle(
            f"{model} on {data['device']} (torch {data['torch']}, triton {data['triton']}, "
            f"commit {data['commit'][:12]})",
            fontsize=10,
        )
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(handles), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.94))
        path = Path(json_path).with_name(f"grouped_gemm_{model}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    for png in plot(Path(sys.argv[1])):
        print(f"wrote {png}")
