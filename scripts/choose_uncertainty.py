"""Choose the uncertainty map on the VALIDATION patients: which map finds the wrong voxels where a reviewer looks.

Each validation scan is segmented twice through the pipeline with blending and smoothing off (as
``choose_inference_settings.py`` does): the presegmentation alone (``t_start = 0``) and the diffusion refinement,
whose run keeps the paper's step-uncertainty map (``uncertainty="steps"``).  The default labels are then made by
the pipeline's own last stage from ``(1 - w) diffusion + w presegmentation``, and every candidate map is scored
by the evaluation's band AUROC (wrong voxels within 5 voxels of truth or prediction, inside the labelled
levels), over the map a user sees (all structures) and per class.  The test patients are never read.

Candidates (per written structure, then the max over structures):

* ``steps+prior``: the step-uncertainty map's max with the presegmentation's -p log p (the default until v4.1);
* ``steps``: the paper's step-uncertainty map alone;
* ``labels``: the binary entropy of the final probability the labels are drawn from (blended and smoothed);
* ``labels, unsmoothed``: the same before the smoothing across slices;
* ``expected entropy``: the mean of the presegmentation's and the diffusion's binary entropies;
* ``labels + steps``: the sum of ``labels`` and ``steps``;
* ``labels, in-plane blur S mm``: ``labels`` from the final probability blurred in plane (Gaussian, sigma S mm),
  which widens the uncertain rim where the network is sharp, so voxels a little off the drawn boundary are
  ranked by their distance to it instead of tying at zero;
* ``labels, across slices S mm``: ``labels`` from the probability smoothed across slices to S mm (the labels
  themselves keep the default 2 mm).

    .venv/bin/python scripts/choose_uncertainty.py --data slabs:../shared/data/spider_t2space \\
        --data lumbar:../shared/data/lumbar --splits src/napari_spinesegdiff/weights/splits_v4.json \\
        --out docs/evaluation/v4_validation
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.evaluation.evaluate import BAND_VOXELS, load_eval_cases, split_patients, write_csv
from napari_spinesegdiff.evaluation.metrics import auroc, band_mask
from napari_spinesegdiff.labelscheme import ChannelRoles, merge_vertebrae
from napari_spinesegdiff.pipeline import blend_presegmentation, finalize_labels, load_models, run, written_uncertainty


BLUR_MM = (0.5, 1.0, 2.0)
ACROSS_MM = (3.0, 4.0)  # total sigma across slices, the labels' own being 2 mm


def written_channels(p: np.ndarray, roles: ChannelRoles) -> dict[int, np.ndarray]:
    """Written label -> the map behind it, from a per-channel (C, ...) map: canal, disc, and for label 2 the
    larger of the whole-vertebra and body channels' maps, as the pipeline's step maps combine channels."""
    return {1: p[roles.canal], 2: np.maximum(p[roles.body], p[roles.whole]), 3: p[roles.disc]}


def candidate_maps(pre, dif, step, smoothed, blended, names, vertebrae,
                   spacing=(1.0, 1.0, 1.0)) -> dict[str, dict[int, np.ndarray]]:
    """Candidate name -> written label -> map (all on the 0..1/e scale), for a model with channels ``names``."""
    import torch
    from scipy import ndimage

    from napari_spinesegdiff.model.sampler import step_uncertainty

    h = {}
    probs = {"pre": pre, "dif": dif, "sm": smoothed, "bl": blended}
    for mm in BLUR_MM:
        sigma = (0.0, 0.0, mm / spacing[1], mm / spacing[2])  # (channel, slice, row, col): in plane only
        probs[f"blur{mm}"] = ndimage.gaussian_filter(smoothed, sigma).astype(np.float32)
    for mm in ACROSS_MM:
        extra = np.sqrt(mm ** 2 - SegmentationConfig.smooth_mm ** 2) / spacing[0]
        probs[f"across{mm}"] = ndimage.gaussian_filter1d(smoothed, extra, axis=1, mode="nearest")
    for key, prob in probs.items():
        # each written structure's map, as the pipeline draws it (label 4 shares label 2's)
        maps = written_uncertainty(prob, names, vertebrae)
        h[key] = {c: maps[c] for c in (1, 2, 3)}
    roles = ChannelRoles.of(names)
    steps = written_channels(step, roles)
    prior = written_channels(step_uncertainty(torch.from_numpy(pre)).numpy(), roles)  # -p log p
    labels = (1, 2, 3)
    return {
        "steps+prior": {c: np.maximum(steps[c], prior[c]) for c in labels},
        "steps": steps,
        "labels": h["sm"],
        "labels, unsmoothed": h["bl"],
        "expected entropy": {c: 0.5 * (h["pre"][c] + h["dif"][c]) for c in labels},
        "labels + steps": {c: h["sm"][c] + steps[c] for c in labels},
        **{f"labels, in-plane blur {mm} mm": h[f"blur{mm}"] for mm in BLUR_MM},
        **{f"labels, across slices {mm} mm": h[f"across{mm}"] for mm in ACROSS_MM},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, help="lumbar:PATH, slabs:PATH (as for evaluate)")
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--baseline-weight", type=float, default=SegmentationConfig.baseline_weight)
    ap.add_argument("--cache", type=Path, help="keep each case's network outputs here (.npz) and reuse them")
    ap.add_argument("--out", type=Path, required=True, help="folder for uncertainty_maps.csv")
    args = ap.parse_args(argv)
    raw = SegmentationConfig(baseline_weight=0.0, smooth_mm=0.0, uncertainty="steps", vertebrae="split")
    final = SegmentationConfig(vertebrae="split")
    cases = load_eval_cases(args.data, split_patients(args.splits, args.fold, "val"))
    names = load_models(raw).diffusion_config.class_names
    roles = ChannelRoles.of(names)
    if not roles.can_split:
        raise SystemExit("This script compares the maps of a four-channel (v4) model.")
    rows = []
    for case in cases:
        cached = args.cache / f"{case.name}.npz" if args.cache else None
        if cached is not None and cached.exists():
            z = np.load(cached)
            pre, dif, step = z["pre"], z["dif"], z["step"]
        else:
            pre = run(case.image, raw.replace(t_start=0), stream_every=0).canonical_probabilities
            res = run(case.image, raw, stream_every=0)
            dif, step = res.canonical_probabilities, res.canonical_class_uncertainty
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.savez_compressed(cached, pre=pre, dif=dif, step=step)
        blended = blend_presegmentation(dif, pre, args.baseline_weight).astype(np.float32)
        smoothed = blended.copy()
        labels = finalize_labels(smoothed, case.image.orientation.canonical_spacing, final, class_names=names)
        if case.vertebrae != "split":
            labels = merge_vertebrae(labels)
        region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
        errors, fg = np.zeros(case.truth.shape, bool), np.zeros(case.truth.shape, bool)
        for c in case.classes:
            errors |= ((labels == c) != (case.truth == c)) & region
            fg |= (labels == c) | (case.truth == c)
        band = band_mask(fg, fg, BAND_VOXELS) & region
        for name, maps in candidate_maps(pre, dif, step, smoothed, blended, names, case.vertebrae,
                                          case.image.orientation.canonical_spacing).items():
            shown = np.max([maps[c] for c in (1, 2, 3)], axis=0)
            row = {"case": case.name, "map": name, "class": "all (the map a user sees)",
                   "band_auroc": round(auroc(shown[band], errors[band]), 4)}
            rows.append(row)
            for c in case.classes:
                p, t = labels == c, case.truth == c
                sel = band_mask(p, t, BAND_VOXELS) & region
                rows.append({"case": case.name, "map": name, "class": case.class_name(c),
                             "band_auroc": round(auroc(maps[c][sel], ((p != t) & region)[sel]), 4)})
        print(f"{case.name}: done", flush=True)
    write_csv(args.out / "uncertainty_maps.csv", rows)
    print("| map | SPIDER (all) | lumbar (all) | SPIDER per class | lumbar per class |\n|---|---|---|---|---|")
    for name in dict.fromkeys(r["map"] for r in rows):
        def mean(spider: bool, overall: bool) -> float:
            v = [r["band_auroc"] for r in rows if r["map"] == name and r["case"].startswith("SPIDER") == spider
                 and (r["class"].startswith("all") == overall)]
            return float(np.nanmean(v)) if v else float("nan")
        print(f"| {name} | {mean(True, True):.4f} | {mean(False, True):.4f} | {mean(True, False):.4f} | "
              f"{mean(False, False):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
