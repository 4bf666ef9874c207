"""The spine column (column.py): pieces far from the chain of vertebrae, discs and canal are dropped in 3-D,
pieces beside it or aligned with it are kept, and the pipeline applies it (``column_margin_mm``)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spinesegdiff.column import column_pieces, drop_strays, farthest_structure_mm
from napari_spinesegdiff.config import SegmentationConfig

SPACING = (2.0, 1.0, 1.0)  # canonical: left-right slices, rows superior-inferior, columns anterior-posterior


def _chain(shape=(20, 200, 160), lordosis_mm: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """A constructed column: vertebrae (2) and discs (3) alternating down the rows, a canal (1) behind them,
    the whole chain curved forward by ``lordosis_mm`` at its middle; returns labels and the AP centre of the
    bodies per row."""
    labels = np.zeros(shape, np.uint8)
    rows = np.arange(shape[1])
    centre = 60.0 + lordosis_mm * np.sin(np.pi * (rows - 20) / 160.0).clip(0)
    for r in range(20, 180):
        c = int(round(centre[r]))
        kind = 2 if (r - 20) % 30 < 22 else 3
        labels[6:14, r, c - 15:c + 15] = kind
        labels[8:12, r, c + 15:c + 27] = 1
    return labels, centre


def test_a_blob_in_a_corner_is_dropped_and_the_column_kept():
    labels, _ = _chain()
    blob = labels.copy()
    blob[0:4, 2:12, 140:155] = 3  # a disc drawn in the posterior-superior corner, off the midline
    found = column_pieces(blob, SPACING)
    assert found.distance_mm.size == 2
    assert found.distance_mm.min() == 0.0 and found.distance_mm.max() > 40.0
    dropped = drop_strays(blob, SPACING, 20.0)
    assert dropped == 4 * 10 * 15
    np.testing.assert_array_equal(blob, labels)


def test_distances_in_mm_to_the_chain_and_along_the_curve():
    """A straight chain: the curve runs through its centroids; a cube level with the chain is as far as its
    nearest voxel is from the chain's (3-D, mm); a cube 80 mm below the chain's end but on its line is as far
    as it is from the curve in plane, not 80 mm."""
    labels, _ = _chain(shape=(20, 300, 160), lordosis_mm=0.0)
    found = column_pieces(labels, SPACING)
    lr, ap = found.curve.at(np.array([50.0, 100.0, 150.0]))
    body, canal = 8 * 30, 4 * 12  # per row: bodies 8 slices x 30 columns from 45, canal 4 x 12 from 75
    expect = (body * 59.5 + canal * 80.5) / (body + canal)
    np.testing.assert_allclose(ap, expect, atol=0.5)
    np.testing.assert_allclose(lr, 9.5 * SPACING[0], atol=0.5)
    level = labels.copy()
    level[9:11, 95:105, 120:125] = 3  # canal's last column is 86: 34 columns = 34 mm behind it
    assert farthest_structure_mm(level, SPACING) == pytest.approx(34.0, abs=1e-6)
    below = labels.copy()
    below[8:12, 260:270, 58:62] = 2  # rows 260-269: 81 mm below the chain's last row (179), on its line
    end_lr, end_ap = found.curve.at(np.array([400.0]))  # beyond the end: the end point
    np.testing.assert_allclose([end_lr[0], end_ap[0]], [19.0, expect], atol=0.5)
    nearest = min(np.hypot(x - end_lr[0], 61.0 - end_ap[0]) for x in (16.0, 18.0, 20.0, 22.0))
    assert farthest_structure_mm(below, SPACING) == pytest.approx(nearest, abs=1e-6)
    assert nearest < 3.0
    assert drop_strays(below, SPACING, 20.0) == 0


def test_pieces_beside_or_aligned_with_the_chain_are_kept():
    labels, centre = _chain()
    near = labels.copy()
    c = int(round(centre[100]))
    near[8:12, 95:105, c + 30:c + 50] = 2  # a posterior arch 3 mm behind the canal, not touching it
    near[6:14, 185:197, int(round(centre[185])) - 15:int(round(centre[185])) + 15] = 2  # a level below a gap
    keep = near.copy()
    assert drop_strays(near, SPACING, 20.0) == 0
    np.testing.assert_array_equal(near, keep)
    assert farthest_structure_mm(keep, SPACING) < 10.0


def test_a_large_stray_does_not_pull_the_column_to_itself():
    """A stray a third the chain's size (a candidate for the column by size) far anterior is dropped: the
    curve is refitted with robust weights and the chain stays the column."""
    labels, _ = _chain(shape=(20, 200, 300))
    n_chain = int((labels > 0).sum())
    stray = labels.copy()
    stray[0:20, 60:140, 200:215] = 3  # 20 x 80 x 15 = 24,000 voxels, about a third of the chain
    assert (stray == 3).sum() - (labels == 3).sum() > 0.25 * n_chain
    found = column_pieces(stray, SPACING)
    assert sorted(found.distance_mm.round(1))[0] == 0.0 and found.distance_mm.max() > 100.0
    drop_strays(stray, SPACING, 20.0)
    np.testing.assert_array_equal(stray, labels)


def test_off_and_empty():
    labels, _ = _chain()
    blob = labels.copy()
    blob[0:4, 2:12, 140:155] = 3
    assert drop_strays(blob, SPACING, 0.0) == 0 and (blob != labels).sum() == 4 * 10 * 15
    assert drop_strays(np.zeros((3, 4, 5), np.uint8), SPACING, 20.0) == 0
    assert np.isnan(farthest_structure_mm(np.zeros((3, 4, 5), np.uint8), SPACING))
    with pytest.raises(ValueError, match="column_margin_mm"):
        SegmentationConfig(column_margin_mm=-1.0)


def test_finalize_labels_drops_a_stray_from_the_probabilities():
    """The pipeline's last stage: a disc probability in a corner of a phantom's channels comes out as a disc
    with ``column_margin_mm`` 0 and not at all with the default."""
    from napari_spinesegdiff.phantom import make_phantom
    from napari_spinesegdiff.pipeline import finalize_labels

    ph = make_phantom(seed=3)
    truth = ph.labels.canonical().astype(np.uint8)
    spacing = ph.image.orientation.canonical_spacing
    probs = np.stack([(truth == c).astype(np.float32) for c in (1, 2, 3)])
    probs[2, 3:6, 5:30, 5:30] = 1.0  # a disc in the superior-anterior corner, 15 mm square, three slices
    off = finalize_labels(probs.copy(), spacing, SegmentationConfig(column_margin_mm=0.0, smooth_mm=0.0))
    on = finalize_labels(probs.copy(), spacing, SegmentationConfig(smooth_mm=0.0))
    assert (off[3:6, 5:30, 5:30] == 3).all()
    assert not on[:, :40, :40].any()
    np.testing.assert_array_equal(on[:, 40:], off[:, 40:])


def test_a_real_scan_with_a_disc_pasted_into_a_corner(shared_file):
    """SPIDER_041 (a validation slab) with a patch holding its lowest disc pasted into the superior-anterior
    corner: the presegmenter draws structures there (so the test can fail); with the default margin the
    corner is empty and the middle slice's Dice stays that of the scan without the patch."""
    from scipy import ndimage

    from napari_spinesegdiff.evaluation.metrics import dice
    from napari_spinesegdiff.io.labels import to_classes
    from napari_spinesegdiff.io.readers import read_pair
    from napari_spinesegdiff.pipeline import run

    name = "spider_t2space/SPIDER_041_t2SPACE"
    image, lab = read_pair(shared_file(f"{name}_image.nii.gz"), shared_file(f"{name}_label.nii.gz"))
    scan = image.canonical().astype(np.float32)
    truth = to_classes(lab.canonical(), scheme="auto")
    mid = scan.shape[0] // 2
    comp, n = ndimage.label(truth[mid] == 3)
    rows, cols = ndimage.find_objects(comp)[n - 1]
    patch = scan[:, rows.start - 25:rows.stop + 25, cols.start - 15:cols.stop + 15]
    h, w = patch.shape[1:]
    pasted = scan.copy()
    pasted[:, 5:5 + h, 5:5 + w] = patch
    cfg = SegmentationConfig(t_start=0, slices=f"{mid - 2}:{mid + 3}")
    plain = run(image.with_canonical(scan), cfg, stream_every=0).canonical_labels
    off = run(image.with_canonical(pasted), cfg.replace(column_margin_mm=0.0), stream_every=0).canonical_labels
    on = run(image.with_canonical(pasted), cfg, stream_every=0).canonical_labels
    corner = (slice(None), slice(0, h + 10), slice(0, w + 10))
    assert (off[corner] > 0).sum() > 1000
    assert not on[corner].any()
    for c in (1, 2, 3):
        assert dice(on[mid] == c, truth[mid] == c) == pytest.approx(dice(plain[mid] == c, truth[mid] == c), abs=0.005)
