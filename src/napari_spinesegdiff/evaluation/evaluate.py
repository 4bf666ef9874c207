"""``spinesegdiff evaluate``: per case and class Dice (3-D, and 2-D on the middle sagittal slice as in the
paper) and HD95 for the presegmentation alone, the diffusion output alone and the default blend; the
uncertainty AUROC for misclassified voxels (over the labelled slices, and in a band of 5 voxels around the
truth and the prediction, where a reviewer looks); an optional sweep of steps / t_start / ensemble with
seconds per scan; a degenerated-disc subgroup on phantoms; CSV + Markdown report + per-class reliability.

The presegmentation is evaluated through the same pipeline with ``t_start = 0``: the sampler then returns
it unchanged, so the rows of a case differ only by the diffusion refinement and the blend.

Partial labels (the ``lumbar`` data): only the labelled class is scored, and only within the
superior-inferior rows that the mask spans ("in range"); whole-volume Dice is reported beside it.
Vertebral-body masks (``lumbar`` VB) are scored against label 2 of ``--vertebrae split``; whole-vertebra
masks (SPIDER, phantoms) against label 2 of the default ``whole`` scheme.
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
from ..labelscheme import label_channels, label_names, label_probability, merge_vertebrae
from ..training.data import read_fold
from .metrics import auroc, band_mask, dice, hd95, reliability

BAND_VOXELS = 5


@dataclass
class EvalCase:
    name: str
    group: str
    image: Volume
    truth: np.ndarray  # canonical product labels 0..3
    classes: tuple[int, ...]  # labelled classes (1-based)
    in_range: np.ndarray | None  # canonical bool mask of the labelled SI rows (None = everywhere)
    degenerated_discs: np.ndarray | None = None  # canonical bool mask of degenerated discs (phantoms)
    vertebrae: str = "whole"  # "split": the truth's label 2 is the vertebral body (lumbar VB masks)

    def class_name(self, c: int) -> str:
        return label_names("split" if self.vertebrae == "split" else "whole")[c]


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
    """``lumbar:PATH``, ``slabs:PATH``, ``spider:PATH``, ``nnunet:PATH`` (restricted to ``test_patients``
    when given) and ``phantom:N:SEED`` sources."""
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
                out.append(EvalCase(name, name.split("_")[0], image, truth, (cls,), _row_range_mask(truth),
                                    vertebrae="split" if cls == 2 else "whole"))
        elif kind == "slabs":
            for img in sorted(Path(rest).glob("*_image.nii.gz")):
                name = img.name[: -len("_image.nii.gz")]
                if test_patients is not None and name not in test_patients:
                    continue
                image, labels = read_pair(img, img.with_name(f"{name}_label.nii.gz"))
                truth = to_classes(labels.canonical(), scheme="auto").astype(np.uint8)
                out.append(EvalCase(name, "spider", image, truth, (1, 2, 3), None))
        elif kind == "phantom":
            from ..phantom import make_phantom

            n, _, seed = rest.partition(":")
            rng = np.random.default_rng(int(seed or 100))
            for i in range(int(n)):
                deg = int(rng.integers(0, 3))
                ph = make_phantom(seed=int(rng.integers(1 << 30)), contrast="T2w" if i % 2 == 0 else "T1w",
                                  degenerated=deg, label_posterior_elements=True)
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
            raise ValueError(f"evaluate understands lumbar:, slabs:, spider:, nnunet: and phantom: sources, "
                             f"not {spec!r}.")
    return out


def case_errors(case: EvalCase, labels: np.ndarray, band: int = BAND_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """``(errors, in_band)`` of written ``labels`` against the case's truth: the voxels a labelled class gets
    wrong, and those within ``band`` voxels (in-plane) of the truth or the prediction of any labelled class;
    both within the labelled levels (``case.in_range``)."""
    region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
    errors = np.zeros(case.truth.shape, bool)
    fg = np.zeros(case.truth.shape, bool)
    for c in case.classes:
        p, t = labels == c, case.truth == c
        errors |= (p != t) & region
        fg |= p | t
    return errors, band_mask(fg, fg, band) & region


def score_case(case: EvalCase, labels: np.ndarray, uncertainty: np.ndarray,
               class_uncertainty: np.ndarray | None = None, class_names: Sequence[str] | None = None,
               band: int = BAND_VOXELS, label_maps: dict[int, np.ndarray] | None = None) -> list[dict]:
    """One row per labelled class: Dice in range, whole volume and on the middle sagittal slice, HD95 in
    range, and AUROCs of the uncertainty for the misclassified voxels.

    ``labels`` are written labels in the case's scheme (``case.vertebrae``).  ``uncertainty_auroc``: the
    map (max over classes) over the in-range voxels of the slices holding labelled structure.
    ``band_auroc``: the same map within ``band`` voxels (in-plane) of the truth or the prediction of any
    labelled class, which leaves out the far background a reviewer never looks at; the row's
    ``band_auroc_class`` uses that class's own channels' uncertainty (``class_uncertainty`` (C, ...), with
    the model's ``class_names``), its own errors and its own band; where ``label_maps`` (written label -> its
    map, :func:`pipeline.written_uncertainty`) are given, the class's own map is that label's instead, so a
    whole vertebra is not charged for the body channel's doubt at the body's border with the posterior
    elements, which is no boundary of the written label.  ``band_auroc_labelled``: as ``band_auroc``, but
    the map is the max over the labelled classes' own maps only.  On a partially labelled scan (a lumbar scan
    with bodies only) the map a user sees also lights the canal's and the discs' boundaries next to the
    bodies; whether those voxels are wrong is unknown, yet ``band_auroc`` counts them as correct and flagged.
    Where every structure is labelled and ``label_maps`` are given, the two figures are the same."""
    spacing = case.image.orientation.canonical_spacing
    rows = []
    own_maps = []
    region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
    mid = case.truth.shape[0] // 2
    errors, in_band = case_errors(case, labels, band)
    for c in case.classes:
        p, t = labels == c, case.truth == c
        row = {
            "case": case.name, "group": case.group, "class": case.class_name(c),
            "dice": round(dice(p, t, region), 4), "dice_whole": round(dice(p, t), 4),
            "dice_mid": round(dice(p[mid], t[mid], region[mid]), 4),
            "hd95_mm": round(hd95(p & region, t & region, spacing), 2),
            "band_auroc_class": float("nan"),
        }
        own = None
        if label_maps is not None and c in label_maps:
            own = label_maps[c]
        elif class_uncertainty is not None and class_names is not None:
            ch = label_channels(c, class_names, case.vertebrae)
            if ch:
                own = np.max(class_uncertainty[ch], axis=0)
        if own is not None:
            own_maps.append(own)
            sel = band_mask(p, t, band) & region
            row["band_auroc_class"] = round(auroc(own[sel], ((p != t) & region)[sel]), 4)
        rows.append(row)
    # AUROC over the slices that contain labelled structure, in range (background far away is excluded)
    slices = case.truth.any(axis=(1, 2))
    sel = region & slices[:, None, None]
    au = auroc(uncertainty[sel], errors[sel])
    au_band = auroc(uncertainty[in_band], errors[in_band])
    labelled = np.max(own_maps, axis=0) if own_maps else None
    au_labelled = auroc(labelled[in_band], errors[in_band]) if labelled is not None else float("nan")
    for r in rows:
        r["uncertainty_auroc"] = round(au, 4)
        r["band_auroc"] = round(au_band, 4)
        r["band_auroc_labelled"] = round(au_labelled, 4)
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


#: The methods an evaluation can compare (``--methods``): the presegmentation alone, the diffusion output
#: alone (the paper) and the default (their blend, ``baseline_weight``).
METHODS = ("presegmentation", "diffusion", "default")


def method_configs(config: SegmentationConfig, methods: Sequence[str] = METHODS) -> dict[str, SegmentationConfig]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown evaluation method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    table = {"presegmentation": config.replace(prior="baseline", t_start=0),
             "diffusion": config.replace(prior="baseline", baseline_weight=0.0),
             "default": config.replace(prior="baseline")}
    return {m: table[m] for m in methods}


def evaluate(sources: Sequence[str], config: SegmentationConfig, out_dir: Path, splits: Path | None = None,
             fold: int = 0, sweep: bool = False, subset: str = "test",
             methods: Sequence[str] = METHODS) -> Path:
    """Run the evaluation and write ``per_case.csv``, ``sweep.csv``, ``report.md`` and figures.

    With ``splits``, only the ``subset`` ("test", or "val" for choosing settings without touching the
    test patients) of ``fold`` is evaluated.
    """
    from ..labelscheme import ChannelRoles
    from ..pipeline import load_models, run

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    test = split_patients(splits, fold, subset) if splits is not None else None
    cases = load_eval_cases(sources, test)
    if not cases:
        raise ValueError("No evaluation cases were found in the given sources and split.")
    method_configs(config, methods)  # validates the names
    models = load_models(config.replace(prior="baseline"))
    class_names = list(models.diffusion_config.class_names)
    vertebrae = "split" if ChannelRoles.of(class_names).can_split else "whole"
    rows, deg_rows = [], []
    rel: dict[str, dict[str, list]] = {}
    for case in cases:
        for method, (res, seconds, probs, maps) in _method_results(case, config.replace(vertebrae=vertebrae),
                                                                    methods, run, class_names).items():
            labels = res.canonical_labels if case.vertebrae == "split" else merge_vertebrae(res.canonical_labels)
            for r in score_case(case, labels, res.canonical_uncertainty, res.canonical_class_uncertainty,
                                class_names, label_maps=maps):
                rows.append({"method": method, **r, "seconds": round(seconds, 2)})
            deg_rows += _degenerated_rows(case, labels, method)
            region = case.in_range if case.in_range is not None else slice(None)
            for c in case.classes:
                prob = label_probability(probs, class_names, c, case.vertebrae)
                d = rel.setdefault(method, {}).setdefault(case.class_name(c), [[], []])
                d[0].append(prob[region].ravel()[::7])
                d[1].append((case.truth == c)[region].ravel()[::7])
            print(f"{case.name:>20} {method:>15}: " + ", ".join(
                f"{r['class']} {r['dice']:.3f}" for r in rows if r["case"] == case.name and r["method"] == method)
                + f" ({seconds:.1f} s)")
    write_csv(out_dir / "per_case.csv", rows)
    write_csv(out_dir / "degenerated_discs.csv", deg_rows)
    sweep_rows = _sweep(cases[: min(2, len(cases))], config, run, can_split=vertebrae == "split") if sweep else []
    write_csv(out_dir / "sweep.csv", sweep_rows)
    return _report(out_dir, rows, deg_rows, sweep_rows, rel, config, models, list(methods))


def _method_results(case: EvalCase, config: SegmentationConfig, methods: Sequence[str], run,
                    class_names: Sequence[str]) -> dict[str, tuple]:
    """Each method's result on one case from at most two pipeline runs: the presegmentation alone
    (``t_start = 0``) and the diffusion output alone (``baseline_weight = 0``), both unsmoothed; the default
    is their blend.  Each method's labels are then made by the pipeline's own last stage
    (:func:`finalize_labels`, with ``config``'s smoothing and vertebrae), which is what a run with that
    method's settings computes (blending and smoothing are linear and commute with the resampling to the
    scan grid).  The step-uncertainty maps are the runs' own; the ``"labels"`` map is made from each method's
    final probabilities, in the case's own label scheme (``case.vertebrae``).  Returns method -> (result with its
    labels and uncertainty, seconds of the runs it needs, the final probabilities, and in the ``"labels"`` mode
    each written label's own map, :func:`pipeline.written_uncertainty`, else None)."""
    import dataclasses

    from ..pipeline import blend_presegmentation, finalize_labels, label_uncertainty, written_uncertainty

    out = {}
    if list(methods) == ["default"]:  # one run with the default settings is cheaper than two
        t0 = time.perf_counter()
        res = run(case.image, config.replace(prior="baseline"), stream_every=0)
        out["default"] = (res, time.perf_counter() - t0, res.canonical_probabilities, None)
    else:
        raw = config.replace(prior="baseline", baseline_weight=0.0, smooth_mm=0.0, vertebrae="whole")
        spacing = case.image.orientation.canonical_spacing
        runs: dict[str, tuple] = {}
        for name, needed, cfg in (("presegmentation", ("presegmentation", "default"), raw.replace(t_start=0)),
                                  ("diffusion", ("diffusion", "default"), raw)):
            if any(m in methods for m in needed):
                t0 = time.perf_counter()
                res = run(case.image, cfg, stream_every=0)
                runs[name] = (res, time.perf_counter() - t0)
        for method in methods:
            if method == "default":
                (pre, s_pre), (dif, s_dif) = runs["presegmentation"], runs["diffusion"]
                probs = blend_presegmentation(dif.canonical_probabilities, pre.canonical_probabilities,
                                              config.baseline_weight)
                base, seconds = dif, s_pre + s_dif
            else:
                base, seconds = runs[method]
                probs = base.canonical_probabilities
            probs = np.array(probs, np.float32)  # finalize_labels smooths in place
            labels = finalize_labels(probs, spacing, config, _segmented(base), class_names)
            out[method] = (dataclasses.replace(base, canonical_labels=labels, canonical_probabilities=probs),
                           seconds, probs, None)
    if config.uncertainty == "labels":
        for method, (res, seconds, probs, _) in out.items():
            maps = written_uncertainty(probs, class_names, case.vertebrae, _segmented(res))
            unc, class_unc = label_uncertainty(probs, class_names, case.vertebrae, _segmented(res), written=maps)
            out[method] = (dataclasses.replace(res, canonical_uncertainty=unc, canonical_class_uncertainty=class_unc),
                           seconds, probs, maps)
    return out


