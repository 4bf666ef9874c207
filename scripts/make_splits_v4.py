"""Write the patient-level folds of model v4: the lumbar folds of v1-v3 (same test patients) plus five folds
of the SPIDER T2-SPACE slabs (stratified, seed 0).  A case whose image and label files are byte-identical to
an earlier case's (sorted by name) is the same scan under a second name and is left out of every fold
(``lumbar/VB3_19`` is ``VB3_18``), so one scan never sits on two sides of a split.  Usage:
    .venv/bin/python scripts/make_splits_v4.py [DATA] [OUT]
"""

import hashlib
import json
import sys
from pathlib import Path

from napari_spinesegdiff.training.data import make_splits


def duplicate_cases(folder: Path) -> dict[str, str]:
    """Case -> the earlier case (by name) whose ``_image.nii.gz`` and ``_label.nii.gz`` have the same bytes."""
    first: dict[str, str] = {}
    out: dict[str, str] = {}
    for img in sorted(folder.glob("*_image.nii.gz")):
        name = img.name[: -len("_image.nii.gz")]
        lab = img.with_name(f"{name}_label.nii.gz")
        key = hashlib.sha256(img.read_bytes() + b"|" + (lab.read_bytes() if lab.exists() else b"")).hexdigest()
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "src/napari_spinesegdiff/weights/splits_v4.json")
lumbar = json.loads(Path("src/napari_spinesegdiff/weights/splits_lumbar.json").read_text())
slabs = sorted(p.name[: -len("_image.nii.gz")] for p in (data / "spider_t2space").glob("*_image.nii.gz"))
if not slabs:
    sys.exit(f"no SPIDER slabs under {data / 'spider_t2space'}")
dropped = {**duplicate_cases(data / "lumbar"), **duplicate_cases(data / "spider_t2space")}
folds = []
for k, fold in enumerate(lumbar):
    spider = make_splits({s: "spider" for s in slabs if s not in dropped}, k=len(lumbar), fold=k, seed=0)
    folds.append({key: sorted(c for c in fold[key] + spider[key] if c not in dropped)
                  for key in ("train", "val", "test")})
out.write_text(json.dumps(folds, indent=1))
print(f"wrote {out}: fold 0 SPIDER test {[s for s in folds[0]['test'] if s.startswith('SPIDER')]}, "
      f"val {[s for s in folds[0]['val'] if s.startswith('SPIDER')]}; left out as copies: "
      + (", ".join(f"{a} (= {b})" for a, b in sorted(dropped.items())) or "none"))
