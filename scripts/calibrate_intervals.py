"""Fit the measurement intervals on the validation slabs, then check them on the test slabs.

For every SPIDER slab of fold 0 (``weights/splits_v4.json``: all three structures labelled on every slice) this
runs the shipped model with its default settings, keeping the ensemble members (``segment(keep_samples=True)``),
splits the prediction into named structures (``report.instances.find_instances``) and the manual labels too
(``read_any_labels``), measures both with ``report.measure`` (the members in the final labels' frames), and
pairs each predicted body, disc and canal level with the manual one it overlaps most (Dice >= 0.5; a canal
level through the structure it is measured at), so that naming mistakes do not enter the measurement errors.

* ``--fit`` (the validation slabs): the members' spread and the error against the manual value per kind of
  measurement give the conformal factors and floors of ``report/calibration.json``;
* ``--evaluate`` (the test slabs, never used for fitting): per structure and measurement the median absolute
  error of the final value against the manual one, and how often the 90 % interval holds the manual value;
  written as CSV and a short report to ``docs/evaluation/levels_measure``.

    .venv/bin/python scripts/calibrate_intervals.py --fit --evaluate [--cache DIR] [--threads 2]

Model runs are cached in ``--cache`` (default ``~/.cache/spinesegdiff/levels_runs``), keyed by case; about 40 s
per slab on two CPU cores, then the measurements take seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np

from napari_spinesegdiff.report.intervals import (
    CALIBRATION_PATH,
    COVERAGE,
    apply_intervals,
    fit_calibration,
    kind_of,
    load_calibration,
    member_measurements,
    spreads,
)
from napari_spinesegdiff.report.measure import MEASURES, measure_structures

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "spider_t2space"
SPLITS = ROOT / "src" / "napari_spinesegdiff" / "weights" / "splits_v4.json"
REPORT = ROOT / "docs" / "evaluation" / "levels_measure"


def cases(part: str, fold: int = 0) -> list[str]:
    return [c for c in json.loads(SPLITS.read_text())[fold][part] if c.startswith("SPIDER")]


def model_run(case: str, cache: Path) -> dict[str, np.ndarray]:
    """The shipped model's final labels, members and uncertainty on a slab (canonical), cached."""
    dest = cache / f"{case}.npz"
    if not dest.is_file():
        from napari_spinesegdiff.config import SegmentationConfig
        from napari_spinesegdiff.io.readers import read_volume
        from napari_spinesegdiff.pipeline import run

        vol = read_volume(DATA / f"{case}_image.nii.gz", kind="image")
        t0 = time.perf_counter()
        res = run(vol, SegmentationConfig(), keep_samples=True, stream_every=0)
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dest, labels=res.canonical_labels, samples=res.canonical_sample_labels,
                            uncertainty=res.canonical_uncertainty.astype(np.float16),
                            spacing=np.array(vol.orientation.canonical_spacing))
        print(f"{case}: model run {time.perf_counter() - t0:.0f} s", flush=True)
    z = np.load(dest)
    return {k: z[k] for k in z.files}


def _match(pred, manual) -> dict[int, int]:
    """Predicted structure value -> the manual structure of the same kind it overlaps most (Dice >= 0.5)."""
    kinds = {s.value: s.structure for s in manual.structures}
    out = {}
    for s in pred.structures:
        if s.structure == "canal" or s.value is None:
            continue
        mask = pred.canonical == s.value
        vals, counts = np.unique(manual.canonical[mask], return_counts=True)
        cand = [(c, v) for v, c in zip(vals, counts) if kinds.get(int(v)) == s.structure]
        if cand:
            c, v = max(cand)
            if 2 * c / (mask.sum() + (manual.canonical == v).sum()) >= 0.5:
                out[s.value] = int(v)
    return out


