"""Qt-free QA helpers of the widget: structure/slice tables, overlay mask, live-stream colouring, trajectory slots."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_spinesegdiff._dock.qa import (
    CLASS_RGB,
    MAX_UNCERTAINTY,
    classes_from_probabilities,
    frame_slot,
    probability_rgb,
    slice_table,
    streamed_steps,
    structure_table,
    trajectory_frames,
    uncertain_mask,
    voxel_volume_ml,
)

NAMES = {1: "spinal canal", 2: "vertebrae", 3: "intervertebral disc"}


def _two_vertebrae_and_a_disc():
    labels = np.zeros((4, 40, 20), np.uint8)
    unc = np.zeros(labels.shape, np.float32)
    labels[1:3, 2:10, 5:15] = 2  # superior vertebra: 2 x 8 x 10 = 160 voxels
    labels[1:3, 14:16, 5:15] = 3  # disc: 40 voxels
    labels[0:4, 20:30, 5:15] = 2  # inferior vertebra: 4 x 10 x 10 = 400 voxels
    unc[1:3, 2:10, 5:15] = 0.05
    unc[1:3, 14:16, 5:15] = 0.30
    unc[0:4, 20:30, 5:15] = 0.10
    unc[0, 20, 5] = 0.35  # one very uncertain voxel in the inferior vertebra
    return labels, unc


def test_max_uncertainty_is_the_peak_of_minus_p_log_p():
    p = np.linspace(1e-6, 1, 100001)
    assert MAX_UNCERTAINTY == pytest.approx(float(np.max(-p * np.log(p))), abs=1e-8)
    assert MAX_UNCERTAINTY == pytest.approx(1 / math.e)


def test_structure_table_components_levels_volumes_and_order():
    labels, unc = _two_vertebrae_and_a_disc()
    rows = structure_table(labels, unc, (3.5, 0.5, 0.5), NAMES)
    assert [(r.class_name, r.level) for r in rows] == [("intervertebral disc", 1), ("vertebrae", 2), ("vertebrae", 1)]
    disc, low, high = rows
    assert (disc.voxels, low.voxels, high.voxels) == (40, 400, 160)
    assert high.volume_ml == pytest.approx(160 * 3.5 * 0.25 / 1000)
    assert disc.mean_uncertainty == pytest.approx(0.30)
    assert low.max_uncertainty == pytest.approx(0.35)
    assert low.mean_uncertainty == pytest.approx((399 * 0.10 + 0.35) / 400, rel=1e-5)
    assert high.centroid == pytest.approx((1.5, 5.5, 9.5))
    assert low.slices == (0, 3) and high.slices == (1, 2)
    assert low.slice_index in (1, 2) and high.slice_index in (1, 2)


def test_structure_table_restricted_to_segmented_slices_and_sequence_names():
    labels, unc = _two_vertebrae_and_a_disc()
    rows = structure_table(labels, unc, (1, 1, 1), ["canal", "bone", "disc"], slices=[0])
    assert len(rows) == 1 and rows[0].class_name == "bone" and rows[0].voxels == 100
    assert rows[0].slices == (0, 0)
    with pytest.raises(ValueError, match="one 3-D grid"):
        structure_table(labels, unc[:2], (1, 1, 1), NAMES)


def test_slice_table_means_over_labelled_voxels_sorted():
    labels, unc = _two_vertebrae_and_a_disc()
    rows = slice_table(labels, unc, slices=[0, 1, 3])
    assert sorted(r.index for r in rows) == [0, 1, 3] and rows[0].index == 0
    means = [r.mean_uncertainty for r in rows]
    assert means == sorted(means, reverse=True)
    by = {r.index: r for r in rows}
    assert by[1].labelled_voxels == 80 + 20 + 100
    assert by[1].mean_uncertainty == pytest.approx((80 * 0.05 + 20 * 0.30 + 100 * 0.10) / 200, rel=1e-5)
    assert by[0].max_uncertainty == pytest.approx(0.35)
    assert by[0].mean_uncertainty == pytest.approx((99 * 0.10 + 0.35) / 100, rel=1e-5)
    assert by[0].centroid == pytest.approx((24.5, 9.5))
    empty = slice_table(np.zeros((2, 4, 6), np.uint8), np.zeros((2, 4, 6), np.float32))
    assert [(r.mean_uncertainty, r.labelled_voxels, r.centroid) for r in empty] == [(0.0, 0, (1.5, 2.5))] * 2


def test_uncertain_mask_and_voxel_volume():
    unc = np.array([[[0.0, 0.1, 0.2, 0.3]]], np.float32)
    np.testing.assert_array_equal(uncertain_mask(unc, 0.15), [[[0, 0, 1, 1]]])
    assert uncertain_mask(unc, 0.15).dtype == np.uint8
    assert voxel_volume_ml((1.0, 3.5, 0.5, 0.5)) == pytest.approx(0.000875)


def test_classes_follow_the_pipeline_rule():
    p = np.zeros((1, 3, 1, 4), np.float32)
    p[0, :, 0, 0] = (0.2, 0.3, 0.4)  # nothing above 0.5 -> background
    p[0, :, 0, 1] = (0.9, 0.6, 0.1)  # canal wins among those above 0.5
    p[0, :, 0, 2] = (0.1, 0.7, 0.8)  # disc
    p[0, :, 0, 3] = (0.0, 0.51, 0.0)  # vertebra
    np.testing.assert_array_equal(classes_from_probabilities(p), [[[0, 1, 3, 2]]])

    # the same as "argmax among the channels above 0.5" everywhere, ties (first channel wins) and 0.5 included
    rng = np.random.default_rng(3)
    q = (np.round(rng.random((3, 4, 16, 16)) * 4) / 4).astype(np.float32)  # quarters: many ties, many 0.5
    above = q > 0.5
    want = np.where(above.any(axis=1), np.argmax(np.where(above, q, -1.0), axis=1) + 1, 0)
    got = classes_from_probabilities(q)
    assert got.dtype == np.uint8 and set(np.unique(got)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(got, want)


def test_probability_rgb_weights_class_colours():
    p = np.zeros((2, 3, 1, 3), np.float32)
    p[0, 0, 0, 0] = 1.0
    p[0, 2, 0, 1] = 0.5
    p[1, 1, 0, 2] = 1.0
    p[1, 0, 0, 2] = 1.0  # canal + vertebra: summed and clipped
    rgb = probability_rgb(p)
    assert rgb.shape == (2, 1, 3, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, 0, 0], CLASS_RGB[1])
    np.testing.assert_array_equal(rgb[0, 0, 1], [127, 55, 48])  # half of the disc colour (255, 111, 97)
    np.testing.assert_array_equal(rgb[0, 0, 2], [0, 0, 0])
    np.testing.assert_array_equal(rgb[1, 0, 2], np.minimum(np.add(CLASS_RGB[1], CLASS_RGB[2]), 255))


def test_streamed_steps_and_trajectory_slots():
    assert streamed_steps(4, 2) == [2, 4]
    assert streamed_steps(5, 2) == [2, 4, 5]
    assert streamed_steps(3, 1) == [1, 2, 3]
    assert streamed_steps(3, 0) == []
    # all streamed steps fit: one frame each
    assert [frame_slot(i, 3, 3) for i in range(3)] == [0, 1, 2]
    # 10 streamed steps into 4 frames: monotone, evenly spread, the last step in the last frame
    slots = [frame_slot(i, 10, 4) for i in range(10)]
    assert slots == sorted(slots) and slots[-1] == 3 and set(slots) == {0, 1, 2, 3}
    assert trajectory_frames(50, (10, 100, 100), 10 * 100 * 100 * 7 + 5) == 7
    assert trajectory_frames(3, (10, 100, 100), 10**9) == 3
    assert trajectory_frames(3, (10, 100, 100), 1) == 1


def test_live_view_colours_are_the_labels_layer_colours():
    from napari.utils.colormaps.standardize_color import transform_color

    from napari_spinesegdiff import CLASS_COLORS, CLASS_NAMES

    assert set(CLASS_RGB) == set(CLASS_NAMES) == {1, 2, 3, 4}
    for value, rgb in CLASS_RGB.items():
        np.testing.assert_allclose(np.array(rgb) / 255, transform_color(CLASS_COLORS[value])[0][:3], atol=0.5 / 255)
