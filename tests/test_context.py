"""2.5-D presegmenter: neighbouring slices as input channels, in training and at inference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.model.baseline import BaselineNet
from napari_spinesegdiff.model.checkpoint import CheckpointConfig, CheckpointError, load_checkpoint, save_checkpoint
from napari_spinesegdiff.phantom import make_phantom
from napari_spinesegdiff.pipeline import SHIPPED_BASELINE, SegmentationError, run
from napari_spinesegdiff.preprocess import context_offset, context_stack
from napari_spinesegdiff.training.train import TrainConfig, build_model, load_init_weights


def test_neighbours_lie_about_context_mm_away_and_repeat_at_the_ends():
    assert context_offset(1.0, 2.0) == 2
    assert context_offset(0.9, 2.0) == 2
    assert context_offset(3.3, 2.0) == 1  # thick slices: the adjacent one, never the slice itself
    assert context_offset(0.0, 2.0) == 1  # no usable spacing: the adjacent slice
    image = np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 4, 5), np.float32)
    stack = context_stack(image, [0, 3, 5], 3, slice_mm=1.0, context_mm=2.0)
    assert stack.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(stack[:, :, 0, 0], [[0, 0, 2], [1, 3, 5], [3, 5, 5]])
    five = context_stack(image, [2], 5, slice_mm=4.0, context_mm=2.0)
    np.testing.assert_array_equal(five[0, :, 0, 0], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(context_stack(image, [4], 1, 1.0, 2.0)[:, 0], image[[4]])
    with pytest.raises(ValueError, match="odd"):
        context_stack(image, [1], 2, 1.0, 2.0)


def test_one_slice_weights_grow_into_a_2p5d_presegmenter_that_computes_the_same():
    torch.manual_seed(0)
    old, _ = build_model(TrainConfig(kind="baseline", preset="tiny"))
    new, cfg = build_model(TrainConfig(kind="baseline", preset="tiny", context=1))
    assert cfg.in_channels == 3
    logs: list[str] = []
    load_init_weights(new, old.state_dict(), log=logs.append)
    assert any("1 to 3 image channels" in line for line in logs)
    x = torch.rand(2, 3, 48, 40)
    with torch.no_grad():
        np.testing.assert_allclose(new.eval()(x).numpy(), old.eval()(x[:, 1:2]).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="baseline presegmenter only"):
        build_model(TrainConfig(kind="diffusion", preset="tiny", context=1))


def test_training_batches_carry_the_neighbours_in_order():
    from napari_spinesegdiff.training.batches import SliceBatches
    from napari_spinesegdiff.training.data import phantom_cases

    case = phantom_cases(1, seed=5)[0]
    case.image[:] = np.arange(len(case.image), dtype=np.float32)[:, None, None]  # slice k holds the value k
    batches = SliceBatches([case], crop=(32, 32), batch_size=6, seed=1, augment=False, channels=3,
                           context_mm=case.slice_mm)
    image = next(batches)["image"].numpy()
    assert image.shape == (6, 3, 32, 32)
    centre = image[:, 1].max(axis=(1, 2))
    last = len(case.image) - 1
    np.testing.assert_array_equal(image[:, 0].max(axis=(1, 2)), np.maximum(centre - 1, 0))
    np.testing.assert_array_equal(image[:, 2].max(axis=(1, 2)), np.minimum(centre + 1, last))


def test_mirrored_batches_swap_the_neighbours_of_about_half_the_crops_and_keep_the_centre():
    from napari_spinesegdiff.training.batches import SliceBatches
    from napari_spinesegdiff.training.data import phantom_cases

    case = phantom_cases(1, seed=5)[0]
    case.image[:] = np.arange(len(case.image), dtype=np.float32)[:, None, None] + 1  # slice k holds k + 1
    batches = SliceBatches([case], crop=(32, 32), batch_size=200, seed=2, augment=False, channels=3,
                           context_mm=case.slice_mm, mirror=True)
    peak = next(batches)["image"].numpy().max(axis=(2, 3))  # (200, 3): the slice number + 1 of each channel
    centre, last = peak[:, 1], len(case.image)
    before, after = np.maximum(centre - 1, 1), np.minimum(centre + 1, last)
    swapped = (peak[:, 0] == after) & (peak[:, 2] == before)
    kept = (peak[:, 0] == before) & (peak[:, 2] == after)
    assert np.all(swapped | kept)
    assert 0.35 < np.mean(swapped) < 0.65
    plain = SliceBatches([case], crop=(32, 32), batch_size=50, seed=2, augment=False, channels=3,
                         context_mm=case.slice_mm)
    peak = next(plain)["image"].numpy().max(axis=(2, 3))
    np.testing.assert_array_equal(peak[:, 0], np.maximum(peak[:, 1] - 1, 1))  # off: never swapped
    with pytest.raises(ValueError, match="--context"):
        build_model(TrainConfig(kind="baseline", mirror=True))


@pytest.fixture(scope="module")
def grown_baseline(tmp_path_factory):
    """A one-slice presegmenter (the shipped one's centre-slice weights), the same grown to three slices with
    zero neighbour weights, and one whose input convolution reads only the previous slice."""
    net, meta = load_checkpoint(SHIPPED_BASELINE)
    key = "unet.conv_0.conv_0.conv.weight"
    state = net.state_dict()
    centre = state[key].shape[1] // 2
    state[key] = state[key][:, centre:centre + 1]
    one_cfg = dataclasses.replace(meta.network, in_channels=1)
    folder = tmp_path_factory.mktemp("ctx")
    one_net = BaselineNet(one_cfg)
    one_net.load_state_dict(state)
    one = save_checkpoint(folder / "one.safetensors", one_net, meta.replace(network=one_cfg))
    cfg = dataclasses.replace(meta.network, in_channels=3)
    grown = BaselineNet(cfg)
    load_init_weights(grown, one_net.state_dict(), log=lambda s: None)
    same = save_checkpoint(folder / "same.safetensors", grown, meta.replace(network=cfg, context_mm=3.0))
    state = grown.state_dict()
    state[key] = state[key][:, [1, 0, 2]]  # the old weights now look at the previous slice
    grown.load_state_dict(state)
    previous = save_checkpoint(folder / "previous.safetensors", grown, meta.replace(network=cfg, context_mm=3.0))
    return one, same, previous


@pytest.mark.parametrize("engine", ["torch", "openvino"])
def test_pipeline_feeds_the_2p5d_presegmenter_its_neighbouring_slices(grown_baseline, engine):
    if engine == "openvino":
        pytest.importorskip("openvino")
    one, same, previous = grown_baseline
    ph = make_phantom(seed=4, contrast="T2w", spacing=(3.0, 0.8, 0.8))
    cfg = SegmentationConfig(t_start=0, slices="3:7", engine=engine, smooth_mm=0.0, baseline_checkpoint=str(one))
    first = run(ph.image, cfg)
    plain = first.canonical_probabilities
    # bfloat16 (OpenVINO on a CPU with AVX-512 BF16 or AMX) rounds the three-channel and the one-channel input
    # convolutions differently: a few boundary voxels move by ~0.01, the mean stays within 1e-4
    atol = 3e-2 if first.provenance["engine"]["precision"] == "bf16" else 2e-3

    def close(a, b):
        np.testing.assert_allclose(a, b, atol=atol)
        assert np.abs(a - b).mean() < 1e-4

    grown = run(ph.image, cfg.replace(baseline_checkpoint=str(same))).canonical_probabilities
    close(grown, plain)  # zero neighbour weights: the one-slice network
    # reading the previous slice (3 mm away): slice k is segmented as the one-slice network segments k - 1
    shifted = run(ph.image, cfg.replace(baseline_checkpoint=str(previous))).canonical_probabilities
    before = run(ph.image, cfg.replace(slices="2:6")).canonical_probabilities
    close(shifted[:, 3:7], before[:, 2:6])
    assert np.abs(shifted[:, 3:7] - plain[:, 3:7]).max() > 0.2  # the slices differ, so the test can fail


def test_an_even_channel_presegmenter_and_a_bad_context_are_refused(tmp_path):
    net, meta = load_checkpoint(SHIPPED_BASELINE)
    cfg = dataclasses.replace(meta.network, in_channels=2)
    path = save_checkpoint(tmp_path / "even.safetensors", BaselineNet(cfg), meta.replace(network=cfg))
    ph = make_phantom(seed=4)
    with pytest.raises(SegmentationError, match="odd number"):
        run(ph.image, SegmentationConfig(baseline_checkpoint=str(path), engine="torch", slices="3"))
    with pytest.raises(CheckpointError, match="context_mm"):
        CheckpointConfig(context_mm=-1.0)
    assert CheckpointConfig.from_dict(meta.replace(context_mm=2.5).to_dict()).context_mm == 2.5
