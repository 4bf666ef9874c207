"""Cohorts: segment many scans into a mirrored output tree and one results table (``spinesegdiff batch``).

No Qt, no napari.  The work per scan is :func:`segment_scan`, a plain picklable function, run by a local
``concurrent.futures.ProcessPoolExecutor`` (the default) or sent to a Dask distributed cluster; every engine
calls the pipeline with the one :class:`~.config.SegmentationConfig` (its ``seed`` included), so labels do
not depend on which worker or engine made them.

Layout of ``OUTDIR`` for an input ``site1/sub-01.nii.gz`` (names mirror the input tree, extension dropped):

* ``site1/sub-01_labels.nii.gz`` and ``site1/sub-01_uncertainty.nii.gz`` in the scan's geometry
  (:func:`~.io.writers.write_volume`, atomic);
* ``site1/sub-01.json``: the pipeline's provenance plus a ``batch`` section with the skip key (input,
  model and settings hashes), the output paths and the scan's results row;
* ``.rows/site1/sub-01.json``: the row of the latest run (written atomically as each scan finishes);
* ``results.parquet`` and ``results.csv``: one row per scan (:data:`COLUMNS`), rebuilt from the rows.

Resuming: a scan is *skipped* when its sidecar holds the same key and both outputs exist.  The parent
checks this without reading the input again when the input's size and modification time are the ones
recorded; otherwise the worker hashes the input and compares.  Failed scans are retried on every run.

QA (columns ``qa_flags`` and ``qa_pass``), see :func:`measure`:

* ``missing:<structure>``: no voxel of a structure on the segmented slices;
* ``volume:<structure>``: total volume outside :data:`PLAUSIBLE_ML` (checked only when every slice was
  segmented, since a partial run measures partial volumes);
* ``canal_pieces:<n>``: the spinal canal is more than one 3-D component of at least
  :data:`CANAL_PIECE_SHARE` of the largest (with the default
  ``single_canal`` the pipeline keeps the largest piece, so a break shows as ``canal_short`` instead);
* ``canal_short``: the canal covers less than :data:`CANAL_MIN_COVER` of the superior-inferior span of
  the discs;
* ``levels:discs=<n>`` / ``levels:vertebrae=<n>`` / ``levels:mismatch``: the number of discs or vertebral
  bodies (face-connected 3-D components at least :data:`LEVEL_MIN_SHARE` of the largest of their class; with whole
  vertebrae, the part of label 2 anterior to the canal) is outside :data:`EXPECTED_DISCS` /
  :data:`EXPECTED_VERTEBRAE`, or they differ by more than :data:`MAX_LEVEL_MISMATCH`.

``uncertainty_score``: the mean of the uncertainty map (0 to 1/e) over a band of voxels within
:data:`BAND_MM` mm in-plane of any label boundary (between structures or with the background) on the
segmented slices: where the model's doubt matters for the result, independent of the field of view.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .config import SegmentationConfig
from .io.readers import dicom_files_in, file_stem, file_suffix, is_dicom_file, looks_like_labels_path

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
ROWS_DIR = ".rows"
#: Scan files a folder or glob input picks up (a folder holding DICOM files is one scan too).
SCAN_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
#: Files never opened to look for a DICOM preamble.
_NOT_DICOM = frozenset({".json", ".txt", ".csv", ".tsv", ".md", ".py", ".png", ".jpg", ".jpeg", ".gz", ".zip",
                        ".raw", ".zraw", ".img", ".hdr", ".parquet", ".pq", ".xml", ".html", ".pdf", ".tmp"})

#: Written label value -> column prefix (label 2 is the whole vertebra, or the body with ``vertebrae=split``).
STRUCTURES = {1: "canal", 2: "vertebra", 3: "disc", 4: "posterior"}
#: Plausible total volume (mL) of each structure in a lumbar sagittal scan; wide on purpose, to catch gross
#: failures only (phantoms: canal 53-57, whole vertebrae 300, bodies 205, posterior elements 92, discs 81-98;
#: real lumbar masks: 5 bodies 180-230, 7 bodies 210-265, 5 discs 30; SPIDER mid-line slabs 13-25 slices:
#: canal 22-50, whole vertebrae 68-143, discs 19-47).
PLAUSIBLE_ML = {"canal": (5.0, 200.0), "vertebra": (30.0, 1200.0), "disc": (5.0, 300.0),
                "posterior": (5.0, 800.0)}
#: Expected number of discs and of vertebral bodies in a lumbar field of view (at least L1/L2-L5/S1 is
#: in view and rarely more than from T10; phantoms: 6 discs, 7 bodies; 26 SPIDER slabs: 6-9 and 6-9).
EXPECTED_DISCS = (4, 10)
EXPECTED_VERTEBRAE = (4, 11)
MAX_LEVEL_MISMATCH = 2
#: A 3-D component counts as a level when its volume is at least this share of the largest one of its class.
LEVEL_MIN_SHARE = 0.2
#: The canal must cover at least this share of the rows between the highest and the lowest disc (the
#: thecal sac may end above the lowest disc in view: SPIDER truth 0.63-1.0).
CANAL_MIN_COVER = 0.6
#: Pieces of the canal count when they are at least this share of the largest (specks do not).
CANAL_PIECE_SHARE = 0.05
#: Half-width (mm, in-plane) of the band around label boundaries for ``uncertainty_score``.
BAND_MM = 2.0

#: Columns of the results table, in order, with their Arrow types.
COLUMNS: dict[str, str] = {
    "scan": "string", "input": "string", "status": "string", "error": "string", "seconds": "float64",
    "input_sha256": "string", "model_sha256": "string", "baseline_sha256": "string",
    "settings_sha256": "string", "vertebrae": "string", "slices": "string", "n_slices": "int64",
    "labels": "string", "uncertainty": "string",
    **{f"{s}_{m}": "float64" for s in STRUCTURES.values() for m in ("ml", "unc_mean", "unc_max")},
    "canal_pieces": "int64", "vertebra_levels": "int64", "disc_levels": "int64",
    "uncertainty_score": "float64", "qa_flags": "string", "qa_pass": "bool",
    "worker": "string", "peak_rss_mb": "float64", "finished": "string",
}


class BatchError(ValueError):
    """A batch that cannot start (no scans, unreadable table, missing checkpoint): one sentence."""


# ------------------------------------------------------------------------------------------------ jobs


@dataclass(frozen=True)
class ScanJob:
    """One scan: ``path`` (a file or a DICOM folder, absolute) and ``name``, its output path relative to
    OUTDIR without extension (``"site1/sub-01"``)."""

    path: str
    name: str


@dataclass(frozen=True)
class BatchSettings:
    """What every worker needs, picklable: the output folder, the configuration and the skip key parts."""

    outdir: str
    config: SegmentationConfig
    model_sha256: str
    baseline_sha256: str | None
    settings_sha256: str
    threads: int = 1  # torch threads per worker
    suffix: str = ".nii.gz"

    def labels_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_labels{self.suffix}"

    def uncertainty_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_uncertainty{self.suffix}"

    def sidecar_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}.json"

    def row_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / ROWS_DIR / f"{job.name}.json"

    def key(self, input_sha256: str) -> dict[str, str | None]:
        return {"input_sha256": input_sha256, "model_sha256": self.model_sha256,
                "baseline_sha256": self.baseline_sha256, "settings_sha256": self.settings_sha256}


def _is_scan_file(path: Path) -> bool:
    return file_suffix(path) in SCAN_SUFFIXES


def _maybe_dicom(path: Path) -> bool:
    suffix = file_suffix(path)
    if suffix in SCAN_SUFFIXES or suffix in _NOT_DICOM or path.name.startswith("."):
        return False
    return is_dicom_file(path)


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _walk(root: Path, outdir: Path | None, found: list[tuple[Path, Path]], ignored: list[str]) -> None:
    """Scans under ``root`` as (path, root) pairs: scan files, and folders holding DICOM files."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not _inside(here / d, outdir))
        if _inside(here, outdir):
            continue
        names = sorted(filenames)
        if any(_maybe_dicom(here / n) or file_suffix(n) == ".dcm" for n in names):
            found.append((here, root))
        for n in names:
            p = here / n
            if n.startswith(".") or not _is_scan_file(p):
                continue
            if looks_like_labels_path(p):
                ignored.append(str(p))
                continue
            found.append((p, root))


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _read_table(path: Path) -> tuple[list[str], list[str | None]]:
    """The ``path`` column (and an optional ``id`` column) of a CSV or Parquet table."""
    try:
        if file_suffix(path) == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
            columns = set(rows[0]) if rows else set()
            paths = [r.get("path") or "" for r in rows]
            ids = [r.get("id") or None for r in rows] if "id" in columns else [None] * len(rows)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            columns = set(table.column_names)
            if "path" not in columns:
                raise BatchError(f"The table {path} has no 'path' column (columns: {', '.join(sorted(columns))}).")
            paths = [str(p) if p is not None else "" for p in table.column("path").to_pylist()]
            ids = ([str(i) if i is not None else None for i in table.column("id").to_pylist()]
                   if "id" in columns else [None] * len(paths))
    except BatchError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is one sentence about the table
        raise BatchError(f"The table {path} cannot be read ({type(exc).__name__}: {exc}).") from None
    if "path" not in columns:
        raise BatchError(f"The table {path} has no 'path' column.")
    return paths, ids


