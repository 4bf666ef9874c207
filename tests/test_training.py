"""Training: loss goes down on phantoms, checkpoints load, folds keep patients apart, partial labels mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_spinesegdiff.training.data import TrainCase, make_splits, phantom_cases
from napari_spinesegdiff.training.losses import segdiff_loss
from napari_spinesegdiff.training.recipe import balanced_weights, split_cases


@pytest.fixture(scope="module")
def cases():
    return phantom_cases(3, seed=11)


def test_phantom_cases_are_on_the_model_grid(cases):
    c = cases[0]
    assert c.image.dtype == np.float32 and c.image.ndim == 3
    assert c.target.shape == (c.image.shape[0], 4, *c.image.shape[1:])
    assert c.known.all()
    for ch in range(4):
        assert c.target[:, ch].any(), f"channel {ch} is empty in a phantom"
    body, whole = c.target[:, 1].astype(bool), c.target[:, 3].astype(bool)
    assert not (body & ~whole).any(), "a vertebral body lies inside its whole vertebra"
    assert whole.sum() > 1.2 * body.sum(), "the whole vertebra adds the posterior elements"


@pytest.mark.parametrize("kind", ["baseline", "diffusion"])
def test_tiny_training_reduces_loss_and_writes_a_loadable_checkpoint(tmp_path, cases, kind):
    from napari_spinesegdiff.model.checkpoint import load_checkpoint
    from napari_spinesegdiff.training.train import TrainConfig, forward_loss, train

    torch.manual_seed(0)
    cfg = TrainConfig(kind=kind, preset="tiny", iterations=30, batch_size=4, crop=(96, 96), lr=3e-3,
                      warmup=5, val_every=30, seed=1, threads=1)
    out = train(cfg, cases[:2], cases[2:], tmp_path / kind, progress=False, log=lambda s: None)
    net, meta = load_checkpoint(out)
    assert meta.kind == kind
    assert meta.network.features == (8, 8, 16, 32, 64, 8)
    rows = (tmp_path / kind / "log.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one validation row
    # the trained weights give a lower loss than fresh ones on the same fixed batches
    from napari_spinesegdiff.model.diffusion import CosineSchedule
    from napari_spinesegdiff.training.batches import SliceBatches
    from napari_spinesegdiff.training.train import build_model

    fresh, _ = build_model(cfg)
    batches = SliceBatches(cases[:2], (96, 96), 8, seed=5, augment=False)
    fixed = [next(batches) for _ in range(3)]

    def mean_loss(model):
        model.eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return float(np.mean([float(forward_loss(model, b, cfg, CosineSchedule(), g)["loss"]) for b in fixed]))

    trained, fresh_loss = mean_loss(net), mean_loss(fresh)
    print(f"{kind}: loss fresh {fresh_loss:.4f} -> trained {trained:.4f}")
    assert trained < 0.9 * fresh_loss


def test_same_seed_draws_the_same_augmented_batches(cases):
    """The MONAI augmentation is seeded once: asking how long a ``Compose`` is builds a new one, which
    re-seeds the shared transforms from OS entropy, so the crop size must not test its truth value."""
    from napari_spinesegdiff.training.batches import SliceBatches

    def draw(seed):
        batches = SliceBatches(cases, (64, 64), 3, seed=seed)
        return [next(batches) for _ in range(4)]

    a, b, other = draw(7), draw(7), draw(8)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), f"same seed, different {k}"
    assert any(not torch.equal(x["image"], z["image"]) for x, z in zip(a, other))


def test_same_train_command_gives_the_same_weights(tmp_path, cases):
    from safetensors.torch import load_file

    from napari_spinesegdiff.training.train import TrainConfig, train

    cfg = TrainConfig(kind="baseline", preset="tiny", iterations=6, batch_size=2, crop=(64, 64), lr=3e-3,
                      warmup=2, val_every=6, seed=4, threads=1)
    runs = [load_file(str(train(cfg, cases[:2], cases[2:], tmp_path / f"run{i}", progress=False,
                                log=lambda s: None))) for i in range(2)]
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), f"{k} differs between two runs of one command"


def test_unknown_channels_get_zero_gradient():
    logits = torch.zeros(2, 3, 8, 8, requires_grad=True)
    target = torch.ones(2, 3, 8, 8)
    known = torch.zeros(2, 3, 8, 8)
    known[:, 1] = 1  # only the vertebra channel is labelled
    known[:, 1, :2] = 0  # and not in the top rows (outside the labelled level range)
    segdiff_loss(logits, target, known)["loss"].backward()
    g = logits.grad
    assert torch.all(g[:, [0, 2]] == 0)
    assert torch.all(g[:, 1, :2] == 0)
    assert torch.all(g[:, 1, 2:] != 0)


def test_case_known_mask_uses_row_range_and_unknown_voxels():
    n, h, w = 2, 10, 6
    case = TrainCase("a", "a", "VB", np.zeros((n, h, w), np.float32), np.zeros((n, 4, h, w), np.uint8),
                     np.array([False, True, False, False]), rows=(3, 7), slice_weights=np.ones(n) / n)
    m = case.known_mask(0)
    assert m.shape == (4, h, w)
    assert not m[0].any() and not m[2].any() and not m[3].any()
    assert m[1, 3:7].all() and not m[1, :3].any() and not m[1, 7:].any()
    case.unknown = np.zeros((n, 4, h, w), bool)
    case.unknown[1, 1, 4, 2] = True
    assert case.known_mask(0)[1, 4, 2] and not case.known_mask(1)[1, 4, 2]


def test_folds_never_share_a_patient_and_cover_everyone():
    patients = {f"IVD_{i}": "IVD" for i in range(3)} | {f"VB3_{i:02d}": "VB3" for i in range(20)}
    tests = []
    for fold in range(5):
        s = make_splits(patients, k=5, fold=fold, seed=0)
        sets = [set(s[k]) for k in ("train", "val", "test")]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert set().union(*sets) == set(patients)
        assert s["val"], "a validation split separate from the test fold"
        tests += s["test"]
    assert sorted(tests) == sorted(patients)  # every patient is tested exactly once over the folds


def test_split_cases_keeps_phantoms_in_training(tmp_path, cases):
    real = [TrainCase(f"VB3_{i}", f"VB3_{i}", "VB3", *[np.zeros(1)] * 2, np.ones(4, bool)) for i in range(10)]
    train, val, split = split_cases(real + list(cases), tmp_path / "splits.json", 5, 0, 0)
    assert all(c in train for c in cases)
    assert {c.patient for c in val}.isdisjoint({c.patient for c in train})
    assert not {c.patient for c in train} & set(split["test"])
    assert (tmp_path / "splits.json").exists()
    w = balanced_weights(train, phantom_share=0.3)
    assert abs(sum(w[i] for i, c in enumerate(train) if c.group == "phantom") - 0.3) < 1e-9
    assert abs(sum(w) - 1) < 1e-9


def test_same_train_command_runs_distributed_under_torchrun(tmp_path):
    """Two CPU processes (gloo) with DistributedDataParallel: rank 0 writes a loadable checkpoint."""
    import subprocess
    import sys

    from napari_spinesegdiff.model.checkpoint import load_checkpoint

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "napari_spinesegdiff.cli", "train", "--kind", "baseline", "--data", "phantom:2:3",
           "--preset", "tiny", "--iterations", "4", "--batch-size", "2", "--crop", "64", "64",
           "--val-every", "4", "--threads", "1", "--no-progress", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    net, meta = load_checkpoint(out / "best.safetensors")
    assert meta.kind == "baseline" and meta.training["iteration"] == 4


class _Recorder(torch.nn.Module):
    """Stands in for the denoiser: records what it is given and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x_t, t, image):
        self.seen.append((x_t.clone(), t.clone()))
        return torch.zeros_like(x_t, requires_grad=True)


