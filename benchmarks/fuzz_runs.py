"""Whole ``spinesegdiff segment`` runs for ``benchmarks/fuzz.py``: absurd scans and paths end in one sentence.

Each case builds a scan (or a path that leads to none) in a folder of its own and runs the real command line
in a fresh interpreter, under an address-space limit (``RLIMIT_AS``, as ``ulimit -v``; 4 GiB by default) and
a timeout:

    python -m napari_spinesegdiff.cli segment SCAN -o OUT/labels.nii.gz --uncertainty OUT/unc.nii.gz \\
        --slices mid --steps 2 --ensemble 2 --no-progress [case options]

so a case that passes every check segments one slice cheaply.  Families: ``spacing`` (voxel sizes no scan
has, in NIfTI, MetaImage and NRRD headers), ``extent`` (an axis longer than 2 m), ``grid`` (a model grid too
big for the memory limit: wide slices at 1 mm, or coarse voxels resampled to the model's 1 mm), ``loop``
(symbolic-link loops as the scan, a folder on its path, the truth, prior or checkpoint file, an entry of a
DICOM folder, the output), ``unreadable`` (broken links, paths through a file, names too long, pipes,
folders and empty or random files under a scan's name), ``dicom`` (SimpleITK-written series with mutated
tags: see ``fuzz_dicom.py``) and ``valid`` (small real-looking scans that must segment).

Outcomes: ``segmented`` (exit 0, labels and sidecar written), ``refused`` (exit 2, the last line of stderr
``spinesegdiff: error: <one sentence>``, no traceback, nothing written, the inputs untouched),
``foreign`` (exit 2 otherwise, or exit 0 without the outputs), ``crashed`` (any other exit, a signal),
``hung`` (past the timeout).
"""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

RUN_OUTCOMES = ("segmented", "refused", "foreign", "crashed", "hung")
CHEAP = ["--slices", "mid", "--steps", "2", "--ensemble", "2", "--no-progress"]
_ERROR = "spinesegdiff: error: "


@dataclass
class RunCase:
    """One whole run: ``build(folder)`` makes the inputs and returns the scan path and extra options."""

    name: str
    family: str
    build: Callable[[Path], tuple[Path, list[str]]]
    expect: str | None = None  # "refused" or "segmented" for the named cases; None: either
    phrase: str | None = None  # a phrase the refusal must contain
    note: str = ""


# --------------------------------------------------------------------------------------- scan files


def _signal(shape, rng: random.Random, dtype=np.int16) -> np.ndarray:
    """Mostly zeros with a noisy block in the middle: a scan with signal that compresses to little."""
    data = np.zeros(shape, dtype)
    block = tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)
    region = data[block]
    values = np.random.default_rng(rng.randrange(2**32)).integers(50, 1000, region.shape)
    data[block] = values.astype(dtype)
    return data


