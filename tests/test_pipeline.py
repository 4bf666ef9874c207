"""Whole-scan pipeline: geometry, Dice with the shipped model, streaming, cancelling, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.evaluation.metrics import dice_per_class
from napari_spinesegdiff.io.volume import Volume
from napari_spinesegdiff.phantom import make_phantom
from napari_spinesegdiff.pipeline import Progress, SegmentationError, StepUpdate, run, segment

#: Mean Dice (canal, vertebrae, disc) the shipped model reaches on a phantom with the fast test settings.
PHANTOM_DICE_FLOOR = 0.90
FAST = SegmentationConfig(steps=3, ensemble=2, t_start=300, slices="4:9", batch_slices=5)


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(seed=21, contrast="T2w", random_orientation=True)


@pytest.fixture(scope="module")
def result(phantom):
    events = []
    res = run(phantom.image, FAST, callback=events.append)
    return res, events


def test_output_geometry_equals_the_input(phantom, result):
    res, _ = result
    for vol in [res.labels, res.uncertainty, *res.probabilities]:
        assert vol.shape == phantom.image.shape
        np.testing.assert_allclose(vol.affine, phantom.image.affine, atol=1e-9)
    assert res.labels.data.dtype == np.uint8
    assert np.array_equal(res.labels.canonical(), res.canonical_labels)


def test_shipped_model_segments_the_phantom(phantom, result):
    res, _ = result
    truth = phantom.truth().canonical()  # written scheme: 2 = the whole vertebra
    sl = slice(4, 9)
    scores = dice_per_class(res.canonical_labels[sl], truth[sl], 3)
    print("phantom Dice canal, vertebrae, disc:", [round(s, 4) for s in scores])
    assert np.mean(scores) >= PHANTOM_DICE_FLOOR
    # slices outside the selection are untouched
    assert not res.canonical_labels[:4].any() and not res.canonical_labels[9:].any()
    assert res.slices == (4, 5, 6, 7, 8)
    from scipy import ndimage

    assert ndimage.label(res.canonical_labels == 1)[1] == 1  # the canal is kept as one 3-D tube


def test_uncertainty_is_high_where_the_model_is_wrong(phantom, result):
    from napari_spinesegdiff.evaluation.metrics import auroc

    res, _ = result
    truth = phantom.truth().canonical()[4:9]
    wrong = res.canonical_labels[4:9] != truth
    u = res.canonical_uncertainty[4:9]
    assert 0 <= u.min() and u.max() <= 1 / np.e + 1e-6
    assert auroc(u, wrong) > 0.8


def test_streams_one_update_per_step_and_progress(result):
    _, events = result
    steps = [e for e in events if isinstance(e, StepUpdate)]
    assert [e.step for e in steps] == [0, 1, 2, 3]  # 0: the presegmentation the denoising starts from
    assert steps[0].probabilities.shape[:2] == (5, 4)  # the shipped model's four channels
    assert steps[0].t == FAST.t_start and steps[1].t < FAST.t_start
    assert steps[0].uncertainty.shape == steps[0].probabilities.shape[:1] + steps[0].probabilities.shape[2:]
    prog = [e for e in events if isinstance(e, Progress)]
    assert prog[-1].done == prog[-1].total


def test_closing_the_generator_stops_work(phantom):
    gen = segment(phantom.image, FAST.replace(steps=5))
    seen = 0
    for ev in gen:
        if isinstance(ev, StepUpdate) and ev.step > 0:
            seen += 1
            if seen == 2:
                break
    gen.close()
    with pytest.raises(StopIteration):
        next(gen)
    assert seen == 2


def test_same_seed_same_result(phantom):
    cfg = FAST.replace(slices="6", steps=2)
    a, b = run(phantom.image, cfg), run(phantom.image, cfg)
    assert np.array_equal(a.canonical_labels, b.canonical_labels)
    assert np.array_equal(a.canonical_uncertainty, b.canonical_uncertainty)


def test_t_start_zero_with_a_labels_prior_returns_the_prior():
    # at the model's own spacing (1 mm) no resampling happens, so the prior must come back exactly
    ph = make_phantom(seed=4, spacing=(3.5, 1.0, 1.0))
    truth = ph.labels.canonical()
    res = run(ph.image, FAST.replace(prior="labels", t_start=0, slices="5:7", min_component_mm2=0.0),
              prior_labels=truth, stream_every=0)
    assert np.array_equal(res.canonical_labels[5:7], truth[5:7])


def test_class_count_mismatch_is_refused_before_running(phantom):
    with pytest.raises(SegmentationError, match="5 classes but the checkpoint has 4"):
        run(phantom.image, FAST.replace(num_classes=5))


def test_nan_scan_is_refused(phantom):
    data = phantom.image.data.astype(np.float32).copy()
    data[0, 0, 0] = np.nan
    with pytest.raises(SegmentationError, match="NaN"):
        run(phantom.image.with_data(data), FAST)


def test_labels_volume_is_refused(phantom):
    with pytest.raises(SegmentationError, match="labels volume"):
        run(phantom.labels, FAST)


def test_missing_checkpoint_is_refused(phantom, tmp_path):
    with pytest.raises(SegmentationError, match="does not exist"):
        run(phantom.image, FAST.replace(checkpoint=str(tmp_path / "nope.safetensors")))


def test_prior_of_the_wrong_shape_is_refused(phantom):
    with pytest.raises(SegmentationError, match="prior labels have shape"):
        run(phantom.image, FAST.replace(prior="labels"), prior_labels=np.zeros((3, 4, 5), np.uint8))


def test_two_d_volume_cannot_be_built():
    with pytest.raises(ValueError, match="3-D"):
        Volume(np.zeros((4, 4)), np.eye(4))


def test_roi_is_the_spinal_column_plus_margin_and_pastes_back():
    import torch

    from napari_spinesegdiff.pipeline import _Roi

    prior = torch.zeros(2, 3, 200, 150)
    prior[0, 1, 50:120, 40:100] = 1  # the column (vertebrae)
    prior[1, 2, 120:130, 45:65] = 1  # a disc touching it
    prior[0, 1, 5:8, 140:145] = 1  # a small spurious blob far away: ignored
    prior[0, 0, 190:195, 0:5] = 1  # canal false positive: not a column channel
    roi = _Roi.around(prior, margin_px=10)
    assert roi.box == (40, 140, 30, 110)
    x = torch.arange(2 * 200 * 150, dtype=torch.float32).reshape(2, 1, 200, 150)
    assert roi.crop(x).shape == (2, 1, 100, 80)
    full = roi.paste(roi.crop(x) * 0 + 7, x, x)
    assert torch.all(full[..., 40:140, 30:110] == 7)
    assert torch.equal(full[..., :40, :], x[..., :40, :])
    assert _Roi.around(None, 10).box is None and _Roi.around(prior, -1).box is None
    small = torch.zeros(1, 3, 200, 150)
    small[0, 1, 100:104, 70:72] = 1
    r0, r1, c0, c1 = _Roi.around(small, margin_px=2).box
    assert r1 - r0 >= 64 and c1 - c0 >= 64  # never smaller than what the network handles well


def test_steps_plus_prior_uncertainty_bounds_the_step_map(phantom):
    cfg = FAST.replace(slices="6", steps=2)
    steps_only = run(phantom.image, cfg.replace(uncertainty="steps"), stream_every=0)
    both = run(phantom.image, cfg.replace(uncertainty="steps+prior"), stream_every=0)
    assert np.array_equal(steps_only.canonical_labels, both.canonical_labels)
    assert np.all(both.canonical_uncertainty >= steps_only.canonical_uncertainty - 1e-7)
    assert np.any(both.canonical_uncertainty > steps_only.canonical_uncertainty + 1e-3)


def test_smoothing_filters_the_probabilities_across_sagittal_slices_only(phantom):
    from scipy import ndimage

    plain = run(phantom.image, FAST.replace(smooth_mm=0.0, baseline_weight=0.0))
    smooth = run(phantom.image, FAST.replace(smooth_mm=1.5, baseline_weight=0.0))
    sigma = 1.5 / phantom.image.orientation.canonical_spacing[0]
    want = ndimage.gaussian_filter1d(plain.canonical_probabilities[:, 4:9], sigma, axis=1, mode="nearest")
    np.testing.assert_allclose(smooth.canonical_probabilities[:, 4:9], want, atol=1e-5)
    assert not smooth.canonical_probabilities[:, :4].any() and not smooth.canonical_probabilities[:, 9:].any()
    assert (smooth.canonical_labels != plain.canonical_labels).any()  # the labels follow the smoothed maps
    truth = phantom.truth().canonical()[4:9]
    assert np.mean(dice_per_class(smooth.canonical_labels[4:9], truth, 3)) >= PHANTOM_DICE_FLOOR
    one = run(phantom.image, FAST.replace(slices="6", smooth_mm=1.5, baseline_weight=0.0))
    ref = run(phantom.image, FAST.replace(slices="6", smooth_mm=0.0, baseline_weight=0.0))
    assert np.array_equal(one.canonical_probabilities, ref.canonical_probabilities)  # one slice: nothing to mix


def test_baseline_weight_blends_the_presegmentation_into_the_result(phantom):
    cfg = FAST.replace(smooth_mm=0.0, slices="6")
    diffusion = run(phantom.image, cfg.replace(baseline_weight=0.0)).canonical_probabilities
    preseg = run(phantom.image, cfg.replace(t_start=0)).canonical_probabilities
    half = run(phantom.image, cfg.replace(baseline_weight=0.5)).canonical_probabilities
    assert np.abs(diffusion - preseg).max() > 0.2  # the two really differ, so the blend is tested
    np.testing.assert_allclose(half, 0.5 * (diffusion + preseg), atol=1e-4)
    only = run(phantom.image, cfg.replace(baseline_weight=1.0)).canonical_probabilities
    np.testing.assert_allclose(only, preseg, atol=1e-4)


def test_bad_blend_and_smoothing_values_are_refused():
    with pytest.raises(ValueError, match="baseline_weight"):
        SegmentationConfig(baseline_weight=1.5)
    with pytest.raises(ValueError, match="smooth_mm"):
        SegmentationConfig(smooth_mm=-1)


def test_a_scan_without_signal_is_refused_before_the_model_runs():
    """The same refusal as the CLI's for the dock and batch runs, which call the pipeline directly."""
    flat = Volume(np.zeros((12, 64, 64), np.float32), np.diag([3.0, 0.7, 0.7, 1.0]))
    with pytest.raises(SegmentationError, match="no signal"):
        run(flat, FAST.replace(slices="all"))