class _ConstantPrior(torch.nn.Module):
    def forward(self, image):
        return torch.full((image.shape[0], 4, *image.shape[2:]), 30.0)  # sigmoid = 1 everywhere


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_prior_training_noises_the_presegmentation_instead_of_the_truth(share):
    """With a prior network, low-t inputs are q_sample(2 * sigmoid(prior) - 1, t) on every channel, with the
    same noise the truth would have had; with share 0 the inputs stay the noised truth."""
    from napari_spinesegdiff.model.diffusion import CosineSchedule
    from napari_spinesegdiff.training.train import TrainConfig, forward_loss

    schedule = CosineSchedule(1000)
    b = 16
    batch = {"image": torch.randn(b, 1, 12, 12), "target": torch.zeros(b, 4, 12, 12),
             "known": torch.ones(b, 4, 12, 12)}
    cfg = TrainConfig(kind="diffusion", t_focus=400, prior_share=share)
    plain, with_prior = _Recorder(), _Recorder()
    forward_loss(plain, batch, cfg, schedule, torch.Generator().manual_seed(3))
    forward_loss(with_prior, batch, cfg, schedule, torch.Generator().manual_seed(3), prior_net=_ConstantPrior())
    (x_truth, t), (x_prior, t2) = plain.seen[0], with_prior.seen[0]
    assert torch.equal(t, t2)
    root_ab = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32)[t].sqrt()[:, None, None, None]
    expected = torch.where((t < 400)[:, None, None, None] & (share > 0), x_truth + 2.0 * root_ab, x_truth)
    assert torch.allclose(x_prior, expected, atol=1e-3)
    if share > 0:
        assert bool((t < 400).any()) and bool((t >= 400).any())  # both kinds of sample occurred


