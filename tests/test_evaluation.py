"""Evaluation metrics and per-case scoring on predictions whose scores are known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spinesegdiff.evaluation.evaluate import EvalCase, _row_range_mask, score_case
from napari_spinesegdiff.evaluation.metrics import auroc, dice, dice_per_class, hd95, reliability
from napari_spinesegdiff.io.volume import Volume


def test_dice_by_hand():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 voxels
    b[1:3] = True  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0
    mask = np.zeros_like(a)
    mask[1] = True
    assert dice(a, b, mask) == 1.0


def test_dice_per_class_by_hand():
    truth = np.array([[1, 1, 2, 2, 3, 0]])
    pred = np.array([[1, 0, 2, 2, 3, 3]])
    assert dice_per_class(pred, truth, 3) == pytest.approx([2 / 3, 1.0, 2 / 3])


def test_auroc_by_hand():
    assert auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    # one inversion out of four positive-negative pairs
    assert auroc(np.array([0.1, 0.6, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([0, 0])))


def test_hd95_of_a_shifted_cube_is_the_shift_in_mm():
    a = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b = np.roll(a, 2, axis=0)
    assert hd95(a, b, (1.5, 1.0, 1.0)) == pytest.approx(3.0, abs=1e-6)


def test_reliability_bins():
    p = np.array([0.05, 0.05, 0.95, 0.95])
    y = np.array([0, 1, 1, 1])
    mp, fr, cnt = reliability(p, y, bins=10)
    assert cnt[0] == 2 and cnt[9] == 2
    assert fr[0] == pytest.approx(0.5) and fr[9] == pytest.approx(1.0)


def test_score_case_with_partial_labels_counts_only_the_labelled_range():
    truth = np.zeros((2, 10, 10), np.uint8)
    truth[:, 3:6, 2:8] = 3  # a disc in rows 3..5
    pred = truth.copy()
    pred[:, 3, 2:8] = 0  # misses one of three rows: Dice 2*24/(24+36) = 0.8
    pred[:, 8:, :] = 3  # a disc below the labelled range (an unlabelled level): ignored in range
    unc = (pred != truth).astype(np.float32)  # uncertainty exactly where wrong
    case = EvalCase("c", "IVD", Volume(np.zeros((2, 10, 10), np.float32), np.eye(4)), truth, (3,),
                    _row_range_mask(truth))
    (row,) = score_case(case, pred, unc)
    assert row["dice"] == pytest.approx(0.8)
    assert row["dice_whole"] < row["dice"]
    assert row["uncertainty_auroc"] == 1.0


def test_degenerated_disc_mask_marks_exactly_the_degenerated_levels():
    from scipy import ndimage

    from napari_spinesegdiff.evaluation.evaluate import degenerated_disc_mask
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(seed=3, degenerated=["L4/L5"])
    truth = ph.labels.canonical()
    mask = degenerated_disc_mask(ph, truth)
    assert ndimage.label(mask)[1] == 1
    lev = ph.level("L4/L5")
    assert mask[truth.shape[0] // 2, int(round(lev.row)), int(round(lev.column))]
    assert not mask[truth.shape[0] // 2, int(round(ph.level("L2/L3").row)), int(round(ph.level("L2/L3").column))]


def test_split_patients_picks_the_subset_and_refuses_missing_folds(tmp_path):
    import json

    from napari_spinesegdiff.evaluation.evaluate import split_patients

    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["A"], "val": ["B", "C"], "test": ["D"]}]))
    assert split_patients(path, 0) == {"D"}
    assert split_patients(path, 0, "val") == {"B", "C"}
    with pytest.raises(ValueError, match="fold 1 does not exist"):
        split_patients(path, 1)
    with pytest.raises(ValueError, match="subset"):
        split_patients(path, 0, "train")


def test_band_auroc_leaves_out_far_background_with_a_known_answer():
    """Truth a square, prediction the square shifted by two columns: the errors are two strips. The
    uncertainty is 1 on the errors and also on a patch of correct background far away: over whole slices
    that patch costs AUROC, in the 5-voxel band around truth and prediction it is not counted (AUROC 1);
    the class row uses that class's own channel."""
    from napari_spinesegdiff.evaluation.metrics import band_mask

    truth = np.zeros((1, 60, 60), np.uint8)
    truth[0, 10:30, 10:30] = 3
    pred = np.zeros_like(truth)
    pred[0, 10:30, 12:32] = 3
    errors = pred != truth
    unc = errors.astype(np.float32)
    unc[0, 50:58, 50:58] = 1.0  # far from both: correct, but flagged
    case = EvalCase("c", "spider", Volume(np.zeros((1, 60, 60), np.float32), np.eye(4)), truth, (3,), None)
    class_unc = np.stack([np.zeros_like(unc), np.zeros_like(unc), unc])  # the disc's own channel
    (row,) = score_case(case, pred, unc, class_unc, ["spinal canal", "vertebrae", "intervertebral disc"])
    n_err, n_far = int(errors.sum()), 64
    band = band_mask(pred > 0, truth > 0, 5)
    assert band.sum() == 30 * 32  # rows 5..34, columns 5..36
    assert not band[0, 50:58, 50:58].any()
    n_ok = int(truth.any(axis=0).size - errors.sum())  # correct voxels over the whole slice
    expected_slice = 1 - 0.5 * n_far / n_ok  # ties with the errors count one half
    assert row["uncertainty_auroc"] == pytest.approx(expected_slice, abs=1e-4)  # rounded to 4 places
    assert row["band_auroc"] == 1.0 and row["band_auroc_class"] == 1.0
    assert n_err == 80
    # an uninformative map scores one half in the band
    (flat,) = score_case(case, pred, np.ones_like(unc), class_unc * 0, ["spinal canal", "vertebrae",
                                                                        "intervertebral disc"])
    assert flat["band_auroc"] == 0.5 and flat["band_auroc_class"] == 0.5


