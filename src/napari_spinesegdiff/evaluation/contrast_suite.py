"""``spinesegdiff evaluate --contrast-suite``: the chosen split's scans under each transform of
:mod:`.contrast` beside the unchanged scans, for the presegmentation alone, the diffusion alone and the
default blend (the methods of :func:`.evaluate.method_configs`, from the same two runs as ``evaluate``).

Per case, transform, method and labelled class: Dice (3-D in the labelled range, and on the middle slice),
HD95, the band AUROC of the shown uncertainty map (:func:`.evaluate.score_case`), the predicted volume over
the manual one, and per scan the farthest predicted structure from the spine column (mm, :mod:`..column`)
before and after the pipeline drops strays (with the manual labels' own farthest beside it).  The labels
are those of the pipeline: the column filter (``column_margin_mm``) is applied here after measuring the
farthest structure without it, which is what ``finalize_labels`` does (it drops whole 3-D pieces of the
foreground, so the vertebra split does not change which).

``middle_mm`` restricts every scan, unchanged or transformed, to the sagittal slices within ``middle_mm / 2``
of its middle slice: only those are segmented and the truth outside them is cleared, so the Dice is that of
the middle ``middle_mm`` of each scan, comparable between transforms and methods (not with whole-scan
figures).  The report says so.

Writes ``contrast_per_case.csv`` and ``contrast.md`` (a VB1 table by contrast, VB3 body volumes, the
column distances, per-case Dice per transform).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import SegmentationConfig
from .contrast import TRANSFORMS, transform_case
from .evaluate import METHODS, EvalCase, load_eval_cases, method_configs, score_case, split_patients, write_csv

#: The contrast of each ``lumbar/VB1_*`` scan, read off its middle slice (fluid in the canal and discs,
#: subcutaneous fat, marrow): T1-weighted (fluid dark, fat bright), TIRM (fat suppressed, fluid bright)
#: or T2-weighted (fluid and fat bright).
VB1_CONTRAST = {"VB1_02": "T1", "VB1_03": "TIRM", "VB1_06": "T1", "VB1_07": "TIRM", "VB1_08": "T1",
                "VB1_10": "T1", "VB1_11": "T2"}


def middle_block(case: EvalCase, middle_mm: float | None) -> tuple[EvalCase, str]:
    """``case`` restricted to its sagittal slices within ``middle_mm / 2`` of slice ``n // 2`` (the truth
    cleared outside them), and the ``slices`` setting that segments only those; unchanged for None."""
    import dataclasses

    n = case.truth.shape[0]
    if middle_mm is None:
        return case, "all"
    half = int(np.floor(middle_mm / 2 / case.image.orientation.canonical_spacing[0] + 1e-6))
    first, stop = max(0, n // 2 - half), min(n, n // 2 + half + 1)
    truth = np.zeros_like(case.truth)
    truth[first:stop] = case.truth[first:stop]
    return dataclasses.replace(case, truth=truth), f"{first}:{stop}"


def _volume_ratio(labels: np.ndarray, case: EvalCase, c: int) -> float:
    region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
    truth = int(((case.truth == c) & region).sum())
    return float(((labels == c) & region).sum()) / truth if truth else float("nan")


def contrast_suite(sources: Sequence[str], config: SegmentationConfig, out_dir: Path,
                   splits: Path | None = None, fold: int = 0, subset: str = "test",
                   methods: Sequence[str] = METHODS, transforms: Sequence[str] = TRANSFORMS, seed: int = 0,
                   middle_mm: float | None = None) -> Path:
    """Run the suite on ``subset`` of ``fold`` (all cases of ``sources`` without ``splits``) and write its
    CSV and report into ``out_dir``; returns the report's path."""
    from ..column import column_pieces, drop_pieces, farthest_structure_mm
    from ..labelscheme import ChannelRoles, merge_vertebrae
    from ..pipeline import load_models, run
    from .evaluate import _method_results

    unknown = [t for t in transforms if t not in TRANSFORMS]
    if unknown:
        raise ValueError(f"Unknown contrast-suite transform {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}.")
    if middle_mm is not None and middle_mm <= 0:
        raise ValueError(f"middle_mm must be more than 0 mm, got {middle_mm}.")
    method_configs(config, methods)  # validates the names
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = load_eval_cases(sources, split_patients(splits, fold, subset) if splits is not None else None)
    if not cases:
        raise ValueError("No evaluation cases were found in the given sources and split.")
    models = load_models(config.replace(prior="baseline"))
    class_names = list(models.diffusion_config.class_names)
    vertebrae = "split" if ChannelRoles.of(class_names).can_split else "whole"
    margin = config.column_margin_mm
    raw = config.replace(vertebrae=vertebrae, column_margin_mm=0.0)
    rows: list[dict] = []
    for case in cases:
        truth_far = farthest_structure_mm(case.truth, case.image.orientation.canonical_spacing)
        for name in transforms:
            tcase, params = transform_case(case, name, seed)
            tcase, slices = middle_block(tcase, middle_mm)
            spacing = tcase.image.orientation.canonical_spacing
            results = _method_results(tcase, raw.replace(slices=slices), methods, run, class_names)
            for method, (res, seconds, _probs, maps) in results.items():
                labels = np.array(res.canonical_labels if tcase.vertebrae == "split"
                                  else merge_vertebrae(res.canonical_labels))
                found = column_pieces(labels, spacing, margin if margin > 0 else 20.0)
                dist = found.distance_mm
                before = float(dist.max()) if dist.size else float("nan")
                dropped = drop_pieces(labels, found, margin) if margin > 0 else 0
                kept = dist[dist <= margin] if margin > 0 else dist
                after = float(kept.max()) if kept.size else float("nan")
                for r in score_case(tcase, labels, res.canonical_uncertainty, res.canonical_class_uncertainty,
                                    class_names, label_maps=maps):
                    c = next(k for k in tcase.classes if tcase.class_name(k) == r["class"])
                    rows.append({"transform": name, "method": method, **r,
                                 "volume_ratio": round(_volume_ratio(labels, tcase, c), 4),
                                 "farthest_mm": round(before, 1), "farthest_kept_mm": round(after, 1),
                                 "truth_farthest_mm": round(truth_far, 1), "dropped_voxels": dropped,
                                 "contrast": VB1_CONTRAST.get(case.name, ""), "slices": slices,
                                 "params": params, "seconds": round(seconds, 2)})
                print(f"{case.name:>20} {name:>9} {method:>15}: " + ", ".join(
                    f"{r['class']} {r['dice']:.3f}" for r in rows[-len(tcase.classes):])
                    + f" ({seconds:.1f} s)", flush=True)
    write_csv(out_dir / "contrast_per_case.csv", rows)
    report = out_dir / "contrast.md"
    report.write_text(contrast_report(rows, config, models, list(methods), list(transforms), subset, fold,
                                      middle_mm, seed))
    return report