def test_whole_vertebra_labels_leave_the_body_unknown_only_inside_vertebrae():
    """SPIDER-style truth (2 = whole vertebra): canal, disc and whole-vertebra channels are known everywhere;
    the body channel is known (0) outside the vertebrae and unknown inside them, so its loss is masked
    there and its gradient is exactly zero."""
    from napari_spinesegdiff.training.data import _finish, classes_to_channels

    labels = np.zeros((3, 40, 30), np.uint8)
    labels[:, 5:15, 5:20] = 2  # a vertebra
    labels[:, 15:19, 5:20] = 3  # a disc
    labels[:, :, 22:26] = 1  # the canal
    target = np.moveaxis(classes_to_channels(labels), 0, 1)
    assert not target[:, 1].any()  # no body label in a whole-vertebra dataset
    case = _finish("s", "s", "spider", np.random.default_rng(0).random(labels.shape), target, (1.0, 1.0, 1.0),
                   (1.0, 1.0), np.ones(4, bool), False, None, body_inside_whole_unknown=True)
    m = case.known_mask(1)
    assert m[[0, 2, 3]].all()
    assert not m[1, 5:15, 5:20].any() and m[1, 20:, :].all() and m[1, :5].all()
    logits = torch.zeros(1, 4, 40, 30, requires_grad=True)
    segdiff_loss(logits, torch.as_tensor(case.target[1:2], dtype=torch.float32),
                 torch.as_tensor(m[None], dtype=torch.float32))["loss"].backward()
    assert torch.all(logits.grad[0, 1, 5:15, 5:20] == 0) and torch.all(logits.grad[0, 1, 20:] != 0)


@pytest.mark.parametrize("kind", ["baseline", "diffusion"])
def test_three_channel_weights_grow_into_the_four_channel_model(kind):
    """Fine-tuning a v3 model: the grown network computes exactly what the old one did on canal, body and
    disc, and its new whole-vertebra output starts as the body output."""
    import dataclasses

    from napari_spinesegdiff.model.baseline import BaselineNet
    from napari_spinesegdiff.model.network import PRESETS, SpineSegDiffNet
    from napari_spinesegdiff.training.train import TrainConfig, build_model, load_init_weights

    torch.manual_seed(0)
    old_cfg = dataclasses.replace(PRESETS["tiny"], num_classes=3)
    old = (BaselineNet if kind == "baseline" else SpineSegDiffNet)(old_cfg).eval()
    new, _ = build_model(TrainConfig(kind=kind, preset="tiny"))
    load_init_weights(new, old.state_dict(), log=lambda s: None)
    new.eval()
    x = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        if kind == "baseline":
            a, b = new(x), old(x)
        else:
            xt, t = torch.rand(2, 3, 48, 48) * 2 - 1, torch.tensor([50, 700])
            a, b = new(torch.cat([xt, torch.rand(2, 1, 48, 48)], 1), t, x), old(xt, t, x)
    assert a.shape[1] == 4
    assert torch.allclose(a[:, :3], b, atol=1e-5)
    assert torch.allclose(a[:, 3], a[:, 1], atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        bad = {k: v[..., :1] if v.ndim == 4 else v for k, v in old.state_dict().items()}
        load_init_weights(new, bad, log=lambda s: None)


def test_widened_presegmenter_computes_what_the_narrow_one_did():
    """Capacity without starting over: widening a trained presegmenter (tiny -> small here, small -> medium in
    train_shipped.sh) keeps its output exactly, while the new channels can learn."""
    import dataclasses

    from napari_spinesegdiff.model.baseline import BaselineNet
    from napari_spinesegdiff.model.network import PRESETS
    from napari_spinesegdiff.training.train import load_init_weights, widen_basic_unet

    torch.manual_seed(0)
    narrow = BaselineNet(dataclasses.replace(PRESETS["tiny"], num_classes=4, in_channels=3)).eval()
    with torch.no_grad():  # non-trivial normalisation and bias values, as after training
        for name, p in narrow.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.3)
    wide = BaselineNet(dataclasses.replace(PRESETS["small"], num_classes=4, in_channels=3))
    logs: list[str] = []
    load_init_weights(wide, narrow.state_dict(), log=logs.append)
    wide.eval()
    assert any("widened" in s for s in logs)
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        a, b = wide(x), narrow(x)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    wide.train()
    wide(x).square().mean().backward()
    # the zero weights reading the new channels are not stuck: the output layer's get a gradient at once, and
    # each step opens the path one layer further back
    final = dict(wide.named_parameters())["unet.final_conv.weight"]
    assert final.grad[:, 8:].abs().sum() > 0, "the new channels can never reach the output"
    with pytest.raises(ValueError, match="Cannot widen"):
        widen_basic_unet(wide.state_dict(), narrow.state_dict())


