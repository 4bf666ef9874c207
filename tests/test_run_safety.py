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
from _absurd_inputs import ABSURD, IDS, nifti_scan

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
    real_access = os.access  # os.access says no for the output folder (the scan stays readable)
    monkeypatch.setattr(outputs.os, "access", lambda p, mode, **k: Path(p) != locked and real_access(p, mode))
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
import os, signal, sys, time
# a shell that starts a job in the background (no job control) starts it with SIGINT ignored, which Python
# keeps: give the child the handler a terminal's Ctrl+C meets
signal.signal(signal.SIGINT, signal.default_int_handler)
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


# ------------------------------------------------------------------------------- absurd inputs, memory


@pytest.mark.parametrize("make, phrase", ABSURD, ids=IDS)
def test_absurd_inputs_are_refused_before_the_run(tmp_path, capsys, no_model, make, phrase):
    from napari_spinesegdiff.io import VolumeReadError, read_volume

    scan = make(tmp_path)
    with pytest.raises(VolumeReadError) as direct:
        read_volume(scan)
    assert phrase in str(direct.value)
    out = tmp_path / "out"
    out.mkdir()
    before = listing(tmp_path)
    assert segment(scan, "-o", out / "labels.nii.gz", "--uncertainty", out / "unc.nii.gz") == 2
    assert one_error_line(capsys) == f"spinesegdiff: error: {direct.value}"  # read_volume's own sentence
    assert listing(tmp_path) == before


@pytest.fixture
def networks_that_must_not_run(monkeypatch):
    """The shipped checkpoints' configurations with networks that fail the test when called."""
    import torch

    from napari_spinesegdiff import pipeline
    from napari_spinesegdiff.model.checkpoint import read_config

    def forbidden(*args, **kwargs):
        raise AssertionError("a network ran although the run had to be refused before it")

    loaded = pipeline.LoadedModels(forbidden, read_config(pipeline.SHIPPED_DIFFUSION), forbidden,
                                   read_config(pipeline.SHIPPED_BASELINE), torch.device("cpu"), "Using the CPU.",
                                   str(pipeline.SHIPPED_DIFFUSION), str(pipeline.SHIPPED_BASELINE), "openvino", "bf16")
    monkeypatch.setattr(pipeline, "load_models", lambda config: loaded)
    return loaded


def test_a_grid_that_would_not_fit_in_memory_is_refused_with_the_numbers(tmp_path, capsys, monkeypatch,
                                                                         networks_that_must_not_run):
    from napari_spinesegdiff import pipeline
    from napari_spinesegdiff.config import SegmentationConfig
    from napari_spinesegdiff.io import limits, read_volume

    scan = nifti_scan(tmp_path / "wide.nii.gz", (1, 1000, 1000), (1.0, 1.0, 1.0))  # 1 m across: a scan, just
    monkeypatch.setattr(limits, "available_memory", lambda: (2 * 2**30, "the address space left under this "
                                                                        "process's limit"))
    out = tmp_path / "out"
    assert segment(scan, "-o", out / "labels.nii.gz") == 2
    err = one_error_line(capsys)
    assert err.startswith(f"spinesegdiff: error: Cannot segment {scan}: its slices of 1000 x 1000 voxels")
    assert "1000 x 1000 pixels at the model's 1 x 1 mm" in err and "(1 slice, 1 at a time, 5 samples each)" in err
    need = limits.estimate_run_bytes((1, 1000, 1000), (1.0, 1.0, 1.0), (1.0, 1.0), chosen=1, batch_slices=4,
                                     ensemble=5, classes=4, engine="openvino").bytes
    assert f"needs about {need / 2**30:.1f} GiB of memory, more than the 2.0 GiB of the address space" in err
    assert 2 * 2**30 < need < 4 * 2**30 and not out.exists()
    # the same run where 4 GiB are left: not refused (the check compares numbers, it refuses no size as such)
    monkeypatch.setattr(limits, "available_memory", lambda: (4 * 2**30, "the memory the machine has available"))
    pipeline.check_fits(read_volume(scan), SegmentationConfig(), networks_that_must_not_run)


def test_the_memory_estimate_follows_the_model_grid():
    from napari_spinesegdiff.io.limits import estimate_run_bytes

    def need(shape, spacing, **kw):
        kw = {"chosen": shape[0], "batch_slices": 4, "ensemble": 5, "classes": 4, "engine": "openvino", **kw}
        return estimate_run_bytes(shape, spacing, (1.0, 1.0), **kw)

    fine, coarse = need((1, 1200, 1200), (3.0, 0.5, 0.5)), need((1, 600, 600), (3.0, 1.0, 1.0))
    assert fine.model_shape == coarse.model_shape == (600, 600)
    scan_term = 4 * 40  # bytes per scan voxel with four classes
    assert fine.bytes - coarse.bytes == (1200**2 - 600**2) * scan_term  # the same model grid: only the scan grows
    one, four = need((8, 600, 600), (3.0, 1.0, 1.0), batch_slices=1), need((8, 600, 600), (3.0, 1.0, 1.0))
    assert four.batch == 4 and four.bytes - 8 * 600**2 * scan_term == 4 * (one.bytes - 8 * 600**2 * scan_term)
    gpu = need((8, 600, 600), (3.0, 1.0, 1.0), on_cpu=False)
    assert gpu.bytes == 8 * 600**2 * scan_term  # the networks' activations live on the accelerator
    assert need((1, 3000, 3000), (1.0, 1.0, 1.0), engine="torch").bytes > need((1, 3000, 3000), (1.0, 1.0, 1.0)).bytes
    huge = need((12, 64, 64), (1e9, 1e9, 1e9))  # Python integers: no overflow, just a number no machine has
    assert huge.model_shape == (64 * 10**9, 64 * 10**9) and huge.bytes > 10**22


