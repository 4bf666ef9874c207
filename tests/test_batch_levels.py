"""``spinesegdiff batch``'s level report: each scan's levels table, the cohort's ``levels.parquet``, the
findings in the results rows, ``--report`` figures, resuming with them, and the queue ordered by findings.

Two small phantoms (one with a 40 % wedge fracture of L1 and a 30 % slip of L4 over L5), fast settings (2 DDIM
steps, 1 sample, 2 slices), in this process.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from napari_spinesegdiff import batch
from napari_spinesegdiff._dock import queue_table as qt
from napari_spinesegdiff.cli import main
from napari_spinesegdiff.io.writers import write_volume
from napari_spinesegdiff.phantom import BODY_NAMES, DISC_NAMES, make_phantom
from napari_spinesegdiff.report.table import COLUMNS as LEVEL_TABLE_COLUMNS

pytest.importorskip("matplotlib")

FAST = ["--steps", "2", "--ensemble", "1", "--slices", "1:3", "--no-progress", "--workers", "0"]
SMALL = dict(spacing=(3.5, 1.0, 1.0), fov_mm=(14.0, 200.0, 160.0))
DISCS = [d.replace("/", "-") for d in DISC_NAMES]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("levels")
    scans = root / "scans"
    (scans / "sub").mkdir(parents=True)
    phantoms = {"plain": make_phantom(seed=21, **SMALL),
                "sub/deformed": make_phantom(seed=22, wedge={"L1": 0.4}, slip={"L4": 0.3}, **SMALL)}
    for name, ph in phantoms.items():
        write_volume(ph.image.data, scans / f"{name}.nii.gz", like=ph.image, kind="image")
    out = root / "out"
    assert main(["batch", str(scans), "-o", str(out), "--report", *FAST]) == 0
    return {"scans": scans, "out": out, "phantoms": phantoms}


def _table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _results(out: Path) -> dict[str, dict]:
    return {r["scan"]: r for r in _table(out / "results.parquet")}


def _by_scan(rows: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for r in rows:
        found.setdefault(r["scan"], []).append({k: v for k, v in r.items() if k != "scan"})
    return found


# ------------------------------------------------------------------------------------------------ tables


def test_batch_writes_the_levels_of_every_scan(cohort):
    out, phantoms = cohort["out"], cohort["phantoms"]
    results = _results(out)
    levels = _table(out / "levels.parquet")
    assert list(levels[0]) == ["scan", *LEVEL_TABLE_COLUMNS]
    with open(out / "levels.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert list(lines[0]) == ["scan", *LEVEL_TABLE_COLUMNS] and len(lines) == len(levels)
    per_scan = _by_scan(levels)
    assert set(per_scan) == set(phantoms) == set(results)
    for name, ph in phantoms.items():
        row = results[name]
        assert row["status"] == "ok" and row["levels"] == f"{name}_levels.parquet", row["error"]
        assert per_scan[name] == batch.read_scan_levels(out / row["levels"])  # the cohort's rows are the scan's
        vertebrae = [r["level"] for r in per_scan[name] if r["structure"] == "vertebra"]
        discs = [r["level"] for r in per_scan[name] if r["structure"] == "disc"]
        canal = [r for r in per_scan[name] if r["structure"] == "canal"]
        assert vertebrae == list(BODY_NAMES) and discs == DISCS, (vertebrae, discs)
        assert {r["level"] for r in canal} >= set(DISCS) and {r["level"] for r in canal} <= set(BODY_NAMES + tuple(DISCS))
        aps = [r["ap_diameter_mm"] for r in canal if r["ap_diameter_mm"] is not None]
        assert row["canal_ap_min_mm"] == pytest.approx(min(aps)) and 10 < min(aps) < 25
        assert row["level_anchor"] in ("sacrum", "lowest disc")
        for r in per_scan[name]:  # the names line up with the phantom's levels: the measures are the built ones
            truth = ph.geometry.get(r["level"].replace("-", "/"), {})
            if r["structure"] == "vertebra" and r["height_middle_mm"] is not None:
                assert r["height_middle_mm"] == pytest.approx(truth["height_middle_mm"], abs=1.5), (name, r["level"])

    deformed, plain = results["sub/deformed"], results["plain"]
    rows = {r["level"]: r for r in per_scan["sub/deformed"] if r["structure"] == "vertebra"}
    assert "genant" in rows["L1"]["flags"] and "meyerding" in rows["L4"]["flags"]
    assert deformed["height_loss"].startswith("L1 genant") and deformed["height_loss_grade"] >= 2
    assert deformed["slip"].startswith("L4 meyerding") and deformed["slip_max_percent"] > 20
    assert plain["height_loss"] == "" and plain["height_loss_grade"] == 0 and plain["slip"] == ""
    assert plain["slip_max_percent"] < 10 and plain["stenosis"] == deformed["stenosis"] == ""
    for row in (plain, deformed):
        lowest = min(r["level_confidence"] for r in per_scan[row["scan"]] if r["structure"] != "canal")
        assert row["level_confidence_min"] == pytest.approx(lowest, abs=1e-4)
        assert ("sacrum_out_of_view" in row["level_doubt"]) == (row["level_anchor"] == "lowest disc")


def test_summary_of_findings_from_rows():
    rows = [
        {"structure": "vertebra", "value": 2, "level": "L4", "level_confidence": 0.9, "height_posterior_mm": 25.0,
         "slip_percent": -12.0, "flags": "genant1:wedge;retrolisthesis"},
        {"structure": "vertebra", "value": 3, "level": "L3", "level_confidence": 0.55, "height_posterior_mm": 24.0,
         "slip_percent": 3.0, "flags": "genant3:crush"},
        {"structure": "vertebra", "value": 25, "level": "S1", "level_confidence": 0.95, "flags": "cut_by_fov"},
        {"structure": "disc", "value": None, "level": "extra:L3", "level_confidence": 0.0, "flags": "extra_disc"},
        {"structure": "canal", "value": None, "level": "L3-L4", "ap_diameter_mm": 8.5, "flags": "stenosis:absolute"},
        {"structure": "canal", "value": None, "level": "L4", "ap_diameter_mm": 11.0, "flags": "stenosis:relative"},
        {"structure": "canal", "value": None, "level": "L5", "ap_diameter_mm": None, "flags": "cut_by_fov:ap_diameter"},
    ]
    s = batch.summarise(rows, ("extra_disc:L3", "lumbar:6", "renumbered:+1"), "sacrum")
    assert s == {"level_anchor": "sacrum", "stenosis": "L3-L4 absolute; L4 relative", "canal_ap_min_mm": 8.5,
                 "height_loss": "L4 genant1:wedge; L3 genant3:crush", "height_loss_grade": 3,
                 "slip": "L4 retrolisthesis", "slip_max_percent": 12.0,
                 "level_doubt": "extra_disc:L3; confidence 0.55 at L3", "level_confidence_min": 0.55}
    none = batch.summarise([], (), None, error="No disc was found.")
    assert none["level_doubt"] == "levels not found: No disc was found." and none["height_loss_grade"] is None


# ------------------------------------------------------------------------------------------------ report


def test_report_figures_show_the_slice_names_and_measures(cohort):
    from matplotlib.image import imread

    for name in cohort["phantoms"]:
        png = imread(cohort["out"] / f"{name}_report.png")  # RGBA floats in [0, 1]
        gray = png[..., :3].mean(axis=2)
        h, w = gray.shape
        assert h >= 600 and w >= 1000
        picture, text = gray[:, : w // 2], gray[:, w // 2:]
        assert picture.std() > 0.1  # the scan and its overlay, not a blank canvas
        dark = (text < 0.3).mean()
        assert 0.005 < dark < 0.3  # dark glyphs on white: the names, the table


def test_level_figure_draws_names_lines_and_the_table():
    from napari_spinesegdiff.report import figure
    from napari_spinesegdiff.report.instances import find_instances
    from napari_spinesegdiff.report.levels import levels_for_instances

    ph = make_phantom(seed=3, wedge={"L2": 0.35}, **SMALL)
    labels = ph.truth().canonical()
    inst = find_instances(labels, ph.image.orientation.canonical_spacing)
    rows = levels_for_instances(inst, classes=labels)
    fig = figure.level_figure(ph.image.canonical(), inst, rows, title="phantom 3")
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]
    on_image = {t for ax in fig.axes for t in (x.get_text() for x in ax.texts)}
    assert set(BODY_NAMES[1:-1]) <= on_image and set(DISCS) <= on_image
    table = next(t for t in texts if t.startswith("level"))
    l2 = next(line for line in table.splitlines() if line.startswith("L2 "))
    l2_row = next(r for r in rows if r["level"] == "L2" and r["structure"] == "vertebra")
    assert f"{l2_row['height_middle_mm']:.1f}" in l2 and "genant" in table and "phantom 3" in texts[-2]
    n_lines = sum(len(r.get("lines") or ()) for r in rows)
    assert sum(len(ax.lines) for ax in fig.axes) == n_lines
    blank = figure.report_png(ph.image.canonical(), inst, [], title="phantom 3")
    assert figure.figure_png(fig) != blank and figure.figure_png(fig)[:8] == b"\x89PNG\r\n\x1a\n"
    assert figure.mid_sagittal_slice(inst) == int(round(inst.by_value(100).centroid[0]))


def test_report_without_matplotlib_is_refused_in_one_sentence(cohort, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    assert main(["batch", str(cohort["scans"]), "-o", str(out), "--report", *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "matplotlib" in err and not out.exists()


# ------------------------------------------------------------------------------------------------ resume


def test_skipped_scans_keep_their_rows_and_get_their_report_without_the_model(cohort, monkeypatch):
    import napari_spinesegdiff.pipeline as pipeline

    out = cohort["out"]
    before_levels, before_results = _table(out / "levels.parquet"), _results(out)
    for name in ("levels.parquet", "levels.csv"):
        (out / name).unlink()  # rebuilt from the per-scan tables
    (out / "plain_report.png").unlink()  # drawn again from the outputs

    def no_model(*args, **kwargs):
        raise AssertionError("the model was called for an up-to-date scan")

    monkeypatch.setattr(pipeline, "run", no_model)
    monkeypatch.setattr(pipeline, "load_models", no_model)
    assert main(["batch", str(cohort["scans"]), "-o", str(out), "--report", *FAST]) == 0
    results = _results(out)
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert _table(out / "levels.parquet") == before_levels
    summary = [*batch.SUMMARY_COLUMNS, "qa_flags"]
    for name, row in results.items():
        assert {c: row[c] for c in summary} == {c: before_results[name][c] for c in summary}
        assert row["error"] == ""
    assert (out / "plain_report.png").stat().st_size > 10_000

    monkeypatch.undo()  # a scan whose levels table is gone is segmented again
    (out / "plain_levels.parquet").unlink()
    assert main(["batch", str(cohort["scans"]), "-o", str(out), *FAST]) == 0
    results = _results(out)
    assert results["plain"]["status"] == "ok" and results["sub/deformed"]["status"] == "skipped"
    assert _by_scan(_table(out / "levels.parquet")) == _by_scan(before_levels)


# ------------------------------------------------------------------------------------------------- queue


def _item(scan, status="ok", score=None, **findings):
    return qt.QueueItem(scan=scan, status=status, error="", input=Path(f"/in/{scan}"), labels=Path(f"/o/{scan}_l"),
                        uncertainty=Path(f"/o/{scan}_u"), sidecar=Path(f"/o/{scan}.json"), score=score, flags=(),
                        vertebrae="whole", slices=None,
                        findings=tuple((text, *findings.get(text, ("", None))) for text, _, _ in batch.FINDINGS))


def test_queue_orders_by_level_findings(cohort):
    items = [_item("a", score=0.3, stenosis=("", 14.0), height_loss=("", 0), level_doubt=("", 0.9)),
             _item("b", score=0.1, stenosis=("L4 relative", 11.0), height_loss=("L1 genant1:wedge", 1)),
             _item("c", score=0.2, stenosis=("L3-L4 absolute", 8.0), height_loss=("L2 genant3:crush", 3),
                   level_doubt=("sacrum_out_of_view", 0.55)),
             _item("d", status="failed", stenosis=("L1 absolute", 5.0)),
             _item("e", score=0.05, slip=("L4 meyerding2", 30.0), level_doubt=("missing_disc:L3-L4", 0.8))]
    order = {mode: [i.scan for i in qt.sort_items(items, mode)] for mode in qt.LEVEL_SORTS}
    assert order["stenosis first"] == ["c", "b", "a", "e", "d"]  # narrowest canal first, failed last
    assert order["height loss first"] == ["c", "b", "a", "e", "d"]
    assert order["slip first"] == ["e", "a", "c", "b", "d"]  # then by uncertainty
    assert order["level doubt first"] == ["c", "e", "a", "b", "d"]
    assert items[2].finding("stenosis") == ("L3-L4 absolute", 8.0)

    _, read = qt.read_results(cohort["out"])  # the batch's own table
    for mode in ("height loss first", "slip first"):
        ranked = qt.sort_items(read, mode)
        assert [i.scan for i in ranked] == ["sub/deformed", "plain"], mode
    deformed = next(i for i in read if i.scan == "sub/deformed")
    assert deformed.finding("slip")[0].startswith("L4 meyerding") and deformed.finding("height_loss")[1] >= 2
