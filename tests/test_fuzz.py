"""A short seeded run of ``benchmarks/fuzz.py``: hostile headers and bodies are opened or refused in one
sentence of ours, never crash, hang, exhaust memory or leak a library's message.

Each case runs in a forked child with RLIMIT_AS and a timeout, in a fresh interpreter started for the run
(never forked from pytest).  The explicit cases are one per crash class the hostile tester found.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
EXPLICIT = {
    "ndims_negative": "NDims = -3",
    "ndims_zero": "NDims = 0",
    "ndims_huge": "NDims = 100000",
    "ndims_int_max": "NDims = 2147483647",
    "dim_negative": "size -5",
    "dim_zero": "size 0",
    "devzero": "'/dev/zero' is a system file",
    "devstdin": "'/dev/stdin' is a system file",
    "compressed_1024cubed": "1024x1024x1024",
    "nii_stub_4000x4000x100": "4000x4000x100",
    "degenerate_affine": "parallel axes",
    "nii_negative_dim": "size -5",
    "nii_negative_ndim": "dimensions",
    "nhdr_devzero": "'/dev/zero' is a system file",
}


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("spinesegdiff_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "report.json"
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "--explicit", "--cases", "48", "--seed", "11", "--timeout", "30",
         "--mem-gib", "2", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_no_crash_hang_or_foreign_error(report):
    summary = report["summary"]
    bad = [r for r in report["records"] if r["outcome"] in ("foreign", "crashed", "hung")]
    assert not bad, json.dumps(bad[:5], indent=1)
    assert summary["crashed"] == summary["hung"] == summary["foreign"] == 0
    assert summary["cases"] == 48 + len(EXPLICIT)
    assert summary["opened"] > 0 and summary["refused"] > 0  # the mutations neither all pass nor all fail
    assert summary["peak_rss_mib"] < 1024
    assert report["returncode"] == 0, report["stderr"][-2000:]


@pytest.mark.parametrize("name", sorted(EXPLICIT))
def test_explicit_crash_classes_are_refused_in_one_sentence(report, name):
    [record] = [r for r in report["records"] if r["case"] == name]
    assert record["outcome"] == "refused", record
    assert set(record["paths"]) == {"read_volume", "napari"}
    for path_name, message in record["messages"].items():
        assert EXPLICIT[name] in message, (path_name, message)
        assert message.startswith(f"Cannot open {record['target']}: ")


def test_sentence_classifier():
    fuzz = _fuzz_module()
    p = Path("/tmp/x.nii")
    assert fuzz.is_our_sentence(f"Cannot open {p}: its header declares 4000x4000x100 voxels.", p)
    assert not fuzz.is_our_sentence(f"Cannot open {p}: all elements of broadcast shape must be non-negative.", p)
    assert not fuzz.is_our_sentence(f"Cannot open {p}: bad (itk::ERROR at 0x55d1c0de00). Try again.", p)
    assert not fuzz.is_our_sentence(f"Cannot open {p}: two. Sentences.", p)
    assert not fuzz.is_our_sentence("Cannot open /elsewhere: no.", p)


def test_cases_are_reproducible_from_the_seed():
    fuzz = _fuzz_module()
    a = [fuzz.make_case(3, i) for i in range(30)]
    b = [fuzz.make_case(3, i) for i in range(30)]
    assert [(c.note, c.files) for c in a] == [(c.note, c.files) for c in b]
    kinds = {c.note.split(":")[0].split()[0] for c in a}
    assert {"nifti", "metaimage", "nrrd"} <= kinds
