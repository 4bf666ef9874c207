"""``spinesegdiff evaluate``: per case and class 3-D Dice and HD95 for the baseline presegmentation and the
diffusion model, uncertainty AUROC for misclassified voxels, an optional sweep of steps / t_start /
ensemble with seconds per scan, a degenerated-disc subgroup on phantoms, CSV + Markdown report + figures.

The baseline is evaluated through the same pipeline with ``t_start = 0``: the sampler then returns the
presegmentation unchanged, so both rows of a case differ only by the diffusion refinement.

Partial labels (the ``lumbar`` data): only the labelled class is scored, and only within the
superior-inferior rows that the mask spans ("in range"); whole-volume Dice is reported beside it.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..config import SegmentationConfig
from ..io.volume import Volume
from ..training.data import read_fold
from .metrics import auroc, dice, hd95, reliability

CLASS_NAMES = ["spinal canal", "vertebrae", "intervertebral disc"]


@dataclass
class EvalCase:
    name: str
    group: str
    image: Volume
    truth: np.ndarray  # canonical product labels 0..3
    classes: tuple[int, ...]  # labelled classes (1-based)
    in_range: np.ndarray | None  # canonical bool mask of the labelled SI rows (None = everywhere)
    degenerated_discs: np.ndarray | None = None  # canonical bool mask of degenerated discs (phantoms)


def _row_range_mask(truth: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(truth.any(axis=(0, 2)))
    m = np.zeros(truth.shape, bool)
    if rows.size:
        m[:, rows[0]:rows[-1] + 1, :] = True
    return m


def degenerated_disc_mask(phantom, truth: np.ndarray) -> np.ndarray:
    """Canonical mask of the phantom's degenerated discs: the 3-D disc components holding the centre of a
    disc level flagged degenerated."""
    from scipy import ndimage

    comps, _ = ndimage.label(truth == 3)
    mid = truth.shape[0] // 2
    keep = {int(comps[mid, int(round(lev.row)), int(round(lev.column))])
            for lev in phantom.levels if lev.kind == "disc" and lev.degenerated}
    keep.discard(0)
    return np.isin(comps, sorted(keep)) if keep else np.zeros(truth.shape, bool)


def load_eval_cases(sources: Iterable[str], test_patients: set[str] | None = None) -> list[EvalCase]:
    """``lumbar:PATH`` (restricted to ``test_patients`` when given) and ``phantom:N:SEED`` sources."""
    from ..io.labels import to_classes
    from ..io.readers import read_pair

    out: list[EvalCase] = []
    for spec in sources:
        kind, _, rest = spec.partition(":")
        if kind == "lumbar":
            for img in sorted(Path(rest).glob("*_image.nii.gz")):
                name = img.name[: -len("_image.nii.gz")]
                if test_patients is not None and name not in test_patients:
                    continue
                try:
                    image, labels = read_pair(img, img.with_name(f"{name}_label.nii.gz"))
                except ValueError as exc:
                    print(f"skipping {name}: {exc}")
                    continue
                cls = 3 if name.upper().startswith("IVD") else 2
                truth = np.where(labels.canonical() > 0, cls, 0).astype(np.uint8)
                out.append(EvalCase(name, name.split("_")[0], image, truth, (cls,), _row_range_mask(truth)))
        elif kind == "phantom":
            from ..phantom import make_phantom

            n, _, seed = rest.partition(":")
            rng = np.random.default_rng(int(seed or 100))
            for i in range(int(n)):
                deg = int(rng.integers(0, 3))
                ph = make_phantom(seed=int(rng.integers(1 << 30)), contrast="T2w" if i % 2 == 0 else "T1w",
                                  degenerated=deg)
                truth = ph.labels.canonical().astype(np.uint8)
                out.append(EvalCase(f"phantom_{seed or 100}_{i}", "phantom", ph.image, truth, (1, 2, 3), None,
                                    degenerated_disc_mask(ph, truth)))
        elif kind in ("spider", "nnunet"):
            root = Path(rest)
            if kind == "spider":
                pairs = [(p, root / "masks" / p.name) for p in sorted((root / "images").glob("*.mha"))]
            else:
                pairs = [(p, root / "labelsTr" / p.name.replace("_0000.nii.gz", ".nii.gz"))
                         for p in sorted((root / "imagesTr").glob("*_0000.nii.gz"))]
            for img, lab in pairs:
                name = lab.name.split(".")[0]
                patient = name.split("_")[0] if kind == "spider" else name
                if not lab.exists() or (test_patients is not None and patient not in test_patients):
                    continue
                image, labels = read_pair(img, lab)
                truth = to_classes(labels.canonical(), scheme="auto").astype(np.uint8)
                out.append(EvalCase(name, kind, image, truth, (1, 2, 3), None))
        else:
            raise ValueError(f"evaluate understands lumbar:, spider:, nnunet: and phantom: sources, not {spec!r}.")
    return out


def score_case(case: EvalCase, labels: np.ndarray, uncertainty: np.ndarray,
               class_uncertainty: np.ndarray | None = None) -> list[dict]:
    """One row per labelled class: Dice in range and whole volume, HD95 in range, and the AUROC of the
    uncertainty map (max over classes) for the misclassified voxels; with ``class_uncertainty``
    (C, ...) also the AUROC of the labelled classes' own uncertainty (``uncertainty_auroc_class``)."""
    spacing = case.image.orientation.canonical_spacing
    rows = []
    region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
    errors = np.zeros(case.truth.shape, bool)
    for c in case.classes:
        p, t = labels == c, case.truth == c
        errors |= (p != t) & region
        rows.append({
            "case": case.name, "group": case.group, "class": CLASS_NAMES[c - 1],
            "dice": round(dice(p, t, region), 4), "dice_whole": round(dice(p, t), 4),
            "hd95_mm": round(hd95(p & region, t & region, spacing), 2),
        })
    # AUROC over the slices that contain labelled structure, in range (background far away is excluded)
    slices = case.truth.any(axis=(1, 2))
    sel = region & slices[:, None, None]
    au = auroc(uncertainty[sel], errors[sel])
    au_cls = float("nan")
    if class_uncertainty is not None:
        own = np.max([class_uncertainty[c - 1] for c in case.classes], axis=0)
        au_cls = auroc(own[sel], errors[sel])
    for r in rows:
        r["uncertainty_auroc"] = round(au, 4)
        r["uncertainty_auroc_class"] = round(au_cls, 4)
        r["error_fraction"] = round(float(errors[sel].mean()), 5)
    return rows