def test_labels_uncertainty_is_the_entropy_of_the_final_probabilities(phantom, result):
    """The default map: the binary entropy of the probabilities the labels were drawn from (blended and
    smoothed), so it peaks where a label could go either way and is 0 where they are certain; the same run's
    labels and probabilities as the step maps'."""
    from napari_spinesegdiff.pipeline import LABEL_UNCERTAINTY_SCALE, label_uncertainty

    res, _ = result
    assert FAST.uncertainty == "labels"  # the default
    u, per_channel = label_uncertainty(res.canonical_probabilities, res.class_names, "whole",
                                       range(res.slices[0], res.slices[-1] + 1))
    np.testing.assert_allclose(res.canonical_uncertainty, u, atol=1e-6)
    np.testing.assert_allclose(res.canonical_class_uncertainty, per_channel, atol=1e-6)
    assert u.max() <= LABEL_UNCERTAINTY_SCALE + 1e-6
    outside = np.ones(u.shape[0], bool)
    outside[list(res.slices)] = False
    assert not u[outside].any()
    # near-even probabilities are the most uncertain, confident voxels the least
    vert = np.maximum(res.canonical_probabilities[1], res.canonical_probabilities[3])
    inside = np.zeros(u.shape, bool)
    inside[list(res.slices)] = True
    even = inside & (np.abs(vert - 0.5) < 0.05)
    structures = np.stack([res.canonical_probabilities[0], vert, res.canonical_probabilities[2]])
    sure = inside & np.all((structures < 0.01) | (structures > 0.99), axis=0)
    assert even.any() and sure.any()
    assert u[even].min() > 0.95 * LABEL_UNCERTAINTY_SCALE
    assert u[sure].max() < 0.1 * LABEL_UNCERTAINTY_SCALE
    steps = run(phantom.image, FAST.replace(uncertainty="steps"), stream_every=0)
    assert np.array_equal(steps.canonical_labels, res.canonical_labels)


