"""A presegmenter on its own, finer grid than the diffusion model's: it runs at its checkpoint's spacing and
its detail reaches the written probabilities (blended on the scan grid, not on the diffusion model's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.model.checkpoint import load_checkpoint, save_checkpoint
from napari_spinesegdiff.phantom import make_phantom
from napari_spinesegdiff.pipeline import SHIPPED_BASELINE, run
from napari_spinesegdiff.preprocess import context_stack, normalize_intensity


@pytest.fixture(scope="module")
def fine_baseline(tmp_path_factory):
    """The shipped presegmenter's weights, declared to work at 0.5 mm (the scan's own in-plane spacing)."""
    net, meta = load_checkpoint(SHIPPED_BASELINE)
    path = tmp_path_factory.mktemp("grid") / "fine.safetensors"
    return save_checkpoint(path, net, meta.replace(spacing_mm=[0.5, 0.5])), net.eval(), meta


@pytest.fixture(scope="module")
def scan():
    return make_phantom(seed=6, contrast="T2w", spacing=(3.0, 0.5, 0.5)).image


def test_a_finer_presegmenter_runs_at_its_own_spacing(fine_baseline, scan):
    path, net, meta = fine_baseline
    cfg = SegmentationConfig(t_start=0, slices="4:7", engine="torch", smooth_mm=0.0, baseline_checkpoint=str(path))
    got = run(scan, cfg).canonical_probabilities
    # at 0.5 mm the presegmenter's grid is the scan's own: no resampling between its output and the result
    image = normalize_intensity(scan.canonical(), meta.intensity)
    spacing = scan.orientation.canonical_spacing
    stack = context_stack(image, [4, 5, 6], net.config.in_channels, float(spacing[0]), float(meta.context_mm))
    with torch.inference_mode():
        want = torch.sigmoid(net(torch.from_numpy(stack))).numpy()
    np.testing.assert_allclose(got[:, 4:7], np.moveaxis(want, 0, 1), atol=1e-4)
    coarse = run(scan, cfg.replace(baseline_checkpoint=None)).canonical_probabilities  # the same net at 1 mm
    assert np.abs(coarse[:, 4:7] - got[:, 4:7]).max() > 0.2  # the grids really differ, so the test can fail


def test_the_blend_with_a_finer_presegmenter_is_made_on_the_scan_grid(fine_baseline, scan):
    path = fine_baseline[0]
    cfg = SegmentationConfig(steps=2, ensemble=2, slices="5:7", engine="torch", smooth_mm=0.0,
                             baseline_checkpoint=str(path))
    preseg = run(scan, cfg.replace(t_start=0)).canonical_probabilities
    only_pre = run(scan, cfg.replace(baseline_weight=1.0)).canonical_probabilities
    only_diff = run(scan, cfg.replace(baseline_weight=0.0)).canonical_probabilities
    half = run(scan, cfg.replace(baseline_weight=0.5)).canonical_probabilities
    np.testing.assert_allclose(only_pre, preseg, atol=1e-5)  # weight 1: the fine presegmentation, unblurred
    np.testing.assert_allclose(half, 0.5 * only_diff + 0.5 * only_pre, atol=1e-5)
    assert np.abs(only_diff - only_pre)[:, 5:7].max() > 0.2  # the denoiser ran and changed the mask


def test_outside_the_refined_box_the_fine_presegmentation_stands(fine_baseline, scan):
    """The denoiser refines only the box around the prior's column; beyond it the written probabilities are
    the fine presegmentation itself, not blended with its 1 mm resampling (as on one grid)."""
    cfg = SegmentationConfig(steps=2, ensemble=2, slices="5:7", engine="torch", smooth_mm=0.0,
                             baseline_checkpoint=str(fine_baseline[0]), roi_margin_mm=0.0)
    preseg = run(scan, cfg.replace(t_start=0)).canonical_probabilities[:, 5:7]
    half = run(scan, cfg.replace(baseline_weight=0.5)).canonical_probabilities[:, 5:7]
    changed = np.abs(half - preseg).max(axis=(0, 1)) > 1e-6  # (rows, cols) where the blend moved anything
    cols = np.flatnonzero(changed.any(axis=0))
    assert changed.any() and 60 < cols[0] and cols[-1] < 280  # the spine's box (about 93-222 of 360) only
    np.testing.assert_allclose(half[..., :60], preseg[..., :60], atol=1e-6)
    np.testing.assert_allclose(half[..., 280:], preseg[..., 280:], atol=1e-6)
