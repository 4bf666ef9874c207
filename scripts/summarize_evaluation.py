"""Summarise ``spinesegdiff evaluate`` results (per_case.csv) as the README's tables: per data set and method,
Dice on the middle slice and in 3-D per class, band AUROC, and the degenerated-disc subgroup.

    .venv/bin/python scripts/summarize_evaluation.py docs/evaluation/v4 [docs/evaluation/v3_new_scheme]
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load(folder: Path) -> list[dict]:
    with open(folder / "per_case.csv") as fh:
        return list(csv.DictReader(fh))


def table(rows: list[dict], label: str) -> None:
    by = defaultdict(list)
    for r in rows:
        by[(r["group"], r["method"], r["class"])].append(r)
    print(f"\n### {label}\n")
    print("| data | method | class | n | Dice mid-slice | Dice 3-D | band AUROC (class) |")
    print("|---|---|---|---|---|---|---|")
    for (g, m, c), v in sorted(by.items()):
        f = lambda k: np.nanmean([float(x[k]) for x in v])  # noqa: E731
        print(f"| {g} | {m} | {c} | {len(v)} | {f('dice_mid'):.3f} | {f('dice'):.3f} | {f('band_auroc_class'):.3f} |")
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["group"], r["method"])][r["case"]] = r
    print("\n| data | method | mean Dice mid-slice over classes | mean 3-D Dice | band AUROC (all classes) |")
    print("|---|---|---|---|---|")
    for (g, m), cases in sorted(groups.items()):
        mids = [float(r["dice_mid"]) for r in rows if r["group"] == g and r["method"] == m]
        d3 = [float(r["dice"]) for r in rows if r["group"] == g and r["method"] == m]
        band = [float(r["band_auroc"]) for r in cases.values()]
        print(f"| {g} | {m} | {np.mean(mids):.3f} | {np.mean(d3):.3f} | {np.nanmean(band):.3f} |")


def per_case(rows: list[dict], method: str = "default") -> None:
    print(f"\n### per case ({method})\n")
    print("| case | class | Dice mid | Dice 3-D | HD95 mm | band AUROC |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == method:
            print(f"| {r['case']} | {r['class']} | {float(r['dice_mid']):.3f} | {float(r['dice']):.3f} | "
                  f"{r['hd95_mm']} | {float(r['band_auroc']):.3f} |")


def degenerated(folder: Path) -> None:
    path = folder / "degenerated_discs.csv"
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    print("\n| method | degenerated discs | healthy discs |\n|---|---|---|")
    for m in dict.fromkeys(r["method"] for r in rows):
        d = [float(r["dice"]) for r in rows if r["method"] == m and r["degenerated"] == "True"]
        h = [float(r["dice"]) for r in rows if r["method"] == m and r["degenerated"] == "False"]
        print(f"| {m} | {np.mean(d):.3f} ({len(d)}) | {np.mean(h):.3f} ({len(h)}) |")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        rows = load(Path(arg))
        table(rows, arg)
        per_case(rows)
        degenerated(Path(arg))