def _clean_name(name: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", name.strip()) if p not in ("", ".", "..")]
    return "/".join(parts)


def _name_for(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    if str(rel) in ("", "."):
        rel = Path(path.resolve().name)
    if path.is_dir():
        return _clean_name(rel.as_posix())
    return _clean_name((rel.parent / file_stem(rel)).as_posix())


def _unique(pairs: list[tuple[Path, str]]) -> list[ScanJob]:
    """Disambiguate names that two inputs share (``scan.nii`` and ``scan.mha``): add the extension."""
    counts: dict[str, int] = {}
    for _, name in pairs:
        counts[name.lower()] = counts.get(name.lower(), 0) + 1
    jobs, used = [], set()
    for path, name in pairs:
        if counts[name.lower()] > 1:
            tag = file_suffix(path).lstrip(".").replace(".", "_") or "dicom"
            name = f"{name}_{tag}"
        base, k = name, 2
        while name.lower() in used:
            name, k = f"{base}_{k}", k + 1
        used.add(name.lower())
        jobs.append(ScanJob(str(path.resolve()), name))
    return jobs


def find_scans(source: str | os.PathLike, outdir: str | os.PathLike | None = None) -> tuple[list[ScanJob], list[str]]:
    """The scans of a batch input and the files ignored because their names mark them as labels.

    ``source`` is a folder (searched recursively for NIfTI, MetaImage and NRRD files and for folders holding
    DICOM files, each such folder one scan; hidden folders and anything inside ``outdir`` are left out, and
    so are files whose names mark labels, :func:`~.io.readers.looks_like_labels_path`), a glob pattern
    (``"data/**/*_t2.nii.gz"``; matched folders are searched like a folder), a CSV or Parquet table with a
    ``path`` column (relative paths are relative to the table's folder; an optional ``id`` column names the
    outputs; every row is a scan, missing files become failed rows), or one scan.  Output names mirror the
    paths relative to the folder, the glob's fixed prefix or the table's common folder.
    """
    src = str(source)
    out = Path(outdir).resolve() if outdir is not None else None
    ignored: list[str] = []
    found: list[tuple[Path, Path]] = []
    p = Path(src)
    if p.is_file() and file_suffix(p) in TABLE_SUFFIXES:
        paths, ids = _read_table(p)
        if any(not q.strip() for q in paths):
            raise BatchError(f"The table {p} has rows with an empty 'path'.")
        resolved = [Path(q) if Path(q).is_absolute() else (p.parent / q).resolve() for q in paths]
        parents = [str(q.parent) for q in resolved]
        root = Path(os.path.commonpath(parents)) if parents else p.parent
        pairs = [(q, _clean_name(i) if i else _name_for(q, root)) for q, i in zip(resolved, ids)]
        return _unique(pairs), ignored
    if p.is_dir():
        _walk(p, out, found, ignored)
    elif p.exists():
        found.append((p, p.parent))
    elif glob.has_magic(src):
        root = _glob_root(src)
        for match in sorted(glob.glob(src, recursive=True)):
            m = Path(match)
            if _inside(m, out) or any(part.startswith(".") and part not in (".", "..") for part in m.parts):
                continue
            if m.is_dir():
                _walk(m, out, found, ignored)
            elif _is_scan_file(m) or _maybe_dicom(m):
                if looks_like_labels_path(m):
                    ignored.append(match)
                else:
                    found.append((m, root))
    else:
        raise BatchError(f"{src} does not exist (give a folder, a glob pattern, a CSV/Parquet table or a scan).")
    seen, pairs = set(), []
    for path, root in found:
        key = str(path.resolve())
        if key not in seen:
            seen.add(key)
            pairs.append((path, _name_for(path, root)))
    pairs.sort(key=lambda t: t[1])
    return _unique(pairs), ignored


# ------------------------------------------------------------------------------------------------ hashes


def _sha256_file(path: Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else h


def _detached_data(header: Path) -> list[Path]:
    """The data file a ``.mhd``/``.nhdr`` header names, when it is one file beside it."""
    try:
        with open(header, "rb") as fh:
            text = fh.read(65536).decode("latin-1")
    except OSError:
        return []
    m = re.search(r"^\s*(?:ElementDataFile\s*=|data ?file\s*:)\s*(.+?)\s*$", text, re.M | re.I)
    if not m or m.group(1).upper() in ("LOCAL", "LIST") or " " in m.group(1):
        return []
    data = header.parent / m.group(1)
    return [data] if data.is_file() else []


def _input_files(path: Path) -> list[Path]:
    if path.is_dir():
        return dicom_files_in(path)
    if file_suffix(path) in (".mhd", ".nhdr"):
        return [path, *_detached_data(path)]
    return [path]


def input_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a scan file's bytes (equal to the pipeline provenance's ``input.sha256``); for a
    ``.mhd``/``.nhdr`` header the data file beside it is hashed after it; for a DICOM folder, a SHA-256 over
    the names and hashes of its DICOM files in name order."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist.")
    files = _input_files(p)
    if p.is_dir():
        if not files:
            raise ValueError(f"{p} holds no DICOM files.")
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + _sha256_file(f).encode() + b"\n")
        return h.hexdigest()
    if len(files) == 1:
        return _sha256_file(p)
    h = hashlib.sha256()
    for f in files:
        _sha256_file(f, h)
    return h.hexdigest()