# ------------------------------------------------------------------------------------------- report
def _mean(rows: list[dict], key: str) -> float:
    vals = [float(r[key]) for r in rows if r[key] == r[key]]
    return float(np.mean(vals)) if vals else float("nan")


def _per_scan(rows: list[dict], key: str) -> float:
    """Mean over scans of a per-scan figure (repeated on every class row of a scan)."""
    first = {r["case"]: r for r in rows}
    return _mean(list(first.values()), key)


def _lumbar(r: dict) -> bool:
    return r["group"] not in ("spider", "phantom")


def _transform_table(rows, methods, transforms, title: str, key: str = "dice", per_scan: bool = False,
                     keep=lambda r: True) -> list[str]:
    """Mean ``key`` per transform (rows) and method (columns) over the rows ``keep`` takes, with each
    method's change from ``none``; nothing when ``keep`` takes no row."""
    if not any(keep(r) for r in rows):
        return []
    lines = [f"### {title}", "", "| transform | " + " | ".join(methods) + " | "
             + " | ".join(f"{m}: change" for m in methods) + " |",
             "|---|" + "---|" * (2 * len(methods))]
    base = {}
    for t in transforms:
        vals = []
        for m in methods:
            sel = [r for r in rows if r["transform"] == t and r["method"] == m and keep(r)]
            vals.append(_per_scan(sel, key) if per_scan else _mean(sel, key))
        if t == "none":
            base = dict(zip(methods, vals))
        change = [v - base.get(m, np.nan) if base else np.nan for m, v in zip(methods, vals)]
        lines.append(f"| {t} | " + " | ".join(f"{v:.4f}" for v in vals) + " | "
                     + " | ".join("" if t == "none" or c != c else f"{c:+.4f}" for c in change) + " |")
    return lines + [""]


