"""The levels table from the command line: ``segment --levels`` and ``measure`` (values, schemes, bad input)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_spinesegdiff.cli import main
from napari_spinesegdiff.phantom import make_phantom
from napari_spinesegdiff.report.table import COLUMNS, interval_names, read_levels_table

HEIGHTS = ("height_anterior_mm", "height_middle_mm", "height_posterior_mm")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A phantom scan, its truth labels (the project's scheme) and the same truth in SPIDER's instance scheme,
    as files."""
    from napari_spinesegdiff.io.writers import write_volume
    from napari_spinesegdiff.report.instances import find_instances

    d = tmp_path_factory.mktemp("levels_cli")
    ph = make_phantom(seed=4, contrast="T2w", random_orientation=True)
    img = write_volume(ph.image.data, d / "scan.nii.gz", like=ph.image, kind="image", produced_by="test")
    lab = write_volume(ph.labels.data, d / "truth.nii.gz", like=ph.labels, kind="labels", produced_by="test")
    inst = find_instances(ph.labels.canonical(), ph.labels.orientation.canonical_spacing)
    spider = write_volume(ph.labels.with_canonical(inst.canonical, kind="labels").data, d / "truth_spider.mha",
                          like=ph.labels, kind="labels", produced_by="test")
    return dict(scan=img, labels=lab, spider=spider, phantom=ph)


def by_level(rows, structure):
    return {r["level"]: r for r in rows if r["structure"] == structure}


def test_measure_of_the_truth_matches_the_construction(files, tmp_path, capsys):
    """``measure`` of the truth labels: every lumbar disc's middle height within a voxel of the phantom's
    construction (binary masks, so a fraction of a voxel is the best any edge can do), the canal measured at
    each level, every column present, no intervals."""
    ph = files["phantom"]
    out = tmp_path / "truth_levels.csv"
    assert main(["measure", str(files["labels"]), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    rows = read_levels_table(out)
    assert list(rows[0]) == list(COLUMNS)
    voxel = min(ph.labels.orientation.canonical_spacing[1:])
    discs = by_level(rows, "disc")
    compared = 0
    for name, row in discs.items():
        truth = ph.geometry.get(name.replace("-", "/"), {})
        if "height_middle_mm" in truth and row["height_middle_mm"] is not None:
            assert abs(row["height_middle_mm"] - truth["height_middle_mm"]) < voxel, (name, row, truth)
            compared += 1
    assert compared >= 4
    assert {"L1-L2", "L2-L3", "L3-L4", "L4-L5"} <= set(discs)
    canal = [r for r in rows if r["structure"] == "canal"]
    assert len(canal) >= 8 and all(r["ap_diameter_mm"] is None or 5 < r["ap_diameter_mm"] < 30 for r in canal)
    lo, hi = interval_names("height_middle_mm")
    assert all(r[lo] is None and r[hi] is None for r in rows)


def test_measure_reads_spider_instances_like_the_class_map(files, tmp_path):
    """The same truth as SPIDER's instance map (another format and scheme) measures to the same table."""
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert main(["measure", str(files["labels"]), "-o", str(a)]) == 0
    assert main(["measure", str(files["spider"]), "--image", str(files["scan"]), "-o", str(b)]) == 0
    ra, rb = read_levels_table(a), read_levels_table(b)
    assert [(r["structure"], r["level"]) for r in ra] == [(r["structure"], r["level"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in (*HEIGHTS, "depth_mm", "ap_diameter_mm"):
            if x[key] is not None or y[key] is not None:
                assert x[key] == pytest.approx(y[key], abs=0.05), (x["level"], key)


def test_segment_levels_writes_named_rows_with_intervals(files, tmp_path):
    """``segment --levels``: the model's labels split, named and measured with the ensemble's intervals; the
    disc heights agree with the truth's to the model's accuracy; the sidecar lists the table."""
    import json

    out, table = tmp_path / "labels.nii.gz", tmp_path / "levels.csv"
    assert main(["segment", str(files["scan"]), "-o", str(out), "--levels", str(table), "--steps", "3",
                 "--ensemble", "3", "--no-progress"]) == 0
    rows = read_levels_table(table)
    truth = tmp_path / "truth.csv"
    assert main(["measure", str(files["labels"]), "-o", str(truth)]) == 0
    manual = by_level(read_levels_table(truth), "disc")
    discs = by_level(rows, "disc")
    assert {"L2-L3", "L3-L4", "L4-L5"} <= set(discs)
    lo, hi = interval_names("height_middle_mm")
    errors = []
    for name, row in discs.items():
        if row["height_middle_mm"] is None or manual.get(name, {}).get("height_middle_mm") is None:
            continue
        assert row[lo] <= row["height_middle_mm"] <= row[hi]
        assert 0 < row["level_confidence"] <= 1
        errors.append(abs(row["height_middle_mm"] - manual[name]["height_middle_mm"]))
    assert len(errors) >= 3 and np.median(errors) < 1.5, errors
    assert all(r["value"] is None for r in rows if r["structure"] == "canal")
    assert all(201 <= r["value"] <= 225 for r in discs.values())
    sidecar = json.loads((tmp_path / "labels.json").read_text())
    assert sidecar["outputs"]["levels"] == str(table)


@pytest.mark.parametrize("case", ["suffix", "missing", "empty", "shape", "onto_scan"])
def test_bad_input_is_refused_in_one_sentence(files, tmp_path, capsys, case):
    """Bad tables, missing or empty labels, a scan of another shape, and an output onto the input: exit 2, one
    sentence, nothing written, the inputs untouched."""
    from napari_spinesegdiff.io.writers import write_volume

    out = tmp_path / "levels.csv"
    args = ["measure", str(files["labels"]), "-o", str(out)]
    if case == "suffix":
        args[-1] = str(tmp_path / "levels.xlsx")
        needle = ".csv or .parquet"
    elif case == "missing":
        args[1] = str(tmp_path / "nope.nii.gz")
        needle = "does not exist"
    elif case == "empty":
        empty = files["phantom"].labels.with_data(np.zeros_like(files["phantom"].labels.data))
        args[1] = str(write_volume(empty.data, tmp_path / "empty.nii.gz", like=empty, kind="labels",
                                   produced_by="test"))
        needle = "no vertebra, disc or canal"
    elif case == "shape":
        import nibabel as nib

        other = tmp_path / "other.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), other)
        args += ["--image", str(other)]
        needle = "do not belong"
    else:
        args[-1] = str(files["labels"])
        needle = str(files["labels"].name)
    before = {k: files[k].read_bytes() for k in ("labels", "scan")}
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "levels.xlsx").exists()
    assert {k: files[k].read_bytes() for k in ("labels", "scan")} == before


def test_segment_refuses_a_bad_levels_path_before_the_run(files, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(files["scan"]), "-o", str(out), "--levels", str(tmp_path / "x.txt"),
                 "--no-progress"]) == 2
    assert ".csv or .parquet" in capsys.readouterr().err
    assert not out.exists()