def input_stat(path: str | os.PathLike) -> str | None:
    """Size and modification time of the input's files: when unchanged, the input is not read again."""
    try:
        files = _input_files(Path(path))
        return hashlib.sha256(json.dumps(
            [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]).encode()).hexdigest()[:32]
    except OSError:
        return None


def model_sha256(config: SegmentationConfig) -> tuple[str, str | None]:
    """SHA-256 of the diffusion checkpoint and of the baseline presegmenter (None without that prior)."""
    from .pipeline import SegmentationError, checkpoint_paths

    try:
        diffusion, baseline = checkpoint_paths(config)
    except SegmentationError as exc:
        raise BatchError(str(exc)) from None
    return _sha256_file(diffusion), (_sha256_file(baseline) if baseline else None)


def settings_sha256(config: SegmentationConfig) -> str:
    """SHA-256 of the configuration's canonical JSON, without the checkpoint paths (the model hashes stand
    for them) and with a labels-file prior replaced by its hash."""
    d = config.to_dict()
    d.pop("checkpoint", None)
    d.pop("baseline_checkpoint", None)
    if d.get("prior") not in ("baseline", "none", "labels") and Path(str(d["prior"])).is_file():
        d["prior"] = "file:" + _sha256_file(Path(str(d["prior"])))
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def prepare(config: SegmentationConfig, outdir: str | os.PathLike, threads: int = 1,
            suffix: str = ".nii.gz") -> BatchSettings:
    if suffix not in OUTPUT_SUFFIXES:
        raise BatchError(f"The output format must be one of {', '.join(OUTPUT_SUFFIXES)}, got {suffix!r}.")
    if config.prior not in ("baseline", "none"):
        raise BatchError("A batch takes the prior 'baseline' or 'none' (one labels file cannot fit every scan).")
    if threads < 1:
        raise BatchError(f"threads per worker must be at least 1, got {threads}.")
    diffusion, baseline = model_sha256(config)
    return BatchSettings(str(Path(outdir).resolve()), config, diffusion, baseline, settings_sha256(config),
                         threads, suffix)