def test_band_auroc_of_the_labelled_structures_leaves_out_an_unlabelled_neighbour():
    """Only the disc is labelled (a partially labelled scan).  The map a user sees is 1 on the disc's errors and
    on a strip of the canal's boundary next to it, inside the band; nobody labelled the canal, so those voxels
    count as correct: the overall band AUROC drops below 1 by the known share of the strip, while the map of
    the labelled structure's own channel (the disc's) finds exactly its errors."""
    from napari_spinesegdiff.evaluation.metrics import band_mask

    names = ["spinal canal", "vertebrae", "intervertebral disc"]
    truth = np.zeros((1, 60, 60), np.uint8)
    truth[0, 10:30, 10:30] = 3
    pred = np.zeros_like(truth)
    pred[0, 10:30, 12:32] = 3
    errors = pred != truth
    canal_rim = np.zeros_like(errors)
    canal_rim[0, 10:30, 34:36] = True  # background in truth and prediction, 2-3 voxels from the disc
    class_unc = np.stack([canal_rim, np.zeros_like(errors), errors]).astype(np.float32)
    shown = class_unc.max(axis=0)
    case = EvalCase("c", "lumbar", Volume(np.zeros((1, 60, 60), np.float32), np.eye(4)), truth, (3,), None)
    (row,) = score_case(case, pred, shown, class_unc, names)
    band = band_mask(pred > 0, truth > 0, 5)
    assert band[canal_rim].all()
    n_err, n_rim = int(errors[band].sum()), int(canal_rim.sum())
    n_ok = int(band.sum()) - n_err
    assert row["band_auroc"] == pytest.approx(1 - 0.5 * n_rim / n_ok, abs=1e-4)  # ties with the errors: 1/2
    assert row["band_auroc"] < 0.99
    assert row["band_auroc_labelled"] == 1.0 and row["band_auroc_class"] == 1.0


