"""Where the errors lie and which uncertainty map finds them, on the validation patients (never the test ones).

For each validation case of fold 0 this runs the presegmentation alone and the diffusion output alone (as
``spinesegdiff evaluate`` does), makes the default blend and its labels, and then

* prints how far each wrong voxel lies from the predicted boundary (in-plane, mm), and
* scores candidate uncertainty maps by the band AUROC of the evaluation (5 voxels around truth and
  prediction, within the labelled levels): the shipped ``"labels"`` map against the same with the
  presegmentation-diffusion disagreement added, the diffusion ensemble's step map, in-plane blurring,
  a shifted decision point, and the mean of the two methods' entropies.

    .venv/bin/python scripts/study_uncertainty.py [--threads 2] [--baseline-checkpoint FILE]

About 4 minutes on 2 CPU cores.  The figures it gave for v4.4 are in the README (model card).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.evaluation.evaluate import load_eval_cases, score_case, split_patients
from napari_spinesegdiff.labelscheme import ChannelRoles, merge_vertebrae, structure_probabilities
from napari_spinesegdiff.pipeline import LABEL_UNCERTAINTY_SCALE, binary_entropy, finalize_labels, \
    label_uncertainty, run, smooth_across_slices

ROOT = Path(__file__).resolve().parents[1]
BINS_MM = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, np.inf)


def entropy(p: np.ndarray) -> np.ndarray:
    return binary_entropy(p) * LABEL_UNCERTAINTY_SCALE


def error_distances(case, labels: np.ndarray, spacing) -> np.ndarray:
    """Share of the wrong voxels in each distance bin from the predicted boundary of their class."""
    region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
    counts = np.zeros(len(BINS_MM) - 1)
    for c in case.classes:
        pred, wrong = labels == c, ((labels == c) != (case.truth == c)) & region
        for k in np.flatnonzero(wrong.any(axis=(1, 2))):
            inside = ndimage.distance_transform_edt(pred[k], sampling=spacing[1:])
            outside = ndimage.distance_transform_edt(~pred[k], sampling=spacing[1:])
            counts += np.histogram(np.where(pred[k], inside, outside)[wrong[k]], bins=BINS_MM)[0]
    return counts / max(1.0, counts.sum())


def default_runs(case, config: SegmentationConfig):
    """The presegmentation alone and the diffusion alone (as ``spinesegdiff evaluate`` runs them), and the
    default blend made from them: ``(diffusion run, blended probabilities, written labels in the case's
    scheme, presegmentation and diffusion probabilities smoothed across slices)``.  The blended
    probabilities are smoothed in place by :func:`finalize_labels`."""
    raw = config.replace(baseline_weight=0.0, smooth_mm=0.0, vertebrae="whole", uncertainty="steps")
    pre_run = run(case.image, raw.replace(t_start=0), stream_every=0)
    dif_run = run(case.image, raw, stream_every=0)
    names, spacing = dif_run.class_names, case.image.orientation.canonical_spacing
    rng = range(dif_run.slices[0], dif_run.slices[-1] + 1)
    probs = np.array(0.5 * dif_run.canonical_probabilities + 0.5 * pre_run.canonical_probabilities, np.float32)
    labels = finalize_labels(probs, spacing, config.replace(vertebrae="split"), rng, names)  # smooths probs
    if case.vertebrae != "split":
        labels = merge_vertebrae(labels)
    pre, dif = (smooth_across_slices(np.array(r.canonical_probabilities, np.float32), spacing[0],
                                     config.smooth_mm, rng) for r in (pre_run, dif_run))
    return dif_run, probs, labels, pre, dif


def candidate_maps(case, probs, pre, dif, steps_map, rng, spacing, names):
    base, _ = label_uncertainty(probs, names, case.vertebrae, rng)
    roles = ChannelRoles.of(names)
    s_pre, s_dif = structure_probabilities(pre, roles), structure_probabilities(dif, roles)
    yield "labels (shipped)", base
    for a in (0.25, 0.5, 1.0):
        yield f"labels + {a} |pre - diffusion|", base + a * np.abs(s_pre - s_dif).max(0)
    yield "max(labels, steps)", np.maximum(base, steps_map)
    yield "labels + steps", base + steps_map
    for mm in (0.5, 1.0, 2.0):
        yield f"labels blurred {mm} mm", ndimage.gaussian_filter(base, (0, mm / spacing[1], mm / spacing[2]))
    split = case.vertebrae == "split" and roles.can_split  # lumbar bodies: the body channel divides 2 from 4

    def written(p_c, s_c):  # the map over the written labels' probabilities, as label_uncertainty makes it
        u = entropy(s_c).max(0)
        return np.maximum(u, entropy(p_c[roles.body])) if split else u

    s = np.clip(structure_probabilities(probs, roles), 1e-6, 1 - 1e-6)
    for b in (-0.5, 0.5, 1.0):  # the entropy centred away from p = 0.5
        shift = lambda q: 1.0 / (1.0 + np.exp(-(np.log(q) - np.log1p(-q) + b)))  # noqa: E731
        yield f"entropy at logit {b:+}", written(shift(np.clip(probs, 1e-6, 1 - 1e-6)), shift(s))
    yield "mean of the two methods' entropies", 0.5 * (written(pre, s_pre) + written(dif, s_dif))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patients = split_patients(ROOT / "src/napari_spinesegdiff/weights/splits_v4.json", 0, "val")
    cases = load_eval_cases([f"slabs:{args.data}/spider_t2space", f"lumbar:{args.data}/lumbar"], patients)
    config = SegmentationConfig(baseline_checkpoint=args.baseline_checkpoint)
    scores: dict[str, dict[str, list[float]]] = {}
    print("share of wrong voxels by in-plane distance from the predicted boundary (mm): "
          + " ".join(f"<{b:g}" for b in BINS_MM[1:-1]) + f" >{BINS_MM[-2]:g}")
    for case in cases:
        dif_run, probs, labels, pre, dif = default_runs(case, config)
        names, spacing = dif_run.class_names, case.image.orientation.canonical_spacing
        rng = range(dif_run.slices[0], dif_run.slices[-1] + 1)
        shares = error_distances(case, labels, spacing)
        print(f"  {case.name:20s} ({spacing[1]:.2f} mm pixels) " + " ".join(f"{v:.2f}" for v in shares))
        steps_map = dif_run.canonical_class_uncertainty.max(axis=0)
        source = "spider" if case.group == "spider" else "lumbar"
        for name, u in candidate_maps(case, probs, pre, dif, steps_map, rng, spacing, names):
            band = score_case(case, labels, u.astype(np.float32))[0]["band_auroc"]
            scores.setdefault(name, {}).setdefault(source, []).append(band)
    print("\nband AUROC (mean over cases): SPIDER / lumbar")
    for name, by_source in scores.items():
        print(f"  {name:38s} " + " / ".join(f"{statistics.mean(by_source.get(s, [np.nan])):.4f}"
                                            for s in ("spider", "lumbar")))


if __name__ == "__main__":
    main()
