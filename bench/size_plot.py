"""Plot of bench/size_table.py's results: file MiB against mean KLD, stock llama-quantize presets
against our --size plans (and --types-only, --size --kv 0.5) at each preset's budget.

    pip install matplotlib    # only this script needs it
    python bench/size_plot.py --results bench-out/size/results.jsonl --out docs/size_plot.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from _common import load_results

STYLE = {"stock": ("o", "llama-quantize --imatrix (stock)"), "size": ("s", "--size (ranks and types)"),
         "types": ("^", "--size --types-only"), "kv0.5": ("D", "--size --kv 0.5")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=Path("bench-out/size/results.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("docs/size_plot.png"))
    args = ap.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("this plot needs matplotlib: pip install matplotlib") from None
    rows = load_results(args.results)
    if not rows:
        raise SystemExit(f"no results in {args.results}: run bench/size_table.py first")
    series: dict[str, list[tuple[float, float, str]]] = {k: [] for k in STYLE}
    for name, r in rows.items():
        m = re.fullmatch(r"(stock|ours)-([A-Z0-9_]+?)(?:-(size|types|kv0\.5))?\.gguf", name)
        if m is None:
            continue
        kind = "stock" if m.group(1) == "stock" else m.group(3)
        series[kind].append((r["mib"], r["kld"], m.group(2)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, pts in series.items():
        if not pts:
            continue
        pts.sort()
        marker, label = STYLE[kind]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="none", label=label)
        if kind == "stock":
            for x, y, preset in pts:
                ax.annotate(preset, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("file MiB")
    ax.set_ylabel("mean KLD against F16 (llama-perplexity, 20 x 512)")
    ax.set_title("SmolLM2-135M-Instruct: stock presets against --size plans at their budgets")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
