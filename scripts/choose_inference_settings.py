"""Choose the final-probability settings (``baseline_weight`` x ``smooth_mm``) on the VALIDATION patients.

Each validation scan is segmented twice through the pipeline, with blending and smoothing off: the
presegmentation alone (``t_start = 0``) and the diffusion refinement.  Every grid point is then the
pipeline's own last stage (``finalize_labels``) applied to ``(1 - w) diffusion + w presegmentation``, so the
networks run once per scan (blending before or after the linear resampling to the scan grid is the same).
Prints mean 3-D Dice in the labelled level range per setting and writes a CSV; the test patients are never
read.

    .venv/bin/python scripts/choose_inference_settings.py --data lumbar:../shared/data/lumbar \\
        --splits src/napari_spinesegdiff/weights/splits_lumbar.json --fold 0 --out docs/evaluation/validation
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.evaluation.evaluate import load_eval_cases, split_patients, write_csv
from napari_spinesegdiff.evaluation.metrics import dice
from napari_spinesegdiff.labelscheme import ChannelRoles, merge_vertebrae
from napari_spinesegdiff.pipeline import blend_presegmentation, finalize_labels, load_models, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True, help="lumbar:PATH, slabs:PATH (as for evaluate)")
    ap.add_argument("--splits", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--checkpoint", help="diffusion checkpoint (default: shipped)")
    ap.add_argument("--baseline-checkpoint", help="baseline checkpoint (default: shipped)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--smooth", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", type=Path, required=True, help="folder for inference_settings.csv")
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    raw = SegmentationConfig(checkpoint=args.checkpoint, baseline_checkpoint=args.baseline_checkpoint,
                             baseline_weight=0.0, smooth_mm=0.0)
    cases = load_eval_cases(args.data, split_patients(args.splits, args.fold, "val"))
    names = load_models(raw).diffusion_config.class_names
    split = "split" if ChannelRoles.of(names).can_split else "whole"
    raw = raw.replace(vertebrae=split)
    rows = []
    for case in cases:
        spacing = case.image.orientation.canonical_spacing
        preseg = run(case.image, raw.replace(t_start=0), stream_every=0).canonical_probabilities
        diffusion = run(case.image, raw, stream_every=0).canonical_probabilities
        region = case.in_range if case.in_range is not None else np.ones(case.truth.shape, bool)
        mid = case.truth.shape[0] // 2
        for w in args.weights:
            for s in args.smooth:
                labels = finalize_labels(blend_presegmentation(diffusion, preseg, w), spacing,
                                         raw.replace(smooth_mm=s), class_names=names)
                if case.vertebrae != "split":
                    labels = merge_vertebrae(labels)
                for c in case.classes:
                    rows.append({"case": case.name, "class": case.class_name(c), "baseline_weight": w,
                                 "smooth_mm": s, "dice": round(dice(labels == c, case.truth == c, region), 4),
                                 "dice_mid": round(dice(labels[mid] == c, case.truth[mid] == c, region[mid]), 4)})
        print(f"{case.name}: done", flush=True)
    write_csv(args.out / "inference_settings.csv", rows)
    print("| class | baseline_weight | smooth_mm | mean Dice | n |\n|---|---|---|---|---|")
    keys = sorted({(r["class"], r["baseline_weight"], r["smooth_mm"]) for r in rows})
    for cls, w, s in keys:
        v = [r["dice"] for r in rows if (r["class"], r["baseline_weight"], r["smooth_mm"]) == (cls, w, s)]
        print(f"| {cls} | {w} | {s} | {np.mean(v):.4f} | {len(v)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