def test_available_memory_counts_the_address_space_limit():
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from napari_spinesegdiff.io.limits import _vm_size, available_memory; "
            "left, what = available_memory(); print(left + _vm_size(), what)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, what = proc.stdout.split(" ", 1)
    if "address space" not in what:  # the machine or container has less than the limit left
        pytest.skip(f"less memory than the 3 GiB limit is available here ({what.strip()})")
    assert abs(int(total) - (3 << 30)) < 16 << 20  # the limit minus what the process had mapped


# ------------------------------------------------------------------------------- stale temporaries


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(scan, tmp_path, fake_model, capsys):
    from napari_spinesegdiff.io.temporaries import writer_tag

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    out = tmp_path / "results"
    out.mkdir()
    outputs = ["-o", out / "labels.nii.gz", "--uncertainty", out / "unc.nii.gz"]
    proc = subprocess.Popen([sys.executable, str(driver), "segment", str(scan), *map(str, outputs), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "SAFETY_MODE": "write"})
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read() if proc.poll() is not None else ""
        proc.kill()  # SIGKILL in the middle of the writes: no handler runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = temporaries(out)
    assert len(left) == 2 and all(f"-{proc.pid}." in name for name in left), left  # labels and unc.nii.gz
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    alive = f".labels.nii.gz.{writer_tag().split('-')[0]}-{sleeper.pid}.abcdefgh.tmp.nii.gz"
    decoys = [alive,  # a writer that is still running: a concurrent run to the same output
              ".labels.nii.gz.ABCDEFGH.tmp.nii.gz", "labels.nii.gz.abcdefgh.tmp.nii.gz",
              ".labels.nii.gz.abcdefg.tmp.nii.gz", ".labels.nii.gz.abcdefgh.tmp.nii", ".labels.nii.gz.abcdefgh.tmp.mha",
              ".labels.nii.gz.abcdefgh.tmp.nii.gz.bak", ".label.nii.gz.abcdefgh.tmp.nii.gz", "notes.tmp.nii.gz",
              ".labels.nii.gz.abcdefgh.tmp.old"]  # an old copy that is not the target's content
    try:
        for name in decoys:
            (out / name).write_bytes(b"not a temporary of this output")
        assert segment(scan, *outputs) == 0
        assert sorted(listing(out)) == sorted(["labels.nii.gz", "labels.json", "unc.nii.gz", *decoys])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert segment(scan, *outputs) == 0  # now its writer is gone: that one goes too
    assert sorted(listing(out)) == sorted(["labels.nii.gz", "labels.json", "unc.nii.gz", *decoys[1:]])


def test_which_temporaries_count_as_stale(tmp_path):
    from napari_spinesegdiff.io import temporaries as tmp

    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"the current result")
    host = tmp.writer_tag().split("-")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    names = {
        "young_unknown_writer": ".labels.nii.gz.abcdefgh.tmp.nii.gz",  # from before the writer was recorded
        "old_unknown_writer": ".labels.nii.gz.bcdefghi.tmp.nii.gz",
        "other_machine_dead_pid": f".labels.nii.gz.00000000-{dead}.cdefghij.tmp.nii.gz",
        "dead_writer": f".labels.nii.gz.{host}-{dead}.defghijk.tmp.nii.gz",
        "this_process": f".labels.nii.gz.{tmp.writer_tag()}.efghijkl.tmp.nii.gz",
        "backup_of_the_current_content": f".labels.nii.gz.{host}-{dead}.fghijklm.tmp.old",
        "backup_of_other_content": f".labels.nii.gz.{host}-{dead}.ghijklmn.tmp.old",
    }
    for key, name in names.items():
        if key == "backup_of_the_current_content":
            os.link(target, tmp_path / name)
        else:
            (tmp_path / name).write_bytes(b"x")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(tmp_path / names["old_unknown_writer"], (two_hours_ago, two_hours_ago))
    (tmp_path / f".labels.nii.gz.{host}-{dead}.hijklmno.tmp.nii.gz").mkdir()  # a folder: never ours
    (tmp_path / f".labels.nii.gz.{host}-{dead}.ijklmnop.tmp.nii.gz").symlink_to(target)  # a link: never ours
    stale = {p.name for p in tmp.stale_temporaries(target)}
    assert stale == {names[k] for k in ("old_unknown_writer", "dead_writer", "backup_of_the_current_content")}
    assert {p.name for p in tmp.remove_stale(target)} == stale
    assert target.read_bytes() == b"the current result" and not any((tmp_path / n).exists() for n in stale)
    later = time.time() + 2 * 3600  # an hour on, every temporary whose writer cannot be asked is stale
    assert {p.name for p in tmp.stale_temporaries(target, now=later)} == {
        names[k] for k in ("young_unknown_writer", "other_machine_dead_pid")}


def test_temporaries_of_long_names_still_fit(tmp_path):
    from napari_spinesegdiff.io import temporaries as tmp

    target = tmp_path / ("x" * 218 + ".nii.gz")  # 225 bytes: a temporary of 246 fits, with the writer 257 or more
    made = tmp.make_temporary(target)
    assert len(made.name) == 246 and tmp._pattern(target).match(made.name)
    assert tmp.stale_temporaries(target) == []  # no writer to ask: stale only after STALE_AFTER_S
    assert tmp.stale_temporaries(target, now=time.time() + tmp.STALE_AFTER_S + 60) == [made]
