"""Plot loss (and passkey accuracy where present) against step from one or more metrics.jsonl files.

    python app/gpt/plot_metrics.py OUT.png runs/a/metrics.jsonl:label-a runs/b/metrics.jsonl:label-b
    python app/gpt/plot_metrics.py OUT.png run/metrics.jsonl --mark 1000:2K --mark 1150:16K   (stage starts)
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the PNG to write")
    p.add_argument("runs", nargs="+", metavar="METRICS[:LABEL]", help="metrics.jsonl files")
    p.add_argument("--mark", action="append", default=[], metavar="STEP:LABEL",
                   help="a dashed line at STEP, e.g. where a curriculum stage begins (repeatable)")
    args = p.parse_intermixed_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for mark in args.mark:
        step, _, label = mark.partition(":")
        for ax in (ax_loss, ax_acc):
            ax.axvline(int(step), color="grey", lw=0.8, ls="--")
            ax.annotate(label, (int(step), 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="grey")
    for spec in args.runs:
        path, _, label = spec.partition(":")
        rows = [json.loads(line) for line in open(path)]
        ax_loss.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=0.6, label=label or path)
        acc = [(r["step"], r["passkey_acc"]) for r in rows if "passkey_acc" in r]
        if acc:
            ax_acc.plot(*zip(*acc), marker="o", ms=3, label=label or path)
    ax_loss.set(xlabel="step", ylabel="training loss", yscale="log", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy (5 digits right)", ylim=(-0.05, 1.05), title="passkey accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