def case_records(case: str, cache: Path) -> list[dict]:
    """One record per predicted row paired with a manual row: final, manual and member values per measure."""
    from napari_spinesegdiff.io.readers import read_volume
    from napari_spinesegdiff.report.instances import find_instances, read_any_labels

    run_ = model_run(case, cache)
    spacing = tuple(float(v) for v in run_["spacing"])
    manual_labels = read_volume(DATA / f"{case}_label.nii.gz", kind="labels").canonical()
    manual = read_any_labels(manual_labels, spacing)
    pred = find_instances(run_["labels"], spacing)
    mrows = measure_structures(manual.canonical, spacing, manual.structures)
    final = measure_structures(pred.canonical, spacing, pred.structures, classes=run_["labels"])
    members = member_measurements(pred.canonical, spacing, pred.structures, final, run_["samples"],
                                  classes=run_["labels"])
    pairs = _match(pred, manual)
    level_of = {s.value: s.level for s in manual.structures}
    at_level = {s.level: s.value for s in pred.structures if s.structure != "canal"}
    by_manual = {(r.structure, r.level): r for r in mrows}
    out = []
    for j, (row, spread) in enumerate(zip(final, spreads(final, members))):
        own = row.value if row.structure != "canal" else at_level.get(row.level)
        if own not in pairs:
            continue
        ref = by_manual.get((row.structure, level_of[pairs[own]]))
        if ref is None:
            continue
        out.append(dict(case=case, structure=row.structure, level=row.level, manual_level=ref.level, index=j,
                        final=dict(row.values), manual=dict(ref.values), spread={m: spread[m][0] for m in MEASURES},
                        n_members=len(members), row=row, members=[m[j] for m in members]))
    return out


def calibration_records(records: list[dict]) -> list[dict]:
    return [dict(kind=kind_of(r["structure"], m), final=r["final"][m], manual=r["manual"][m], spread=r["spread"][m])
            for r in records for m in MEASURES]


def evaluate(records: list[dict], calibration) -> list[dict]:
    """Per record and measure: the error, the interval (after the too-uncertain rule) and whether it holds
    the manual value."""
    rows = []
    for r in records:
        row = r["row"]
        bounds = apply_intervals([row], [[m] for m in r["members"]], calibration, r["n_members"])[0]
        for m in MEASURES:
            final, manual = r["final"][m], r["manual"][m]
            if not (np.isfinite(final) and np.isfinite(manual)):
                continue
            lo, hi = bounds.get(m, (math.nan, math.nan))
            rows.append(dict(case=r["case"], structure=r["structure"], level=r["level"], measure=m,
                             final=final, manual=manual, error=final - manual, spread=r["spread"][m], lo=lo, hi=hi,
                             reported=bool(np.isfinite(row.values[m])),
                             inside=bool(np.isfinite(lo) and lo <= manual <= hi)))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for key in sorted({(r["structure"], r["measure"]) for r in rows}):
        sel = [r for r in rows if (r["structure"], r["measure"]) == key]
        rep = [r for r in sel if r["reported"]]
        err = np.abs([r["error"] for r in sel])
        out.append(dict(structure=key[0], measure=key[1], n=len(sel), median_abs_error=float(np.median(err)),
                        mean_error=float(np.mean([r["error"] for r in sel])), p90_abs_error=float(np.percentile(err, 90)),
                        reported=len(rep), coverage=float(np.mean([r["inside"] for r in rep])) if rep else math.nan,
                        median_interval=float(np.median([r["hi"] - r["lo"] for r in rep])) if rep else math.nan))
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit", action="store_true", help="fit report/calibration.json on the validation slabs")
    ap.add_argument("--evaluate", action="store_true", help="errors and coverage on the test slabs")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spinesegdiff" / "levels_runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    calibration = load_calibration()
    if args.fit:
        val = [r for c in cases("val") for r in case_records(c, args.cache)]
        calibration = fit_calibration(calibration_records(val), COVERAGE, dict(
            cases=cases("val"), split="splits_v4.json fold 0 val (SPIDER slabs)", commit=commit,
            fitted=time.strftime("%Y-%m-%d"), script="scripts/calibrate_intervals.py --fit"))
        val_rows = evaluate(val, calibration)
        calibration.source["validation_coverage"] = float(np.mean([r["inside"] for r in val_rows if r["reported"]]))
        CALIBRATION_PATH.write_text(calibration.to_json() + "\n")
        print(f"wrote {CALIBRATION_PATH} ({len(val)} validation rows, coverage there "
              f"{calibration.source['validation_coverage']:.3f})")
    if args.evaluate:
        test = [r for c in cases("test") for r in case_records(c, args.cache)]
        rows = evaluate(test, calibration)
        table = summary(rows)
        write_csv(REPORT / "per_measurement.csv", rows)
        write_csv(REPORT / "summary.csv", table)
        for t in table:
            print(f"{t['structure']:8s} {t['measure']:20s} n {t['n']:3d}  median |error| {t['median_abs_error']:.3f}  "
                  f"coverage {t['coverage']:.3f}  median interval {t['median_interval']:.2f}")
        allrep = [r for r in rows if r["reported"]]
        print(f"coverage of all reported 90 % intervals: {np.mean([r['inside'] for r in allrep]):.3f} "
              f"({len(allrep)} values of {len(rows)}); commit {commit}")


if __name__ == "__main__":
    main()