def write_scan(path: Path, data: np.ndarray, spacing) -> Path:
    """``data`` (file order) with a diagonal geometry of ``spacing`` mm, in the format of ``path``'s extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        nib.save(nib.Nifti1Image(data, np.diag([*map(float, spacing), 1.0])), path)
    else:
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose()))
        img.SetSpacing(tuple(float(s) for s in spacing))
        sitk.WriteImage(img, str(path), True)
    return path


def _scan_case(name, family, shape, spacing, ext=".nii.gz", expect=None, phrase=None, seed=0, options=()):
    def build(folder: Path):
        return write_scan(folder / f"scan{ext}", _signal(shape, random.Random(seed)), spacing), list(options)

    note = f"{'x'.join(map(str, shape))} voxels of {' x '.join(f'{s:g}' for s in spacing)} mm, {ext}"
    return RunCase(name, family, build, expect, phrase, note)


def _valid_scan(folder: Path, ext: str = ".nii.gz", shape=(5, 96, 80), spacing=(3.0, 1.0, 1.0)) -> Path:
    noise = np.random.default_rng(1).normal(300, 60, shape).clip(0, 4000).astype(np.int16)
    return write_scan(folder / f"scan{ext}", noise, spacing)


# ------------------------------------------------------------------------------------------ paths


def _link(folder: Path, name: str, target: str) -> Path:
    (folder / name).symlink_to(target)
    return folder / name


def _loop_case(name: str, where: str, expect: str | None = "refused", phrase: str | None = None) -> RunCase:
    def build(folder: Path):
        if where == "scan":
            return _link(folder, "scan.nii.gz", "scan.nii.gz"), []
        if where == "chain":
            _link(folder, "a.nii.gz", "b.nii.gz")
            _link(folder, "b.nii.gz", "c.nii.gz")
            _link(folder, "c.nii.gz", "a.nii.gz")
            return folder / "a.nii.gz", []
        if where == "folder":
            _link(folder, "ring", "ring")
            return folder / "ring" / "scan.nii.gz", []
        scan = _valid_scan(folder)
        if where == "dicom entry":
            from fuzz_dicom import valid_series

            series = valid_series(folder / "series")
            _link(series, "loop.dcm", "loop.dcm")
            return series, []
        if where == "output":
            (folder / "out").mkdir()
            _link(folder / "out", "labels.nii.gz", "labels.nii.gz")
            return scan, []
        flag = {"truth": "--truth", "prior": "--prior", "checkpoint": "--checkpoint"}[where]
        return scan, [flag, str(_link(folder, f"{where}.nii.gz" if where != "checkpoint" else "m.safetensors",
                                      f"{where}.nii.gz" if where != "checkpoint" else "m.safetensors"))]

    return RunCase(name, "loop", build, expect, phrase, f"a symbolic-link loop as the {where}")


def _unreadable_case(name: str, kind: str, phrase: str | None = None) -> RunCase:
    def build(folder: Path):
        if kind == "dangling":
            return _link(folder, "scan.nii.gz", "nowhere.nii.gz"), []
        if kind == "through a file":
            (folder / "notes.txt").write_text("a file, not a folder")
            return folder / "notes.txt" / "scan.nii.gz", []
        if kind == "too long":
            return folder / ("x" * 300 + ".nii.gz"), []
        if kind == "fifo":
            os.mkfifo(folder / "scan.nii.gz")
            return folder / "scan.nii.gz", []
        if kind == "folder":
            (folder / "scan.nii.gz").mkdir()
            return folder / "scan.nii.gz", []
        if kind == "device":
            return _link(folder, "scan.mha", "/dev/zero"), []
        if kind == "empty":
            (folder / "scan.nii.gz").write_bytes(b"")
            return folder / "scan.nii.gz", []
        if kind == "random bytes":
            (folder / "scan.nrrd").write_bytes(random.Random(7).randbytes(4096))
            return folder / "scan.nrrd", []
        if kind == "missing":
            return folder / "scan.nii.gz", []
        raise ValueError(kind)

    return RunCase(name, "unreadable", build, "refused", phrase, kind)


def _dicom_case(name: str, mutate: Callable[[Path], None] | None = None, expect=None, phrase=None,
                note: str = "") -> RunCase:
    def build(folder: Path):
        from fuzz_dicom import valid_series

        series = valid_series(folder / "series")
        if mutate is not None:
            mutate(series)
        return series, []

    return RunCase(name, "dicom", build, expect, phrase, note or name)


def _mixed_series(series: Path) -> None:
    from fuzz_dicom import write_series

    write_series(series, _signal((2, 64, 64), random.Random(3)), series="2", name="other")


def _tag(tag, value, which="*.dcm"):
    def mutate(series: Path) -> None:
        from fuzz_dicom import edit_files

        edit_files(series, tag, value, which)

    return mutate


def named_run_cases() -> list[RunCase]:
    """One case per absurd input named in the issue, and one per family's main trap."""
    import fuzz_dicom as fd

    return [
        _scan_case("spacing_1e9", "spacing", (12, 64, 64), (1e9, 1e9, 1e9), expect="refused",
                   phrase="its voxels measure 1e+09 x 1e+09 x 1e+09 mm"),
        _scan_case("spacing_1e-9_mha", "spacing", (6, 64, 64), (1e-9, 1.0, 1.0), ".mha", "refused",
                   "and a scan's voxels measure 0.001 to 100 mm"),
        _scan_case("slice_3000_at_1mm", "extent", (1, 3000, 3000), (1.0, 1.0, 1.0), expect="refused",
                   phrase="span 1 x 3000 x 3000 mm, more than the 2000 mm"),
        _scan_case("memory_1500_at_1mm", "grid", (1, 1500, 1500), (1.0, 1.0, 1.0), expect="refused",
                   phrase="1500 x 1500 pixels at the model's 1 x 1 mm"),
        _scan_case("coarse_500_at_3mm", "grid", (1, 500, 500), (3.0, 3.0, 3.0), ".nrrd", "refused",
                   "1500 x 1500 pixels at the model's 1 x 1 mm"),
        _loop_case("self_loop", "scan", phrase="it is a symbolic link in a loop of links"),
        _loop_case("three_link_loop", "chain", phrase="it is a symbolic link in a loop of links"),
        _loop_case("loop_on_the_path", "folder", phrase="passes through a loop of symbolic links"),
        _loop_case("truth_loop", "truth", phrase="truth.nii.gz: it is a symbolic link in a loop"),
        _loop_case("prior_loop", "prior", phrase="prior.nii.gz: it is a symbolic link in a loop"),
        _loop_case("checkpoint_loop", "checkpoint", phrase="m.safetensors"),
        _loop_case("dicom_folder_loop_entry", "dicom entry", phrase="the entry loop.dcm of its folder"),
        _loop_case("output_loop", "output", expect=None),
        _unreadable_case("dangling_link", "dangling", "which does not exist"),
        _unreadable_case("through_a_file", "through a file", "Not a directory"),
        _unreadable_case("name_too_long", "too long", "File name too long"),
        _unreadable_case("fifo_scan", "fifo", "device, pipe or socket"),
        _unreadable_case("folder_scan", "folder", "holds no DICOM file"),
        _unreadable_case("dev_zero_scan", "device", "system file"),
        _unreadable_case("empty_file", "empty"),
        _unreadable_case("random_bytes", "random bytes"),
        _unreadable_case("missing_scan", "missing", "does not exist"),
        _dicom_case("dicom_valid", expect="segmented"),
        _dicom_case("dicom_mixed_series", _mixed_series, expect="segmented", note="two series in one folder"),
        _dicom_case("dicom_rows_1000", _tag(fd.ROWS, fd.us_value(1000)), "refused", "truncated or its header is wrong",
                    note="rows 1000, data for 96"),
        _dicom_case("dicom_columns_0", _tag(fd.COLUMNS, fd.us_value(0)), note="columns 0"),
        _dicom_case("dicom_bits_allocated_64", _tag(fd.BITS_ALLOCATED, fd.us_value(64)), note="bits allocated 64"),
        _dicom_case("dicom_bits_stored_32", _tag(fd.BITS_STORED, fd.us_value(32)), note="bits stored 32 of 16"),
        _dicom_case("dicom_samples_3", _tag(fd.SAMPLES_PER_PIXEL, fd.us_value(3)), note="3 samples per pixel"),
        _dicom_case("dicom_frames_1000", _tag(fd.NUMBER_OF_FRAMES, fd.text_value("1000")), note="1000 frames"),
        _dicom_case("dicom_positions_equal", _tag(fd.POSITION, fd.text_value("0\\0\\0")), note="positions equal"),
        _dicom_case("dicom_orientation_differs", _tag(fd.ORIENTATION, fd.text_value("1\\0\\0\\0\\1\\0"),
                                                      "slice002.dcm"), note="one slice axial"),
        _dicom_case("dicom_spacing_1e9", _tag(fd.PIXEL_SPACING, fd.text_value("1e9\\1e9")), "refused",
                    "its voxels measure 1e+09 x 1e+09 mm"),
        RunCase("nifti_valid", "valid", lambda d: (_valid_scan(d), []), "segmented"),
        RunCase("mha_valid", "valid", lambda d: (_valid_scan(d, ".mha"), []), "segmented"),
    ]


