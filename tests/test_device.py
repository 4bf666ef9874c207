"""Device choice: an accelerator this machine lacks is one sentence (DeviceError), exit 2 from ``segment``,
and the same sentence in the dock's model preparation; nothing is written."""

from __future__ import annotations

import pytest
import torch

from napari_spinesegdiff.cli import main
from napari_spinesegdiff.model import device as device_module
from napari_spinesegdiff.model.device import DeviceError, resolve_device


@pytest.fixture
def no_accelerator(monkeypatch):
    """A machine without CUDA GPU and without Apple GPU, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_mps_available", lambda: False)


def _one_sentence(text: str) -> bool:
    return text.endswith(".") and "\n" not in text and ". " not in text


@pytest.mark.parametrize("cuda_build, reason", [(None, "no CUDA support"), ("12.4", "finds no CUDA GPU")])
def test_cuda_without_a_gpu_is_one_sentence(no_accelerator, monkeypatch, cuda_build, reason):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert message.startswith("Device cuda was asked for, but ") and reason in message
    assert message.endswith("use device cpu or auto.") and _one_sentence(message)
    assert isinstance(info.value, ValueError)  # what the CLI and the dock turn into their one sentence


def test_mps_without_an_apple_gpu_is_one_sentence(no_accelerator):
    with pytest.raises(DeviceError, match=r"^Device mps was asked for, but no Apple GPU \(mps\)") as info:
        resolve_device("mps")
    assert _one_sentence(str(info.value))


def test_auto_falls_back_to_the_cpu_and_unknown_names_are_refused(no_accelerator):
    assert resolve_device("auto") == (torch.device("cpu"), "Using the CPU (no GPU found).")
    assert resolve_device(" CPU ")[0] == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^Device must be auto, cpu, cuda or mps, not 'tpu'\.$"):
        resolve_device("tpu")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.phantom import make_phantom

    ph = make_phantom(seed=3)
    return write_volume(ph.image.data, tmp_path_factory.mktemp("device") / "scan.nii.gz", like=ph.image,
                        kind="image", produced_by="test")


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_segment_on_a_missing_device_exits_2_with_one_sentence(no_accelerator, scan, tmp_path, capsys, name):
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(scan), "-o", str(out), "--uncertainty", str(tmp_path / "unc.nii.gz"),
                 "--device", name, "--slices", "mid", "--steps", "2", "--ensemble", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"spinesegdiff: error: Device {name} was asked for, but ")
    assert err.count("\n") == 0 and "Traceback" not in err and "RuntimeError" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary


def test_the_dock_prepares_no_model_on_a_missing_device(no_accelerator):
    from napari_spinesegdiff._dock.worker import preload_in_thread
    from napari_spinesegdiff.config import SegmentationConfig

    with pytest.raises(DeviceError, match=r"^Device cuda was asked for, but ") as info:
        preload_in_thread(SegmentationConfig(device="cuda"), None)
    assert _one_sentence(str(info.value))  # the dock shows it after "The model could not be prepared: "


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_train_on_a_missing_device_exits_2_before_reading_data(no_accelerator, tmp_path, capsys, name):
    out = tmp_path / "run"
    code = main(["train", "--data", "phantom:2", "--out", str(out), "--preset", "tiny", "--iterations", "2",
                 "--device", name, "--no-progress"])
    err = capsys.readouterr()
    assert code == 2
    assert err.err.strip().startswith(f"spinesegdiff: error: Device {name} was asked for, but ")
    assert "Traceback" not in err.err and "training cases" not in err.out  # refused before the data
    assert not out.exists()
