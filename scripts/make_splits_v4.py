"""Write the patient-level folds of model v4: the lumbar folds of v1-v3 unchanged (same test patients) plus
five folds of the SPIDER T2-SPACE slabs (stratified, seed 0).  Usage:
    .venv/bin/python scripts/make_splits_v4.py [DATA] [OUT]
"""

import json
import sys
from pathlib import Path

from napari_spinesegdiff.training.data import make_splits

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
out = Path(sys.argv[2] if len(sys.argv) > 2 else "src/napari_spinesegdiff/weights/splits_v4.json")
lumbar = json.loads(Path("src/napari_spinesegdiff/weights/splits_lumbar.json").read_text())
slabs = sorted(p.name[: -len("_image.nii.gz")] for p in (data / "spider_t2space").glob("*_image.nii.gz"))
if not slabs:
    sys.exit(f"no SPIDER slabs under {data / 'spider_t2space'}")
folds = []
for k, fold in enumerate(lumbar):
    spider = make_splits({s: "spider" for s in slabs}, k=len(lumbar), fold=k, seed=0)
    folds.append({key: sorted(fold[key] + spider[key]) for key in ("train", "val", "test")})
out.write_text(json.dumps(folds, indent=1))
print(f"wrote {out}: fold 0 SPIDER test {[s for s in folds[0]['test'] if s.startswith('SPIDER')]}, "
      f"val {[s for s in folds[0]['val'] if s.startswith('SPIDER')]}")
