"""Turns data sources and a fold into train / validation / test case lists (used by ``spinesegdiff train``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

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


def balanced_weights(cases: Sequence[TrainCase], phantom_share: float = 0.3,
                     source_shares: Mapping[str, float] | None = None) -> list[float]:
    """Sampling weights: phantoms together get ``phantom_share``; the real share is split between sources
    (datasets: ``lumbar``, ``spider``, ...), equally unless ``source_shares`` gives some sources their share of
    the real batches (the sources not named split the rest equally), within a source equally between groups
    (so three disc cases are not drowned by twenty vertebra cases), then equally within a group."""
    real = [c for c in cases if c.group != "phantom"]
    sources = sorted({c.source for c in real})
    real_shares = _source_split(sources, dict(source_shares or {}))
    n_ph = sum(c.group == "phantom" for c in cases)
    share = phantom_share if n_ph and real else (1.0 if n_ph else 0.0)
    weights = []
    for c in cases:
        if c.group == "phantom":
            weights.append(share / n_ph)
            continue
        groups = {o.group for o in real if o.source == c.source}
        members = sum(o.group == c.group and o.source == c.source for o in real)
        weights.append((1 - share) * real_shares[c.source] / len(groups) / members)
    return weights


def _source_split(sources: Sequence[str], named: dict[str, float]) -> dict[str, float]:
    """Each real source's share of the real batches: the named ones as given, the others equal parts of the
    rest.  Refuses a source that is not in the data, a share outside (0, 1), or shares that leave nothing
    for the sources not named (or do not add up to 1 when every source is named)."""
    unknown = sorted(set(named) - set(sources))
    if unknown:
        raise ValueError(f"--source-share names {', '.join(unknown)}, but the training data has only the "
                         f"sources {', '.join(sources) or '(none)'}")
    bad = {k: v for k, v in named.items() if not 0.0 < v < 1.0 or v != v}
    if bad:
        raise ValueError(f"a source's share of the real batches must lie strictly between 0 and 1, got {bad}")
    rest = [s for s in sources if s not in named]
    if not named:
        return {s: 1.0 / len(sources) for s in sources}
    left = 1.0 - sum(named.values())
    if (rest and left <= 1e-9) or (not rest and abs(left) > 1e-6):
        raise ValueError(f"source shares {named} must add up to 1 over {', '.join(sources)} "
                         "(or to less than 1, leaving a share for the sources not named)")
    return {s: named[s] if s in named else left / len(rest) for s in sources}


def gather(sources: Sequence[str], spacing=(1.0, 1.0), soft: bool = False) -> list[TrainCase]:
    cases: list[TrainCase] = []
    for spec in sources:
        cases += load_cases(spec, target_spacing=spacing, soft=soft)
    return cases
