"""Which scans a batch input holds (:func:`find_scans`: a folder, a glob, a table or one scan) and what
identifies an input's bytes (:func:`input_sha256`, and :func:`input_stat` to avoid reading it again)."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from pathlib import Path

from ..io.guard import resolved
from ..io.readers import dicom_files_in, file_stem, file_suffix, is_dicom_file, looks_like_labels_path
from .jobs import BatchError, ScanJob, _sha256_file

#: Scan files a folder or glob input picks up (a folder holding DICOM files is one scan too).
SCAN_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: Files never opened to look for a DICOM preamble.
_NOT_DICOM = frozenset({".json", ".txt", ".csv", ".tsv", ".md", ".py", ".png", ".jpg", ".jpeg", ".gz", ".zip",
                        ".raw", ".zraw", ".img", ".hdr", ".parquet", ".pq", ".xml", ".html", ".pdf", ".tmp"})


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
        resolved(path).relative_to(folder)
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
        rel = resolved(path).relative_to(resolved(root))
    except ValueError:
        rel = Path(path.name)
    if str(rel) in ("", "."):
        rel = Path(resolved(path).name)
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
        jobs.append(ScanJob(str(resolved(path)), name))
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
    out = resolved(outdir) if outdir is not None else None
    ignored: list[str] = []
    found: list[tuple[Path, Path]] = []
    p = Path(src)
    if p.is_file() and file_suffix(p) in TABLE_SUFFIXES:
        paths, ids = _read_table(p)
        if any(not q.strip() for q in paths):
            raise BatchError(f"The table {p} has rows with an empty 'path'.")
        listed = [Path(q) if Path(q).is_absolute() else resolved(p.parent / q) for q in paths]
        parents = [str(q.parent) for q in listed]
        root = Path(os.path.commonpath(parents)) if parents else p.parent
        pairs = [(q, _clean_name(i) if i else _name_for(q, root)) for q, i in zip(listed, ids)]
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
        key = str(resolved(path))
        if key not in seen:
            seen.add(key)
            pairs.append((path, _name_for(path, root)))
    pairs.sort(key=lambda t: t[1])
    return _unique(pairs), ignored


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
