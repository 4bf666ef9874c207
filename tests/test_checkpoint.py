"""Checkpoints: our safetensors format round trip, the three official raw layouts, unsafe pickles refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import pytest
import torch

from napari_spinesegdiff.model.baseline import BaselineNet
from napari_spinesegdiff.model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_network,
    read_config,
    save_checkpoint,
)
from napari_spinesegdiff.model.network import PRESETS, SpineSegDiffNet

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def midl_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return SpineSegDiffNet("midl2025").state_dict()


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["raw", "module_dict", "module_prefix"])
def test_official_layouts_load_strict(tmp_path, midl_state, layout: str) -> None:
    if layout == "raw":
        obj = midl_state
    elif layout == "module_dict":
        obj = {"module": midl_state}
    else:
        obj = {f"module.{k}": v for k, v in midl_state.items()}
    path = tmp_path / "best_model.pt"
    torch.save(obj, path)
    module, cfg = load_checkpoint(path)
    assert isinstance(module, SpineSegDiffNet) and not module.training
    assert _same_state(module.state_dict(), midl_state)
    assert cfg.network == PRESETS["midl2025"] and cfg.kind == "diffusion"
    assert cfg.x0_mode == "clamp" and cfg.crop == [320, 320] and cfg.spacing_mm == [0.625, 0.625]
    assert cfg.training["sha256"] == file_sha256(path)


def test_forced_wrong_preset_is_refused(tmp_path, midl_state) -> None:
    path = tmp_path / "model.pth"
    torch.save(midl_state, path)
    with pytest.raises(CheckpointError, match="differ in shape"):
        load_checkpoint(path, preset="tiny")


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer: str) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save({"model.final_conv.weight": evil}, path)
    else:
        path.write_bytes(pickle.dumps({"module": evil}))
    with pytest.raises(CheckpointError, match="Refusing evil.pt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    if writer == "torch":
        assert "would run code" in str(info.value)
    assert not marker.exists()


def test_safetensors_round_trip_identical_outputs(tmp_path) -> None:
    torch.manual_seed(2)
    net = SpineSegDiffNet("tiny").eval()
    cfg = CheckpointConfig(
        network=PRESETS["tiny"],
        spacing_mm=[0.8, 0.8],
        crop=[128, 96],
        training={"seed": 3, "command": "spinesegdiff train ..."},
        metrics={"dice_mean": 0.5},
    )
    path = save_checkpoint(tmp_path / "w" / "tiny.safetensors", net, cfg)
    assert sorted(os.listdir(tmp_path / "w")) == ["tiny.safetensors"]  # no temp file left
    assert read_config(path) == cfg
    module, cfg2 = load_checkpoint(path)
    assert cfg2 == cfg and cfg2.to_dict() == json.loads(cfg.to_json())
    x, image = torch.randn(2, 3, 24, 20), torch.randn(2, 1, 24, 20)
    with torch.inference_mode():
        assert torch.equal(net(x, torch.tensor([5, 700]), image), module(x, torch.tensor([5, 700]), image))
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not load_network(str(path)).training


def test_baseline_round_trip(tmp_path) -> None:
    torch.manual_seed(4)
    net = BaselineNet("tiny").eval()
    cfg = CheckpointConfig(kind="baseline", network=PRESETS["tiny"])
    path = save_checkpoint(tmp_path / "baseline.safetensors", net, cfg)
    module, cfg2 = load_checkpoint(path)
    assert isinstance(module, BaselineNet) and cfg2.kind == "baseline"
    image = torch.randn(1, 1, 33, 40)
    with torch.inference_mode():
        assert torch.equal(net(image), module(image))


def test_safetensors_without_metadata_is_read_as_official(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(5)
    state = SpineSegDiffNet("tiny").state_dict()
    path = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    assert read_config(path) is None
    module, cfg = load_checkpoint(path)
    assert cfg.network.features == PRESETS["tiny"].features and cfg.x0_mode == "clamp"
    assert _same_state(module.state_dict(), state)


def test_unreadable_inputs_give_one_sentence(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="Refusing junk.pt: it is not a plain-tensor"):
        load_checkpoint(junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(bad_st)
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a SpineSegDiff network"):
        load_checkpoint(other)
    assert issubclass(CheckpointError, ValueError)


def test_config_validation(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="kind"):
        CheckpointConfig(kind="gan")
    with pytest.raises(CheckpointError, match="class names"):
        CheckpointConfig(class_names=["a", "b"])
    with pytest.raises(CheckpointError, match="differs"):
        save_checkpoint(tmp_path / "x.safetensors", SpineSegDiffNet("tiny"), CheckpointConfig(network=PRESETS["small"]))
    d = CheckpointConfig().to_dict()
    assert d["schedule"] == {"name": "cosine", "T": 1000}
    assert d["class_names"] == ["spinal canal", "vertebrae", "intervertebral disc"]
    assert d["intensity"] == {"method": "percentile", "low": 0.5, "high": 99.5}
    assert CheckpointConfig.from_dict({**d, "future_field": 1}) == CheckpointConfig()


def _tiny_with_declared(tmp_path, name: str, kind: str = "diffusion", **network) -> "os.PathLike":
    """A file with the tiny network's weights whose metadata declares another network shape."""
    from safetensors.torch import save_file

    torch.manual_seed(6)
    net = BaselineNet("tiny") if kind == "baseline" else SpineSegDiffNet("tiny")
    declared = CheckpointConfig(kind=kind, network=PRESETS["tiny"]).to_dict()
    declared["network"].update(network)
    if "num_classes" in network:  # keep the config itself valid: one name per declared class
        declared["class_names"] = [f"class {i}" for i in range(network["num_classes"])]
    path = tmp_path / name
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"spinesegdiff": json.dumps(declared)})
    return path


@pytest.mark.parametrize(
    ("kind", "network", "what"),
    [
        ("diffusion", {"features": [4096, 4096, 8192, 8192, 16384, 4096]}, "features"),
        ("diffusion", {"num_classes": 40}, "classes"),
        ("diffusion", {"in_channels": 7}, "input channel"),
        ("diffusion", {"temb_dim": 8192}, "differ in shape"),
        ("baseline", {"features": [2048, 2048, 4096, 4096, 8192, 2048]}, "features"),
    ],
)
def test_declared_network_mismatch_refused_before_building(tmp_path, monkeypatch, kind, network, what) -> None:
    from napari_spinesegdiff.model import checkpoint as ckpt

    path = _tiny_with_declared(tmp_path, "huge.safetensors", kind, **network)

    def no_build(config):
        raise AssertionError("build_module was called for a checkpoint whose metadata does not fit its weights")

    monkeypatch.setattr(ckpt, "build_module", no_build)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert "huge.safetensors" in text and what in text and "\n" not in text
    assert text.count(". ") == 0 and text.endswith(".")


def test_declared_network_matching_loads(tmp_path) -> None:
    path = _tiny_with_declared(tmp_path, "ok.safetensors")
    module, cfg = load_checkpoint(path)
    assert cfg.network == PRESETS["tiny"] and isinstance(module, SpineSegDiffNet)


@pytest.mark.parametrize("stored", ["[1, 2]", "{not json", '{"network": 5}', '{"network": {"features": "x"}}'])
def test_invalid_stored_config_is_one_sentence(tmp_path, stored: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "odd.safetensors"
    save_file({"a": torch.zeros(2)}, str(path), metadata={"spinesegdiff": stored})
    with pytest.raises(CheckpointError, match="odd.safetensors") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
