"""The review queue's tables, without Qt: reading a batch's results table into queue items, their order, and
the review table of decisions beside it.

``spinesegdiff batch`` writes ``OUTDIR/results.parquet`` and ``OUTDIR/results.csv`` (one row per scan, see
:data:`napari_spinesegdiff.batch.COLUMNS`; the ``labels`` and ``uncertainty`` paths are relative to OUTDIR).
The queue writes only beside them:

* ``OUTDIR/review.csv`` and ``OUTDIR/review.parquet``: one row per reviewed scan (:data:`REVIEW_COLUMNS`),
  each file written to a temporary file and moved into place with ``os.replace``;
* ``OUTDIR/review/<scan>_labels_edited.<ext>``: the corrected labels of a scan.

Nothing here ever writes a file the batch wrote.
"""

from __future__ import annotations

import csv
import getpass
import json
import math
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..batch import FINDINGS, RESULTS_CSV, RESULTS_PARQUET
from ..io.readers import file_suffix

REVIEW_CSV = "review.csv"
REVIEW_PARQUET = "review.parquet"
REVIEW_DIR = "review"
#: Columns of the review table, with their Arrow types.
REVIEW_COLUMNS: dict[str, str] = {"scan": "string", "decision": "string", "note": "string", "reviewer": "string",
                                  "time": "string", "labels_edited": "bool", "edited_labels": "string"}
DECISIONS = ("accepted", "corrected", "rejected")
#: Sort orders of the queue.
SORT_UNCERTAINTY, SORT_QA = "uncertainty", "QA flags first"
#: Orders by the level report's findings (order -> the results column of :data:`~..batch.FINDINGS`): the
#: scans with the finding first, each order by its severity (narrowest canal, worst Genant grade, largest
#: slip, least sure level name), then the most uncertain.
LEVEL_SORTS = {"stenosis first": "stenosis", "height loss first": "height_loss", "slip first": "slip",
               "level doubt first": "level_doubt"}
SORTS = (SORT_UNCERTAINTY, SORT_QA, *LEVEL_SORTS)
OPENABLE = ("ok", "skipped")


class QueueError(ValueError):
    """A results or review table that cannot be used: one sentence."""


def _value(v: Any) -> Any:
    """``None`` for missing cells (None, NaN, empty text), else the value."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
        return None
    return v


def _float(v: Any) -> float | None:
    v = _value(v)
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def _bool(v: Any) -> bool:
    v = _value(v)
    return str(v).strip().lower() in ("true", "1", "yes") if v is not None else False


@dataclass(frozen=True)
class QueueItem:
    """One scan of a results table, its files resolved against OUTDIR."""

    scan: str
    status: str
    error: str
    input: Path | None
    labels: Path | None
    uncertainty: Path | None
    sidecar: Path
    score: float | None
    flags: tuple[str, ...]
    vertebrae: str
    slices: range | None  # canonical slices the batch segmented
    #: the level report's findings: (text column, its text, its number) for each of :data:`~..batch.FINDINGS`
    findings: tuple[tuple[str, str, float | None], ...] = ()

    @property
    def openable(self) -> bool:
        """A scan the batch segmented (``ok`` or ``skipped``) with its files named."""
        return self.status in OPENABLE and None not in (self.input, self.labels, self.uncertainty)

    @property
    def flags_text(self) -> str:
        return "; ".join(self.flags)

    def finding(self, column: str) -> tuple[str, float | None]:
        """The text (``""`` when none) and the number of one finding (``"stenosis"``, ``"height_loss"``, ...)."""
        return next(((text, number) for c, text, number in self.findings if c == column), ("", None))


def results_path(path: str | os.PathLike) -> Path:
    """The results table for ``path``: the file itself, or ``results.parquet`` (else ``results.csv``) in a
    folder."""
    p = Path(path)
    if p.is_dir():
        for name in (RESULTS_PARQUET, RESULTS_CSV):
            if (p / name).is_file():
                return p / name
        raise QueueError(f"{p} holds no {RESULTS_PARQUET} or {RESULTS_CSV} (the output folder of spinesegdiff batch).")
    if not p.is_file():
        raise QueueError(f"Cannot open {p}: no such file.")
    return p


def _records(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet or CSV table as dicts (CSV read as text)."""
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one sentence
        raise QueueError(f"Cannot read {path}: {exc}".rstrip(".") + ".") from exc