# ---------------------------------------------------------------------------------------------- metrics


def _count(mask: np.ndarray, share: float, full: bool) -> int:
    """3-D components (face- or fully-connected) at least ``share`` of the largest one."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool) if full else None)
    if n == 0:
        return 0
    sizes = np.bincount(lab.ravel())[1:]
    return int((sizes >= share * sizes.max()).sum())


def _levels(mask: np.ndarray) -> int:
    """Face-connected 3-D components at least :data:`LEVEL_MIN_SHARE` of the largest one (neighbouring
    discs or bodies may touch at a corner, not across a face)."""
    return _count(mask, LEVEL_MIN_SHARE, full=False)


def _anterior_of_canal(labels: np.ndarray) -> np.ndarray | None:
    """Per row (superior-inferior) and column (anterior-posterior): in front of the canal's anterior edge
    (its union over slices), interpolated over rows without canal; None without a canal."""
    canal = (labels == 1).any(axis=0)
    rows = np.nonzero(canal.any(axis=1))[0]
    if rows.size == 0:
        return None
    front = np.array([np.argmax(canal[r]) for r in rows], float)  # canonical columns run anterior -> posterior
    edge = np.interp(np.arange(labels.shape[1]), rows, front)
    return np.arange(labels.shape[2])[None, :] < edge[:, None]


def _boundary_band(labels: np.ndarray, spacing_rc: tuple[float, float], band_mm: float) -> np.ndarray:
    """Voxels within ``band_mm`` in-plane of a label boundary, slice by slice."""
    from scipy import ndimage

    out = np.zeros(labels.shape, bool)
    for k in range(labels.shape[0]):
        s = labels[k]
        edge = np.zeros(s.shape, bool)
        d0 = s[1:, :] != s[:-1, :]
        d1 = s[:, 1:] != s[:, :-1]
        edge[1:, :] |= d0
        edge[:-1, :] |= d0
        edge[:, 1:] |= d1
        edge[:, :-1] |= d1
        if edge.any():
            out[k] = ndimage.distance_transform_edt(~edge, sampling=spacing_rc) <= band_mm
    return out


def measure(labels: np.ndarray, uncertainty: np.ndarray, spacing: tuple[float, float, float],
            slices: Iterable[int], vertebrae: str = "whole") -> dict[str, Any]:
    """Volumes, uncertainty, level counts and QA flags of canonical labels (see the module docstring).

    ``labels`` and ``uncertainty`` are canonical (LR, SI, AP) arrays of the whole scan, ``spacing`` their
    voxel size in mm and ``slices`` the segmented canonical slices.
    """
    idx = sorted(set(int(s) for s in slices))
    n = labels.shape[0]
    lab = np.asarray(labels)[idx]
    unc = np.asarray(uncertainty, dtype=np.float32)[idx]
    ml_per_voxel = float(np.prod(spacing)) / 1000.0
    full = len(idx) == n
    row: dict[str, Any] = {}
    flags: list[str] = []
    present = [1, 2, 3] + ([4] if vertebrae == "split" else [])
    for value, name in STRUCTURES.items():
        if value not in present:
            row.update({f"{name}_ml": None, f"{name}_unc_mean": None, f"{name}_unc_max": None})
            continue
        m = lab == value
        count = int(m.sum())
        ml = count * ml_per_voxel
        row[f"{name}_ml"] = round(ml, 3)
        row[f"{name}_unc_mean"] = round(float(unc[m].mean()), 5) if count else None
        row[f"{name}_unc_max"] = round(float(unc[m].max()), 5) if count else None
        if count == 0:
            flags.append(f"missing:{name}")
        elif full:
            lo, hi = PLAUSIBLE_ML[name]
            if not lo <= ml <= hi:
                flags.append(f"volume:{name}")
    row["canal_pieces"] = _count(lab == 1, CANAL_PIECE_SHARE, full=True)
    if row["canal_pieces"] > 1:
        flags.append(f"canal_pieces:{row['canal_pieces']}")
    discs = lab == 3
    row["disc_levels"] = _levels(discs)
    if vertebrae == "split":
        bodies = lab == 2
    else:
        front = _anterior_of_canal(lab)
        bodies = (lab == 2) & front[None] if front is not None else lab == 2
    row["vertebra_levels"] = _levels(bodies)
    if discs.any():
        disc_rows = np.nonzero(discs.any(axis=(0, 2)))[0]
        span = np.zeros(lab.shape[1], bool)
        span[disc_rows.min():disc_rows.max() + 1] = True
        canal_rows = (lab == 1).any(axis=(0, 2))
        if (lab == 1).any() and (canal_rows & span).sum() < CANAL_MIN_COVER * span.sum():
            flags.append("canal_short")
        lo, hi = EXPECTED_DISCS
        if not lo <= row["disc_levels"] <= hi:
            flags.append(f"levels:discs={row['disc_levels']}")
    if bodies.any():
        lo, hi = EXPECTED_VERTEBRAE
        if not lo <= row["vertebra_levels"] <= hi:
            flags.append(f"levels:vertebrae={row['vertebra_levels']}")
    if discs.any() and bodies.any() and abs(row["vertebra_levels"] - row["disc_levels"]) > MAX_LEVEL_MISMATCH:
        flags.append("levels:mismatch")
    band = _boundary_band(lab, (spacing[1], spacing[2]), BAND_MM)
    row["uncertainty_score"] = round(float(unc[band].mean()), 5) if band.any() else None
    row["qa_flags"] = ";".join(flags)
    row["qa_pass"] = not flags
    return row


# ------------------------------------------------------------------------------------------- the worker


_threads_set: int | None = None


def _setup_worker(threads: int) -> None:
    """Torch threads of this process (once; a Dask worker or a pool process)."""
    global _threads_set
    if _threads_set == threads:
        return
    import torch

    torch.set_num_threads(threads)
    _threads_set = threads


def _init_pool_worker(threads: int) -> None:
    """Before torch is imported in a pool process: its OpenMP threads (torch's own are set per scan)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def one_sentence(exc: BaseException) -> str:
    """An exception as one sentence (the first line of its message; the type when it has none)."""
    text = " ".join(str(exc).strip().splitlines()[:1]).strip() if str(exc).strip() else ""
    if not text or not isinstance(exc, (ValueError, OSError)):
        text = f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} while segmenting."
    if len(text) > 400:
        text = text[:397] + "..."
    return text if text.endswith((".", "!", "?")) else text + "."


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (MiB), where the OS reports it."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError, ValueError):
        return None
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