# ------------------------------------------------------------------------------------ random cases


_ABSURD_MM = [1e9, 1e30, 6.7e7, 150.0, 5e3, 1e-9, 1e-4, 5e-4, 2e-10]


def random_run_case(seed: int, index: int) -> RunCase:
    """A seeded whole-run case from one of the families."""
    rng = random.Random(seed * 7_000_003 + index)
    family = rng.choices(["spacing", "extent", "grid", "loop", "unreadable", "dicom", "valid"],
                         [0.18, 0.12, 0.16, 0.12, 0.12, 0.22, 0.08])[0]
    name = f"run{index}"
    ext = rng.choice([".nii.gz", ".nii", ".mha", ".nrrd"])
    if family == "spacing":
        spacing = [rng.choice([0.5, 0.8, 1.0, 3.0]) for _ in range(3)]
        for axis in rng.sample(range(3), rng.randint(1, 3)):
            spacing[axis] = rng.choice(_ABSURD_MM)
        return _scan_case(name, family, (rng.randint(2, 8), rng.randint(16, 96), rng.randint(16, 96)), spacing, ext,
                          "refused", "mm", seed=index)
    if family == "extent":
        shape, spacing = [rng.randint(2, 8), 64, 64], [1.0, 1.0, 1.0]
        axis = rng.randrange(3)
        spacing[axis] = rng.choice([1.0, 5.0, 40.0, 99.0])
        shape[axis] = int(rng.uniform(2001, 6000) / spacing[axis]) + 1
        return _scan_case(name, family, tuple(shape), spacing, ext, "refused", "more than the 2000 mm", seed=index)
    if family == "grid":
        voxel = rng.choice([0.25, 0.5, 1.0, 2.0, 3.3])
        side = int(rng.uniform(700, 1995) / max(voxel, 1.0))
        shape = (rng.randint(1, 4), side, int(side * rng.uniform(0.5, 1.0)))
        return _scan_case(name, family, shape, (3.0, voxel, voxel), ext, None, None, seed=index)
    if family == "loop":
        where = rng.choice(["scan", "chain", "folder", "truth", "prior", "checkpoint", "dicom entry", "output"])
        return _loop_case(name, where, None if where == "output" else "refused")
    if family == "unreadable":
        kind = rng.choice(["dangling", "through a file", "too long", "fifo", "folder", "device", "empty",
                           "random bytes", "missing"])
        return _unreadable_case(name, kind)
    if family == "dicom":
        from fuzz_dicom import mutated_series

        files, target, note = mutated_series(rng)

        def build(folder: Path):
            for rel, data in files.items():
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                (folder / rel).write_bytes(data)
            return folder / target, []

        return RunCase(name, family, build, None, None, note)
    shape = (rng.randint(2, 6), rng.randint(48, 160), rng.randint(48, 160))
    spacing = (rng.uniform(2.5, 4.5), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5))
    return RunCase(name, family, lambda d: (_valid_scan(d, ext, shape, spacing), []), "segmented",
                   note=f"{'x'.join(map(str, shape))} {ext}")