def _slices(text: Any) -> range | None:
    try:
        a, b = (int(v) for v in str(_value(text)).split(":"))
        return range(a, b)
    except (TypeError, ValueError):
        return None


def read_results(path: str | os.PathLike) -> tuple[Path, list[QueueItem]]:
    """``(OUTDIR, items)`` of a batch's results table (``path``: the table or its folder), in file order."""
    table = results_path(path)
    outdir = table.parent
    rows = _records(table)
    if rows and not {"scan", "status"} <= set(rows[0]):
        raise QueueError(f"{table} is not a spinesegdiff batch results table (no scan and status columns).")
    items = []
    for r in rows:
        scan = str(_value(r.get("scan")) or "")
        if not scan:
            continue

        def rel(key: str) -> Path | None:
            v = _value(r.get(key))
            return None if v is None else outdir / str(v)

        flags = tuple(f for f in str(_value(r.get("qa_flags")) or "").split(";") if f.strip())
        items.append(QueueItem(
            scan=scan, status=str(_value(r.get("status")) or ""), error=str(_value(r.get("error")) or ""),
            input=Path(str(r["input"])) if _value(r.get("input")) else None, labels=rel("labels"),
            uncertainty=rel("uncertainty"), sidecar=outdir / f"{scan}.json", score=_float(r.get("uncertainty_score")),
            flags=flags, vertebrae=str(_value(r.get("vertebrae")) or "whole"), slices=_slices(r.get("slices")),
            findings=tuple((text, str(_value(r.get(text)) or ""), _float(r.get(number)))
                           for text, number, _ in FINDINGS)))
    return outdir, items


def sort_items(items: list[QueueItem], mode: str = SORT_UNCERTAINTY) -> list[QueueItem]:
    """Most uncertain first (``SORT_UNCERTAINTY``), scans with QA flags first and then the most uncertain
    (``SORT_QA``), or by a finding of the level report (:data:`LEVEL_SORTS`); scans that cannot be opened
    (failed) last, by name."""
    if mode not in SORTS:
        raise ValueError(f"sort must be one of {SORTS}, not {mode!r}.")
    finding = next((f for f in FINDINGS if f[0] == LEVEL_SORTS.get(mode)), None)

    def key(it: QueueItem):
        score = -it.score if it.score is not None else math.inf
        severity = math.inf
        if finding is not None:
            text, number = it.finding(finding[0])
            flagged = 0 if text else 1
            severity = -finding[2] * number if number is not None else math.inf
        else:
            flagged = 0 if (mode == SORT_QA and it.flags) else 1
        return (not it.openable, flagged, severity, score, it.scan)

    return sorted(items, key=key)


def step_row(items: list[QueueItem], current: int | None, delta: int) -> int | None:
    """The next (``delta=1``) or previous (``-1``) row that can be opened from ``current`` (``None``: from
    the start or the end), or ``None`` past the ends."""
    i = (current if current is not None else (-1 if delta > 0 else len(items))) + delta
    while 0 <= i < len(items) and not items[i].openable:
        i += delta
    return i if 0 <= i < len(items) else None


def summary(items: list[QueueItem], reviews: dict[str, dict[str, Any]]) -> str:
    n, failed = len(items), sum(not it.openable for it in items)
    flagged = sum(bool(it.flags) for it in items if it.openable)
    decided = sum(bool(reviews.get(it.scan, {}).get("decision")) for it in items)
    return f"{n} scans: {n - failed} to review ({flagged} with QA flags), {failed} failed; {decided} decided."