def contrast_report(rows: list[dict], config: SegmentationConfig, models, methods: list[str],
                    transforms: list[str], subset: str, fold: int, middle_mm: float | None, seed: int) -> str:
    """The suite's Markdown report from its rows."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    n_struct = len({(r["case"], r["class"]) for r in rows})
    scope = ("every sagittal slice" if middle_mm is None else
             f"the middle {middle_mm:g} mm of each scan (the slices within {middle_mm / 2:g} mm of its middle "
             "slice are segmented and scored, the truth outside them cleared; comparable between transforms "
             "and methods, not with whole-scan figures)")
    lines = ["# Contrast suite", "",
             f"Split: the `{subset}` cases of fold {fold} ({len(cases)} scans, {n_struct} labelled structures: "
             f"{', '.join(cases)}). Scored on {scope}. Transforms seeded with {seed} (each case and transform "
             "its own stream; the parameters are in the CSV's `params`).", "",
             f"Checkpoint: `{models.diffusion_path}`; baseline: `{models.baseline_path}`.",
             f"Settings: {json.dumps(config.to_dict())}", "",
             "Methods: `presegmentation` = the presegmenter alone (t_start 0: the sampler returns it "
             "unchanged); `diffusion` = the diffusion output alone (baseline_weight 0); `default` = their blend "
             f"(baseline_weight {config.baseline_weight}). Labels after the column filter "
             f"(column_margin_mm {config.column_margin_mm:g}).", "",
             "## Dice per transform", ""]
    lines += _transform_table(rows, methods, transforms, f"Mean 3-D Dice over the {n_struct} structures "
                              "(in the labelled range)")
    lines += _transform_table(rows, methods, transforms, "SPIDER: mean Dice on the middle slice (the paper's)",
                              "dice_mid", keep=lambda r: r["group"] == "spider")
    lines += _transform_table(rows, methods, transforms, "Lumbar vertebral bodies: mean 3-D Dice in range",
                              keep=lambda r: _lumbar(r) and r["class"] == "vertebral body")
    lines += _transform_table(rows, methods, transforms, "Phantoms: mean 3-D Dice",
                              keep=lambda r: r["group"] == "phantom")
    lines += ["## Band AUROC per transform (the shown map, 5 voxels around truth and prediction)", ""]
    for title, keep in (("SPIDER", lambda r: r["group"] == "spider"), ("Lumbar", _lumbar),
                        ("Phantoms", lambda r: r["group"] == "phantom")):
        lines += _transform_table(rows, methods, transforms, title, "band_auroc", per_scan=True, keep=keep)
    lines += _vb_tables(rows, methods, transforms)
    lines += _column_table(rows, transforms)
    lines += _case_table(rows, methods, transforms)
    return "\n".join(lines) + "\n"


def _vb_tables(rows, methods, transforms) -> list[str]:
    out = []
    vb1 = [r for r in rows if r["group"] == "VB1"]
    if vb1:
        out += ["## VB1 by contrast: vertebral bodies, 3-D Dice in range", "",
                "| case | contrast | method | " + " | ".join(transforms) + " |", "|---|---|---|" + "---|" * len(transforms)]
        for case in dict.fromkeys(r["case"] for r in vb1):
            for m in methods:
                vals = [_mean([r for r in vb1 if r["case"] == case and r["method"] == m and r["transform"] == t],
                              "dice") for t in transforms]
                out.append(f"| {case} | {VB1_CONTRAST.get(case, '?')} | {m} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        out.append("")
    vb3 = [r for r in rows if r["group"] == "VB3"]
    if vb3:
        out += ["## VB3 (water-fat): vertebral bodies, 3-D Dice in range / predicted over manual volume", "",
                "| case | method | " + " | ".join(transforms) + " |", "|---|---|" + "---|" * len(transforms)]
        for case in list(dict.fromkeys(r["case"] for r in vb3)) + ["mean"]:
            for m in methods:
                cells = []
                for t in transforms:
                    sel = [r for r in vb3 if (case == "mean" or r["case"] == case) and r["method"] == m
                           and r["transform"] == t]
                    cells.append(f"{_mean(sel, 'dice'):.4f} / {_mean(sel, 'volume_ratio'):.3f}")
                out.append(f"| {case} | {m} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _column_table(rows, transforms) -> list[str]:
    """Per scan: the farthest predicted structure (default method, or the first method run) from the spine
    column without the filter, per transform, with the largest kept and the manual labels' own."""
    method = "default" if any(r["method"] == "default" for r in rows) else rows[0]["method"]
    sel = [r for r in rows if r["method"] == method]
    out = [f"## Farthest predicted structure from the spine column (mm, `{method}`)", "",
           "Before the column filter (after it: the largest kept, in brackets; voxels dropped in the CSV). "
           "The manual labels' farthest piece is the last column (lumbar masks hold bodies or discs only).", "",
           "| case | " + " | ".join(transforms) + " | manual |", "|---|" + "---|" * (len(transforms) + 1)]
    for case in dict.fromkeys(r["case"] for r in sel):
        cells, truth = [], ""
        for t in transforms:
            r = next((r for r in sel if r["case"] == case and r["transform"] == t), None)
            cells.append("" if r is None else f"{float(r['farthest_mm']):.1f} ({float(r['farthest_kept_mm']):.1f})")
            truth = truth or ("" if r is None else f"{float(r['truth_farthest_mm']):.1f}")
        out.append(f"| {case} | " + " | ".join(cells) + f" | {truth} |")
    return out + [""]


def _case_table(rows, methods, transforms) -> list[str]:
    out = ["## Per case: 3-D Dice in range (middle slice in brackets)", "",
           "| case | class | method | " + " | ".join(transforms) + " |", "|---|---|---|" + "---|" * len(transforms)]
    for case, cls in dict.fromkeys((r["case"], r["class"]) for r in rows):
        for m in methods:
            cells = []
            for t in transforms:
                r = next((r for r in rows if r["case"] == case and r["class"] == cls and r["method"] == m
                          and r["transform"] == t), None)
                cells.append("" if r is None else f"{r['dice']:.4f} ({r['dice_mid']:.4f})")
            out.append(f"| {case} | {cls} | {m} | " + " | ".join(cells) + " |")
    return out + [""]