def _base_row(job: ScanJob, settings: BatchSettings) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    out = Path(settings.outdir)
    row.update(scan=job.name, input=job.path, status="failed", error="", model_sha256=settings.model_sha256,
               baseline_sha256=settings.baseline_sha256, settings_sha256=settings.settings_sha256,
               vertebrae=settings.config.vertebrae,
               labels=settings.labels_path(job).relative_to(out).as_posix(),
               uncertainty=settings.uncertainty_path(job).relative_to(out).as_posix(),
               worker=f"{socket.gethostname()}:{os.getpid()}")
    return row


def stored_row(job: ScanJob, settings: BatchSettings, input_sha: str | None = None) -> dict[str, Any] | None:
    """The stored results row when this scan's outputs are up to date, else None.

    Up to date: the sidecar's key equals this batch's (input hash, model hashes, settings hash) and both
    outputs exist.  Without ``input_sha`` the input is not read: its recorded size and modification time
    must be unchanged instead.
    """
    side = _read_json(settings.sidecar_path(job))
    info = side.get("batch") if side else None
    if not isinstance(info, dict) or not isinstance(info.get("row"), dict) or not isinstance(info.get("key"), dict):
        return None
    if not (settings.labels_path(job).is_file() and settings.uncertainty_path(job).is_file()):
        return None
    key = info["key"]
    if input_sha is None:
        stat = input_stat(job.path)
        if stat is None or info.get("input_stat") != stat:
            return None
        input_sha = key.get("input_sha256")
    if key != settings.key(input_sha):
        return None
    return dict(info["row"])