def test_labels_uncertainty_follows_the_written_scheme():
    """A body/posterior-elements boundary is uncertain only when vertebrae are split (4-channel model)."""
    from napari_spinesegdiff.labelscheme import CHANNELS
    from napari_spinesegdiff.pipeline import LABEL_UNCERTAINTY_SCALE, label_uncertainty

    p = np.zeros((4, 1, 1, 3), np.float32)  # canal, body, disc, whole vertebra at three voxels
    p[:, 0, 0, 0] = [0.0, 0.5, 0.0, 1.0]  # inside a vertebra, at the body's edge
    p[:, 0, 0, 1] = [0.5, 0.0, 0.0, 0.0]  # at the canal's edge
    p[:, 0, 0, 2] = [0.0, 0.0, 0.0, 0.0]  # background
    whole, _ = label_uncertainty(p, CHANNELS, "whole")
    split, per_channel = label_uncertainty(p, CHANNELS, "split")
    s = LABEL_UNCERTAINTY_SCALE
    np.testing.assert_allclose(whole[0, 0], [0.0, s, 0.0], atol=1e-4)
    np.testing.assert_allclose(split[0, 0], [s, s, 0.0], atol=1e-4)
    np.testing.assert_allclose(per_channel[1, 0, 0], [s, 0.0, 0.0], atol=1e-4)