def _degenerated_rows(case: EvalCase, labels: np.ndarray, method: str) -> list[dict]:
    """Per-disc Dice split into degenerated and healthy discs (phantoms only)."""
    if case.degenerated_discs is None:
        return []
    from scipy import ndimage

    truth_disc = case.truth == 3
    comp, n = ndimage.label(truth_disc)
    out = []
    for k in range(1, n + 1):
        disc = comp == k
        bbox = ndimage.find_objects(disc.astype(np.uint8))[0]
        grown = np.zeros_like(disc)
        grown[bbox] = True
        pred = (labels == 3) & grown
        out.append({"case": case.name, "method": method, "disc": k,
                    "degenerated": bool((case.degenerated_discs & disc).any()),
                    "dice": round(dice(pred, disc), 4)})
    return out


def split_patients(splits: Path, fold: int, subset: str = "test") -> set[str]:
    """The patients of one subset ("test" or "val") of one fold of a folds JSON."""
    if subset not in ("test", "val"):
        raise ValueError(f"subset must be 'test' or 'val', got {subset!r}.")
    return set(read_fold(splits, fold)[subset])


def evaluate(sources: Sequence[str], config: SegmentationConfig, out_dir: Path, splits: Path | None = None,
             fold: int = 0, sweep: bool = False, subset: str = "test") -> Path:
    """Run the evaluation and write ``per_case.csv``, ``sweep.csv``, ``report.md`` and figures.

    With ``splits``, only the ``subset`` ("test", or "val" for choosing settings without touching the
    test patients) of ``fold`` is evaluated.
    """
    from ..pipeline import load_models, run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = split_patients(splits, fold, subset) if splits is not None else None
    cases = load_eval_cases(sources, test)
    if not cases:
        raise ValueError("No evaluation cases were found in the given sources and split.")
    methods = {"baseline": config.replace(prior="baseline", t_start=0),
               "diffusion": config.replace(prior="baseline")}
    rows, deg_rows, rel = [], [], {"p": [], "y": []}
    for case in cases:
        for method, cfg in methods.items():
            t0 = time.perf_counter()
            res = run(case.image, cfg, stream_every=0)
            seconds = time.perf_counter() - t0
            for r in score_case(case, res.canonical_labels, res.canonical_uncertainty,
                                res.canonical_class_uncertainty):
                rows.append({"method": method, **r, "seconds": round(seconds, 2)})
            deg_rows += _degenerated_rows(case, res.canonical_labels, method)
            if method == "diffusion":
                for c in case.classes:
                    region = case.in_range if case.in_range is not None else slice(None)
                    rel["p"].append(res.canonical_probabilities[c - 1][region].ravel()[::7])
                    rel["y"].append((case.truth == c)[region].ravel()[::7])
            print(f"{case.name:>14} {method:>9}: " + ", ".join(
                f"{r['class']} {r['dice']:.3f}" for r in rows if r["case"] == case.name and r["method"] == method)
                + f" ({seconds:.1f} s)")
    _write_csv(out_dir / "per_case.csv", rows)
    _write_csv(out_dir / "degenerated_discs.csv", deg_rows)
    sweep_rows = _sweep(cases[: min(2, len(cases))], config, run) if sweep else []
    _write_csv(out_dir / "sweep.csv", sweep_rows)
    models = load_models(methods["diffusion"])
    return _report(out_dir, rows, deg_rows, sweep_rows, rel, config, models)


