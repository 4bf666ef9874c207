"""The shipped folds never put one scan on two sides of a split: cases whose files are byte-identical (the
same scan under two names, as ``lumbar/VB3_18`` and ``VB3_19``) must share a subset of every fold."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "napari_spinesegdiff" / "weights"
SPLITS = ("splits_v4.json", "splits_lumbar.json")


def _scan_keys(data: Path) -> dict[str, str]:
    """Case name -> hash of its image and label bytes, for ``lumbar/`` and ``spider_t2space/``."""
    keys = {}
    for folder in ("lumbar", "spider_t2space"):
        for img in sorted((data / folder).glob("*_image.nii.gz")):
            name = img.name[: -len("_image.nii.gz")]
            lab = img.with_name(f"{name}_label.nii.gz")
            keys[name] = hashlib.sha256(img.read_bytes() + b"|" + lab.read_bytes()).hexdigest()
    return keys


def straddling(fold: dict[str, list[str]], keys: dict[str, str]) -> list[tuple[str, ...]]:
    """Groups of byte-identical cases of ``fold`` that sit in more than one of train, val and test."""
    sides: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    for subset, cases in fold.items():
        for case in cases:
            key = keys.get(case, case)
            sides.setdefault(key, set()).add(subset)
            members.setdefault(key, set()).add(case)
    return [tuple(sorted(members[k])) for k, s in sides.items() if len(s) > 1]


@pytest.fixture(scope="module")
def scan_keys(shared_data: Path) -> dict[str, str]:
    if not (shared_data / "lumbar").is_dir():
        pytest.skip("no lumbar data under ../shared/data")
    return _scan_keys(shared_data)


@pytest.mark.parametrize("name", SPLITS)
def test_identical_scans_never_straddle_a_split(name, scan_keys):
    folds = json.loads((WEIGHTS / name).read_text())
    for k, fold in enumerate(folds):
        assert straddling(fold, scan_keys) == [], f"{name} fold {k}"
        listed = [c for cases in fold.values() for c in cases]
        assert len(listed) == len(set(listed)), f"{name} fold {k} lists a case twice"
        assert set(listed) <= set(scan_keys), f"{name} fold {k} names cases the data lacks"


def test_the_check_finds_the_copy_that_was_in_validation(scan_keys):
    """Fold 0 as it was before the fix (VB3_19, a copy of the training case VB3_18, in validation) fails."""
    if scan_keys.get("VB3_18") is None or scan_keys.get("VB3_18") != scan_keys.get("VB3_19"):
        pytest.skip("VB3_18 and VB3_19 are not the same file in this data")
    fold = json.loads((WEIGHTS / "splits_v4.json").read_text())[0]
    assert "VB3_18" in fold["train"] and "VB3_19" not in fold["val"]
    old = {**fold, "val": fold["val"] + ["VB3_19"]}
    assert straddling(old, scan_keys) == [("VB3_18", "VB3_19")]
