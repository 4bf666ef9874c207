"""What a batch is made of: its scans (:class:`ScanJob`), the settings every worker shares
(:class:`BatchSettings`, with the output paths and the skip key), the model and settings hashes and the small
file helpers (atomic JSON, one-sentence errors) the other modules share."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SegmentationConfig

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
ROWS_DIR = ".rows"
LEVELS_PARQUET = "levels.parquet"
LEVELS_CSV = "levels.csv"
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


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
    report: bool = False  # a PNG per scan (``batch --report``)

    def labels_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_labels{self.suffix}"

    def uncertainty_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_uncertainty{self.suffix}"

    def sidecar_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}.json"

    def levels_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_levels.parquet"

    def report_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / f"{job.name}_report.png"

    def row_path(self, job: ScanJob) -> Path:
        return Path(self.outdir) / ROWS_DIR / f"{job.name}.json"

    def key(self, input_sha256: str) -> dict[str, str | None]:
        return {"input_sha256": input_sha256, "model_sha256": self.model_sha256,
                "baseline_sha256": self.baseline_sha256, "settings_sha256": self.settings_sha256}


def _sha256_file(path: Path, h=None):
    own = h is None
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest() if own else h


def model_sha256(config: SegmentationConfig) -> tuple[str, str | None]:
    """SHA-256 of the diffusion checkpoint and of the baseline presegmenter (None without that prior)."""
    from ..pipeline import SegmentationError, checkpoint_paths

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
            suffix: str = ".nii.gz", report: bool = False) -> BatchSettings:
    """The settings of a batch, or :class:`BatchError` before any work: an unknown output format, a prior
    that cannot fit every scan, no threads, a missing checkpoint, or ``report`` without matplotlib."""
    if suffix not in OUTPUT_SUFFIXES:
        raise BatchError(f"The output format must be one of {', '.join(OUTPUT_SUFFIXES)}, got {suffix!r}.")
    if config.prior not in ("baseline", "none"):
        raise BatchError("A batch takes the prior 'baseline' or 'none' (one labels file cannot fit every scan).")
    if threads < 1:
        raise BatchError(f"threads per worker must be at least 1, got {threads}.")
    if report:
        from ..report.figure import FigureError, check_available

        try:
            check_available()
        except FigureError as exc:
            raise BatchError(f"--report: {exc}") from None
    diffusion, baseline = model_sha256(config)
    return BatchSettings(str(Path(outdir).resolve()), config, diffusion, baseline, settings_sha256(config),
                         threads, suffix, report)


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
