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
    "spacing_1e9": "its voxels measure 1e+09 x 1e+09 x 1e+09 mm",
    "slice_3000_at_1mm": "span 1 x 3000 x 3000 mm, more than the 2000 mm",
    "self_loop": "it is a symbolic link in a loop of links",
    "dicom_spacing_1e9": "its voxels measure 1e+09 x 1e+09 mm",
}
#: Whole ``segment`` runs (fuzz_runs.py): the issue's three absurd inputs, a grid too big for the 4 GiB
#: address space, a DICOM header that lies about its rows, and a valid series that must segment.
NAMED_RUNS = {
    "spacing_1e9": ("refused", "its voxels measure 1e+09 x 1e+09 x 1e+09 mm"),
    "slice_3000_at_1mm": ("refused", "span 1 x 3000 x 3000 mm"),
    "self_loop": ("refused", "it is a symbolic link in a loop of links"),
    "memory_1500_at_1mm": ("refused", "1500 x 1500 pixels at the model's 1 x 1 mm"),
    "dicom_rows_1000": ("refused", "truncated or its header is wrong"),
    "dicom_valid": ("segmented", ""),
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


@pytest.fixture(scope="module")
def runs_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_runs") / "report.json"
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "--cases", "0", "--named-runs", ",".join(NAMED_RUNS), "--runs", "2",
         "--seed", "3", "--run-timeout", "300", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=1200,
    )
    assert out.exists(), proc.stderr[-3000:]
    data = json.loads(out.read_text())["runs"]
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_whole_runs_end_in_one_sentence_or_a_result(runs_report):
    summary = runs_report["summary"]
    assert summary["runs"] == len(NAMED_RUNS) + 2
    assert summary["crashed"] == summary["hung"] == summary["foreign"] == summary["unbuilt"] == 0, runs_report
    for record in runs_report["records"][: len(NAMED_RUNS)]:
        outcome, phrase = NAMED_RUNS[record["case"]]
        assert record["outcome"] == outcome and phrase in record["message"], record
        if outcome == "refused":
            assert record["message"].startswith(("Cannot open ", "Cannot segment ")), record
    memory = next(r for r in runs_report["records"] if r["case"] == "memory_1500_at_1mm")
    assert "GiB of memory, more than the" in memory["message"]
    assert all(r["seconds"] < 120 for r in runs_report["records"])  # refusals before the model's work
    assert runs_report["returncode"] == 0, runs_report["stderr"][-2000:]


def test_whole_run_cases_cover_every_family():
    fuzz = _fuzz_module()
    import fuzz_runs

    cases = [fuzz_runs.random_run_case(3, i) for i in range(80)]
    assert {c.family for c in cases} == {"spacing", "extent", "grid", "loop", "unreadable", "dicom", "valid"}
    assert [c.note for c in cases] == [fuzz_runs.random_run_case(3, i).note for i in range(80)]
    assert set(NAMED_RUNS) <= {c.name for c in fuzz_runs.named_run_cases()}
    assert fuzz.LIBRARY_MARKERS.search("Traceback (most recent call last)")


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
    kinds = {make.note.split(":")[0] for make in (fuzz.make_case(3, i) for i in range(200))}
    assert "dicom" in kinds  # series written by SimpleITK with mutated tags