def _skipped(row: dict[str, Any], job: ScanJob, settings: BatchSettings, t0: float) -> dict[str, Any]:
    out = _base_row(job, settings)
    out.update({k: v for k, v in row.items() if k in COLUMNS})
    out.update(status="skipped", error="", seconds=round(time.perf_counter() - t0, 3), input=job.path,
               worker=f"{socket.gethostname()}:{os.getpid()}", peak_rss_mb=None)
    return out


def segment_scan(job: ScanJob, settings: BatchSettings) -> dict[str, Any]:
    """Segment one scan into its outputs and return its results row; never raises for a bad scan.

    Skips the work when the outputs are up to date (:func:`stored_row` with the input's hash).  Writes the
    labels and the uncertainty map (atomically, in the scan's geometry), then the sidecar with the skip key
    and the row.  Any failure is a ``failed`` row with a one-sentence ``error``.
    """
    t0 = time.perf_counter()
    row = _base_row(job, settings)
    try:
        sha = input_sha256(job.path)
        row["input_sha256"] = sha
        stored = stored_row(job, settings, input_sha=sha)
        if stored is not None:  # the same bytes under a new modification time: record it, skip the work
            side = _read_json(settings.sidecar_path(job))
            if side is not None and side["batch"].get("input_stat") != input_stat(job.path):
                side["batch"]["input_stat"] = input_stat(job.path)
                _write_json(settings.sidecar_path(job), side)
            return _skipped(stored, job, settings, t0)
        _setup_worker(settings.threads)
        from .io.readers import read_volume
        from .io.writers import write_volume
        from .pipeline import run

        cfg = settings.config
        volume = read_volume(job.path, kind="image")
        result = run(volume, cfg, stream_every=0)
        row.update(measure(result.canonical_labels, result.canonical_uncertainty,
                           volume.orientation.canonical_spacing, result.slices, cfg.vertebrae))
        chosen = result.slices
        row["slices"] = f"{chosen[0]}:{chosen[-1] + 1}" if chosen else ""
        row["n_slices"] = int(result.canonical_labels.shape[0])
        prov = dict(result.provenance)
        write_volume(result.labels.data, settings.labels_path(job), like=volume, kind="labels", produced_by=prov)
        write_volume(result.uncertainty.data, settings.uncertainty_path(job), like=volume, kind="image",
                     produced_by=prov)
        row.update(status="ok", error="", seconds=round(time.perf_counter() - t0, 3),
                   peak_rss_mb=_peak_rss_mb(), finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        prov["outputs"] = {"labels": str(settings.labels_path(job)),
                           "uncertainty": str(settings.uncertainty_path(job))}
        prov["batch"] = {"key": settings.key(sha), "input_stat": input_stat(job.path), "row": row}
        _write_json(settings.sidecar_path(job), prov)
    except Exception as exc:  # noqa: BLE001 - one bad scan is a row, never the end of the batch
        row.update(status="failed", error=one_sentence(exc), labels=None, uncertainty=None)
    row["seconds"] = round(time.perf_counter() - t0, 3)
    row["peak_rss_mb"] = _peak_rss_mb()
    return row


# ----------------------------------------------------------------------------------------------- tables


def _arrow_schema():
    import pyarrow as pa

    types = {"string": pa.string(), "float64": pa.float64(), "int64": pa.int64(), "bool": pa.bool_()}
    return pa.schema([(name, types[kind]) for name, kind in COLUMNS.items()])


def _clean_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, kind in COLUMNS.items():
        v = row.get(name)
        if v is not None:
            try:
                v = {"string": str, "float64": float, "int64": int, "bool": bool}[kind](v)
            except (TypeError, ValueError):
                v = None
        out[name] = v
    return out


def write_results(outdir: str | os.PathLike, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``results.parquet`` and ``results.csv`` in ``outdir`` (each written to a temporary file, then
    ``os.replace``), columns :data:`COLUMNS`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [_clean_row(r) for r in rows]
    table = pa.Table.from_pylist(clean, schema=_arrow_schema())
    paths = (out / RESULTS_PARQUET, out / RESULTS_CSV)
    for path in paths:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            if path.suffix == ".parquet":
                pq.write_table(table, tmp)
            else:
                with open(tmp, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
                    w.writeheader()
                    for r in clean:
                        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return paths


def stored_rows(jobs: list[ScanJob], settings: BatchSettings) -> dict[str, dict[str, Any]]:
    """The row files of ``jobs`` under ``OUTDIR/.rows`` made with this batch's model and settings
    (name -> row; a job without one is left out)."""
    rows = {}
    for job in jobs:
        r = _read_json(settings.row_path(job))
        if (r is not None and r.get("scan") == job.name and r.get("settings_sha256") == settings.settings_sha256
                and r.get("model_sha256") == settings.model_sha256):
            rows[job.name] = r
    return rows


# ---------------------------------------------------------------------------------------------- engines


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


#: Memory one local worker needs at its peak on a 15-slice scan with default settings (benchmarks/bench_batch.py).
WORKER_MEMORY_BYTES = 2 * 2**30


def default_workers(threads: int = 1, jobs: int | None = None) -> int:
    """max(1, cores // threads), also limited by the memory available (:data:`WORKER_MEMORY_BYTES` each)
    and by the number of scans."""
    n = max(1, cpu_cores() // max(1, threads))
    try:
        import psutil

        n = min(n, max(1, int(psutil.virtual_memory().available // WORKER_MEMORY_BYTES)))
    except Exception:  # noqa: BLE001 - psutil is optional here
        pass
    if jobs is not None:
        n = min(n, max(1, jobs))
    return n


def _died(job: ScanJob, settings: BatchSettings, why: str) -> dict[str, Any]:
    row = _base_row(job, settings)
    row.update(status="failed", error=why, seconds=None, labels=None, uncertainty=None)
    return row


def _run_inline(jobs: list[ScanJob], settings: BatchSettings, on_row: Callable[[dict], None]) -> None:
    global _threads_set
    import torch

    before, before_set = torch.get_num_threads(), _threads_set
    try:
        for job in jobs:
            on_row(segment_scan(job, settings))
    finally:
        torch.set_num_threads(before)
        _threads_set = before_set


def _run_pool(jobs: list[ScanJob], settings: BatchSettings, workers: int, on_row: Callable[[dict], None],
              fn: Callable[[ScanJob, BatchSettings], dict] = segment_scan) -> None:
    """A spawn-context process pool with at most 2 x workers scans in flight.  When a worker process dies
    (out of memory, a crash), the scans in flight are run again one at a time in a new pool; a scan that
    kills its worker while alone is a failed row.  ``fn`` is :func:`segment_scan` (another only in tests)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = multiprocessing.get_context("spawn")
    queue, solo = deque(jobs), deque()
    while queue or solo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_pool_worker,
                                   initargs=(settings.threads,))
        inflight: dict[Any, tuple[ScanJob, bool]] = {}
        broken = finished = False
        try:
            while (queue or solo or inflight) and not broken:
                if solo:
                    if not inflight:
                        job = solo.popleft()
                        inflight[pool.submit(fn, job, settings)] = (job, True)
                else:
                    while queue and len(inflight) < 2 * workers:
                        job = queue.popleft()
                        inflight[pool.submit(fn, job, settings)] = (job, False)
                done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
                for fut in done:
                    try:
                        row = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    inflight.pop(fut)
                    on_row(row)
            if broken:
                for fut, (job, alone) in inflight.items():
                    if alone:
                        on_row(_died(job, settings, "The worker process died while segmenting this scan "
                                                     "(out of memory or a crash)."))
                    else:
                        solo.append(job)
            finished = True
        finally:
            pool.shutdown(wait=finished and not broken, cancel_futures=True)


def _run_dask(jobs: list[ScanJob], settings: BatchSettings, scheduler: str, on_row: Callable[[dict], None],
              log: Callable[[str], None]) -> None:
    """Send the scans to a Dask distributed cluster: ``ADDRESS`` (an existing scheduler, e.g.
    ``tcp://host:8786``) or ``local:N`` (a LocalCluster of N one-thread worker processes here)."""
    from dask.distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler == "local" or scheduler.startswith("local:"):
        n = scheduler.partition(":")[2]
        try:
            workers = int(n) if n else default_workers(settings.threads, len(jobs))
        except ValueError:
            raise BatchError(f"--scheduler local:N takes a number of workers, got {scheduler!r}.") from None
        import logging

        cluster = LocalCluster(n_workers=max(1, workers), threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=logging.ERROR)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise BatchError(f"No Dask scheduler answers at {scheduler} ({exc}).") from None
    try:
        import importlib.util

        services = client.scheduler_info().get("services", {})
        if "dashboard" in services:
            local_without_bokeh = cluster is not None and importlib.util.find_spec("bokeh") is None
            hint = " (its pages need bokeh>=3.1 installed here)" if local_without_bokeh else ""
            log(f"Dask dashboard: {client.dashboard_link}{hint}")
        else:
            log(f"Dask scheduler {client.scheduler.address} (it serves no dashboard)")
        futures = {}
        for job in jobs:
            futures[client.submit(segment_scan, job, settings, pure=False)] = job
        for fut in as_completed(list(futures)):
            job = futures.pop(fut)
            try:
                row = fut.result()
            except Exception as exc:  # noqa: BLE001 - KilledWorker and the like: one failed row
                row = _died(job, settings, f"The Dask task failed: {one_sentence(exc)}")
            fut.release()
            on_row(row)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# ------------------------------------------------------------------------------------------- the batch


@dataclass
class BatchSummary:
    rows: list[dict[str, Any]]
    parquet: Path
    csv: Path
    ignored: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.get("status") == status for r in self.rows)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries (``.<name>.<random>.tmp...``) that a killed earlier run left in its own output tree: the
    files they were meant to become are rewritten by this run, so they are removed before it starts."""
    for path in out.rglob(".*.tmp*"):
        if path.is_file() and not path.is_symlink():
            try:
                path.unlink()
            except OSError:
                pass


def run_batch(
    source: str | os.PathLike,
    outdir: str | os.PathLike,
    config: SegmentationConfig = SegmentationConfig(),
    *,
    workers: int | None = None,
    scheduler: str | None = None,
    threads: int = 1,
    suffix: str = ".nii.gz",
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> BatchSummary:
    """Segment every scan of ``source`` (:func:`find_scans`) into ``outdir`` and write the results table.

    ``workers``: local process pool size (None: :func:`default_workers`; 0: in this process);
    ``scheduler``: a Dask scheduler address or ``local:N`` instead of the pool; ``threads``: torch threads
    per worker.  Scans already up to date are skipped here, without reading them.  The table is rewritten
    every minute and at the end (also on Ctrl-C), in the order of the scans, from this run's rows and, for
    scans this run has not reached, the row files of an earlier run with the same model and settings.
    """
    out = Path(outdir)
    settings = prepare(config, out, threads, suffix)
    jobs, ignored = find_scans(source, out)
    if ignored:
        log(f"ignored {len(ignored)} file(s) whose names mark labels (e.g. {ignored[0]})")
    if not jobs:
        raise BatchError(f"No scans were found in {source}.")
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    earlier = stored_rows(jobs, settings)  # rows of an earlier, stopped run: in the table until replaced
    rows: dict[str, dict[str, Any]] = {}
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), unit="scan", desc="batch", file=sys.stderr, dynamic_ncols=True)
    last_table = [time.monotonic()]

    def table_rows() -> list[dict[str, Any]]:
        return [r for r in (rows.get(j.name) or earlier.get(j.name) for j in jobs) if r is not None]

    def table() -> tuple[Path, Path]:
        return write_results(out, table_rows())

    def on_row(row: dict[str, Any]) -> None:
        rows[row["scan"]] = row
        _write_json(settings.row_path(ScanJob(row["input"], row["scan"])), row)
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"ok {counts['ok']}, skipped {counts['skipped']}, failed {counts['failed']}",
                                refresh=False)
        if time.monotonic() - last_table[0] > 60:
            table()
            last_table[0] = time.monotonic()

    try:
        pending = []
        for job in jobs:
            t0 = time.perf_counter()
            stored = stored_row(job, settings)
            if stored is not None:
                on_row(_skipped(stored, job, settings, t0))
            else:
                pending.append(job)
        if pending:
            if scheduler:
                _run_dask(pending, settings, scheduler, on_row, log)
            else:
                n = default_workers(threads, len(pending)) if workers is None else workers
                if n <= 0:
                    _run_inline(pending, settings, on_row)
                else:
                    _run_pool(pending, settings, n, on_row)
    finally:
        if bar is not None:
            bar.close()
        parquet, csv_path = table()
    return BatchSummary(table_rows(), parquet, csv_path, ignored)
