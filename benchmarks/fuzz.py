"""Fuzz the scan readers with mutated NIfTI, MetaImage (.mha, .mhd + .raw), NRRD and DICOM files, and whole
``spinesegdiff segment`` runs with absurd scans and paths.

Every case is read in a child process of its own (forked from a clean process that imported the readers
and nothing else), with its address space capped (RLIMIT_AS) and a timeout, through
``napari_spinesegdiff.io.readers.read_volume`` and through the napari reader hook
(``napari_get_reader`` then the reader it returns, without a viewer).  Each case counts as:

* ``opened``  -- both paths returned a volume / layers;
* ``refused`` -- a path raised :class:`VolumeReadError` whose message is one sentence naming the file;
* ``foreign`` -- any other exception type, or a refusal whose message is not one sentence of ours;
* ``crashed`` -- the child died by a signal or exited without reporting;
* ``hung``    -- the child ran past the timeout.

Run by hand (a few minutes for 2,000 cases on one core):

    python benchmarks/fuzz.py --cases 2000 --seed 0 [--workers 1] [--json report.json] [--keep DIR]

The cases are drawn in ``fuzz_cases.py``.  ``--explicit`` adds one named case per crash class found by
the hostile tester (negative, zero and huge NDims, a tiny compressed .mha declaring 1024^3 voxels, a
4000x4000x100 .nii stub, .mhd -> /dev/zero and /dev/stdin, a degenerate affine, a negative dimension).
DICOM cases are series written by SimpleITK with mutated tags (``fuzz_dicom.py``).

Whole runs (``fuzz_runs.py``: each a fresh ``spinesegdiff segment`` under ``--run-mem-gib`` of address
space, one slice, two steps, two samples):

    python benchmarks/fuzz.py --cases 0 --named-runs all --runs 40 [--run-mem-gib 4] [--run-timeout 300]

``--named-runs`` takes ``all`` or a comma-separated list of the named cases (the issue's 1e9 mm spacing,
3000 x 3000 slice at 1 mm and symlink loop among them; a named case must end as it expects).  The exit
status is 1 when any case is foreign, crashed or hung, or a named case ends otherwise than it expects.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(_var, "1")  # no thread pools in the process that forks the cases

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fuzz_cases, fuzz_dicom, fuzz_runs beside this file

from fuzz_cases import Case, explicit_cases, make_case  # noqa: E402

OUTCOMES = ("opened", "refused", "foreign", "crashed", "hung")
#: Words that only appear in a library's own messages, never in one of our sentences.
LIBRARY_MARKERS = re.compile(
    r"Traceback|sitk::|ITK ERROR|itk::|\[nrrd\]|0x[0-9a-fA-F]{6,}|MetaImage:|MET_Read|broadcast shape|"
    r"iterator is too large|start_ornt|HeaderDataError|nibabel|Exception thrown|numpy|[Ee]rrno"
)


# ------------------------------------------------------------------------------------------- running


def write_case(case: Case, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sub in case.folders:
        (folder / sub).mkdir(exist_ok=True)
    for name, data in case.files.items():
        (folder / name).write_bytes(data)
    for name, target in case.links.items():
        link = folder / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(target)
    for name in case.fifos:
        path = folder / name
        if not path.exists():
            os.mkfifo(path)
    return folder / case.target


def is_our_sentence(message: str, path: Path) -> bool:
    """One sentence of ours: ``Cannot open <path>: <reason>.`` on one line, no library words."""
    return (
        message.startswith(f"Cannot open {path}: ")
        and message.endswith(".")
        and "\n" not in message
        and ". " not in message[len(f"Cannot open {path}: "):]
        and not LIBRARY_MARKERS.search(message)
    )


def _classify(fn, path: Path) -> tuple[str, str]:
    from napari_spinesegdiff.io.readers import VolumeReadError

    try:
        fn()
    except VolumeReadError as exc:
        message = str(exc)
        return ("refused" if is_our_sentence(message, path) else "foreign"), message
    except Exception as exc:  # noqa: BLE001 - that is what is counted
        return "foreign", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return "opened", ""


def _child(path: Path, mem_bytes: int, timeout: float, out_fd: int) -> None:
    """Runs in the forked child: cap memory, read both ways, report one JSON line, exit without cleanup."""
    import warnings

    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(int(timeout) + 5)  # a backstop; the parent kills at `timeout`
    try:
        status = Path("/proc/self/status").read_text()
        base = int(re.search(r"VmSize:\s+(\d+)", status).group(1)) * 1024
    except (OSError, AttributeError):
        base = 0
    resource.setrlimit(resource.RLIMIT_AS, (base + mem_bytes, base + mem_bytes))
    warnings.simplefilter("ignore")
    from napari_spinesegdiff._reader import napari_get_reader
    from napari_spinesegdiff.io.readers import read_volume

    result = {}
    result["read_volume"] = _classify(lambda: read_volume(path), path)

    def napari_path():
        reader = napari_get_reader(str(path))
        if reader is None:
            raise LookupError("napari_get_reader declined the file")
        layers = reader(str(path))
        if not layers:
            raise LookupError("the reader returned no layers")

    outcome = _classify(napari_path, path)
    if outcome[0] == "foreign" and outcome[1].startswith("LookupError: napari_get_reader declined"):
        outcome = ("declined", outcome[1])
    result["napari"] = outcome
    os.write(out_fd, (json.dumps(result) + "\n").encode())
    os._exit(0)


@dataclass
class Running:
    index: int
    case: Case
    path: Path
    pid: int
    fd: int
    started: float
    chunks: list = field(default_factory=list)


def _start(case: Case, index: int, root: Path, mem_bytes: int, timeout: float, stdin_fd: int,
           quiet_children: bool = True) -> Running:
    path = write_case(case, root / f"c{index:05d}")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            os.dup2(stdin_fd, 0)  # a pipe the parent never writes to: reading /dev/stdin blocks (a hang)
            if quiet_children:  # libraries' own chatter (ITK warnings, nibabel's header fixes)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
            _child(path, mem_bytes, timeout, w)
        except BaseException:  # noqa: BLE001
            try:
                os.write(w, json.dumps({"child_error": traceback.format_exc()[-2000:]}).encode() + b"\n")
            finally:
                os._exit(3)
    os.close(w)
    return Running(index, case, path, pid, r, time.monotonic())


def _finish(run: Running, timed_out: bool) -> dict:
    if timed_out:
        try:
            os.kill(run.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status, usage = os.wait4(run.pid, 0)
    while True:
        try:
            chunk = os.read(run.fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        run.chunks.append(chunk)
    os.close(run.fd)
    text = b"".join(run.chunks).decode(errors="replace").strip()
    record = {"index": run.index, "case": run.case.name, "note": run.case.note, "target": str(run.path),
              "seconds": round(time.monotonic() - run.started, 3), "peak_rss_kb": int(usage.ru_maxrss)}
    if timed_out:
        record["outcome"] = "hung"
        return record
    if os.WIFSIGNALED(status):
        record["outcome"], record["detail"] = "crashed", f"signal {os.WTERMSIG(status)}"
        return record
    try:
        result = json.loads(text.splitlines()[-1]) if text else {}
    except json.JSONDecodeError:
        result = {}
    if "read_volume" not in result:
        record["outcome"] = "crashed"
        record["detail"] = f"exit {os.WEXITSTATUS(status)} " + str(result.get("child_error", text))[-500:]
        return record
    paths = {k: tuple(v) for k, v in result.items()}
    record["paths"] = {k: v[0] for k, v in paths.items()}
    record["messages"] = {k: v[1] for k, v in paths.items() if v[1]}
    outcomes = [v[0] for v in paths.values() if v[0] != "declined"]
    for worst in ("foreign", "refused", "opened"):
        if worst in outcomes:
            record["outcome"] = worst
            break
    else:
        record["outcome"] = "refused"
    if os.WEXITSTATUS(status) != 0:
        record["outcome"], record["detail"] = "crashed", f"exit {os.WEXITSTATUS(status)}"
    return record


def run_cases(cases: list[Case], workers: int = 1, timeout: float = 20.0, mem_gib: float = 2.0,
              keep: Path | None = None, progress: bool = True, quiet_children: bool = True) -> list[dict]:
    """Run every case in its own forked child; return one record per case (in case order)."""
    import SimpleITK  # noqa: F401 - imported once here, so each child starts with it loaded

    import napari_spinesegdiff._reader  # noqa: F401
    import napari_spinesegdiff.io.readers  # noqa: F401

    root = Path(tempfile.mkdtemp(prefix="spinesegdiff-fuzz-", dir=keep))
    stdin_r, stdin_w = os.pipe()
    mem_bytes = int(mem_gib * 2**30)
    records: list[dict] = []
    pending = list(enumerate(cases))
    running: dict[int, Running] = {}
    t0 = time.monotonic()
    reported = 0
    try:
        while pending or running:
            while pending and len(running) < workers:
                index, case = pending.pop(0)
                run = _start(case, index, root, mem_bytes, timeout, stdin_r, quiet_children)
                running[run.fd] = run
            ready, _, _ = select.select(list(running), [], [], 0.05)
            for fd in ready:
                run = running[fd]
                chunk = os.read(fd, 65536)
                if chunk:
                    run.chunks.append(chunk)
                    continue
                records.append(_finish(running.pop(fd), timed_out=False))
            now = time.monotonic()
            for fd, run in list(running.items()):
                if now - run.started > timeout:
                    records.append(_finish(running.pop(fd), timed_out=True))
            if progress and len(records) >= reported + 250:
                reported = len(records) - len(records) % 250
                done = Counter(r["outcome"] for r in records)
                print(f"  {len(records)}/{len(cases)} cases, {time.monotonic() - t0:.0f} s: {dict(done)}",
                      file=sys.stderr, flush=True)
    finally:
        os.close(stdin_w)
        os.close(stdin_r)
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    records.sort(key=lambda r: r["index"])
    return records


def summarize(records: list[dict], seconds: float) -> dict:
    counts = Counter(r["outcome"] for r in records)
    per_path: dict[str, Counter] = {}
    for r in records:
        for name, outcome in r.get("paths", {}).items():
            per_path.setdefault(name, Counter())[outcome] += 1
    return {
        "cases": len(records),
        **{k: counts.get(k, 0) for k in OUTCOMES},
        "per_path": {k: dict(v) for k, v in per_path.items()},
        "peak_rss_mib": round(max((r["peak_rss_kb"] for r in records), default=0) / 1024, 1),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="random cases (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--explicit", action="store_true", help="also run the named crash-class cases")
    ap.add_argument("--workers", type=int, default=1, help="cases run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as hung")
    ap.add_argument("--mem-gib", type=float, default=2.0, help="address space a case may add (RLIMIT_AS)")
    ap.add_argument("--json", type=Path, help="write the summary and every record here")
    ap.add_argument("--keep", type=Path, help="keep the case files under this folder")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    ap.add_argument("--library-output", action="store_true", help="let the children print libraries' warnings")
    ap.add_argument("--runs", type=int, default=0, help="random whole segment runs (default 0)")
    ap.add_argument("--named-runs", default="", help="'all' or comma-separated named whole-run cases")
    ap.add_argument("--run-mem-gib", type=float, default=4.0, help="address space of a whole run (RLIMIT_AS)")
    ap.add_argument("--run-timeout", type=float, default=300.0, help="seconds before a whole run counts as hung")
    args = ap.parse_args(argv)

    cases = (explicit_cases() if args.explicit else []) + [make_case(args.seed, i) for i in range(args.cases)]
    t0 = time.monotonic()
    records = run_cases(cases, workers=args.workers, timeout=args.timeout, mem_gib=args.mem_gib, keep=args.keep,
                        progress=not args.quiet, quiet_children=not args.library_output)
    summary = summarize(records, time.monotonic() - t0)
    runs = whole_runs(args)
    bad = [r for r in records if r["outcome"] in ("foreign", "crashed", "hung")]
    expected_misses = []
    for r, case in zip(records, cases):
        if case.expect is not None:
            messages = " ".join(r.get("messages", {}).values())
            if r["outcome"] != "refused" or case.expect not in messages:
                expected_misses.append(r)
    summary["explicit_misses"] = len(expected_misses)
    report = {"summary": summary, "records": records}
    if runs is not None:
        report["runs"] = runs
        summary["whole_runs"] = runs["summary"]
        bad += [r for r in runs["records"] if r["outcome"] in ("foreign", "crashed", "hung", "unbuilt")]
        expected_misses += [r for r in runs["records"] if "expected" in r]
    print(json.dumps(summary))
    for r in (bad + expected_misses)[:40]:
        detail = r.get("detail") or r.get("messages") or r.get("message")
        print(f"{r['outcome']:8s} {r.get('case', '')} {r['note'][:110]} :: {detail}"
              + (f" (expected {r['expected']})" if "expected" in r else ""), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 1 if bad or expected_misses else 0


def whole_runs(args) -> dict | None:
    """The whole ``segment`` runs the options ask for (``fuzz_runs.py``), or ``None`` when none."""
    if not args.runs and not args.named_runs:
        return None
    import fuzz_runs

    named = fuzz_runs.named_run_cases()
    if args.named_runs and args.named_runs != "all":
        wanted = [n.strip() for n in args.named_runs.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in named})
        if unknown:
            raise SystemExit(f"unknown named runs: {', '.join(unknown)}")
        named = [c for c in named if c.name in wanted]
    elif not args.named_runs:
        named = []
    cases = named + [fuzz_runs.random_run_case(args.seed, i) for i in range(args.runs)]
    root = Path(tempfile.mkdtemp(prefix="spinesegdiff-fuzz-runs-", dir=args.keep))
    t0 = time.monotonic()
    try:
        records = fuzz_runs.run_cases(cases, root, mem_gib=args.run_mem_gib, timeout=args.run_timeout,
                                      markers=LIBRARY_MARKERS, progress=not args.quiet)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return {"summary": fuzz_runs.summarize_runs(records, time.monotonic() - t0), "records": records}


if __name__ == "__main__":
    sys.exit(main())