def _sweep(cases: Sequence[EvalCase], config: SegmentationConfig, run, n_slices: int = 3) -> list[dict]:
    """The paper's Table 2 redone on the ``n_slices`` middle slices of each case: Dice and seconds per
    slice for several sampler settings (the reference setting costs minutes per slice on a CPU)."""
    from dataclasses import replace

    settings = [
        ("presegmentation only", dict(prior="baseline", t_start=0)),
        ("S=1, 5 steps, t=300", dict(prior="baseline", ensemble=1, steps=5, t_start=300)),
        ("S=5, 10 steps, t=300 (default)", dict(prior="baseline", ensemble=5, steps=10, t_start=300)),
        ("S=5, 10 steps, t=500", dict(prior="baseline", ensemble=5, steps=10, t_start=500)),
        ("S=5, 20 steps, t=300", dict(prior="baseline", ensemble=5, steps=20, t_start=300)),
        ("S=5, 10 steps, no prior", dict(prior="none", ensemble=5, steps=10)),
        ("reference: S=15, 50 steps, no prior", dict(prior="none", ensemble=15, steps=50)),
    ]
    out = []
    for label, change in settings:
        for case in cases:
            mid = case.truth.shape[0] // 2
            sel = slice(mid - n_slices // 2, mid - n_slices // 2 + n_slices)
            cfg = config.replace(**change, slices=f"{sel.start}:{sel.stop}", batch_slices=n_slices)
            t0 = time.perf_counter()
            res = run(case.image, cfg, stream_every=0)
            sec = time.perf_counter() - t0
            sub = replace(case, truth=case.truth[sel],
                          in_range=None if case.in_range is None else case.in_range[sel])
            for r in score_case(sub, res.canonical_labels[sel], res.canonical_uncertainty[sel]):
                keep = {k: r[k] for k in ("case", "class", "dice", "uncertainty_auroc")}
                out.append({"setting": label, **keep, "seconds_per_slice": round(sec / n_slices, 2)})
            print(f"sweep {label}: {case.name} {sec / n_slices:.1f} s per slice")
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        if rows:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _mean_table(rows: list[dict], key: str = "dice") -> list[str]:
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["group"], r["class"], r["method"]), []).append(r[key])
    lines = ["| data | class | method | n | mean | min |", "|---|---|---|---|---|---|"]
    for (g, c, m), v in sorted(groups.items()):
        lines.append(f"| {g} | {c} | {m} | {len(v)} | {np.nanmean(v):.4f} | {np.nanmin(v):.4f} |")
    return lines


def _report(out_dir: Path, rows, deg_rows, sweep_rows, rel, config, models) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# spinesegdiff evaluation", "",
             f"Checkpoint: `{models.diffusion_path}`; baseline: `{models.baseline_path}`.",
             f"Settings: {json.dumps(config.to_dict())}", "", "## Dice in the labelled range (3-D)", ""]
    lines += _mean_table(rows) + ["", "## Per case", "",
                                  "| case | class | method | Dice | Dice whole | HD95 mm | AUROC | AUROC class | s |",
                                  "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['class']} | {r['method']} | {r['dice']:.4f} | {r['dice_whole']:.4f} | "
                     f"{r['hd95_mm']} | {r['uncertainty_auroc']} | {r['uncertainty_auroc_class']} | {r['seconds']} |")
    for m in ("baseline", "diffusion"):
        au = [r["uncertainty_auroc"] for r in rows if r["method"] == m]
        auc = [r["uncertainty_auroc_class"] for r in rows if r["method"] == m]
        lines.append(f"\nMean AUROC for misclassified voxels, {m}: map {np.nanmean(au):.4f}, "
                     f"labelled class's own map {np.nanmean(auc):.4f}" if au else "")
    lines += ["", "(baseline: the uncertainty is -p log p of the presegmentation's own probabilities)", ""]
    if deg_rows:
        lines += ["## Degenerated discs (phantoms)", "", "| method | degenerated | n | mean Dice |",
                  "|---|---|---|---|"]
        for m in ("baseline", "diffusion"):
            for d in (True, False):
                v = [r["dice"] for r in deg_rows if r["method"] == m and r["degenerated"] == d]
                if v:
                    lines.append(f"| {m} | {d} | {len(v)} | {np.mean(v):.4f} |")
        lines.append("")
    if sweep_rows:
        lines += ["## Sampler sweep (middle slices)", "", "| setting | mean Dice | s per slice |", "|---|---|---|"]
        for s in dict.fromkeys(r["setting"] for r in sweep_rows):
            v = [r for r in sweep_rows if r["setting"] == s]
            lines.append(f"| {s} | {np.mean([r['dice'] for r in v]):.4f} | "
                         f"{np.mean([r['seconds_per_slice'] for r in v]):.2f} |")
        lines.append("")
    if rel["p"]:
        p, y = np.concatenate(rel["p"]), np.concatenate(rel["y"])
        mp, fr, cnt = reliability(p, y)
        fig, ax = plt.subplots(figsize=(4, 4))
        ok = cnt > 0
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.plot(mp[ok], fr[ok], "o-")
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title("reliability (diffusion)")
        fig.tight_layout()
        fig.savefig(out_dir / "reliability.png", dpi=100)
        plt.close(fig)
        lines += ["![reliability](reliability.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