def test_each_written_label_has_its_own_map_and_the_shown_map_is_their_max():
    """written_uncertainty: the whole vertebra (2) is not uncertain at the body's edge inside it; split,
    body (2) and posterior elements (4) are; the canal's edge is the canal's (1) only."""
    from napari_spinesegdiff.labelscheme import CHANNELS
    from napari_spinesegdiff.pipeline import LABEL_UNCERTAINTY_SCALE as s
    from napari_spinesegdiff.pipeline import label_uncertainty, written_uncertainty

    p = np.zeros((4, 2, 1, 3), np.float32)  # canal, body, disc, whole vertebra; two slices
    p[:, :, 0, 0] = np.array([0.0, 0.5, 0.0, 1.0])[:, None]  # inside a vertebra, at the body's edge
    p[:, :, 0, 1] = np.array([0.5, 0.0, 0.0, 0.0])[:, None]  # at the canal's edge
    whole = written_uncertainty(p, CHANNELS, "whole", range(0, 1))
    split = written_uncertainty(p, CHANNELS, "split")
    assert sorted(whole) == [1, 2, 3] and sorted(split) == [1, 2, 3, 4]
    np.testing.assert_allclose(whole[2][0, 0], [0.0, 0.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(whole[1][0, 0], [0.0, s, 0.0], atol=1e-4)
    assert not whole[1][1].any()  # outside the segmented slices
    np.testing.assert_allclose(split[2][0, 0], [s, 0.0, 0.0], atol=1e-4)
    np.testing.assert_array_equal(split[4], split[2])
    for scheme, maps in (("whole", whole), ("split", split)):
        shown, _ = label_uncertainty(p, CHANNELS, scheme, range(0, 1) if scheme == "whole" else None)
        np.testing.assert_array_equal(shown, np.max(list(maps.values()), axis=0))


def test_kept_samples_are_each_members_labels(phantom, result):
    """keep_samples: one label map per ensemble member through the same blend and label rule; the final
    labels are unchanged, the members differ a little from each other and segment as well as the result."""
    res, _ = result
    kept = run(phantom.image, FAST, keep_samples=True)
    np.testing.assert_array_equal(kept.canonical_labels, res.canonical_labels)
    assert res.canonical_sample_labels is None
    members = kept.canonical_sample_labels
    assert members.shape == (FAST.ensemble, *res.canonical_labels.shape) and members.dtype == np.uint8
    assert not members[:, :4].any() and not members[:, 9:].any()  # only the segmented slices
    assert not np.array_equal(members[0], members[1])
    from napari_spinesegdiff.pipeline import MEMBER_MARGIN, foreground_box

    rs, cs = foreground_box(res.canonical_labels, MEMBER_MARGIN)
    outside = np.ones(members.shape[1:], bool)
    outside[:, rs, cs] = False
    assert not members[:, outside].any() and outside.any()  # labelled only near the final labels
    truth = phantom.truth().canonical()[4:9]
    final = np.mean(dice_per_class(res.canonical_labels[4:9], truth, 3))
    for member in members:
        agree = dice_per_class(member[4:9], res.canonical_labels[4:9], 3)
        assert min(agree) > 0.97, agree
        assert np.mean(dice_per_class(member[4:9], truth, 3)) > final - 0.02


@pytest.mark.parametrize("shape, slice_mm, smooth_mm, slices", [
    ((4, 17, 40, 30), 3.3, 2.0, range(17)), ((3, 9, 20, 16), 1.0, 2.5, range(2, 7)),
    ((3, 3, 8, 8), 0.5, 4.0, range(3)), ((2, 5, 8, 8), 10.0, 2.0, range(5)), ((2, 6, 4, 4), 3.0, 0.0, range(6))])
def test_smoothing_across_slices_is_scipys_gaussian(shape, slice_mm, smooth_mm, slices):
    """The slice smoothing (a weighted sum of whole slices) equals scipy's gaussian_filter1d with mode
    'nearest' on the segmented slices, and leaves the other slices alone."""
    from scipy import ndimage

    from napari_spinesegdiff.pipeline import smooth_across_slices

    a = np.random.default_rng(1).random(shape, dtype=np.float32)
    want = a.copy()
    if smooth_mm > 0:
        want[:, slices.start:slices.stop] = ndimage.gaussian_filter1d(
            want[:, slices.start:slices.stop], smooth_mm / slice_mm, axis=1, mode="nearest")
    got = smooth_across_slices(a.copy(), slice_mm, smooth_mm, slices)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert smooth_mm == 0 or not np.allclose(got[:, slices.start:slices.stop], a[:, slices.start:slices.stop])
