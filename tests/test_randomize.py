"""Intensity domain randomisation (training.randomize): seeded, labels untouched, inversion inverts, the
networks' normalisation, and p = 0 leaves the batches of earlier stages as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_spinesegdiff.preprocess import normalize_intensity
from napari_spinesegdiff.training.batches import SliceBatches
from napari_spinesegdiff.training.data import BODY_CH, WHOLE_CH, phantom_cases
from napari_spinesegdiff.training.randomize import (
    ContrastRandomizer,
    RandBiasField,
    RandContrastCurve,
    RandRicianNoise,
    RandSliceThickness,
    RandStructureIntensity,
    structure_maps,
)


@pytest.fixture(scope="module")
def cases():
    return phantom_cases(3, seed=5)


def _stack(case, k, channels=3):
    from napari_spinesegdiff.preprocess import context_stack

    img = context_stack(case.image, [k], channels, case.slice_mm, 2.0)[0]
    tgt = context_stack(case.target, [k], channels, case.slice_mm, 2.0)[0]
    return img, tgt


def _draw(cases, seed, p, n=3, **kw):
    batches = SliceBatches(cases, (64, 64), 4, seed=seed, channels=3, randomize=p, **kw)
    return [next(batches) for _ in range(n)]


def test_zero_share_draws_the_batches_of_before(cases):
    """``randomize=0`` (every stage before v5) is the batch stream of a SliceBatches without the option."""
    before = [next(b) for b in [SliceBatches(cases, (64, 64), 4, seed=3, channels=3)] for _ in range(3)]
    for x, y in zip(before, _draw(cases, 3, 0.0)):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_randomised_batches_are_seeded_and_keep_the_labels(cases):
    a, b, other = _draw(cases, 3, 1.0), _draw(cases, 3, 1.0), _draw(cases, 4, 1.0)
    plain = _draw(cases, 3, 0.0)
    for x, y, z in zip(a, b, plain):
        for k in x:
            assert torch.equal(x[k], y[k]), f"same seed, different {k}"
        # the contrast has its own random stream: crops, augmentation and labels are those of p = 0
        assert torch.equal(x["target"], z["target"]) and torch.equal(x["known"], z["known"])
        assert not torch.equal(x["image"], z["image"])
    assert any(not torch.equal(x["image"], o["image"]) for x, o in zip(a, other))


def test_share_of_randomised_crops_follows_p(cases):
    img, tgt = _stack(cases[0], 10)
    rnd = ContrastRandomizer(0.3)
    rng = np.random.default_rng(0)
    changed = [not np.array_equal(rnd(img, tgt, cases[0].known, rng), img) for _ in range(400)]
    assert 0.24 < np.mean(changed) < 0.36


def test_output_is_normalised_as_the_networks_expect(cases):
    img, tgt = _stack(cases[1], 8)
    rnd = ContrastRandomizer(1.0)
    rng = np.random.default_rng(1)
    for _ in range(30):
        out = rnd(img, tgt, cases[1].known, rng)
        assert out.shape == img.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.5
        lo, hi = np.percentile(out, [0.5, 99.5])
        assert lo == pytest.approx(0.0, abs=1e-3) and hi == pytest.approx(1.0, abs=1e-3)


def test_inversion_inverts():
    """Inverted and normalised again, an image in [0, 1] (no clipped headroom) is 1 minus itself."""
    rng = np.random.default_rng(2)
    img = normalize_intensity(rng.uniform(0, 1, (3, 40, 40)).astype(np.float32))
    img = np.clip(img, 0, 1)
    out = normalize_intensity(RandContrastCurve(invert_prob=1.0)(img, rng))
    inner = (img > 0.01) & (img < 0.99)
    np.testing.assert_allclose(out[inner], 1.0 - img[inner], atol=2e-3)
    assert np.corrcoef(out.ravel(), img.ravel())[0, 1] < -0.999


def test_contrast_curves_are_not_all_monotone():
    rng = np.random.default_rng(3)
    x = np.linspace(0, 1, 200, dtype=np.float32)[None, None]
    curve = RandContrastCurve(invert_prob=0.0)
    steps = [np.diff(curve(x, rng).ravel()) for _ in range(20)]
    assert any((s > 1e-6).any() and (s < -1e-6).any() for s in steps)


def test_structure_intensities_follow_the_labels(cases):
    """Every labelled structure gets its own mean; inside a structure the texture is scaled, not lost."""
    case = cases[0]
    k = int(np.argmax(case.target[:, 2].reshape(len(case.target), -1).sum(1)))
    img, tgt = _stack(case, k)
    maps = structure_maps(tgt, case.known)
    assert len(maps) == 4  # canal, disc, body, posterior elements
    assert maps.sum(axis=0).max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(maps[2] > 0.5, tgt[:, BODY_CH] > 0.5)
    np.testing.assert_array_equal(maps[3] > 0.5, (tgt[:, WHOLE_CH] > 0.5) & (tgt[:, BODY_CH] < 0.5))
    out = RandStructureIntensity()(img, maps, np.random.default_rng(4))
    means = [float(out[m > 0.99].mean()) for m in maps]
    assert np.ptp(means) > 0.05, "the structures should not all keep one intensity"
    inside = maps[2] > 0.99  # the vertebral body: out = m + a (x - mu) exactly
    fit = np.polyfit(img[inside], out[inside], 1)
    np.testing.assert_allclose(out[inside], np.polyval(fit, img[inside]), atol=1e-4)
    slope = fit[0]
    assert 0.3 - 1e-6 <= abs(slope) <= 1.2 + 1e-6


def test_partial_labels_resample_only_what_is_labelled(cases):
    case = cases[0]
    known = np.zeros(4, bool)
    known[2] = True  # a disc-only case (lumbar IVD_*)
    img, tgt = _stack(case, 10)
    maps = structure_maps(tgt, known)
    assert len(maps) == 1
    np.testing.assert_array_equal(maps[0], tgt[:, 2].astype(np.float32))


def test_corruptions_keep_shape_and_act():
    rng = np.random.default_rng(6)
    img = np.clip(rng.normal(0.5, 0.1, (3, 48, 48)), 0, 1).astype(np.float32)
    img[1, 20:28] = 1.0
    field = RandBiasField(coeff=0.5)(np.ones_like(img), rng)
    assert np.allclose(field[0], field[2]) and field.std() > 0.01  # smooth, one field for all slices
    thick = RandSliceThickness(share=(0.3, 0.3))(img, rng)
    np.testing.assert_allclose(thick[1], 0.4 * img[1] + 0.3 * (img[0] + img[2]), atol=1e-6)
    np.testing.assert_array_equal(RandSliceThickness()(img[:1], rng), img[:1])  # one slice: no neighbours
    half = np.zeros_like(img)
    half[..., 24:] = 1.0
    noisy = RandRicianNoise(std=(0.05, 0.05))(half, rng)
    assert noisy.min() >= 0  # a magnitude image
    # on black, Rician noise is Rayleigh: mean sigma * sqrt(pi / 2), not 0; on bright it is about Gaussian
    assert noisy[..., :24].mean() == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.1)
    assert noisy[..., 24:].std() == pytest.approx(0.05, rel=0.1)


def test_share_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="between|in \\[0, 1\\]"):
        ContrastRandomizer(1.5)


def test_train_cli_refuses_a_bad_share(tmp_path, capsys):
    from napari_spinesegdiff.cli import main

    code = main(["train", "--data", "phantom:2", "--out", str(tmp_path / "r"), "--randomize-contrast", "2"])
    assert code == 2
    assert "--randomize-contrast" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_same_randomised_train_command_gives_the_same_weights(tmp_path, cases):
    from safetensors.torch import load_file

    from napari_spinesegdiff.training.train import TrainConfig, train

    cfg = TrainConfig(kind="diffusion", preset="tiny", iterations=4, batch_size=2, crop=(64, 64), lr=3e-3,
                      warmup=2, val_every=4, seed=4, threads=1, randomize_contrast=0.7)
    runs = [load_file(str(train(cfg, cases[:2], cases[2:], tmp_path / f"run{i}", progress=False,
                                log=lambda s: None))) for i in range(2)]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), f"{k} differs between two runs of one command"
