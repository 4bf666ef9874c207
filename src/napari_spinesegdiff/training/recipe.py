"""Turns data sources and a fold into train / validation / test case lists (used by ``spinesegdiff train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .data import TrainCase, load_cases, make_splits, read_fold, write_splits


def split_cases(cases: Sequence[TrainCase], splits_file: Path | None, k: int, fold: int, seed: int,
                write: bool = True) -> tuple[list[TrainCase], list[TrainCase], dict[str, list[str]]]:
    """Split real cases by patient (phantoms always train).  Reuses ``splits_file`` when it exists, so that
    the test fold stays out of training and selection across runs; otherwise creates it."""
    real = [c for c in cases if c.group != "phantom"]
    patients = {c.patient: c.group for c in real}
    if splits_file is not None and Path(splits_file).exists():
        split = read_fold(splits_file, fold)
    elif splits_file is not None and write:
        split = write_splits(splits_file, patients, k, seed=seed)[fold]
    else:
        split = make_splits(patients, k, fold, seed=seed)
    train_p, val_p = set(split["train"]), set(split["val"])
    train = [c for c in cases if c.group == "phantom" or c.patient in train_p]
    val = [c for c in real if c.patient in val_p]
    return train, val, split


def balanced_weights(cases: Sequence[TrainCase], phantom_share: float = 0.3) -> list[float]:
    """Sampling weights: phantoms together get ``phantom_share``; the real share is split equally between
    sources (datasets: ``lumbar``, ``spider``, ...), within a source equally between groups (so three disc
    cases are not drowned by twenty vertebra cases), then equally within a group."""
    real = [c for c in cases if c.group != "phantom"]
    sources = sorted({c.source for c in real})
    n_ph = sum(c.group == "phantom" for c in cases)
    share = phantom_share if n_ph and real else (1.0 if n_ph else 0.0)
    weights = []
    for c in cases:
        if c.group == "phantom":
            weights.append(share / n_ph)
            continue
        groups = {o.group for o in real if o.source == c.source}
        members = sum(o.group == c.group and o.source == c.source for o in real)
        weights.append((1 - share) / len(sources) / len(groups) / members)
    return weights


def gather(sources: Sequence[str], spacing=(1.0, 1.0), soft: bool = False) -> list[TrainCase]:
    cases: list[TrainCase] = []
    for spec in sources:
        cases += load_cases(spec, target_spacing=spacing, soft=soft)
    return cases