def test_sampling_is_balanced_per_source_then_group():
    def case(name, group, source):
        c = TrainCase(name, name, group, *[np.zeros(1)] * 2, np.ones(4, bool))
        c.source = source
        return c

    cases = ([case(f"VB3_{i}", "VB3", "lumbar") for i in range(20)] + [case("IVD_1", "IVD", "lumbar")]
             + [case(f"S_{i}", "spider", "spider") for i in range(5)] + [case("ph", "phantom", "phantom")])
    w = np.array(balanced_weights(cases, phantom_share=0.2))
    src = np.array([c.source for c in cases])
    assert abs(w[src == "spider"].sum() - 0.4) < 1e-9 and abs(w[src == "lumbar"].sum() - 0.4) < 1e-9
    assert abs(w[[c.group == "IVD" for c in cases]].sum() - 0.2) < 1e-9  # half of lumbar's share

    # --source-share: lumbar 0.6 of the real batches, SPIDER the rest; groups still split lumbar's share
    w = np.array(balanced_weights(cases, phantom_share=0.2, source_shares={"lumbar": 0.6}))
    assert w[src == "lumbar"].sum() == pytest.approx(0.48) and w[src == "spider"].sum() == pytest.approx(0.32)
    assert w[[c.group == "IVD" for c in cases]].sum() == pytest.approx(0.24)
    assert w[src == "phantom"].sum() == pytest.approx(0.2) and w.sum() == pytest.approx(1.0)
    for bad, msg in [({"spine": 0.5}, "only the sources lumbar, spider"), ({"lumbar": 1.2}, "strictly between"),
                     ({"lumbar": 0.6, "spider": 0.6}, "add up to 1")]:
        with pytest.raises(ValueError, match=msg):
            balanced_weights(cases, phantom_share=0.2, source_shares=bad)


def test_train_cli_refuses_a_bad_source_share_in_one_sentence(tmp_path, capsys):
    from napari_spinesegdiff.cli import main

    out = tmp_path / "run"
    code = main(["train", "--kind", "baseline", "--data", "phantom:2:1", "--out", str(out),
                 "--source-share", "lumbar"])
    assert code != 0 and "SOURCE=SHARE" in capsys.readouterr().err
    code = main(["train", "--kind", "baseline", "--data", "phantom:2:1", "--out", str(out),
                 "--source-share", "lumbar=0.6"])  # the phantoms are no real source
    assert code != 0 and "training data has only the sources" in capsys.readouterr().err
    assert not (out / "log.csv").exists()  # refused before any training


def test_stop_at_keeps_the_schedule_and_resumes(tmp_path, cases):
    """--stop-at checkpoints mid-schedule (learning rate of the longer run) and --resume finishes it."""
    from napari_spinesegdiff.training.train import TrainConfig, _lr_at, train

    cfg = TrainConfig(kind="baseline", preset="tiny", iterations=8, batch_size=2, crop=(64, 64), lr=1e-3,
                      warmup=2, val_every=4, seed=1, threads=1, stop_at=4)
    train(cfg, cases[:1], cases[1:2], tmp_path, progress=False, log=lambda s: None)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4"]
    assert float(rows[1].split(",")[1]) == pytest.approx(_lr_at(3, cfg), rel=1e-2)  # not the end of a 4-run
    assert torch.load(tmp_path / "last_state.pt", weights_only=True)["iteration"] == 4
    train(TrainConfig(**{**cfg.__dict__, "stop_at": None}), cases[:1], cases[1:2], tmp_path, resume=True,
          progress=False, log=lambda s: None)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["4", "8"]