def _segmented(res) -> range:
    """The contiguous range of canonical slices a result segmented."""
    return range(res.slices[0], res.slices[-1] + 1) if res.slices else range(0)


def _sweep(cases: Sequence[EvalCase], config: SegmentationConfig, run, n_slices: int = 3,
           can_split: bool = False) -> list[dict]:
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
            cfg = config.replace(**change, slices=f"{sel.start}:{sel.stop}", batch_slices=n_slices,
                                 vertebrae="split" if can_split else "whole")
            t0 = time.perf_counter()
            res = run(case.image, cfg, stream_every=0)
            sec = time.perf_counter() - t0
            sub = replace(case, truth=case.truth[sel],
                          in_range=None if case.in_range is None else case.in_range[sel])
            labels = res.canonical_labels if case.vertebrae == "split" else merge_vertebrae(res.canonical_labels)
            for r in score_case(sub, labels[sel], res.canonical_uncertainty[sel]):
                keep = {k: r[k] for k in ("case", "class", "dice", "uncertainty_auroc")}
                out.append({"setting": label, **keep, "seconds_per_slice": round(sec / n_slices, 2)})
            print(f"sweep {label}: {case.name} {sec / n_slices:.1f} s per slice")
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header (an empty file for no rows)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
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


def _report(out_dir: Path, rows, deg_rows, sweep_rows, rel, config, models, methods) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# spinesegdiff evaluation", "",
             f"Checkpoint: `{models.diffusion_path}`; baseline: `{models.baseline_path}`.",
             f"Settings: {json.dumps(config.to_dict())}", "",
             "Methods: `presegmentation` = the baseline alone; `diffusion` = the diffusion output alone "
             "(baseline_weight 0, the paper); `default` = the shipped setting "
             f"(baseline_weight {config.baseline_weight}).", "",
             "## Dice in the labelled range (3-D)", ""]
    lines += _mean_table(rows) + ["", "## Dice on the middle sagittal slice (2-D, as in the paper)", ""]
    lines += _mean_table(rows, "dice_mid") + [
        "", f"## Uncertainty: AUROC for misclassified voxels in a band of {BAND_VOXELS} voxels around truth "
        "and prediction", "", "(the map's max over classes for all labelled classes; per class its own map)",
        ""]
    lines += _mean_table(rows, "band_auroc_class") + [
        "", "(band AUROC: the map a user sees; labelled only: the labelled structures' own maps, "
        "which leaves out unlabelled structures' boundaries on partially labelled scans)", "",
        "| data | method | n | band AUROC | band AUROC, labelled only | slice AUROC |", "|---|---|---|---|---|---|"]
    for g in sorted({r["group"] for r in rows}):
        for m in methods:
            sel = {r["case"]: r for r in rows if r["group"] == g and r["method"] == m}
            if sel:
                lines.append(f"| {g} | {m} | {len(sel)} | "
                             f"{np.nanmean([r['band_auroc'] for r in sel.values()]):.4f} | "
                             f"{np.nanmean([r.get('band_auroc_labelled', np.nan) for r in sel.values()]):.4f} | "
                             f"{np.nanmean([r['uncertainty_auroc'] for r in sel.values()]):.4f} |")
    lines += ["", "## Per case", "",
              "| case | class | method | Dice | Dice whole | Dice mid | HD95 mm | AUROC | band AUROC | "
              "band AUROC class | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['class']} | {r['method']} | {r['dice']:.4f} | {r['dice_whole']:.4f} | "
                     f"{r['dice_mid']:.4f} | {r['hd95_mm']} | {r['uncertainty_auroc']} | {r['band_auroc']} | "
                     f"{r['band_auroc_class']} | {r['seconds']} |")
    lines += ["", "(presegmentation: the uncertainty is -p log p of the presegmentation's own probabilities)", ""]
    if deg_rows:
        lines += ["## Degenerated discs (phantoms)", "", "| method | degenerated | n | mean Dice |",
                  "|---|---|---|---|"]
        for m in methods:
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
    method = "default" if "default" in rel else next(iter(rel), None)
    if method is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        for name, (ps, ys) in sorted(rel[method].items()):
            mp, fr, cnt = reliability(np.concatenate(ps), np.concatenate(ys))
            ok = cnt > 0
            ax.plot(mp[ok], fr[ok], "o-", label=name)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"reliability per class ({method})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "reliability.png", dpi=100)
        plt.close(fig)
        lines += ["![reliability per class](reliability.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
