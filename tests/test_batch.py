"""``spinesegdiff batch``: cohorts of scans through a local process pool and through Dask.

Three small phantoms (one in a subfolder, one as MetaImage) and one truncated NIfTI, fast settings
(2 DDIM steps, 1 sample, 2 slices).  One Dask LocalCluster of 2 worker processes serves the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_spinesegdiff import batch
from napari_spinesegdiff.cli import main
from napari_spinesegdiff.io.readers import read_volume
from napari_spinesegdiff.io.writers import write_volume
from napari_spinesegdiff.phantom import make_phantom

FAST = ["--steps", "2", "--ensemble", "1", "--slices", "1:3", "--no-progress"]
GOOD = ("a", "c", "sub/b")
DICE_FLOOR = 0.85  # canal and disc on the segmented slices (label 2's meaning depends on the model version)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def _rows(outdir: Path) -> dict[str, dict]:
    import pyarrow.parquet as pq

    table = pq.read_table(outdir / "results.parquet")
    assert table.column_names == list(batch.COLUMNS)
    return {r["scan"]: r for r in table.to_pylist()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """a.nii.gz (small), sub/b.mha and c.nii.gz (larger in-plane, so a kill lands between scans),
    broken.nii.gz (truncated); truths outside the input folder."""
    root = tmp_path_factory.mktemp("cohort")
    scans, truth = root / "scans", root / "truth"
    (scans / "sub").mkdir(parents=True)
    truth.mkdir()
    spec = {"a": (11, "a.nii.gz", 1.0), "sub/b": (12, "sub/b.mha", 0.8), "c": (13, "c.nii.gz", 0.8)}
    truths = {}
    for name, (seed, rel, mm) in spec.items():
        ph = make_phantom(seed=seed, spacing=(3.5, mm, mm), fov_mm=(14.0, 200.0, 160.0))
        write_volume(ph.image.data, scans / rel, like=ph.image, kind="image")
        truths[name] = ph.truth().canonical()
    data = (scans / "a.nii.gz").read_bytes()
    (scans / "broken.nii.gz").write_bytes(data[: len(data) // 2])
    return {"scans": scans, "truth": truths, "root": root}


@pytest.fixture(scope="module")
def dask_address():
    import logging

    from dask.distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def dask_out(cohort, dask_address) -> Path:
    out = cohort["root"] / "out_dask"
    code = main(["batch", str(cohort["scans"]), "-o", str(out), "--scheduler", dask_address, *FAST])
    assert code == 3  # every scan tried, one failed
    return out


# ----------------------------------------------------------------------------------- no model needed


def test_measure_on_truth_passes_qa_and_flags_broken_structures():
    ph = make_phantom(seed=5)
    spacing = ph.image.orientation.canonical_spacing
    unc = np.zeros(ph.image.canonical().shape, np.float32)
    n = unc.shape[0]
    for vertebrae in ("whole", "split"):
        truth = ph.truth(vertebrae).canonical()
        row = batch.measure(truth, unc, spacing, range(n), vertebrae)
        assert row["qa_pass"], row["qa_flags"]
        assert (row["disc_levels"], row["vertebra_levels"], row["canal_pieces"]) == (6, 7, 1)
        assert 40 < row["canal_ml"] < 70 and 60 < row["disc_ml"] < 120
        assert (row["posterior_ml"] is None) == (vertebrae == "whole")
    truth = ph.truth().canonical().copy()
    broken = truth.copy()
    broken[broken == 3] = 0
    rows = np.nonzero((truth == 1).any(axis=(0, 2)))[0]
    mid = int(rows[len(rows) // 2])
    cut = broken[:, mid - 3: mid + 3]  # a view: cut the canal in two
    cut[cut == 1] = 0
    unc[truth > 0] = 0.2
    row = batch.measure(broken, unc, spacing, range(n))
    flags = row["qa_flags"].split(";")
    assert "missing:disc" in flags and "canal_pieces:2" in flags and not row["qa_pass"]
    assert row["canal_unc_mean"] == pytest.approx(0.2) and 0 < row["uncertainty_score"] < 0.2
    partial = batch.measure(truth, unc, spacing, [n // 2])
    assert not any(f.startswith("volume:") for f in partial["qa_flags"].split(";"))  # partial runs: no volume check


@pytest.mark.parametrize("series", ["018", "041", "050", "152"])
def test_qa_raises_no_flag_on_real_spider_truth(shared_file, series):
    """The QA ranges against real labels: a short thecal sac (050, 152), specks of canal label (041)."""
    truth = read_volume(shared_file(f"spider_t2space/SPIDER_{series}_t2SPACE_label.nii.gz"), kind="labels")
    labels = truth.canonical()
    row = batch.measure(labels, np.zeros(labels.shape, np.float32), truth.orientation.canonical_spacing,
                        range(labels.shape[0]))
    assert row["qa_pass"], row["qa_flags"]
    assert 6 <= row["disc_levels"] <= 9 and 6 <= row["vertebra_levels"] <= 9


def test_find_scans_folder_glob_and_tables(tmp_path):
    ph = make_phantom(seed=1, spacing=(3.5, 2.0, 2.0))
    (tmp_path / "in" / "s1" / "dicom").mkdir(parents=True)
    for rel in ("s1/t2.nii.gz", "s1/t2_label.nii.gz", "t1.mha", "t1.nii"):
        write_volume(ph.image.data, tmp_path / "in" / rel, like=ph.image, kind="image")
    (tmp_path / "in" / "s1" / "dicom" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    out = tmp_path / "in" / "out"  # an OUTDIR inside the input: a previous batch's outputs are not inputs
    write_volume(ph.image.data, out / "s1" / "t2_uncertainty.nii.gz", like=ph.image, kind="image")

    jobs, ignored = batch.find_scans(tmp_path / "in", out)
    assert [j.name for j in jobs] == ["s1/dicom", "s1/t2", "t1_mha", "t1_nii"]
    assert [Path(i).name for i in ignored] == ["t2_label.nii.gz"]
    assert batch.input_sha256(jobs[1].path) == batch._sha256_file(Path(jobs[1].path))

    jobs, _ = batch.find_scans(str(tmp_path / "in" / "**" / "t2*.nii.gz"), out)
    assert [j.name for j in jobs] == ["s1/t2"]

    (tmp_path / "cohort.csv").write_text("path,age\nin/s1/t2.nii.gz,40\nin/t1.mha,50\nin/missing.nii.gz,60\n")
    jobs, _ = batch.find_scans(tmp_path / "cohort.csv", out)
    assert [j.name for j in jobs] == ["s1/t2", "t1", "missing"]
    assert jobs[2].path == str(tmp_path / "in" / "missing.nii.gz")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(tmp_path / "in" / "t1.nii")], "id": ["site9/p1"]}),
                   tmp_path / "cohort.parquet")
    jobs, _ = batch.find_scans(tmp_path / "cohort.parquet", out)
    assert [(j.name, Path(j.path).name) for j in jobs] == [("site9/p1", "t1.nii")]

    (tmp_path / "bad.csv").write_text("file\nx.nii.gz\n")
    with pytest.raises(batch.BatchError, match="no 'path' column"):
        batch.find_scans(tmp_path / "bad.csv", out)


# ------------------------------------------------------------------------------------ through Dask


def test_dask_batch_segments_every_good_scan_and_reports_the_broken_one(cohort, dask_out):
    rows = _rows(dask_out)
    assert set(rows) == {"a", "broken", "c", "sub/b"}
    bad = rows["broken"]
    assert bad["status"] == "failed" and "broken.nii.gz" in bad["error"] and bad["error"].endswith(".")
    assert bad["labels"] is None and not (dask_out / "broken_labels.nii.gz").exists()
    for name in GOOD:
        row = rows[name]
        assert row["status"] == "ok", row["error"]
        assert row["slices"] == "1:3" and row["input_sha256"] == batch.input_sha256(row["input"])
        assert row["model_sha256"] and row["baseline_sha256"] and row["settings_sha256"]
        assert row["canal_ml"] > 0 and row["disc_ml"] > 0 and 0 < row["uncertainty_score"] < 0.37
        labels = read_volume(dask_out / row["labels"], kind="labels").canonical()
        assert read_volume(dask_out / row["uncertainty"], kind="image").shape == labels.shape
        truth = cohort["truth"][name]
        for value in (1, 3):
            d = _dice(labels[1:3] == value, truth[1:3] == value)
            assert d > DICE_FLOOR, (name, value, d)
        side = json.loads((dask_out / f"{name}.json").read_text())
        assert side["batch"]["key"] == {k: row[k] for k in ("input_sha256", "model_sha256", "baseline_sha256",
                                                             "settings_sha256")}
        assert side["input"]["sha256"] == row["input_sha256"]  # the pipeline's provenance agrees
        assert side["config"]["seed"] == 0 and side["config"]["steps"] == 2
    csv_lines = (dask_out / "results.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(batch.COLUMNS) and len(csv_lines) == 5
    assert not list(dask_out.rglob("*.tmp*"))


def test_second_run_skips_everything_without_the_model(cohort, dask_out, monkeypatch):
    import napari_spinesegdiff.pipeline as pipeline

    def no_model(*args, **kwargs):
        raise AssertionError("the model was called for an up-to-date scan")

    monkeypatch.setattr(pipeline, "run", no_model)
    monkeypatch.setattr(pipeline, "load_models", no_model)
    before = {n: (dask_out / f"{n}_labels.nii.gz").stat().st_mtime_ns for n in GOOD}
    os.utime(cohort["scans"] / "c.nii.gz")  # same bytes, new time: hashed again, still skipped
    # in this process (--workers 0), so the monkeypatched pipeline would see any model call
    assert main(["batch", str(cohort["scans"]), "-o", str(dask_out), "--workers", "0", *FAST]) == 3
    rows = _rows(dask_out)
    for name in GOOD:
        assert rows[name]["status"] == "skipped" and rows[name]["seconds"] < 1.0
        assert rows[name]["disc_ml"] > 0  # the stored results stay in the table
        assert (dask_out / f"{name}_labels.nii.gz").stat().st_mtime_ns == before[name]
    assert rows["broken"]["status"] == "failed"  # failures are tried again


# ------------------------------------------------------------------------- local pool, kill, resume


@pytest.fixture(scope="module")
def resumed_out(cohort) -> tuple[Path, set[str]]:
    """A batch in a subprocess (local pool of 1 worker) killed after its first scan, then rerun here
    with a pool of 2 workers."""
    out = cohort["root"] / "out_pool"
    cmd = [sys.executable, "-m", "napari_spinesegdiff.cli", "batch", str(cohort["scans"]), "-o", str(out),
           "--workers", "1", *FAST]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        while not (out / "a.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the first scan did not finish in time"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the batch and its pool worker
        proc.wait()
        proc.stderr.close()
    done = {n for n in GOOD if (out / f"{n}.json").exists()}
    assert main(["batch", str(cohort["scans"]), "-o", str(out), "--workers", "2", *FAST]) == 3
    return out, done


def test_killed_batch_resumes_where_it_stopped(resumed_out):
    out, done_before = resumed_out
    assert "a" in done_before and done_before != set(GOOD), done_before
    rows = _rows(out)
    assert set(rows) == {"a", "broken", "c", "sub/b"}
    for name in GOOD:
        assert rows[name]["status"] == ("skipped" if name in done_before else "ok"), rows[name]
        assert (out / f"{name}_labels.nii.gz").exists()
    assert rows["broken"]["status"] == "failed"
    assert len(list((out / ".rows").rglob("*.json"))) == 4
    assert not list(out.rglob("*.tmp*"))


def test_local_pool_and_dask_give_identical_labels(dask_out, resumed_out):
    out, _ = resumed_out
    for name in GOOD:
        a = read_volume(dask_out / f"{name}_labels.nii.gz", kind="labels").data
        b = read_volume(out / f"{name}_labels.nii.gz", kind="labels").data
        assert np.array_equal(a, b), name


def _crash_or_ok(job, settings):
    """Stands in for segment_scan in the pool test: the scan named 'crash' kills its worker process."""
    if job.name == "crash":
        os._exit(3)
    row = batch._base_row(job, settings)
    row.update(status="ok")
    return row


def test_a_scan_that_kills_its_worker_is_one_failed_row(tmp_path):
    from napari_spinesegdiff.config import SegmentationConfig

    settings = batch.BatchSettings(str(tmp_path), SegmentationConfig(), "model", None, "settings")
    jobs = [batch.ScanJob(str(tmp_path / f"{n}.nii.gz"), n) for n in ("a", "crash", "b", "c", "d")]
    rows = []
    batch._run_pool(jobs, settings, 2, rows.append, fn=_crash_or_ok)
    status = {r["scan"]: r["status"] for r in rows}
    assert status == {"a": "ok", "crash": "failed", "b": "ok", "c": "ok", "d": "ok"}
    crash = next(r for r in rows if r["scan"] == "crash")
    assert "worker process died" in crash["error"]


def test_a_symlink_loop_in_the_folder_is_one_failed_row(tmp_path, capsys):
    """A link that points at itself among the scans (and a folder link in a loop): the batch does not crash,
    the good scan is segmented and the loop is one failed row whose error says so in one sentence."""
    ph = make_phantom(seed=2, spacing=(3.5, 2.0, 2.0), fov_mm=(10.0, 160.0, 120.0))
    scans = tmp_path / "scans"
    scans.mkdir()
    write_volume(ph.image.data, scans / "good.nii.gz", like=ph.image, kind="image")
    (scans / "loop.nii.gz").symlink_to("loop.nii.gz")
    (scans / "a.nii.gz").symlink_to("b.nii.gz")
    (scans / "b.nii.gz").symlink_to("a.nii.gz")
    jobs, _ = batch.find_scans(scans, tmp_path / "out")
    assert sorted(j.name for j in jobs) == ["a", "b", "good", "loop"]
    code = main(["batch", str(scans), "-o", str(tmp_path / "out"), "--workers", "0", *FAST])
    assert code == 3
    rows = _rows(tmp_path / "out")
    assert rows["good"]["status"] == "ok"
    for name in ("loop", "a", "b"):
        assert rows[name]["status"] == "failed"
        assert "loop" in rows[name]["error"] and "\n" not in rows[name]["error"], rows[name]["error"]
    assert "Traceback" not in capsys.readouterr().err
