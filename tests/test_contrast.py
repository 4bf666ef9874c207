"""The contrast suite (evaluation/contrast.py, contrast_suite.py): transforms are deterministic for a seed,
the inversion inverts the body and leaves the air, the geometry transforms keep the world, and
``spinesegdiff evaluate --contrast-suite`` writes its per-case CSV and report."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from napari_spinesegdiff.evaluation.contrast import (
    TRANSFORMS, _scaled, body_mask, thick_slices, transform_case)
from napari_spinesegdiff.evaluation.contrast_suite import middle_block
from napari_spinesegdiff.evaluation.evaluate import EvalCase
from napari_spinesegdiff.io.volume import Volume
from napari_spinesegdiff.phantom import make_phantom


@pytest.fixture(scope="module")
def case() -> EvalCase:
    """A phantom with 0.9 mm slices (as SPIDER's) inside a field of view with 30 mm of air in front and
    behind."""
    ph = make_phantom(seed=5, spacing=(0.9, 0.8, 0.8), fov_mm=(27.0, 200.0, 160.0))
    image = ph.image.canonical().astype(np.float32)
    truth = ph.labels.canonical().astype(np.uint8)
    rng = np.random.default_rng(0)
    pad = ((0, 0), (0, 0), (38, 38))
    air = np.abs(rng.normal(0.0, 0.01, np.pad(image, pad).shape)).astype(np.float32)
    image = np.pad(image, pad) + air
    affine = ph.image.orientation.canonical_affine
    volume = Volume(image, affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, -38], [0, 0, 0, 1.0]]))
    return EvalCase("phantom_air", "phantom", volume, np.pad(truth, pad), (1, 2, 3), None)


def _world(volume: Volume, index: np.ndarray) -> np.ndarray:
    aff = volume.orientation.canonical_affine
    return index @ aff[:3, :3].T + aff[:3, 3]


@pytest.mark.parametrize("name", [t for t in TRANSFORMS if t != "none"])
def test_transforms_are_deterministic_for_a_seed(case, name):
    a, pa = transform_case(case, name, seed=3)
    b, pb = transform_case(case, name, seed=3)
    np.testing.assert_array_equal(a.image.canonical(), b.image.canonical())
    np.testing.assert_array_equal(a.truth, b.truth)
    assert pa == pb
    if name in ("curve", "gamma", "bias", "noise"):  # the random ones draw from their own seeded stream
        c, _ = transform_case(case, name, seed=4)
        assert not np.array_equal(a.image.canonical(), c.image.canonical())
    other = dataclasses.replace(case, name="another")
    if name in ("curve", "noise"):  # and from a stream of their own per case
        assert not np.array_equal(a.image.canonical(), transform_case(other, name, seed=3)[0].image.canonical())


def test_the_body_mask_holds_the_spine_and_not_the_air(case):
    scan = case.image.canonical()
    mask = body_mask(scan, case.image.orientation.canonical_spacing)
    assert mask[case.truth > 0].all()
    assert mask[:, :, 38:-38].mean() > 0.9  # the phantom's own field (it has some air behind the back)
    assert not mask[:, :, :36].any() and not mask[:, :, -36:].any()  # the air added around it


def test_inversion_inverts_within_the_body_and_leaves_the_air(case):
    inverted, params = transform_case(case, "inverted")
    before, lo, hi = _scaled(case.image.canonical())
    after = (inverted.image.canonical() - lo) / (hi - lo)
    mask = body_mask(case.image.canonical(), case.image.orientation.canonical_spacing)
    np.testing.assert_allclose(after[mask], 1.0 - before[mask], atol=1e-5)
    np.testing.assert_allclose(after[~mask], before[~mask], atol=1e-5)
    # the canal, bright on this T2-weighted phantom, is now darker than the vertebrae
    canal, vert = (after[case.truth == c].mean() for c in (1, 2))
    assert before[case.truth == 1].mean() > before[case.truth == 2].mean() and canal < vert
    np.testing.assert_array_equal(inverted.truth, case.truth)
    assert "body" in params


def test_thick_slices_average_3_6_mm_and_keep_the_world(case):
    thick, params = transform_case(case, "thick")
    spacing = thick.image.orientation.canonical_spacing
    assert spacing == pytest.approx((3.6, 0.8, 0.8))
    n = case.truth.shape[0]
    centres = np.arange(thick.truth.shape[0])
    # the middle thick slice sits on the middle old slice, in world coordinates
    mid_new = _world(thick.image, np.array([[thick.truth.shape[0] // 2, 10.0, 20.0]]))
    mid_old = _world(case.image, np.array([[n // 2, 10.0, 20.0]]))
    np.testing.assert_allclose(mid_new, mid_old, atol=1e-6)
    # each new slice is the box mean of the old ones over 3.6 mm: four slices, the two ends half
    data, old_centres, weights = thick_slices(case.image.canonical(), 0.9)
    np.testing.assert_allclose(weights[len(centres) // 2][n // 2 - 2:n // 2 + 3], [0.125, 0.25, 0.25, 0.25, 0.125])
    np.testing.assert_allclose(thick.image.canonical(), data)
    np.testing.assert_array_equal(thick.truth, case.truth[np.rint(old_centres).astype(int)])
    # every class's centre of mass stays where it was (mm, world)
    for c in (1, 2, 3):
        old = _world(case.image, np.argwhere(case.truth == c).astype(float)).mean(axis=0)
        new = _world(thick.image, np.argwhere(thick.truth == c).astype(float)).mean(axis=0)
        np.testing.assert_allclose(new, old, atol=1.0)
    assert "3.6 mm" in params


def test_coarse_pixels_are_1_2_mm_and_keep_the_world(case):
    coarse, _ = transform_case(case, "coarse")
    spacing = coarse.image.orientation.canonical_spacing
    assert spacing[0] == pytest.approx(0.9) and spacing[1:] == pytest.approx((1.2, 1.2), abs=0.01)
    assert coarse.image.canonical().shape == coarse.truth.shape
    for c in (1, 2, 3):
        old = _world(case.image, np.argwhere(case.truth == c).astype(float)).mean(axis=0)
        new = _world(coarse.image, np.argwhere(coarse.truth == c).astype(float)).mean(axis=0)
        np.testing.assert_allclose(new, old, atol=0.6)
        area_old = (case.truth == c).sum() * 0.8 * 0.8
        area_new = (coarse.truth == c).sum() * spacing[1] * spacing[2]
        assert area_new == pytest.approx(area_old, rel=0.03)


def test_middle_block_segments_and_scores_the_middle_only(case):
    block, slices = middle_block(case, 8.0)
    n = case.truth.shape[0]
    assert slices == f"{n // 2 - 4}:{n // 2 + 5}"
    assert not block.truth[: n // 2 - 4].any() and not block.truth[n // 2 + 5:].any()
    np.testing.assert_array_equal(block.truth[n // 2 - 4:n // 2 + 5], case.truth[n // 2 - 4:n // 2 + 5])
    assert middle_block(case, None) == (case, "all")


def test_cli_contrast_suite_on_a_phantom(tmp_path):
    from napari_spinesegdiff.cli import main

    out = tmp_path / "suite"
    code = main(["evaluate", "--data", "phantom:1:100", "--contrast-suite", "--transforms", "none,inverted",
                 "--methods", "presegmentation", "--middle-mm", "8", "--threads", "1", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "contrast_per_case.csv")))
    assert [(r["transform"], r["class"]) for r in rows] == [
        (t, c) for t in ("none", "inverted") for c in ("spinal canal", "vertebra", "intervertebral disc")]
    none = np.mean([float(r["dice"]) for r in rows if r["transform"] == "none"])
    inverted = np.mean([float(r["dice"]) for r in rows if r["transform"] == "inverted"])
    assert none > 0.95 and inverted < none - 0.2  # a T2-type presegmenter fails on fluid-dark images
    report = (out / "contrast.md").read_text()
    assert "| inverted |" in report and "middle 8 mm" in report
    assert main(["evaluate", "--data", "phantom:1:100", "--contrast-suite", "--transforms", "sepia",
                 "--out", str(out)]) == 2
