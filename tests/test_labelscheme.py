"""The written label scheme: whole vertebrae by default, --vertebrae split (2 body + 4 posterior elements)
from a four-channel model, refused for three-channel models, and the same geometry either way."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.labelscheme import CHANNELS, CHANNELS_V3, ChannelRoles, merge_vertebrae
from napari_spinesegdiff.pipeline import SegmentationError, finalize_labels


def _four_channel_probabilities():
    """One slice: a vertebra whose front half is body, a disc, a canal (channels of CHANNELS)."""
    p = np.zeros((4, 1, 40, 40), np.float32)
    p[3, 0, 5:20, 5:30] = 0.9  # whole vertebra
    p[1, 0, 5:20, 5:18] = 0.8  # its body (front part)
    p[2, 0, 21:26, 5:18] = 0.9  # disc
    p[0, 0, :, 32:36] = 0.95  # canal
    return p


def test_whole_and_split_labels_from_four_channels():
    cfg = SegmentationConfig(smooth_mm=0, min_component_mm2=0)
    whole = finalize_labels(_four_channel_probabilities(), (1.0, 1.0, 1.0), cfg, class_names=CHANNELS)[0]
    split = finalize_labels(_four_channel_probabilities(), (1.0, 1.0, 1.0), cfg.replace(vertebrae="split"),
                            class_names=CHANNELS)[0]
    assert set(np.unique(whole)) == {0, 1, 2, 3}
    assert (whole[5:20, 5:30] == 2).all()  # the whole vertebra, body and posterior elements
    assert (split[5:20, 5:18] == 2).all() and (split[5:20, 18:30] == 4).all()
    assert np.array_equal(merge_vertebrae(split), whole)  # split only divides label 2
    assert (split[21:26, 5:18] == 3).all() and (split[:, 32:36] == 1).all()


def test_three_channel_models_write_label_2_and_cannot_split():
    p = _four_channel_probabilities()[[0, 1, 2]]
    cfg = SegmentationConfig(smooth_mm=0, min_component_mm2=0)
    labels = finalize_labels(p.copy(), (1.0, 1.0, 1.0), cfg, class_names=CHANNELS_V3)[0]
    assert (labels[5:20, 5:18] == 2).all() and not (labels == 4).any()
    assert not ChannelRoles.of(CHANNELS_V3).can_split and ChannelRoles.of(CHANNELS).can_split
    with pytest.raises(SegmentationError, match="cannot split vertebrae"):
        finalize_labels(p, (1.0, 1.0, 1.0), cfg.replace(vertebrae="split"), class_names=CHANNELS_V3)


def test_vertebrae_setting_is_validated():
    with pytest.raises(ValueError, match="vertebrae must be 'whole' or 'split'"):
        SegmentationConfig(vertebrae="bodies")


@pytest.fixture(scope="module")
def four_channel_models(tmp_path_factory):
    """Tiny untrained four-channel diffusion and baseline checkpoints (the label bookkeeping does not need
    good weights)."""
    import torch

    from napari_spinesegdiff.model.checkpoint import CheckpointConfig, save_checkpoint
    from napari_spinesegdiff.training.train import TrainConfig, build_model, checkpoint_config

    d = tmp_path_factory.mktemp("models")
    paths = {}
    for kind in ("diffusion", "baseline"):
        torch.manual_seed(0)
        cfg = TrainConfig(kind=kind, preset="tiny")
        net, net_cfg = build_model(cfg)
        with torch.no_grad():  # a positive bias on every output: some of every channel is predicted
            final = net.model.final_conv if kind == "diffusion" else net.unet.final_conv
            final.bias.fill_(2.0)
            final.bias[1] = 0.0  # body less sure than whole vertebra: both labels 2 and 4 appear
        meta = CheckpointConfig.from_dict(checkpoint_config(cfg, net_cfg, {}, {}))
        assert meta.class_names == CHANNELS
        paths[kind] = save_checkpoint(d / f"{kind}.safetensors", net, meta)
    return paths


def test_cli_vertebrae_split_round_trip(four_channel_models, tmp_path):
    """segment --vertebrae split writes 0-4 in the scan's geometry; merging 4 into 2 gives exactly the
    default (whole) labels of the same run; the sidecar records the setting."""
    import json

    from napari_spinesegdiff.cli import main
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(seed=4, random_orientation=True)
    scan = write_volume(ph.image.data, tmp_path / "scan.nii.gz", like=ph.image, kind="image", produced_by="t")
    common = ["--checkpoint", str(four_channel_models["diffusion"]), "--baseline-checkpoint",
              str(four_channel_models["baseline"]), "--steps", "2", "--ensemble", "1", "--slices", "6:8",
              "--no-progress"]
    assert main(["segment", str(scan), "-o", str(tmp_path / "whole.nii.gz"), *common]) == 0
    assert main(["segment", str(scan), "-o", str(tmp_path / "split.nii.gz"), "--vertebrae", "split", *common]) == 0
    whole, split = nib.load(tmp_path / "whole.nii.gz"), nib.load(tmp_path / "split.nii.gz")
    np.testing.assert_allclose(split.affine, nib.load(scan).affine, atol=1e-5)
    w, s = np.asarray(whole.dataobj), np.asarray(split.dataobj)
    assert s.shape == w.shape == ph.image.shape
    assert {2, 4} <= set(np.unique(s)) and 4 not in set(np.unique(w))
    assert np.array_equal(merge_vertebrae(s), w)
    assert json.loads((tmp_path / "split.json").read_text())["config"]["vertebrae"] == "split"


def test_cli_split_with_a_three_channel_model_is_one_sentence(tmp_path, capsys):
    from napari_spinesegdiff.cli import main
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.labelscheme import ChannelRoles
    from napari_spinesegdiff.model.checkpoint import read_config
    from napari_spinesegdiff.phantom import make_phantom
    from napari_spinesegdiff.pipeline import SHIPPED_DIFFUSION

    if ChannelRoles.of(read_config(SHIPPED_DIFFUSION).class_names).can_split:
        pytest.skip("the shipped model has four channels; the refusal is tested on finalize_labels above")
    ph = make_phantom(seed=4)
    scan = write_volume(ph.image.data, tmp_path / "scan.nii.gz", like=ph.image, kind="image", produced_by="t")
    code = main(["segment", str(scan), "-o", str(tmp_path / "l.nii.gz"), "--vertebrae", "split", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot split vertebrae" in err and err.count("\n") == 1
    assert not (tmp_path / "l.nii.gz").exists()