def test_partial_volume_targets_place_a_boundary_between_model_pixels():
    """``soft=True``: a disc edge that falls inside a 1 mm model pixel becomes that pixel's covered share, the
    covered area is kept, the rounded target is the nearest-neighbour one, and image and target share the
    pipeline's pixel centres (a mask that is also the image lands where the image lands)."""
    from napari_spinesegdiff.preprocess import SliceGrid
    from napari_spinesegdiff.training.data import _finish

    rows, cols = 80, 60  # 0.5 mm pixels -> 40 x 30 on the 1 mm model grid
    labels = np.zeros((2, 4, rows, cols), np.uint8)
    labels[:, 2, 21:41, 10:50] = 1  # a disc from row 21 to 40: its edges split model pixels 10 and 20 in half
    image = labels[:, 2].astype(np.float32) * 100.0
    soft = _finish("s", "s", "spider", image, labels, (3.0, 0.5, 0.5), (1.0, 1.0), np.ones(4, bool), False,
                   {"method": "none"}, soft=True)
    hard = _finish("s", "s", "spider", image, labels, (3.0, 0.5, 0.5), (1.0, 1.0), np.ones(4, bool), False,
                   {"method": "none"}, soft=False)
    disc = soft.target[0, 2].astype(np.float32)
    assert soft.target.dtype == np.float16 and hard.target.dtype == np.uint8
    assert disc.shape == (40, 30)
    np.testing.assert_allclose(disc[10, 5:25], 0.5, atol=1e-3)  # half of model row 10 is disc
    np.testing.assert_allclose(disc[20, 5:25], 0.5, atol=1e-3)
    np.testing.assert_allclose(disc[11:20, 5:25], 1.0)
    assert disc.sum() * 4 == pytest.approx(labels[0, 2].sum(), rel=1e-3)  # area kept (4 scan px per model px)
    assert set(np.unique(hard.target)) <= {0, 1}
    inter = ((disc > 0.5) & (hard.target[0, 2] > 0)).sum()
    assert 2 * inter / ((disc > 0.5).sum() + hard.target[0, 2].sum()) > 0.9
    grid = SliceGrid((rows, cols), (0.5, 0.5), (1.0, 1.0))
    expected = grid.to_model(torch.from_numpy(image)[:, None])[:, 0].numpy()
    np.testing.assert_allclose(soft.image, expected, rtol=1e-6)  # the image exactly as the pipeline sees it


def test_partial_volume_targets_are_warped_bilinearly_and_scored_rounded():
    """Batches of partial-volume cases keep values between 0 and 1 after the affine jitter, and the training
    validation scores them as the labels they round to (a perfect model scores 1)."""
    import dataclasses

    from napari_spinesegdiff.training.batches import SliceBatches
    from napari_spinesegdiff.training.train import TrainConfig, validate

    soft_cases = phantom_cases(2, seed=5, soft=True)
    assert all(c.target.dtype == np.float16 for c in soft_cases)
    edge = soft_cases[0].target.astype(np.float32)
    assert ((edge > 0.05) & (edge < 0.95)).mean() > 0.001
    # float targets that hold only 0 and 1: values in between can only come from a bilinear warp
    rounded = [dataclasses.replace(c, target=(c.target > 0.5).astype(np.float16)) for c in soft_cases]
    t = next(SliceBatches(rounded, crop=(64, 64), batch_size=6, seed=3))["target"]
    assert ((t > 0.05) & (t < 0.95)).float().mean() > 0.001 and float(t.min()) >= 0 and float(t.max()) <= 1

    class Oracle(torch.nn.Module):  # returns the rounded truth of whatever slices it is given
        def __init__(self, case):
            super().__init__()
            self.case = case

        def forward(self, image):
            hits = [int(np.flatnonzero((self.case.image == im[0].numpy()).all(axis=(1, 2)))[0]) for im in image]
            return torch.as_tensor(self.case.target[hits].astype(np.float32) > 0.5).float() * 20 - 10

    case = soft_cases[1]
    score = validate(Oracle(case), [case], TrainConfig(kind="baseline"), None, torch.device("cpu"))
    assert score["val_dice"] == pytest.approx(1.0)
