"""Whole-run data safety of ``spinesegdiff segment``: every output path is checked before the model runs,
all outputs are written together or not at all, and Ctrl+C / SIGTERM never leave a partial set or a
temporary file behind.

The model itself is replaced by a fake ``pipeline.run`` (instant, or failing the test when it must not
be reached); signals are sent to a child process running the real command line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_spinesegdiff.cli import main

CLASSES = ["spinal canal", "vertebrae", "intervertebral disc"]
FAKE = '''
import numpy as np


def fake_result(volume, cfg):
    from napari_spinesegdiff.pipeline import SegmentationResult

    labels = np.zeros(volume.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    probs = [volume.with_data(np.full(volume.shape, 0.1 * (c + 1), np.float32), kind="image") for c in range(3)]
    return SegmentationResult(
        labels=volume.with_data(labels, kind="labels"),
        uncertainty=volume.with_data(np.full(volume.shape, 0.5, np.float32), kind="image"),
        probabilities=probs, canonical_labels=labels, canonical_uncertainty=labels,
        canonical_probabilities=labels, canonical_class_uncertainty=labels, slices=(0, 1),
        class_names=["spinal canal", "vertebrae", "intervertebral disc"],
        provenance={"timings": {"total_s": 0.01}, "tool": "fake"},
    )
'''
exec(FAKE)  # defines fake_result here too


@pytest.fixture
def scan(tmp_path) -> Path:
    path = tmp_path / "scan.nii.gz"
    data = np.random.default_rng(0).normal(100, 20, (12, 10, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def temporaries(folder: Path) -> list[str]:
    return [p for p in listing(folder) if ".tmp" in p or "spinesegdiff-probe" in p]


@pytest.fixture
def no_model(monkeypatch):
    """The model must not run: any call fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("pipeline.run was called although the run had to be refused before it")

    monkeypatch.setattr("napari_spinesegdiff.pipeline.run", forbidden)


@pytest.fixture
def fake_model(monkeypatch):
    calls = []

    def run(volume, cfg, callback=None, **kwargs):
        calls.append(cfg)
        return fake_result(volume, cfg)

    monkeypatch.setattr("napari_spinesegdiff.pipeline.run", run)
    return calls


def segment(*argv) -> int:
    return main(["segment", *map(str, argv), "--no-progress"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("spinesegdiff: error: ") and err.count("\n") == 0, err
    return err


# ------------------------------------------------------------------------------ refused before the run


def test_outputs_that_coincide_are_refused_before_the_run(scan, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    out.mkdir()
    a = out / "A.nii.gz"
    cases = [
        (["-o", a, "--uncertainty", a], "is also the labels output"),
        (["-o", a, "--uncertainty", out / "A.json"], "extension is not one SpineSegDiff writes"),  # the sidecar
        (["-o", a, "--uncertainty", out / "P_vertebra.nii.gz", "--probabilities", out / "P.nii.gz"],
         "is also the uncertainty map output"),
        (["-o", out / "P_spinal_canal.nii.gz", "--probabilities", out / "P.nii.gz"], "is also the labels output"),
    ]
    for argv, phrase in cases:
        before = listing(tmp_path)
        assert segment(scan, *argv) == 2
        assert phrase in one_error_line(capsys)
        assert listing(tmp_path) == before


def test_outputs_that_are_inputs_are_refused(scan, tmp_path, capsys, no_model):
    from napari_spinesegdiff.pipeline import SHIPPED_DIFFUSION

    ckpt = tmp_path / "model.safetensors"
    shutil.copy(SHIPPED_DIFFUSION, ckpt)
    truth = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 6), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), truth)
    (tmp_path / "link.nii.gz").symlink_to(scan)
    raw = np.arange(4 * 5 * 6, dtype=np.uint8)
    (tmp_path / "d.raw").write_bytes(raw.tobytes())
    mhd = tmp_path / "m.mhd"
    mhd.write_text("NDims = 3\nDimSize = 4 5 6\nElementType = MET_UCHAR\nElementDataFile = d.raw\n")
    cases = [
        ([scan, "-o", scan], "is the input scan"),
        ([scan, "-o", tmp_path / "link.nii.gz"], "is the input scan"),
        ([scan, "-o", tmp_path / "o.nii.gz", "--uncertainty", ckpt, "--checkpoint", ckpt], "diffusion checkpoint"),
        ([scan, "-o", truth, "--truth", truth], "is the truth file"),
        ([mhd, "-o", tmp_path / "d.raw"], "input scan's data file d.raw"),
        ([scan, "-o", SHIPPED_DIFFUSION], "diffusion checkpoint"),
    ]
    series = tmp_path / "series"
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "formats" / "niivue" / "dicom_series"
    if shared.is_dir():
        shutil.copytree(shared, series)
        first = sorted(series.iterdir())[0]
        cases.append(([series, "-o", first], f"input scan's file {first.name}"))
        cases.append(([first, "-o", sorted(series.iterdir())[1]], "input scan's file"))
    for argv, phrase in cases:
        before = {p: p.read_bytes() for p in (scan, ckpt, truth, tmp_path / "d.raw")}
        assert segment(*argv) == 2
        assert phrase in one_error_line(capsys)
        assert all(p.read_bytes() == b for p, b in before.items())
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("name", ["out.png", "out", "out.nii.gz.bak", "labels.json", "out.dcm"])
def test_unsupported_extension_is_refused_before_the_run(scan, tmp_path, capsys, no_model, name):
    before = listing(tmp_path)
    assert segment(scan, "-o", tmp_path / name) == 2
    err = one_error_line(capsys)
    assert name in err and "extension is not one SpineSegDiff writes" in err
    assert segment(scan, "-o", tmp_path / "ok.nii.gz", "--uncertainty", tmp_path / name) == 2
    assert "uncertainty map" in one_error_line(capsys)
    assert listing(tmp_path) == before


