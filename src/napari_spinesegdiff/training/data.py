"""Training data: sagittal-slice cases from several layouts, partial labels, patient-level folds.

Every source becomes a list of :class:`TrainCase` on the model grid (canonical sagittal slices resampled
in-plane to the model spacing, intensities normalised per volume).  A case carries, per class channel,
whether that channel is labelled at all and the superior-inferior row range in which the labels are
complete; outside it (or for unlabelled channels) the loss is masked, because an unlabelled structure is
unknown, not background.

Layouts understood by :func:`load_cases`:

* ``lumbar``: ``<case>_image.nii.gz`` + ``<case>_label.nii.gz`` with instance labels of ONE structure
  (``IVD_*`` discs, ``VB*_*`` vertebral bodies), as in ``shared/data/lumbar``.
* ``slabs``: ``<case>_image.nii.gz`` + ``<case>_label.nii.gz`` with every structure labelled in SPIDER's
  product classes (1 canal, 2 whole vertebra, 3 disc), as in ``shared/data/spider_t2space``.
* ``spider``: SPIDER's ``images/*.mha`` + ``masks/*.mha`` (vertebrae 1-25, canal 100, discs 201-225).
* ``nnunet``: ``imagesTr/<case>_0000.nii.gz`` + ``labelsTr/<case>.nii.gz`` (labels 1 canal, 2 vertebrae,
  3 disc, or SPIDER values), with an optional ``splits_final.json``.
* ``phantom:N``: N synthetic spines (every channel known everywhere).

Channels (:data:`labelscheme.CHANNELS`): 0 canal, 1 vertebral body, 2 disc, 3 whole vertebra.  Datasets
that label whole vertebrae (SPIDER) leave the body channel unknown inside each vertebra (a pixel outside
every vertebra is known not to be body); datasets that label bodies (``lumbar`` VB) leave the whole-vertebra
channel unknown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..labelscheme import CHANNELS
from ..preprocess import normalize_intensity

NUM_CLASSES = len(CHANNELS)  # channels: 0 canal, 1 vertebral body, 2 disc, 3 whole vertebra
CANAL_CH, BODY_CH, DISC_CH, WHOLE_CH = range(NUM_CLASSES)


@dataclass
class TrainCase:
    """One volume on the model grid, ready for slice sampling."""

    name: str
    patient: str
    group: str  # stratum for folds (e.g. IVD, VB1, phantom)
    image: np.ndarray  # (N, H, W) float32, normalised
    target: np.ndarray  # (N, C, H, W) uint8 in {0, 1}, or float16 in [0, 1] (partial-volume targets)
    known: np.ndarray  # (C,) bool: channel labelled in this case
    rows: tuple[int, int] | None = None  # SI rows [r0, r1) where labels are complete; None = all
    slice_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    unknown: np.ndarray | None = None  # (N, C, H, W) bool: voxels whose label is unknown (else None)
    source: str = ""  # the dataset (lumbar, spider, nnunet, phantom): sampling is balanced per source first
    slice_mm: float = 1.0  # distance between slices (canonical axis 0): where a 2.5-D input's neighbours lie

    def known_mask(self, k: int | None = None) -> np.ndarray:
        """(C, H, W) bool mask of the pixels of slice ``k`` where the loss may look at each channel."""
        shape = self.image.shape[1:]
        m = np.zeros((NUM_CLASSES, *shape), dtype=bool)
        r0, r1 = self.rows if self.rows is not None else (0, shape[0])
        m[self.known, r0:r1, :] = True
        if self.unknown is not None and k is not None:
            m &= ~self.unknown[k]
        return m


def classes_to_channels(labels: np.ndarray, posterior: np.ndarray | None = None) -> np.ndarray:
    """Written labels (1 canal, 2 vertebra, 3 disc) -> the training channels (C, ...) as uint8.

    Without ``posterior`` label 2 is the whole vertebra (SPIDER) and the body channel is left 0 (unknown
    inside vertebrae, see :func:`_finish`); with a ``posterior`` mask label 2 is the vertebral body
    (phantoms) and the whole vertebra is body + posterior elements."""
    out = np.zeros((NUM_CLASSES, *labels.shape), np.uint8)
    out[CANAL_CH] = labels == 1
    out[DISC_CH] = labels == 3
    if posterior is None:
        out[WHOLE_CH] = labels == 2
    else:
        out[BODY_CH] = labels == 2
        out[WHOLE_CH] = (labels == 2) | (posterior > 0)
    return out


def _model_grid(canonical: np.ndarray, spacing: Sequence[float], target: Sequence[float], order: int) -> np.ndarray:
    from scipy import ndimage

    zoom = (1.0, spacing[1] / target[0], spacing[2] / target[1])
    if np.allclose(zoom, 1.0, atol=1e-3):
        return canonical
    return ndimage.zoom(canonical, zoom, order=order, prefilter=False)


def _soft_grid(canonical: np.ndarray, spacing: Sequence[float], target: Sequence[float], kind: str) -> np.ndarray:
    """In-plane resampling exactly as inference does it (:class:`~..preprocess.SliceGrid`: pixel centres,
    ``align_corners=False``).  ``kind="image"``: bilinear, as the pipeline feeds the network.
    ``kind="mask"``: the share of each model pixel that the mask covers (area average when shrinking,
    bilinear when enlarging), so a boundary inside a model pixel is a value between 0 and 1."""
    import torch
    import torch.nn.functional as F

    from ..preprocess import SliceGrid

    grid = SliceGrid(tuple(canonical.shape[1:]), (float(spacing[1]), float(spacing[2])), tuple(target))
    if grid.identity:
        return canonical.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(canonical, dtype=np.float32))[:, None]
    size = grid.model_shape
    if kind == "mask" and all(o <= i for o, i in zip(size, canonical.shape[1:])):
        out = F.interpolate(t, size=size, mode="area")
    else:
        out = grid.to_model(t)
    return out[:, 0].numpy()


def _finish(name, patient, group, image_c, target_c, spacing, target_spacing, known, rows_from_labels,
            intensity, body_inside_whole_unknown: bool = False, soft: bool = False) -> TrainCase:
    """Normalise, resample in-plane, and compute the label row range and slice weights.  With
    ``body_inside_whole_unknown`` the body channel is known (0) outside the whole vertebrae and unknown
    inside them (datasets that label whole vertebrae only).

    ``soft=False`` (the recipe of models v1-v4.1): image by :func:`scipy.ndimage.zoom` (order 1), targets by
    nearest neighbour, uint8 in {0, 1}.  ``soft=True``: the image resampled as the pipeline resamples it and
    partial-volume targets (float16 in [0, 1], :func:`_soft_grid`): a nearest-neighbour target can only place
    a boundary on the model grid (1 mm), which caps the Dice of a perfect model at about 0.95 for SPIDER's
    discs at 0.47 mm; partial-volume targets let the network place it between model pixels."""
    if soft:
        image = normalize_intensity(_soft_grid(image_c, spacing, target_spacing, "image"), intensity)
        target = np.stack(
            [_soft_grid(target_c[:, c], spacing, target_spacing, "mask") for c in range(NUM_CLASSES)], axis=1
        ).astype(np.float16)
    else:
        image = normalize_intensity(_model_grid(image_c.astype(np.float32), spacing, target_spacing, 1), intensity)
        target = np.stack(
            [_model_grid(target_c[:, c], spacing, target_spacing, 0) for c in range(NUM_CLASSES)], axis=1
        ).astype(np.uint8)
    rows = None
    if rows_from_labels:
        any_rows = np.flatnonzero(target[:, known].any(axis=(0, 1, 3)))
        rows = (int(any_rows[0]), int(any_rows[-1]) + 1) if any_rows.size else (0, 0)
    labelled = target[:, known].reshape(target.shape[0], -1).any(axis=1)
    weights = np.where(labelled, 1.0, 0.15)  # slices without labelled structure are seen less often
    unknown = None
    if body_inside_whole_unknown:
        unknown = np.zeros(target.shape, bool)
        unknown[:, BODY_CH] = target[:, WHOLE_CH] > 0
    return TrainCase(name, patient, group, image, target, np.asarray(known, bool), rows, weights / weights.sum(),
                     unknown, slice_mm=float(spacing[0]))


def lumbar_cases(root: Path, names: Iterable[str] | None = None, target_spacing=(1.0, 1.0),
                 intensity=None, soft: bool = False) -> list[TrainCase]:
    """Cases of the ``lumbar`` layout (partial labels: one structure per case)."""
    from ..io.readers import read_pair

    root = Path(root)
    wanted = set(names) if names is not None else None
    cases = []
    for img_path in sorted(root.glob("*_image.nii.gz")):
        name = img_path.name[: -len("_image.nii.gz")]
        if wanted is not None and name not in wanted:
            continue
        lab_path = root / f"{name}_label.nii.gz"
        try:
            image, labels = read_pair(img_path, lab_path)
        except ValueError:
            continue  # mismatched pairs (VB2_02 ...) are reported by read_pair; training skips them
        channel = DISC_CH if name.upper().startswith("IVD") else BODY_CH
        known = np.zeros(NUM_CLASSES, bool)
        known[channel] = True
        canon_lab = labels.canonical() > 0
        target = np.zeros((canon_lab.shape[0], NUM_CLASSES, *canon_lab.shape[1:]), np.uint8)
        target[:, channel] = canon_lab
        spacing = image.orientation.canonical_spacing
        cases.append(_finish(name, name, name.split("_")[0], image.canonical(), target, spacing,
                             target_spacing, known, True, intensity, soft=soft))
    return cases


def _paired_layout(images: list[Path], label_for, group: str, target_spacing, intensity, patient_of,
                   soft: bool = False) -> list[TrainCase]:
    from ..io.labels import to_classes
    from ..io.readers import read_pair

    cases = []
    for img_path in images:
        lab_path = label_for(img_path)
        if lab_path is None or not lab_path.exists():
            continue
        image, labels = read_pair(img_path, lab_path)
        classes = to_classes(labels.canonical(), scheme="auto")
        target = np.moveaxis(classes_to_channels(classes), 0, 1)
        name = _case_name(img_path)
        cases.append(_finish(name, patient_of(name), group, image.canonical(), target,
                             image.orientation.canonical_spacing, target_spacing,
                             np.ones(NUM_CLASSES, bool), False, intensity, body_inside_whole_unknown=True,
                             soft=soft))
    return cases


def _case_name(path: Path) -> str:
    from ..io.readers import file_stem

    return re.sub(r"(_0000|_image)$", "", file_stem(path))


def slab_cases(root: Path, target_spacing=(1.0, 1.0), intensity=None, soft: bool = False) -> list[TrainCase]:
    """``<case>_image.nii.gz`` + ``<case>_label.nii.gz``, every structure labelled (1 canal, 2 whole
    vertebra, 3 disc), as in ``shared/data/spider_t2space``; patient = case, group ``spider``."""
    root = Path(root)
    return _paired_layout(
        sorted(root.glob("*_image.nii.gz")),
        lambda p: p.with_name(p.name[: -len("_image.nii.gz")] + "_label.nii.gz"),
        "spider", target_spacing, intensity, lambda n: n, soft,
    )


def spider_cases(root: Path, target_spacing=(1.0, 1.0), intensity=None, soft: bool = False) -> list[TrainCase]:
    """SPIDER raw layout: ``images/<id>_<seq>.mha`` and ``masks/<id>_<seq>.mha``; patient = ``<id>``."""
    root = Path(root)
    return _paired_layout(
        sorted((root / "images").glob("*.mha")),
        lambda p: root / "masks" / p.name,
        "spider", target_spacing, intensity, lambda n: n.split("_")[0], soft,
    )


def nnunet_cases(root: Path, target_spacing=(1.0, 1.0), intensity=None, soft: bool = False) -> list[TrainCase]:
    """nnU-Net layout: ``imagesTr/<case>_0000.nii.gz`` and ``labelsTr/<case>.nii.gz``."""
    root = Path(root)
    return _paired_layout(
        sorted((root / "imagesTr").glob("*_0000.nii.gz")),
        lambda p: root / "labelsTr" / (_case_name(p) + ".nii.gz"),
        "nnunet", target_spacing, intensity, lambda n: re.sub(r"_(t1|t2|t2_space)$", "", n, flags=re.I),
        soft,
    )


def phantom_cases(n: int, seed: int = 0, target_spacing=(1.0, 1.0), intensity=None,
                  soft: bool = False) -> list[TrainCase]:
    """``n`` synthetic spines with varied contrast, degeneration and spacing (all classes known)."""
    from ..phantom import make_phantom

    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        spacing = (float(rng.uniform(3.0, 4.0)), float(rng.uniform(0.5, 1.1)), 0.0)
        spacing = (spacing[0], spacing[1], spacing[1])
        ph = make_phantom(
            seed=int(rng.integers(1 << 30)),
            contrast="T2w" if i % 2 == 0 else "T1w",
            degenerated=int(rng.integers(0, 3)),
            spacing=spacing,
        )
        target = np.moveaxis(classes_to_channels(ph.labels.canonical(), ph.posterior_elements.canonical()), 0, 1)
        case = _finish(f"phantom_{seed}_{i}", f"phantom_{seed}_{i}", "phantom", ph.image.canonical(), target,
                       ph.image.orientation.canonical_spacing, target_spacing, np.ones(NUM_CLASSES, bool),
                       False, intensity, soft=soft)
        cases.append(case)
    return cases


def load_cases(spec: str, target_spacing=(1.0, 1.0), intensity=None, names=None,
               soft: bool = False) -> list[TrainCase]:
    """``lumbar:PATH`` | ``slabs:PATH`` | ``spider:PATH`` | ``nnunet:PATH`` | ``phantom:N[:SEED]``.

    ``soft``: partial-volume targets (see :func:`_finish`)."""
    cases = _load_cases(spec, target_spacing, intensity, names, soft)
    source = {"slabs": "spider"}.get(spec.partition(":")[0], spec.partition(":")[0])
    for c in cases:
        c.source = source
    return cases


def _load_cases(spec: str, target_spacing, intensity, names, soft: bool) -> list[TrainCase]:
    kind, _, rest = spec.partition(":")
    if kind == "lumbar":
        return lumbar_cases(Path(rest), names, target_spacing, intensity, soft)
    if kind == "slabs":
        return slab_cases(Path(rest), target_spacing, intensity, soft)
    if kind == "spider":
        return spider_cases(Path(rest), target_spacing, intensity, soft)
    if kind == "nnunet":
        return nnunet_cases(Path(rest), target_spacing, intensity, soft)
    if kind == "phantom":
        n, _, seed = rest.partition(":")
        return phantom_cases(int(n), int(seed or 0), target_spacing, intensity, soft)
    raise ValueError(f"Unknown data source {spec!r}: use lumbar:PATH, slabs:PATH, spider:PATH, nnunet:PATH or "
                     "phantom:N.")


# --------------------------------------------------------------------------------------------- folds
def make_splits(patients: dict[str, str], k: int = 5, fold: int = 0, val_fraction: float = 0.15,
                seed: int = 0) -> dict[str, list[str]]:
    """Patient-level split: ``test`` = fold ``fold`` of ``k`` (stratified by group), ``val`` = a stratified
    ``val_fraction`` of the remaining patients, ``train`` = the rest.  No patient is in two sets.

    ``patients`` maps patient id -> group (stratum).
    """
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}.")
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for group in sorted(set(patients.values())):
        members = sorted(p for p, g in patients.items() if g == group)
        rng.shuffle(members)
        test = [p for i, p in enumerate(members) if i % k == fold]
        rest = [p for p in members if p not in test]
        n_val = int(round(len(rest) * val_fraction))
        split["test"] += test
        split["val"] += rest[:n_val]
        split["train"] += rest[n_val:]
    return {key: sorted(v) for key, v in split.items()}


def read_fold(path: Path, fold: int) -> dict[str, list[str]]:
    """One fold ({train, val, test} patient lists) of a folds JSON written by :func:`write_splits`."""
    folds = json.loads(Path(path).read_text())
    if not 0 <= fold < len(folds):
        raise ValueError(f"{path} has {len(folds)} folds; fold {fold} does not exist.")
    return folds[fold]


def write_splits(path: Path, patients: dict[str, str], k: int = 5, seed: int = 0,
                 val_fraction: float = 0.15) -> list[dict[str, list[str]]]:
    """All ``k`` folds to a JSON file (a list of {train, val, test}), like nnU-Net's ``splits_final.json``."""
    folds = [make_splits(patients, k, f, val_fraction, seed) for f in range(k)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(folds, indent=1))
    return folds
