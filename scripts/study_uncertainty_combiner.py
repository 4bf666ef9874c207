"""Can a learned combination of per-voxel signals find the wrong voxels better than the shipped map?

On the validation patients of fold 0 (never the test ones) this runs the presegmentation alone, the
diffusion alone and the default blend (as ``scripts/study_uncertainty.py`` does), and at every voxel in the
evaluation's band (5 voxels around truth and prediction, within the labelled levels) gathers signals that
need no truth: the shipped ``"labels"`` map, the in-plane distance to the nearest predicted boundary, the
image's gradient there and at that nearest boundary (how sharp the edge is where the model put the
boundary), the presegmentation-diffusion disagreement and the diffusion's step map.  A logistic regression
on standardised signals (class-agnostic: the lumbar scans label only bodies or discs, so a class feature
would learn which classes go unscored) is fitted leaving one validation patient out, and each left-out case
is scored with the band AUROC of the fitted map against the shipped one.  A lookup table does the same
without a functional form: the other cases' error rate (each case weighted equally) in cells of the shipped
map's 30 quantiles, crossed with the edge gradient (5 bins) and the distance (7 bins).

    .venv/bin/python scripts/study_uncertainty_combiner.py [--threads 2] [--cache DIR]

About 18 minutes on 2 CPU cores: 8 for the runs, which are cached in ``--cache`` (a second call only
refits), and 10 for the fits.  Its result for v4.11 is in the README (model card): nothing beats the shipped map.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from napari_spinesegdiff.config import SegmentationConfig
from napari_spinesegdiff.evaluation.evaluate import case_errors, load_eval_cases, split_patients
from napari_spinesegdiff.evaluation.metrics import auroc
from napari_spinesegdiff.labelscheme import ChannelRoles, structure_probabilities
from napari_spinesegdiff.pipeline import LABEL_UNCERTAINTY_SCALE, label_uncertainty
from study_uncertainty import default_runs  # scripts/ is on the path when this runs as a script

ROOT = Path(__file__).resolve().parents[1]
MAX_DIST = 6.0


def boundary_features(labels: np.ndarray, image: np.ndarray) -> dict[str, np.ndarray]:
    """Per slice, in-plane: distance (voxels) to the nearest predicted boundary, the image gradient at the
    voxel and at that nearest boundary voxel (each over the slice's 99th percentile)."""
    dist = np.full(labels.shape, MAX_DIST, np.float32)
    g = np.zeros(labels.shape, np.float32)
    g_edge = np.zeros(labels.shape, np.float32)
    for k in range(labels.shape[0]):
        lab = labels[k]
        edge = np.zeros(lab.shape, bool)
        edge[:-1] |= lab[:-1] != lab[1:]
        edge[1:] |= lab[:-1] != lab[1:]
        edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
        edge[:, 1:] |= lab[:, :-1] != lab[:, 1:]
        gk = ndimage.gaussian_gradient_magnitude(image[k].astype(np.float32), 1.0)
        gk /= max(float(np.percentile(gk, 99)), 1e-6)
        g[k] = gk
        if not edge.any():
            continue
        d, (ii, jj) = ndimage.distance_transform_edt(~edge, return_indices=True)
        dist[k] = np.minimum(d, MAX_DIST)
        g_edge[k] = gk[ii, jj]
    return {"dist": dist, "grad": g, "grad_edge": g_edge}


def gather(case, config) -> dict[str, np.ndarray]:
    """The band voxels' signals and whether each is wrong, for one case."""
    dif_run, probs, labels, pre, dif = default_runs(case, config)
    names = dif_run.class_names
    base, _ = label_uncertainty(probs, names, case.vertebrae, range(dif_run.slices[0], dif_run.slices[-1] + 1))
    roles = ChannelRoles.of(names)
    disagree = np.abs(structure_probabilities(pre, roles) - structure_probabilities(dif, roles)).max(0)
    feats = boundary_features(labels, case.image.canonical())
    feats.update(labels_map=base / LABEL_UNCERTAINTY_SCALE, disagree=disagree,
                 steps=dif_run.canonical_class_uncertainty.max(axis=0) / LABEL_UNCERTAINTY_SCALE)
    errors, sel = case_errors(case, labels)
    out = {k: v[sel].astype(np.float32) for k, v in feats.items()}
    out["wrong"] = errors[sel]
    return out


SIGNALS = {  # name -> the design columns made from a case's signals
    "labels only": lambda f: [f["labels_map"]],
    "labels + distance": lambda f: [f["labels_map"], *one_hot_dist(f["dist"])],
    "labels + distance + gradients": lambda f: [f["labels_map"], *one_hot_dist(f["dist"]), f["grad"],
                                                f["grad_edge"], f["labels_map"] * f["grad_edge"]],
    "+ disagreement, steps": lambda f: [f["labels_map"], *one_hot_dist(f["dist"]), f["grad"], f["grad_edge"],
                                        f["labels_map"] * f["grad_edge"], f["disagree"], f["steps"]],
}


def one_hot_dist(d: np.ndarray) -> list[np.ndarray]:
    return [(d >= lo) & (d < lo + 1) for lo in range(1, int(MAX_DIST))] + [d >= MAX_DIST - 0.5]


def design(f, name):
    return np.stack([np.asarray(c, np.float64) for c in SIGNALS[name](f)], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 30) -> tuple[np.ndarray, ...]:
    """Newton's method on the class-balanced log loss; standardises the columns first."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.c_[np.ones(len(x)), (x - mu) / sd]
    w_pos = 0.5 / max(y.mean(), 1e-9)
    sw = np.where(y, w_pos, 0.5 / max(1 - y.mean(), 1e-9))
    beta = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(z @ beta, -30, 30)))
        grad = z.T @ (sw * (p - y)) / len(y) + l2 * np.r_[0, beta[1:]]
        hess = (z * (sw * p * (1 - p))[:, None]).T @ z / len(y) + l2 * np.eye(len(beta))
        beta -= np.linalg.solve(hess, grad)
    return beta, mu, sd


def predict(model, x):
    beta, mu, sd = model
    return np.c_[np.ones(len(x)), (x - mu) / sd] @ beta


def table_cells(f, edges, use: str) -> tuple[np.ndarray, int]:
    """Each voxel's cell: the shipped map's quantile bin, crossed with the edge gradient ("g") and the
    distance ("d") where ``use`` names them."""
    idx, n = np.digitize(f["labels_map"], edges), len(edges) + 1
    if "g" in use:
        idx, n = idx * 5 + np.clip((f["grad_edge"] * 5).astype(int), 0, 4), n * 5
    if "d" in use:
        idx, n = idx * 7 + np.clip(f["dist"].astype(int), 0, 6), n * 7
    return idx, n


def lookup_tables(data) -> None:
    """Leave-one-patient-out error-rate tables (see the module docstring), against the shipped map."""
    edges = np.quantile(np.concatenate([f["labels_map"] for _, f in data.values()]), np.linspace(0, 1, 31)[1:-1])
    for use, label in (("", "map bins"), ("g", "map x edge gradient"), ("d", "map x distance"),
                       ("gd", "map x edge gradient x distance")):
        scores: dict[str, list[tuple[float, float]]] = {}
        for held in data:
            wrong = total = 0.0
            for n, (_, f) in data.items():
                if n != held:
                    idx, cells = table_cells(f, edges, use)
                    w = np.full(len(idx), 1.0 / len(idx))
                    wrong = wrong + np.bincount(idx, weights=f["wrong"] * w, minlength=cells)
                    total = total + np.bincount(idx, weights=w, minlength=cells)
            source, f = data[held]
            rate = (wrong + 1e-4) / (total + 1e-3)
            idx, _ = table_cells(f, edges, use)  # ties within a cell broken by the shipped map
            scores.setdefault(source, []).append((auroc(f["labels_map"], f["wrong"]),
                                                  auroc(rate[idx] + 1e-6 * f["labels_map"], f["wrong"])))
        print(f"table: {label:30s} " + " / ".join(
            f"{s}: shipped {statistics.mean(a for a, _ in v):.4f}, table {statistics.mean(b for _, b in v):.4f}"
            for s, v in scores.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/spinesegdiff_combiner")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    patients = split_patients(ROOT / "src/napari_spinesegdiff/weights/splits_v4.json", 0, "val")
    cases = load_eval_cases([f"slabs:{args.data}/spider_t2space", f"lumbar:{args.data}/lumbar"], patients)
    config = SegmentationConfig()
    data = {}
    for case in cases:
        path = cache / f"{case.name}.npz"
        if not path.exists():
            np.savez_compressed(path, **gather(case, config))
        with np.load(path) as z:
            data[case.name] = ("spider" if case.group == "spider" else "lumbar", dict(z))
    for name in SIGNALS:
        scores: dict[str, list[tuple[float, float]]] = {}
        per_case = {}
        for held in data:
            train = [f for n, (_, f) in data.items() if n != held]
            x = np.concatenate([design(f, name) for f in train])
            y = np.concatenate([f["wrong"] for f in train]).astype(np.float64)
            model = fit_logistic(x, y)
            source, f = data[held]
            shipped = auroc(f["labels_map"], f["wrong"])
            learned = auroc(predict(model, design(f, name)), f["wrong"])
            scores.setdefault(source, []).append((shipped, learned))
            per_case[held] = learned - shipped
        full = fit_logistic(np.concatenate([design(f, name) for _, f in data.values()]),
                            np.concatenate([f["wrong"] for _, f in data.values()]).astype(np.float64))
        line = " / ".join(f"{s}: shipped {statistics.mean(a for a, _ in v):.4f}, "
                          f"learned {statistics.mean(b for _, b in v):.4f}" for s, v in scores.items())
        print(f"{name:32s} {line}")
        print("    per case (learned - shipped): " + " ".join(f"{n}:{d:+.4f}" for n, d in per_case.items()))
        print("    coefficients (standardised): " + " ".join(f"{b:+.3f}" for b in full[0]))
    lookup_tables(data)


if __name__ == "__main__":
    main()
