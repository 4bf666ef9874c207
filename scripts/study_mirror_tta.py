"""Study (not a product feature): the evaluation with the 2.5-D presegmenter also run on the scan mirrored
left to right (its neighbouring slices swapped) and the two probabilities averaged.

    .venv/bin/python scripts/study_mirror_tta.py evaluate --data slabs:../shared/data/spider_t2space \
        --data lumbar:../shared/data/lumbar --splits src/napari_spinesegdiff/weights/splits_v4.json \
        --fold 0 --subset val --methods default --threads 2 --out /tmp/val_mirror_tta

It runs ``spinesegdiff`` in this process with ``pipeline.load_models`` wrapped, so every command line option
works as usual.  Result for v4.11 on validation: docs/evaluation/v4.11_mirror_tta_validation (not adopted).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

import napari_spinesegdiff.pipeline as pipeline
from napari_spinesegdiff.cli import main

_load_models = pipeline.load_models


def _mirrored(baseline):
    def both(x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(baseline(x).float())
        b = torch.sigmoid(baseline(torch.flip(x, dims=[1])).float())  # channels: the neighbours swapped
        p = (0.5 * (a + b)).clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)  # back to logits: the pipeline applies the sigmoid

    both.mirrored = True
    return both


def load_models(config):
    models = _load_models(config)
    if models.baseline is None or getattr(models.baseline, "mirrored", False):
        return models
    return dataclasses.replace(models, baseline=_mirrored(models.baseline))


if __name__ == "__main__":
    pipeline.load_models = load_models
    sys.exit(main(sys.argv[1:]))
