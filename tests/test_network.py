"""SpineSegDiff network layout (vs the official checkpoint), forward shapes, baseline and device choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from napari_spinesegdiff.model.baseline import BaselineNet, predict_prior
from napari_spinesegdiff.model.device import DeviceError, resolve_device
from napari_spinesegdiff.model.network import PRESETS, NetworkConfig, SpineSegDiffNet, timestep_embedding

torch.set_num_threads(1)
KEYS_TSV = Path(__file__).parents[1].parent / "shared" / "reference" / "official_checkpoint_keys.tsv"


@pytest.fixture(scope="module")
def midl() -> SpineSegDiffNet:
    return SpineSegDiffNet("midl2025")


@pytest.fixture(scope="module")
def tiny() -> SpineSegDiffNet:
    torch.manual_seed(0)
    return SpineSegDiffNet("tiny").eval()


def test_midl2025_size_and_split(midl: SpineSegDiffNet) -> None:
    sd = midl.state_dict()
    assert len(sd) == 144
    assert sum(v.numel() for v in sd.values()) == 13_784_067
    assert sum(p.numel() for p in midl.embed_model.parameters()) == 4_762_176
    assert sum(p.numel() for p in midl.model.parameters()) == 9_021_891
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_midl2025_state_dict_matches_official_tsv(midl: SpineSegDiffNet) -> None:
    if not KEYS_TSV.is_file():
        pytest.skip(f"reference key list not found at {KEYS_TSV}")
    rows = [line.rstrip("\n").split("\t") for line in KEYS_TSV.read_text().splitlines() if not line.startswith("#")]
    sd = midl.state_dict()
    assert list(sd) == [r[0] for r in rows]  # same names, same order
    assert [str(tuple(v.shape)) for v in sd.values()] == [r[1] for r in rows]
    assert {r[2] for r in rows} == {"float32"}


def test_timestep_embedding_by_hand() -> None:
    emb = timestep_embedding(torch.tensor([0, 3]), 128)
    assert emb.shape == (2, 128)
    assert torch.equal(emb[0, :64], torch.zeros(64)) and torch.equal(emb[0, 64:], torch.ones(64))
    f1 = math.exp(-math.log(10000) / 63)
    assert emb[1, 1].item() == pytest.approx(math.sin(3 * f1), abs=1e-6)
    assert emb[1, 64 + 1].item() == pytest.approx(math.cos(3 * f1), abs=1e-6)
    assert emb[1, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)


def test_tiny_forward_on_odd_sizes(tiny: SpineSegDiffNet) -> None:
    image = torch.randn(2, 1, 37, 53)
    x_t = torch.randn(2, 3, 37, 53)
    with torch.inference_mode():
        out = tiny(x_t, torch.tensor([10, 900]), image)
        feats = tiny.encode(image)
        again = tiny(x_t, torch.tensor([10, 900]), image, feats)
        other_t = tiny(x_t, 500, image, feats)
    assert out.shape == (2, 3, 37, 53) and torch.isfinite(out).all()
    shapes = [(2, 8, 48, 64), (2, 8, 24, 32), (2, 16, 12, 16), (2, 32, 6, 8), (2, 64, 3, 4)]
    assert [tuple(f.shape) for f in feats] == shapes
    assert torch.allclose(out, again, atol=1e-6)
    assert not torch.allclose(out, other_t, atol=1e-4)  # the timestep conditions the output


def test_tiny_forward_small_images_and_bad_shapes(tiny: SpineSegDiffNet) -> None:
    with torch.inference_mode():
        assert tiny(torch.zeros(1, 3, 5, 7), 0, torch.zeros(1, 1, 5, 7)).shape == (1, 3, 5, 7)
        with pytest.raises(ValueError, match="image"):
            tiny(torch.zeros(1, 3, 16, 16), 0, torch.zeros(1, 2, 16, 16))
        with pytest.raises(ValueError, match="x_t"):
            tiny(torch.zeros(1, 2, 16, 16), 0, torch.zeros(1, 1, 16, 16))
        with pytest.raises(ValueError, match="embeddings"):
            tiny(torch.zeros(2, 3, 16, 16), 0, torch.zeros(2, 1, 16, 16), tiny.encode(torch.zeros(1, 1, 16, 16)))


def test_network_config_json_round_trip() -> None:
    cfg = PRESETS["small"]
    back = NetworkConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.act == ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
    assert PRESETS["tiny"].features == (8, 8, 16, 32, 64, 8)
    with pytest.raises(ValueError):
        NetworkConfig.from_dict({"features": [1, 2, 3, 4, 5, 6], "bogus": 1})
    with pytest.raises(ValueError):
        NetworkConfig(features=(8, 8, 16))
    with pytest.raises(ValueError, match="preset"):
        SpineSegDiffNet("huge")


def test_baseline_forward_and_prior() -> None:
    torch.manual_seed(0)
    net = BaselineNet("tiny").eval()
    image = torch.randn(1, 1, 37, 53)
    logits = net(image)
    assert logits.shape == (1, 3, 37, 53)
    p = predict_prior(net, image)
    assert torch.allclose(p, torch.sigmoid(logits.detach()))
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert set(net.state_dict()) >= {"unet.conv_0.conv_0.conv.weight", "unet.final_conv.weight"}


def test_resolve_device() -> None:
    dev, msg = resolve_device("cpu")
    assert dev == torch.device("cpu") and "CPU" in msg
    auto, msg = resolve_device("auto")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert auto.type == expected and msg.endswith(".")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            resolve_device("cuda")
    with pytest.raises(DeviceError):
        resolve_device("tpu")