# ------------------------------------------------------------------------------------------ running


def _listing(folder: Path) -> dict[str, int]:
    """Names and sizes under ``folder`` (links and specials by name only)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            out[str(path.relative_to(folder))] = st.st_size if path.is_file() and not path.is_symlink() else -1
    return out


def _one_sentence(message: str, markers: re.Pattern) -> bool:
    return message.endswith(".") and ". " not in message and "\n" not in message and not markers.search(message)


def classify(case: RunCase, code: int | None, signum: int | None, err: str, before: dict, after: dict,
             out: Path, markers: re.Pattern) -> tuple[str, str]:
    """``(outcome, message)`` of a finished run."""
    lines = [line for line in err.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if signum is not None:
        return "crashed", f"killed by signal {signum}: {last[:300]}"
    if code == 0:
        written = (out / "labels.nii.gz").is_file() and (out / "labels.json").is_file()
        return ("segmented", "") if written else ("foreign", "exit 0 without labels and sidecar")
    if code != 2 or "Traceback" in err:
        return "crashed", f"exit {code}: {' | '.join(lines[-3:])[:500]}"
    message = last[len(_ERROR):] if last.startswith(_ERROR) else ""
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    if not message or not _one_sentence(message, markers):
        return "foreign", last[:500]
    if added or changed:
        return "foreign", f"refused but wrote {added[:3]} / changed {changed[:3]}: {message[:300]}"
    return "refused", message


def run_one(case: RunCase, folder: Path, mem_gib: float, timeout: float, markers: re.Pattern,
            python: str = sys.executable) -> dict:
    folder.mkdir(parents=True)
    record = {"case": case.name, "family": case.family, "note": case.note}
    try:
        scan, extra = case.build(folder)
    except Exception as exc:  # noqa: BLE001 - a case that cannot be built is reported, not counted
        record.update(outcome="unbuilt", detail=f"{type(exc).__name__}: {exc}")
        return record
    out = folder / "out"
    out.mkdir(exist_ok=True)
    argv = [python, "-m", "napari_spinesegdiff.cli", "segment", str(scan), "-o", str(out / "labels.nii.gz"),
            "--uncertainty", str(out / "unc.nii.gz"), *CHEAP, *extra]
    limit = int(mem_gib * 2**30)

    def child_setup():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.nice(5)

    before = _listing(folder)
    t0 = time.monotonic()
    with open(folder / "stderr.txt", "w+b") as err_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err_file,
                                preexec_fn=child_setup, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        status = usage = None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
                record.update(outcome="hung", seconds=round(time.monotonic() - t0, 1))
                break
            time.sleep(0.05)
        proc.returncode = 0  # reaped here, not by Popen
        err_file.seek(0)
        err = err_file.read().decode(errors="replace")
    (folder / "stderr.txt").unlink()
    record["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)
    if record.get("outcome") == "hung":
        return record
    record["seconds"] = round(time.monotonic() - t0, 1)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    after = _listing(folder)
    record["outcome"], record["message"] = classify(case, code, signum, err, before, after, out, markers)
    record["exit"] = code
    if case.expect is not None and (record["outcome"] != case.expect
                                    or (case.phrase and case.phrase not in record["message"])):
        record["expected"] = f"{case.expect}" + (f" with '{case.phrase}'" if case.phrase else "")
    return record


def run_cases(cases: list[RunCase], root: Path, mem_gib: float = 4.0, timeout: float = 300.0,
              markers: re.Pattern | None = None, progress: bool = True) -> list[dict]:
    """Run each case in turn (one run at a time: each may use every core); one record per case."""
    markers = markers or re.compile(r"Traceback|0x[0-9a-fA-F]{6,}")
    records = []
    for i, case in enumerate(cases):
        folder = root / f"r{i:04d}"
        try:
            records.append(run_one(case, folder, mem_gib, timeout, markers))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if progress:
            r = records[-1]
            print(f"  run {i + 1}/{len(cases)} {case.name} ({case.family}): {r['outcome']} "
                  f"{r.get('seconds', '')} s {r.get('peak_rss_mib', '')} MiB {str(r.get('message', ''))[:110]}",
                  file=sys.stderr, flush=True)
    return records


def summarize_runs(records: list[dict], seconds: float) -> dict:
    counts = Counter(r["outcome"] for r in records)
    families = {}
    for r in records:
        families.setdefault(r["family"], Counter())[r["outcome"]] += 1
    return {
        "runs": len(records),
        **{k: counts.get(k, 0) for k in RUN_OUTCOMES},
        "unbuilt": counts.get("unbuilt", 0),
        "expected_misses": sum(1 for r in records if "expected" in r),
        "per_family": {k: dict(v) for k, v in sorted(families.items())},
        "peak_rss_mib": max((r.get("peak_rss_mib", 0) for r in records), default=0),
        "seconds": round(seconds, 1),
    }
