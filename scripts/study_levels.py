"""How often the level names are right: the shipped model's labels on the lumbar test volumes, named by
``report.instances.find_instances``, against the levels the manual masks are known to carry.

The lumbar test volumes of fold 0 (``weights/splits_v4.json``; ``../shared/data/lumbar``) label one structure
each, as instances of a fixed run of levels (``../shared/data/README.md``):

* ``IVD_*``: discs, values 1-5 = L5-S1, L4-L5, L3-L4, L2-L3, L1-L2 (counted upwards);
* ``VB3_*``: vertebral bodies, values 1-5 = L1-L5;
* ``VB2_*``: seven vertebral bodies, T11-L5 by position (top to bottom);
* ``VB1_*``: nine bodies "partly into the sacrum", levels not stated: listed, not scored.

Each manual instance is matched to the predicted structure of its kind (disc, or vertebra for a body) that
covers most of it (at least half its voxels, else it counts as unmatched, a miss); the name is right when the
predicted structure's level equals the known level.  Results per subset and per case (anchor, flags, each
structure's expected and given name and confidence) go to ``docs/evaluation/levels/``.

    nice .venv/bin/python scripts/study_levels.py [--cache DIR] [--threads 2] [--fold 0]

Model runs (default settings, ``vertebrae="whole"``) are cached in ``--cache`` (default
``~/.cache/spinesegdiff/levels_lumbar``), keyed by case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from napari_spinesegdiff.report.instances import Instances, find_instances

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "lumbar"
SPLITS = ROOT / "src" / "napari_spinesegdiff" / "weights" / "splits_v4.json"
REPORT = ROOT / "docs" / "evaluation" / "levels"
IVD = {1: "L5-S1", 2: "L4-L5", 3: "L3-L4", 4: "L2-L3", 5: "L1-L2"}
VB3 = {1: "L1", 2: "L2", 3: "L3", 4: "L4", 5: "L5"}
VB2 = ("T11", "T12", "L1", "L2", "L3", "L4", "L5")  # top to bottom
MIN_COVER = 0.5


def cases(fold: int) -> list[str]:
    return [c for c in json.loads(SPLITS.read_text())[fold]["test"] if not c.startswith("SPIDER")]


def model_labels(case: str, cache: Path) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """The shipped model's canonical labels of a case (cached), its spacing and the run's seconds."""
    dest = cache / f"{case}.npz"
    if not dest.is_file():
        from napari_spinesegdiff.config import SegmentationConfig
        from napari_spinesegdiff.io.readers import read_volume
        from napari_spinesegdiff.pipeline import run

        vol = read_volume(DATA / f"{case}_image.nii.gz", kind="image")
        t0 = time.perf_counter()
        res = run(vol, SegmentationConfig(), stream_every=0)
        seconds = time.perf_counter() - t0
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(dest, labels=res.canonical_labels, spacing=np.array(vol.orientation.canonical_spacing),
                            seconds=seconds)
        print(f"{case}: model run {seconds:.0f} s", flush=True)
    z = np.load(dest)
    return z["labels"], tuple(float(s) for s in z["spacing"]), float(z["seconds"])  # type: ignore[return-value]


def expected_levels(case: str, manual: np.ndarray) -> dict[int, str] | None:
    """Manual instance value -> its known level (None: the subset's levels are not known)."""
    values = [int(v) for v in np.unique(manual) if v]
    if case.startswith("IVD"):
        return {v: IVD[v] for v in values if v in IVD}
    if case.startswith("VB3"):
        return {v: VB3[v] for v in values if v in VB3}
    if case.startswith("VB2"):
        rows = {v: float(np.nonzero(manual == v)[1].mean()) for v in values}
        order = sorted(values, key=rows.__getitem__)
        return {v: name for v, name in zip(order, VB2)} if len(order) == len(VB2) else None
    return None


def match(inst: Instances, manual: np.ndarray, value: int, kind: str):
    """The predicted structure of ``kind`` covering most of manual instance ``value`` (at least MIN_COVER)."""
    mask = manual == value
    vals, counts = np.unique(inst.canonical[mask], return_counts=True)
    best = None
    for v, c in zip(vals, counts):
        if not v:
            continue
        try:
            s = inst.by_value(int(v))
        except KeyError:
            continue
        if s.structure == kind and (best is None or c > best[1]):
            best = (s, int(c))
    if best is None or best[1] < MIN_COVER * mask.sum():
        return None, (best[1] / mask.sum() if best else 0.0)
    return best[0], best[1] / mask.sum()


def study_case(case: str, cache: Path) -> dict:
    from napari_spinesegdiff.io.readers import read_volume

    labels, spacing, seconds = model_labels(case, cache)
    manual = read_volume(DATA / f"{case}_label.nii.gz", kind="labels").canonical()
    if manual.shape != labels.shape:
        raise SystemExit(f"{case}: the mask has shape {manual.shape} but the prediction {labels.shape}.")
    t0 = time.perf_counter()
    inst = find_instances(labels, spacing)
    naming_s = time.perf_counter() - t0
    expected = expected_levels(case, manual)
    kind = "disc" if case.startswith("IVD") else "vertebra"
    rows = []
    for v in sorted(int(x) for x in np.unique(manual) if x):
        s, cover = match(inst, manual, v, kind)
        want = expected.get(v) if expected else None
        rows.append(dict(manual_value=v, expected=want, named=s.level if s else None,
                         confidence=s.level_confidence if s else None, cover=round(float(cover), 3),
                         flags=list(s.flags) if s else [], right=(want is not None and s is not None
                                                                   and s.level == want)))
    return dict(case=case, subset=case.split("_")[0], anchor=inst.anchor, flags=list(inst.flags),
                scored=expected is not None, structures=rows, model_s=round(seconds, 1),
                naming_s=round(naming_s, 2),
                all_named=[(s.level, s.value, s.level_confidence) for s in inst.structures])


def summarize(results: list[dict]) -> list[dict]:
    out = []
    for subset in sorted({r["subset"] for r in results}):
        rs = [r for r in results if r["subset"] == subset and r["scored"]]
        rows = [x for r in rs for x in r["structures"]]
        if not rows:
            out.append(dict(subset=subset, cases=0, structures=0, right=0, accuracy=None, unmatched=0))
            continue
        right = sum(x["right"] for x in rows)
        out.append(dict(subset=subset, cases=len(rs), structures=len(rows), right=right,
                        accuracy=round(right / len(rows), 3), unmatched=sum(x["named"] is None for x in rows),
                        sacrum_anchor=sum(r["anchor"] == "sacrum" for r in rs)))
    scored = [x for r in results if r["scored"] for x in r["structures"]]
    if scored:
        right = sum(x["right"] for x in scored)
        out.append(dict(subset="all scored", cases=sum(r["scored"] for r in results), structures=len(scored),
                        right=right, accuracy=round(right / len(scored), 3),
                        unmatched=sum(x["named"] is None for x in scored),
                        sacrum_anchor=sum(r["anchor"] == "sacrum" for r in results if r["scored"])))
    return out


def write_report(results: list[dict], table: list[dict], fold: int, commit: str) -> None:
    REPORT.mkdir(parents=True, exist_ok=True)
    (REPORT / "results.json").write_text(json.dumps(dict(fold=fold, commit=commit, summary=table,
                                                         cases=results), indent=1) + "\n")
    lines = [f"# Level names on the lumbar test volumes (fold {fold})", "",
             f"`scripts/study_levels.py` at commit {commit}: the shipped model's labels (default settings), named "
             "by `report.instances.find_instances`, against the levels the manual masks carry (IVD_*: 1-5 = "
             "L5-S1 ... L1-L2; VB3_*: 1-5 = L1-L5; VB2_*: seven bodies T11-L5 by position; VB1_*: not stated, "
             "listed only). A manual instance is matched to the predicted structure of its kind covering at "
             f"least {MIN_COVER:.0%} of it; unmatched ones count as wrong.", "",
             "| subset | cases | structures | right | accuracy | unmatched | sacrum anchor (cases) |",
             "|---|---|---|---|---|---|---|"]
    for t in table:
        acc = "" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
        lines.append(f"| {t['subset']} | {t['cases']} | {t['structures']} | {t['right']} | {acc} | "
                     f"{t['unmatched']} | {t.get('sacrum_anchor', '')} |")
    lines += ["", "## Per case", ""]
    for r in results:
        lines.append(f"- **{r['case']}** anchor {r['anchor']}, flags {', '.join(r['flags']) or 'none'}; model "
                     f"{r['model_s']} s, naming {r['naming_s']} s")
        for x in r["structures"]:
            mark = "" if not r["scored"] else (" ok" if x["right"] else " **wrong**")
            lines.append(f"  - manual {x['manual_value']}: expected {x['expected']}, named {x['named']} "
                         f"(confidence {x['confidence']}, covers {x['cover']:.0%}){mark}")
    (REPORT / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spinesegdiff" / "levels_lumbar")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fold", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is absent: the lumbar volumes are needed for this study.")
    import torch

    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    results = []
    for case in cases(args.fold):
        results.append(study_case(case, args.cache))
        r = results[-1]
        score = (f"{sum(x['right'] for x in r['structures'])}/{len(r['structures'])} right" if r["scored"]
                 else f"{len(r['structures'])} structures, levels not known: not scored")
        print(f"{case}: {score} (anchor {r['anchor']}, flags {r['flags']})", flush=True)
    table = summarize(results)
    write_report(results, table, args.fold, commit)
    for t in table:
        print(t)


if __name__ == "__main__":
    main()