def test_a_class_is_scored_with_its_written_label_map_where_given():
    """A whole vertebra whose body channel doubts the body's border inside it: scored by the channels it is
    charged for that border (AUROC below 1), scored by its written label's map (which has no such border) it
    finds exactly its errors."""
    names = ["spinal canal", "vertebral body", "intervertebral disc", "vertebra"]
    truth = np.zeros((1, 60, 60), np.uint8)
    truth[0, 10:30, 10:30] = 2
    pred = np.zeros_like(truth)
    pred[0, 10:30, 12:32] = 2
    errors = (pred != truth).astype(np.float32)
    inner = np.zeros_like(errors)
    inner[0, 10:30, 20:22] = 1.0  # the body's border with the posterior elements, inside the vertebra
    class_unc = np.stack([np.zeros_like(errors), inner, np.zeros_like(errors), errors])
    case = EvalCase("c", "spider", Volume(np.zeros((1, 60, 60), np.float32), np.eye(4)), truth, (2,), None)
    (by_channels,) = score_case(case, pred, errors, class_unc, names)
    (by_label,) = score_case(case, pred, errors, class_unc, names, label_maps={2: errors})
    assert by_channels["band_auroc_class"] < 0.99 and by_channels["band_auroc_labelled"] < 0.99
    assert by_label["band_auroc_class"] == 1.0 and by_label["band_auroc_labelled"] == 1.0
    assert by_label["band_auroc"] == by_channels["band_auroc"] == 1.0  # the map a user sees is unchanged


def test_label_channels_and_probabilities_of_four_and_three_channel_models():
    from napari_spinesegdiff.labelscheme import (CHANNELS, CHANNELS_V3, label_channels, label_probability,
                                                 labels_to_channels, merge_vertebrae)

    assert label_channels(2, CHANNELS, "whole") == [1, 3]
    assert label_channels(2, CHANNELS, "split") == [1] and label_channels(4, CHANNELS, "split") == [3]
    assert label_channels(2, CHANNELS_V3) == [1] and label_channels(4, CHANNELS_V3, "split") == []
    p = np.array([0.1, 0.3, 0.2, 0.9])[:, None]
    assert label_probability(p, CHANNELS, 2, "whole")[0] == pytest.approx(0.9)
    assert label_probability(p, CHANNELS, 4, "split")[0] == pytest.approx(0.7)  # whole and not body
    split = np.array([0, 1, 2, 3, 4])
    assert merge_vertebrae(split).tolist() == [0, 1, 2, 3, 2]
    ch = labels_to_channels(split, CHANNELS)
    assert ch[:, 2].tolist() == [0, 1, 0, 1]  # label 2 (body): body and whole vertebra
    assert ch[:, 4].tolist() == [0, 0, 0, 1]  # label 4 (posterior elements): whole vertebra only


def test_method_results_equal_runs_with_each_methods_settings():
    """The evaluation derives the default (blend) from the presegmentation and diffusion runs: its labels
    must be what a run with the default settings writes, and likewise for the other two methods."""
    from napari_spinesegdiff.config import SegmentationConfig
    from napari_spinesegdiff.evaluation.evaluate import _method_results, method_configs
    from napari_spinesegdiff.phantom import make_phantom
    from napari_spinesegdiff.pipeline import load_models, run

    ph = make_phantom(seed=12)
    cfg = SegmentationConfig(steps=2, ensemble=2, slices="4:8", batch_slices=4)
    names = load_models(cfg).diffusion_config.class_names
    case = EvalCase("p", "phantom", ph.image, ph.truth().canonical(), (1, 2, 3), None)
    derived = _method_results(case, cfg, ["presegmentation", "diffusion", "default"], run, names)
    for method, direct_cfg in method_configs(cfg).items():
        direct = run(ph.image, direct_cfg, stream_every=0)
        labels = derived[method][0].canonical_labels
        agree = float((labels == direct.canonical_labels).mean())
        assert agree > 0.9999, (method, agree)
        assert labels[4:8].any() and not labels[:4].any()
    assert not np.array_equal(derived["presegmentation"][2], derived["diffusion"][2])
    for method, (res, _, _, maps) in derived.items():  # the scored per-label maps are the shown map's parts
        assert set(maps) == {1, 2, 3}
        np.testing.assert_array_equal(np.max(list(maps.values()), axis=0), res.canonical_uncertainty)