def sentence(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


def read_sidecar(item: QueueItem) -> dict[str, Any]:
    """The batch's provenance sidecar of a scan (``{}`` when it cannot be read)."""
    try:
        data = json.loads(item.sidecar.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ------------------------------------------------------------------------------------------ review table


def edited_labels_path(outdir: Path, item: QueueItem) -> Path:
    """``OUTDIR/review/<scan>_labels_edited.<ext>`` (the extension of the batch's labels file)."""
    ext = file_suffix(item.labels) if item.labels is not None else ".nii.gz"
    return Path(outdir) / REVIEW_DIR / f"{item.scan}_labels_edited{ext or '.nii.gz'}"


def labels_to_open(outdir: Path, item: QueueItem, reviews: dict[str, dict[str, Any]]) -> Path | None:
    """The scan's saved edits when the review table names an existing file, else the batch's labels."""
    saved = reviews.get(item.scan, {}).get("edited_labels")
    return Path(outdir) / saved if saved and (Path(outdir) / saved).is_file() else item.labels


def edit_target(outdir: Path, item: QueueItem) -> Path:
    """Where the edited labels go; refuses (:class:`QueueError`) any file the batch wrote or read."""
    target = edited_labels_path(outdir, item)
    batch_files = [item.input, item.labels, item.uncertainty, item.sidecar, Path(outdir) / RESULTS_CSV,
                   Path(outdir) / RESULTS_PARQUET]
    if target.resolve() in {Path(p).resolve() for p in batch_files if p is not None}:
        raise QueueError(f"{target} is a file of the batch and is never overwritten.")
    return target


def reviewer() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name (containers): still a decision
        return "unknown"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_review(outdir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The review table beside the results (scan -> row); ``{}`` when there is none yet.  The Parquet file is
    read first; the CSV when the Parquet file is missing or unreadable."""
    out = Path(outdir)
    rows: list[dict[str, Any]] | None = None
    for name in (REVIEW_PARQUET, REVIEW_CSV):
        if (out / name).is_file():
            try:
                rows = _records(out / name)
                break
            except QueueError:
                continue
    reviews = {}
    for r in rows or []:
        row = {c: str(_value(r.get(c)) or "") for c in REVIEW_COLUMNS}
        row["labels_edited"] = _bool(r.get("labels_edited"))
        if row["scan"]:
            reviews[row["scan"]] = row
    return reviews


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_review(outdir: str | os.PathLike, reviews: dict[str, dict[str, Any]]) -> tuple[Path, Path]:
    """Write ``review.parquet`` and ``review.csv`` beside the results, atomically; rows sorted by scan."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(outdir)
    rows = []
    for scan in sorted(reviews):
        r = reviews[scan]
        rows.append({"scan": scan, "decision": str(r.get("decision") or ""), "note": str(r.get("note") or ""),
                     "reviewer": str(r.get("reviewer") or ""), "time": str(r.get("time") or ""),
                     "labels_edited": bool(r.get("labels_edited")), "edited_labels": str(r.get("edited_labels") or "")})
    types = {"string": pa.string(), "bool": pa.bool_()}
    schema = pa.schema([(c, types[k]) for c, k in REVIEW_COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(REVIEW_COLUMNS))
            w.writeheader()
            w.writerows(rows)

    paths = (out / REVIEW_PARQUET, out / REVIEW_CSV)
    _atomic(paths[0], lambda tmp: pq.write_table(table, tmp))
    _atomic(paths[1], write_csv)
    return paths


def record(outdir: str | os.PathLike, scan: str, **fields: Any) -> dict[str, dict[str, Any]]:
    """Update the review row of ``scan`` with ``fields`` (the reviewer and the time are set here), re-reading
    the table first so rows written meanwhile are kept; returns every row."""
    unknown = set(fields) - set(REVIEW_COLUMNS)
    if unknown:
        raise ValueError(f"unknown review columns: {sorted(unknown)}")
    if fields.get("decision") not in (None, "", *DECISIONS):
        raise ValueError(f"decision must be one of {DECISIONS}, not {fields['decision']!r}.")
    reviews = read_review(outdir)
    row = {"decision": "", "note": "", "labels_edited": False, "edited_labels": "", **reviews.get(scan, {}),
           **fields, "scan": scan, "reviewer": reviewer(), "time": now()}
    reviews[scan] = row
    write_review(outdir, reviews)
    return reviews