def test_output_in_a_file_or_a_folder_is_refused(scan, tmp_path, capsys, no_model):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert segment(scan, "-o", tmp_path / "notes.txt" / "out.nii.gz") == 2
    assert "notes.txt is a file, not a folder" in one_error_line(capsys)
    assert segment(scan, "-o", tmp_path / "notes.txt" / "deeper" / "out.nii.gz") == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    (tmp_path / "taken.nii.gz").mkdir()
    assert segment(scan, "-o", tmp_path / "taken.nii.gz") == 2
    assert "it is a folder" in one_error_line(capsys)
    os.mkfifo(tmp_path / "pipe.nii.gz")
    assert segment(scan, "-o", tmp_path / "pipe.nii.gz") == 2
    assert "device, pipe or socket" in one_error_line(capsys)


def test_unwritable_folder_is_refused(scan, tmp_path, capsys, no_model, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    import napari_spinesegdiff.io.outputs as outputs

    locked.chmod(0o500)
    try:
        if os.geteuid() != 0:
            assert segment(scan, "-o", locked / "out.nii.gz") == 2
            assert "is not usable because it is not writable" in one_error_line(capsys)
        else:  # root ignores permission bits: the probe rightly finds the folder writable
            assert outputs._probe_writable(locked) is None
    finally:
        locked.chmod(0o700)
    # A folder where creating a file fails although os.access says yes (read-only mount, root), and one
    # where os.access says no

    real = outputs.tempfile.mkstemp

    def refuse_in_locked(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == locked:
            raise PermissionError(13, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse_in_locked)
    assert segment(scan, "-o", locked / "out.nii.gz") == 2
    err = one_error_line(capsys)
    assert "no file can be created in it (Read-only file system)" in err and str(locked) in err
    monkeypatch.setattr(outputs.os, "access", lambda *a, **k: False)
    assert segment(scan, "-o", locked / "out.nii.gz") == 2
    assert "it is not writable" in one_error_line(capsys)
    assert listing(locked) == []


def test_immutable_folder_is_refused_even_for_root(scan, tmp_path, capsys, no_model):
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(frozen)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        assert segment(scan, "-o", frozen / "out.nii.gz") == 2
        err = one_error_line(capsys)
        assert "it is not writable" in err or "no file can be created in it" in err
    finally:
        subprocess.run(["chattr", "-i", str(frozen)], check=True)


def test_all_zero_scan_is_refused_before_the_run(tmp_path, capsys, no_model):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((12, 10, 6), np.float32), np.eye(4)), flat)
    assert segment(flat, "-o", tmp_path / "o.nii.gz") == 2
    err = one_error_line(capsys)
    assert "flat.nii.gz" in err and "no signal" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_checkpoint_with_oversized_metadata_is_refused_without_building(scan, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from napari_spinesegdiff.model import checkpoint as ckpt_module
    from napari_spinesegdiff.pipeline import SHIPPED_DIFFUSION

    state = load_file(str(SHIPPED_DIFFUSION))
    declared = ckpt_module.read_config(SHIPPED_DIFFUSION).to_dict()
    declared["network"]["features"] = [4096, 4096, 8192, 8192, 16384, 4096]
    huge = tmp_path / "huge.safetensors"
    save_file(state, str(huge), metadata={"spinesegdiff": json.dumps(declared)})

    def no_build(config):
        raise AssertionError("a network was built for a checkpoint whose metadata does not fit its weights")

    monkeypatch.setattr(ckpt_module, "build_module", no_build)
    t0 = time.perf_counter()
    assert segment(scan, "-o", tmp_path / "o.nii.gz", "--checkpoint", huge, "--prior", "none") == 2
    err = one_error_line(capsys)
    assert "huge.safetensors" in err and "features" in err and "differ in shape" in err
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "o.nii.gz").exists() and not temporaries(tmp_path)


# ------------------------------------------------------------------------------------- all or nothing


def test_complete_set_lands_together(scan, tmp_path, capsys, fake_model):
    out = tmp_path / "new" / "deeper"
    argv = ["-o", out / "labels.nii.gz", "--uncertainty", out / "unc.mha", "--probabilities", out / "p.nrrd"]
    assert segment(scan, *argv) == 0 and len(fake_model) == 1
    names = listing(out)
    assert names == sorted(["labels.nii.gz", "labels.json", "unc.mha", "p_spinal_canal.nrrd", "p_vertebrae.nrrd",
                            "p_intervertebral_disc.nrrd"])
    side = json.loads((out / "labels.json").read_text())
    assert set(side["outputs"]) == {"labels", "uncertainty", "probability spinal canal", "probability vertebrae",
                                    "probability intervertebral disc"}
    from napari_spinesegdiff.io import read_volume

    assert read_volume(out / "labels.nii.gz").kind == "labels"
    assert oct((out / "labels.nii.gz").stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("after", [1, 3])
def test_interrupt_during_the_writes_leaves_nothing(scan, tmp_path, capsys, fake_model, monkeypatch, after):
    import napari_spinesegdiff.io.writers as outputs  # the format writers the output set calls

    out = tmp_path / "fresh"
    old = tmp_path / "old.nii.gz"
    shutil.copy(scan, old)  # a previous result at the labels path must survive a cancelled run
    before = old.read_bytes()
    calls = []
    real_nifti, real_itk = outputs._write_nifti, outputs._write_itk

    def interrupting(real):
        def write(*args, **kwargs):
            calls.append(args[1])
            if len(calls) > after:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(outputs, "_write_nifti", interrupting(real_nifti))
    monkeypatch.setattr(outputs, "_write_itk", interrupting(real_itk))
    code = segment(scan, "-o", old, "--uncertainty", out / "unc.nii.gz", "--probabilities", out / "p.mha")
    assert code == 130
    assert "cancelled" in one_error_line(capsys)
    assert old.read_bytes() == before
    assert not out.exists()  # the folder this run created is gone again
    assert not temporaries(tmp_path)


def test_failed_move_restores_the_previous_set(scan, tmp_path, monkeypatch):
    from napari_spinesegdiff.io import read_volume
    from napari_spinesegdiff.io.outputs import OutputSet

    vol = read_volume(scan)
    a, b, c = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz", tmp_path / "c.json"
    a.write_bytes(b"previous a")
    real_replace = os.replace
    moved = []

    def flaky(src, dst):
        if str(dst).endswith("c.json") and not str(src).endswith(".old"):
            raise OSError(28, "No space left on device")
        moved.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr("napari_spinesegdiff.io.outputs.os.replace", flaky)
    with pytest.raises(OSError, match="No space"):
        with OutputSet() as out:
            out.add_volume(vol.data, a, like=vol, kind="image")
            out.add_volume(vol.data, b, like=vol, kind="image")
            out.add_text(c, "{}")
            out.commit()
    assert a.read_bytes() == b"previous a" and not b.exists() and not c.exists()
    assert listing(tmp_path) == sorted(["a.nii.gz", "scan.nii.gz"])


def test_output_set_refuses_the_source_and_cleans_up(scan, tmp_path):
    from napari_spinesegdiff.io import VolumeWriteError, read_volume
    from napari_spinesegdiff.io.outputs import OutputSet

    vol = read_volume(scan)
    with pytest.raises(VolumeWriteError, match="input scan"):
        with OutputSet() as out:
            out.add_volume(vol.data, tmp_path / "fine.nii.gz", like=vol, kind="image")
            out.add_volume(vol.data, scan, like=vol, kind="image")
    assert listing(tmp_path) == ["scan.nii.gz"]


# --------------------------------------------------------------------------- signals to a real process

DRIVER = FAKE + '''
import os, sys, time
import napari_spinesegdiff.pipeline as pipeline
import napari_spinesegdiff.io.writers as outputs  # the format writers the output set calls

mode = os.environ["SAFETY_MODE"]


def run(volume, cfg, callback=None, **kwargs):
    if mode == "run":
        print("RUNNING", flush=True)
        time.sleep(120)
    return fake_result(volume, cfg)


pipeline.run = run
real = outputs._write_nifti
count = []


def slow_write(*args, **kwargs):
    real(*args, **kwargs)
    count.append(1)
    if mode == "write" and len(count) == 2:
        print("WRITING", flush=True)
        time.sleep(120)


outputs._write_nifti = slow_write
from napari_spinesegdiff.cli import main

sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.parametrize("mode", ["run", "write"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_or_mid_write_leaves_nothing(scan, tmp_path, mode, signum):
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    out = tmp_path / "results"
    out.mkdir()
    previous = out / "labels.nii.gz"
    previous.write_bytes(b"an earlier result")
    argv = [sys.executable, str(driver), "segment", str(scan), "-o", str(previous), "--uncertainty",
            str(out / "unc.nii.gz"), "--probabilities", str(out / "p.nii.gz"), "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SAFETY_MODE": mode})
    try:
        marker = "RUNNING" if mode == "run" else "WRITING"
        line = proc.stdout.readline()
        assert line.strip() == marker, (line, proc.stderr.read() if proc.poll() is not None else "")
        if mode == "write":
            assert temporaries(out), "the first outputs should be sitting in temporaries now"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "cancelled; no output was written" in err
    assert listing(out) == ["labels.nii.gz"] and previous.read_bytes() == b"an earlier result"
    assert not temporaries(tmp_path)
