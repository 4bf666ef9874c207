"""A whole scan in, labels + uncertainty + probabilities out, in the scan's own geometry.

:func:`segment` is a generator: it yields :class:`Progress` and :class:`StepUpdate` events while it works
and *returns* a :class:`SegmentationResult` (``StopIteration.value``; :func:`run` drains it).  Closing the
generator stops the work at the next denoising step.  The napari widget, the CLI and the tests all drive
this one function.

Steps: canonical sagittal slices (``io``) -> in-plane resampling to the model spacing -> per-volume
intensity normalisation -> batches of ``batch_slices`` slices x ``ensemble`` samples -> presegmentation
prior (shipped baseline, a labels volume, or none; a baseline runs at its own checkpoint's spacing, which may
be finer than the diffusion model's) -> DDIM sampler with the step-uncertainty ensemble -> back to the scan
grid (linear for maps, labels from the resampled probabilities) -> optional blend with the presegmentation
(``baseline_weight``; on the scan grid when the presegmenter's is finer, so its detail survives) -> optional
Gaussian smoothing of the probabilities across sagittal slices (``smooth_mm``; the networks are 2-D) -> labels and post-processing in millimetres -> the uncertainty
map (default ``"labels"``: the entropy of the probabilities the labels were drawn from,
:func:`label_uncertainty`) -> file order.
Memory for the model stays flat in the number of slices.

Label rule: a pixel gets the class whose probability is highest among those above 0.5 (so overlapping
channels never produce two labels); otherwise background.  Post-processing per class and slice: fill
holes, then drop connected components smaller than ``min_component_mm2``; the spinal canal keeps only its
largest 3-D connected component (``single_canal``); 3-D pieces farther than ``column_margin_mm`` from the spine
column (the chain of vertebrae, discs and canal, :mod:`column`) are dropped.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Generator, Sequence

import numpy as np

from . import __version__
from .column import foreground_box
from .config import SegmentationConfig, parse_slices
from .io.volume import Volume
from .preprocess import SliceGrid, context_stack, normalize_intensity

WEIGHTS_DIR = Path(__file__).parent / "weights"
SHIPPED_DIFFUSION = WEIGHTS_DIR / "diffusion.safetensors"
SHIPPED_BASELINE = WEIGHTS_DIR / "baseline.safetensors"


class SegmentationError(ValueError):
    """A problem with the inputs of a run, stated in one sentence."""


@dataclass(frozen=True)
class Progress:
    done: int  # denoiser passes (or slices) finished
    total: int
    message: str


@dataclass(frozen=True)
class StepUpdate:
    """The current x0 estimate of the slices being denoised, on the scan's canonical grid."""

    slices: tuple[int, ...]  # canonical slice indices (axis 0)
    step: int  # 1-based step within this batch; 0 = the prior (presegmentation) the batch starts from
    total_steps: int
    t: int
    batch: int  # 0-based batch index
    n_batches: int
    probabilities: np.ndarray  # (n, C, rows, cols) float32
    uncertainty: np.ndarray  # (n, rows, cols) float32, running max over steps and classes


@dataclass
class SegmentationResult:
    labels: Volume  # uint8 in the scan's file order: 0 background, 1 canal, 2 vertebra, 3 disc (labelscheme)
    uncertainty: Volume  # float32, max over classes of the step-uncertainty map
    probabilities: list[Volume]  # one float32 volume per class
    canonical_labels: np.ndarray  # the same, in the canonical sagittal view (for napari)
    canonical_uncertainty: np.ndarray  # (N, rows, cols): max over classes
    canonical_probabilities: np.ndarray  # (C, N, rows, cols)
    canonical_class_uncertainty: np.ndarray  # (C, N, rows, cols): the uncertainty of each class
    slices: tuple[int, ...]
    class_names: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)
    # (S, N, rows, cols) uint8, canonical: each ensemble member's labels, from its own last-step x0 through the
    # same blend, smoothing and label rule as ``canonical_labels`` (:func:`member_labels`: not its
    # post-processing), within :data:`MEMBER_MARGIN` voxels of the labels' foreground box (0 outside it); only
    # with ``segment(keep_samples=True)``
    canonical_sample_labels: np.ndarray | None = None


@dataclass(frozen=True)
class LoadedModels:
    diffusion: Any
    diffusion_config: Any
    baseline: Any | None
    baseline_config: Any | None
    device: Any
    device_message: str
    diffusion_path: str
    baseline_path: str | None
    engine: str = "torch"  # "torch", "openvino" or "onnxruntime" (model.engine)
    precision: str = "f32"  # "bf16" or "f32": the arithmetic of the networks' convolutions


@lru_cache(maxsize=4)
def _load_models_cached(diffusion_path: str, baseline_path: str | None, device: str, engine: str = "torch",
                        threads: int = 1) -> LoadedModels:
    from .model.checkpoint import load_checkpoint
    from .model.device import keep_freed_memory, resolve_device

    dev, message = resolve_device(device)
    if dev.type == "cpu":
        keep_freed_memory()
    from .model.engine import RUNTIMES

    served = engine in RUNTIMES  # by the exported ONNX files (model.engine)
    if served:
        from .model.engine import onnx_model

        net, cfg = onnx_model(diffusion_path, threads, engine)
        name = "OpenVINO" if engine == "openvino" else "ONNX Runtime"
        message += f" {name} engine ({'bfloat16' if net.precision == 'bf16' else 'float32'})."
    else:
        net, cfg = load_checkpoint(diffusion_path, map_location="cpu")
        net = net.to(dev).eval()
    if getattr(cfg, "kind", "diffusion") != "diffusion":
        raise SegmentationError(f"{diffusion_path} is a {cfg.kind} checkpoint, not a diffusion model.")
    base, base_cfg = (None, None)
    if baseline_path is not None:
        if served:
            base, base_cfg = onnx_model(baseline_path, threads, engine)
        else:
            base, base_cfg = load_checkpoint(baseline_path, map_location="cpu")
            base = base.to(dev).eval()
        if getattr(base_cfg, "kind", "baseline") != "baseline":
            raise SegmentationError(
                f"{baseline_path} is a {base_cfg.kind} checkpoint, not a baseline presegmenter."
            )
    return LoadedModels(net, cfg, base, base_cfg, dev, message, diffusion_path, baseline_path, engine,
                        getattr(net, "precision", "f32"))


def checkpoint_paths(config: SegmentationConfig) -> tuple[Path, Path | None]:
    """The diffusion checkpoint of ``config`` (shipped by default) and, when the prior is the baseline, the
    baseline presegmenter's; a missing file is one sentence."""
    path = Path(config.checkpoint) if config.checkpoint else SHIPPED_DIFFUSION
    if not path.is_file():
        if config.checkpoint is None:
            raise SegmentationError(
                "The shipped model is missing from this installation; pass --checkpoint with your own model."
            )
        raise SegmentationError(f"Checkpoint {path} does not exist.")
    base = None
    if config.prior == "baseline":
        base = Path(config.baseline_checkpoint) if config.baseline_checkpoint else SHIPPED_BASELINE
        if not base.is_file():
            raise SegmentationError(f"Baseline checkpoint {base} does not exist; use --prior none or a labels file.")
    return path, base


def load_models(config: SegmentationConfig) -> LoadedModels:
    """The diffusion model of ``config.checkpoint`` (shipped by default) and, when the prior is the
    baseline, the shipped baseline presegmenter (or ``config.baseline_checkpoint``)."""
    path, base = checkpoint_paths(config)
    from .model.device import resolve_device

    import torch

    from .model.engine import RUNTIMES, EngineError, resolve_engine

    dev = resolve_device(config.device)[0]
    try:
        engine = resolve_engine(config.engine, dev)
    except EngineError as exc:
        raise SegmentationError(str(exc)) from None
    # "auto" and what it picks share one cache entry; OpenVINO and ONNX Runtime are sized to torch's threads
    threads = torch.get_num_threads() if engine in RUNTIMES else 1
    return _load_models_cached(str(path.resolve()), str(base.resolve()) if base else None, str(dev), engine,
                               threads)


def _validate(volume: Volume, config: SegmentationConfig, models: LoadedModels) -> None:
    ncls = len(models.diffusion_config.class_names)
    if config.num_classes is not None and config.num_classes != ncls:
        raise SegmentationError(
            f"The run asks for {config.num_classes} classes but the checkpoint has {ncls}."
        )
    in_ch = models.diffusion_config.network.in_channels
    if in_ch != 1:
        raise SegmentationError(f"The checkpoint expects {in_ch} image channels; scans have 1.")
    if models.baseline_config is not None and models.baseline_config.network.in_channels % 2 == 0:
        raise SegmentationError(
            f"The baseline expects {models.baseline_config.network.in_channels} image channels; a 2.5-D "
            "presegmenter takes a slice and as many neighbours on each side (an odd number)."
        )
    if models.baseline_config is not None and len(models.baseline_config.class_names) != ncls:
        raise SegmentationError(
            f"The baseline has {len(models.baseline_config.class_names)} classes but the diffusion model {ncls}."
        )
    if config.vertebrae == "split":
        from .labelscheme import ChannelRoles

        if not ChannelRoles.of(models.diffusion_config.class_names).can_split:
            raise SegmentationError(
                "This model has no vertebral-body and whole-vertebra channels, so it cannot split vertebrae; "
                "use vertebrae 'whole' or a v4 model."
            )
    if volume.kind != "image":
        raise SegmentationError("The input is a labels volume, not an image to segment.")
    if not np.issubdtype(volume.data.dtype, np.number) or np.iscomplexobj(volume.data):
        raise SegmentationError(f"The scan has a non-real pixel type ({volume.data.dtype}).")
    if not np.all(np.isfinite(volume.data)):
        raise SegmentationError("The scan contains NaN or infinite values.")
    from .io import check_signal

    try:
        check_signal(volume)
    except ValueError as exc:
        raise SegmentationError(str(exc)) from None
    if min(volume.shape) < 1 or min(sorted(volume.shape)[1:]) < 8:
        raise SegmentationError(f"The scan of shape {volume.shape} is too small to segment.")


def check_fits(volume: Volume, config: SegmentationConfig, models: LoadedModels) -> None:
    """Refuse, in one sentence, a scan whose voxels or extent no scan has or whose run needs more memory
    than this process can get (:mod:`.io.limits`): before any slice is resampled to the model's grid."""
    from .io import limits

    shape, spacing = volume.orientation.canonical_shape, volume.orientation.canonical_spacing
    name = volume.source or "the scan"
    problem = limits.physical_size_problem(spacing, shape)
    if problem is not None:
        raise SegmentationError(f"Cannot segment {name}: {problem}.")
    ckpt, base = models.diffusion_config, models.baseline_config if config.prior == "baseline" else None
    need = limits.estimate_run_bytes(
        shape, spacing, ckpt.spacing_mm, chosen=len(parse_slices(config.slices, shape[0])),
        batch_slices=config.batch_slices, ensemble=config.ensemble, classes=len(ckpt.class_names),
        engine=models.engine, on_cpu=getattr(models.device, "type", "cpu") == "cpu",
        presegmenter_mm=base.spacing_mm if base is not None else None,
        features=(sum(base.network.features) if base is not None else 0, sum(ckpt.network.features)))
    try:
        limits.check_run_memory(name, shape, spacing, need, ckpt.spacing_mm)
    except ValueError as exc:
        raise SegmentationError(str(exc)) from None


def _baseline_input(image: np.ndarray, idx, spacing, grid: SliceGrid, models: LoadedModels, dev, x):
    """The presegmenter's input on its own grid (``grid``, at its checkpoint's spacing): the slices themselves
    (``x``, already on that grid), or for a 2.5-D presegmenter each slice with its neighbours
    (:func:`~.preprocess.context_stack`), taken from the whole scan, so a neighbour outside the chosen slices
    is still real image."""
    import torch

    cfg = models.baseline_config
    channels = cfg.network.in_channels
    if channels == 1:
        return x
    stack = context_stack(image, idx, channels, float(spacing[0]), float(cfg.context_mm))
    return grid.to_model(torch.from_numpy(stack).to(dev))


def _baseline_grid(grid: SliceGrid, models: LoadedModels) -> SliceGrid:
    """The presegmenter's own model grid: its checkpoint's spacing, which may be finer than the diffusion
    model's (the presegmenter runs once per slice, the denoiser ensemble x steps times)."""
    own = tuple(float(v) for v in models.baseline_config.spacing_mm)
    return grid if own == tuple(grid.target_spacing) else SliceGrid(grid.shape, grid.spacing, own)


def _prior_canonical(prior: np.ndarray | Volume | None, volume: Volume) -> np.ndarray | None:
    """A labels prior (Volume on the scan grid, or a canonical array) -> canonical product labels."""
    if prior is None:
        return None
    if isinstance(prior, Volume):
        if prior.shape != volume.shape:
            raise SegmentationError(f"The prior labels have shape {prior.shape}; the scan has {volume.shape}.")
        arr = prior.canonical()
    else:
        arr = np.asarray(prior)
        if arr.shape != volume.orientation.canonical_shape:
            raise SegmentationError(
                f"The prior labels have shape {arr.shape}; the scan's canonical view has "
                f"{volume.orientation.canonical_shape}."
            )
    from .io.labels import to_classes

    return to_classes(arr, scheme="auto")


def _postprocess(labels: np.ndarray, probs: np.ndarray, spacing_mm: tuple[float, float], config) -> np.ndarray:
    """Per class and slice: fill holes, drop components smaller than ``min_component_mm2``."""
    from scipy import ndimage

    min_px = int(np.ceil(config.min_component_mm2 / (spacing_mm[0] * spacing_mm[1])))
    out = np.zeros_like(labels)
    for c in range(1, probs.shape[0] + 1):
        m = labels == c
        if not m.any():
            continue
        if config.fill_holes:
            m = ndimage.binary_fill_holes(m)
        if min_px > 1:
            lab, n = ndimage.label(m)
            if n:
                sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
                m = np.isin(lab, np.flatnonzero(sizes >= min_px) + 1)
        out[m & ((out == 0) | (labels == c))] = c
    return out


@dataclass(frozen=True)
class _Roi:
    """The in-plane box (model grid) that the diffusion refines: the prior's spinal column plus a margin.

    Outside it the presegmentation stands (its probabilities, and -p log p of them as uncertainty); with no
    prior the box is the whole slice.  Cropping keeps the large field of view of many spine scans (the
    whole abdomen) from costing denoiser passes, and is close to the crops the model was trained on.
    """

    box: tuple[int, int, int, int] | None  # r0, r1, c0, c1; None = whole slice

    @classmethod
    def around(cls, prior, margin_px: float, min_size: int = 64) -> "_Roi":
        """Box of the largest connected part of the prior's column (the channels after the canal when there
        are three or more, else all), projected over the batch's slices, plus ``margin_px``."""
        if prior is None or margin_px < 0:
            return cls(None)
        from scipy import ndimage

        channels = prior[:, 1:] if prior.shape[1] >= 3 else prior  # all but the canal (channel 0)
        fg = (channels > 0.5).any(dim=1).any(dim=0).cpu().numpy()
        comp, n = ndimage.label(fg)
        if n == 0:
            return cls(None)
        fg = comp == int(np.argmax(np.bincount(comp.ravel())[1:])) + 1
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        m = int(np.ceil(margin_px))
        box: list[int] = []
        spans = ((rows[0] - m, rows[-1] + 1 + m, fg.shape[0]), (cols[0] - m, cols[-1] + 1 + m, fg.shape[1]))
        for lo, hi, size in spans:
            lo, hi = max(0, int(lo)), min(size, int(hi))
            short = max(0, min(min_size, size) - (hi - lo))  # keep at least min_size pixels
            lo = max(0, lo - (short + 1) // 2)
            hi = min(size, max(hi + short // 2, lo + min(min_size, size)))
            box += [lo, hi]
        return cls(tuple(box))  # type: ignore[arg-type]

    def crop(self, t):
        if t is None or self.box is None:
            return t
        r0, r1, c0, c1 = self.box
        return t[..., r0:r1, c0:c1]

    def paste(self, t, outside, like):
        """``t`` (ROI) into a full-slice tensor that holds ``outside`` (or zeros) elsewhere."""
        if self.box is None:
            return t
        full = t.new_zeros((*t.shape[:2], *like.shape[-2:])) if outside is None else outside.to(t.dtype).clone()
        r0, r1, c0, c1 = self.box
        full[..., r0:r1, c0:c1] = t
        return full


@dataclass(frozen=True)
class _ScanProbabilities:
    """One batch's denoised probabilities (model grid, inside the ROI) -> final channel probabilities on the
    scan grid (n, C, rows, cols): pasted into the presegmentation outside the ROI and blended with it
    (``baseline_weight``) on the finer of the two grids.  The same for the fused result and for each
    ensemble member, so the members' labels differ from the final labels only by the denoiser's samples."""

    steps_run: int
    prior: Any
    pre_scan: Any  # the presegmentation on the scan grid when the presegmenter's grid is finer, else None
    roi: "_Roi"
    grid: SliceGrid
    x: Any
    config: SegmentationConfig

    def __call__(self, p_model) -> np.ndarray:
        import torch

        cfg, roi, grid, prior, pre_scan = self.config, self.roi, self.grid, self.prior, self.pre_scan
        full_p = roi.paste(p_model.float(), prior, self.x)
        if pre_scan is None:  # one grid: blend there
            if cfg.prior == "baseline" and self.steps_run > 0 and cfg.baseline_weight > 0:
                full_p = blend_presegmentation(full_p, prior.float(), cfg.baseline_weight)
            return grid.to_scan(full_p).cpu().numpy()  # (n, C, rows, cols)
        if self.steps_run == 0:  # the presegmentation stands, at its own resolution
            return pre_scan.cpu().numpy()
        probs = grid.to_scan(full_p)  # a finer presegmenter: blend on the scan grid, so its detail survives
        if cfg.baseline_weight > 0:
            probs = blend_presegmentation(probs, pre_scan, cfg.baseline_weight)
        if roi.box is not None:  # outside the box the fine presegmentation stands, as on one grid
            box = roi.paste(torch.ones_like(p_model[:, :1]).float(), None, self.x)
            inside = grid.to_scan(box)
            probs = inside * probs + (1.0 - inside) * pre_scan
        return probs.cpu().numpy()


def blend_presegmentation(diffusion, presegmentation, weight: float):
    """``(1 - weight) diffusion + weight presegmentation`` (class probabilities; tensors or arrays)."""
    return (1.0 - weight) * diffusion + weight * presegmentation


def smooth_across_slices(prob_c: np.ndarray, slice_mm: float, smooth_mm: float, slices: range) -> np.ndarray:
    """In place: Gaussian smoothing (sigma ``smooth_mm``) of channel probabilities (C, n, rows, cols) across
    the contiguous sagittal ``slices`` that were segmented; nothing when ``smooth_mm`` is 0 or one slice."""
    if smooth_mm > 0 and len(slices) > 1:
        first, stop = slices.start, slices.stop
        weights = gaussian_weights(smooth_mm / slice_mm)
        radius = len(weights) // 2
        if radius == 0:
            return prob_c
        # scipy's gaussian_filter1d(mode="nearest") along the slices, as a weighted sum of whole slices:
        # contiguous (C, rows, cols) blocks instead of a filter strided across the slice axis (4x faster)
        src = prob_c[:, first:stop].copy()
        n = stop - first
        tmp = np.empty_like(src[:, 0])
        for i in range(n):
            out = prob_c[:, first + i]
            np.multiply(src[:, min(max(i - radius, 0), n - 1)], weights[0], out=out)
            for j in range(1, len(weights)):
                np.multiply(src[:, min(max(i - radius + j, 0), n - 1)], weights[j], out=tmp)
                out += tmp
    return prob_c


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised Gaussian kernel of ``scipy.ndimage.gaussian_filter1d`` (radius ``truncate`` sigmas,
    rounded), float32."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / float(sigma)) ** 2)
    return (w / w.sum()).astype(np.float32)


def finalize_labels(prob_c: np.ndarray, spacing: tuple[float, float, float], config: SegmentationConfig,
                    slices: range | None = None, class_names: Sequence[str] | None = None) -> np.ndarray:
    """Canonical channel probabilities (C, n, rows, cols) -> canonical written labels (n, rows, cols), the
    last stage of :func:`segment`: Gaussian smoothing across the sagittal ``slices`` (``config.smooth_mm``,
    in place), the structure probabilities (canal, vertebra, disc; :mod:`labelscheme`), the label rule,
    per-slice post-processing, the single canal, no piece farther than ``config.column_margin_mm`` from the spine
    column (:func:`column.drop_strays`), and with ``config.vertebrae == "split"`` vertebral body (2)
    and posterior elements (4).  ``slices`` (a contiguous range, default all) are the slices that were
    segmented; the others stay background.  ``class_names`` (the model's channels) default to the three
    channels of the v3 models."""
    from .labelscheme import CHANNELS_V3, ChannelRoles, split_vertebrae, structure_probabilities

    slices = range(prob_c.shape[1]) if slices is None else slices
    roles = ChannelRoles.of(class_names if class_names is not None else CHANNELS_V3)
    if config.vertebrae == "split" and not roles.can_split:
        raise SegmentationError("This model has no vertebral-body and whole-vertebra channels, so it cannot "
                                "split vertebrae; use vertebrae 'whole' or a v4 model.")
    smooth_across_slices(prob_c, float(spacing[0]), config.smooth_mm, slices)
    labels = np.zeros(prob_c.shape[1:], np.uint8)
    for k in slices:
        structures = structure_probabilities(prob_c[:, k], roles) if roles.known else prob_c[:, k]
        labels[k] = _postprocess(_labels_from_probabilities(structures), structures,
                                 (spacing[1], spacing[2]), config)
    if config.single_canal:
        _keep_largest_component(labels, 1)
    if config.column_margin_mm > 0:  # strays far from the chain of vertebrae, discs and canal
        from .column import drop_strays

        drop_strays(labels, spacing, config.column_margin_mm)
    if config.vertebrae == "split":
        labels = split_vertebrae(labels, prob_c[roles.body])
    return labels


#: In-plane voxels around the final labels' foreground where the ensemble members are labelled: the report
#: measures a member only within two voxels of the final structures, so the rest of the field of view is left 0.
MEMBER_MARGIN = 8


def member_labels(prob_c: np.ndarray, spacing: tuple[float, float, float], config: SegmentationConfig,
                  slices: range, class_names: Sequence[str]) -> np.ndarray:
    """One ensemble member's labels for the measurement intervals (:mod:`.report.intervals`): the smoothing
    across slices and the label rule of :func:`finalize_labels` (and its split of the vertebrae), without its
    post-processing (holes, specks, strays, the single canal).  The report measures a member only within two
    voxels of the final labels' structures, where that post-processing has nothing left to remove; skipping
    it keeps the members' labelling to a small share of the run."""
    from .labelscheme import ChannelRoles, split_vertebrae, structure_probabilities

    roles = ChannelRoles.of(class_names)
    smooth_across_slices(prob_c, float(spacing[0]), config.smooth_mm, slices)
    labels = np.zeros(prob_c.shape[1:], np.uint8)
    for k in slices:
        labels[k] = _labels_from_probabilities(structure_probabilities(prob_c[:, k], roles) if roles.known
                                               else prob_c[:, k])
    if config.vertebrae == "split" and roles.can_split:
        labels = split_vertebrae(labels, prob_c[roles.body])
    return labels


#: The ``"labels"`` uncertainty is the binary entropy in bits times this: an even chance reads 1/e, the top of
#: the paper's step-uncertainty scale (-p log p), so maps, colour limits and thresholds share one scale.
LABEL_UNCERTAINTY_SCALE = float(1.0 / np.e)


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """``-p log2 p - (1 - p) log2 (1 - p)`` (float32; 0 at p = 0 or 1, 1 at p = 0.5)."""
    p = np.clip(np.asarray(p, np.float32), 1e-6, 1.0 - 1e-6)
    return -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))


def written_uncertainty(prob_c: np.ndarray, class_names: Sequence[str], vertebrae: str = "whole",
                        slices: range | None = None) -> dict[int, np.ndarray]:
    """Written label -> the ``"labels"`` uncertainty of that label: the binary entropy of the probability it is
    drawn from, from final channel probabilities (C, n, rows, cols) as :func:`finalize_labels` leaves them.

    Canal (1), (whole) vertebra (2) and disc (3) use :func:`labelscheme.structure_probabilities`; with
    ``vertebrae="split"`` labels 2 and 4 also take the entropy of the vertebral-body probability that divides
    them.  Models with unknown channels map label ``c`` to channel ``c - 1``.  Scaled by
    :data:`LABEL_UNCERTAINTY_SCALE`, 0 outside ``slices`` (default all)."""
    from .labelscheme import ChannelRoles, structure_probabilities

    roles = ChannelRoles.of(class_names)
    if roles.known:
        canal, vert, disc = binary_entropy(structure_probabilities(prob_c, roles))
        maps = {1: canal, 2: vert, 3: disc}
        if vertebrae == "split" and roles.can_split:
            maps[2] = maps[4] = np.maximum(vert, binary_entropy(prob_c[roles.body]))
    else:
        maps = {c + 1: h for c, h in enumerate(binary_entropy(prob_c))}
    return {c: _scaled_in(h, slices) for c, h in maps.items()}


def _scaled_in(h: np.ndarray, slices: range | None) -> np.ndarray:
    """An entropy map (n, ...) times :data:`LABEL_UNCERTAINTY_SCALE`, float32, 0 outside ``slices``."""
    out = (h * LABEL_UNCERTAINTY_SCALE).astype(np.float32)
    if slices is not None:
        outside = np.ones(out.shape[0], bool)
        outside[slices.start:slices.stop] = False
        out[outside] = 0.0
    return out


def label_uncertainty(prob_c: np.ndarray, class_names: Sequence[str], vertebrae: str = "whole",
                      slices: range | None = None,
                      written: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``"labels"`` uncertainty from final channel probabilities (C, n, rows, cols), as :func:`finalize_labels`
    leaves them (blended, smoothed): ``(map, per_channel)``.

    ``map`` is the largest of the written labels' maps (:func:`written_uncertainty`): canal, (whole) vertebra
    and disc, and with ``vertebrae="split"`` the vertebral-body probability that divides label 2 from 4.  A
    boundary between body and posterior elements is not uncertain when they are written as one vertebra.
    ``per_channel`` is each channel's own entropy.  Both are scaled by :data:`LABEL_UNCERTAINTY_SCALE` and are
    0 outside ``slices`` (default all).  ``written``: the maps :func:`written_uncertainty` gives for the same
    arguments, where the caller already has them."""
    if written is None:
        written = written_uncertainty(prob_c, class_names, vertebrae, slices)
    shown = np.max(list(written.values()), axis=0)
    per_channel = np.stack([_scaled_in(h, slices) for h in binary_entropy(prob_c)])
    return shown.astype(np.float32), per_channel


def _labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """(C, ...) class probabilities -> labels 0..C: the most probable class among those above 0.5."""
    above = probs > 0.5
    best = np.argmax(np.where(above, probs, -1.0), axis=0) + 1
    return np.where(above.any(axis=0), best, 0).astype(np.uint8)


def _keep_largest_component(labels: np.ndarray, cls: int) -> None:
    """In place: class ``cls`` keeps only its largest 3-D connected component (the canal is one tube)."""
    from scipy import ndimage

    comp, n = ndimage.label(labels == cls)
    if n > 1:
        sizes = np.bincount(comp.ravel())[1:]
        labels[(comp > 0) & (comp != int(np.argmax(sizes)) + 1)] = 0


def segment(
    volume: Volume,
    config: SegmentationConfig = SegmentationConfig(),
    *,
    prior_labels: np.ndarray | Volume | None = None,
    stream_every: int = 1,
    models: LoadedModels | None = None,
    keep_samples: bool = False,
) -> Generator[Progress | StepUpdate, None, SegmentationResult]:
    """Segment a scan (see the module docstring).  ``prior_labels`` is used when ``config.prior`` is
    ``"labels"`` (a labels volume from the caller); a path in ``config.prior`` is read here.  Step updates
    are yielded every ``stream_every`` steps (and always at a batch's last step), each batch's first as step 0
    (its prior, before the first denoiser pass: what a viewer can show at once); ``0`` = none.
    ``keep_samples``: also label each ensemble member (``SegmentationResult.canonical_sample_labels``, for
    the measurement intervals); off by default, as it costs memory and a labelling pass per member."""
    import torch

    from .labelscheme import labels_to_channels
    from .model.diffusion import schedule_from_dict
    from .model.sampler import sample, step_uncertainty

    t0 = time.perf_counter()
    models = models or load_models(config)
    _validate(volume, config, models)
    check_fits(volume, config, models)
    ckpt = models.diffusion_config
    dev = models.device
    prior_canon = None
    if config.prior not in ("baseline", "none", "labels"):
        from .io.readers import read_volume

        prior_canon = _prior_canonical(read_volume(config.prior, kind="labels"), volume)
    elif config.prior == "labels":
        if prior_labels is None:
            raise SegmentationError("prior is 'labels' but no labels were given.")
        prior_canon = _prior_canonical(prior_labels, volume)

    canonical = volume.canonical()
    n_slices, rows, cols = canonical.shape
    spacing = volume.orientation.canonical_spacing
    chosen = parse_slices(config.slices, n_slices)
    grid = SliceGrid((rows, cols), (spacing[1], spacing[2]), tuple(ckpt.spacing_mm))
    bgrid = _baseline_grid(grid, models) if config.prior == "baseline" else grid
    image = normalize_intensity(canonical, ckpt.intensity)
    ncls = len(ckpt.class_names)
    schedule = schedule_from_dict(ckpt.schedule)

    unc_c = np.zeros((n_slices, rows, cols), np.float32)
    cunc_c = np.zeros((ncls, n_slices, rows, cols), np.float32)
    prob_c = np.zeros((ncls, n_slices, rows, cols), np.float32)
    # each ensemble member's final probabilities, quantised to 1/255 (a fifth of float32's memory)
    samples_u8 = np.zeros((config.ensemble, ncls, n_slices, rows, cols), np.uint8) if keep_samples else None
    batches = [list(chosen)[i:i + config.batch_slices] for i in range(0, len(chosen), config.batch_slices)]
    use_prior = config.prior != "none"
    steps_per_batch = len(schedule.respaced_timesteps(config.t_start if use_prior else schedule.T, config.steps))
    total = max(1, len(batches) * steps_per_batch)
    yield Progress(0, total, f"{models.device_message}; {len(chosen)} slices in {len(batches)} batches")
    timings = {"load_s": round(time.perf_counter() - t0, 3), "prior_s": 0.0, "sampling_s": 0.0, "post_s": 0.0}

    for bi, idx in enumerate(batches):
        with torch.inference_mode():
            x_scan = torch.from_numpy(np.ascontiguousarray(image[idx]))[:, None].to(dev)
            x = grid.to_model(x_scan)
            tp = time.perf_counter()
            prior = None
            pre_scan = None  # the presegmentation on the scan grid, from the presegmenter's own grid
            if config.prior == "baseline":
                xb = x if bgrid is grid else bgrid.to_model(x_scan)
                pre = torch.sigmoid(models.baseline(_baseline_input(image, idx, spacing, bgrid, models, dev, xb)))
                if bgrid is grid:
                    prior = pre
                else:
                    pre_scan = bgrid.to_scan(pre.float())
                    prior = grid.to_model(pre_scan)
            elif prior_canon is not None:
                onehot = np.moveaxis(labels_to_channels(prior_canon[idx], ckpt.class_names), 0, 1)
                prior = grid.to_model(torch.from_numpy(np.ascontiguousarray(onehot)).to(dev), mode="nearest")
            timings["prior_s"] += time.perf_counter() - tp
            if stream_every and prior is not None:  # step 0: the presegmentation this batch's denoising starts from
                p0 = (grid.to_scan(prior.float()) if pre_scan is None else pre_scan).cpu().numpy()
                u0 = grid.to_scan(step_uncertainty(prior.float()).amax(dim=1, keepdim=True)).cpu().numpy()[:, 0]
                yield StepUpdate(tuple(idx), 0, steps_per_batch, config.t_start, bi, len(batches), p0, u0)
        ts0 = time.perf_counter()
        roi = _Roi.around(prior, config.roi_margin_mm / float(ckpt.spacing_mm[0]))
        gen = sample(models.diffusion, roi.crop(x), schedule=schedule, steps=config.steps,
                     t_start=config.t_start if use_prior else None, prior=roi.crop(prior),
                     ensemble=config.ensemble, aggregate_steps=config.aggregate_steps, fusion=config.fusion,
                     seed=config.seed + 1000003 * bi, x0_mode=ckpt.x0_mode)
        try:
            while True:
                ev = next(gen)
                last = ev.index == ev.total
                if stream_every and (ev.index % stream_every == 0 or last):
                    with torch.inference_mode():
                        p = grid.to_scan(roi.paste(ev.probabilities, prior, x)).float().cpu().numpy()
                        u = roi.paste(ev.uncertainty.amax(dim=1, keepdim=True), None, x)
                        u = grid.to_scan(u).float().cpu().numpy()[:, 0]
                    yield StepUpdate(tuple(idx), ev.index, ev.total, ev.t, bi, len(batches), p, u)
                yield Progress(bi * steps_per_batch + ev.index, total,
                               f"batch {bi + 1}/{len(batches)}, step {ev.index}/{ev.total} (t={ev.t})")
        except StopIteration as stop:
            res = stop.value
        finally:
            gen.close()
        timings["sampling_s"] += time.perf_counter() - ts0
        tq = time.perf_counter()
        with torch.inference_mode():
            to_scan = _ScanProbabilities(res.steps_run, prior, pre_scan, roi, grid, x, config)
            probs = to_scan(res.probabilities)
            if samples_u8 is not None:  # each ensemble member through the same blend (report.intervals)
                for k in range(config.ensemble):
                    member = probs if res.sample_x0 is None else to_scan((res.sample_x0[:, k] + 1.0) / 2.0)
                    samples_u8[k][:, idx] = np.rint(np.moveaxis(member, 1, 0).clip(0.0, 1.0) * 255.0)
            if config.uncertainty != "labels":  # the step maps; the "labels" map comes from the final probabilities
                if res.steps_run == 0:  # the presegmentation stands: its own -p log p is the uncertainty
                    full_u = step_uncertainty(roi.paste(res.probabilities.float(), prior, x))
                else:
                    prior_u = None if prior is None else step_uncertainty(prior)
                    full_u = roi.paste(res.uncertainty.float(), prior_u, x)
                    if prior_u is not None and config.uncertainty == "steps+prior":
                        full_u = torch.maximum(full_u, prior_u)
                class_unc = grid.to_scan(full_u).cpu().numpy()  # (n, C, rows, cols)
                unc_c[idx] = class_unc.max(axis=1)
                cunc_c[:, idx] = np.moveaxis(class_unc, 1, 0)
        prob_c[:, idx] = np.moveaxis(probs, 1, 0)
        timings["post_s"] += time.perf_counter() - tq

    tq = time.perf_counter()
    labels_c = finalize_labels(prob_c, spacing, config, chosen, ckpt.class_names)
    sample_labels = None
    if samples_u8 is not None:  # the members through the same smoothing and label rule, near the labels
        rs, cs = foreground_box(labels_c, MEMBER_MARGIN)
        sample_labels = np.zeros((len(samples_u8), *labels_c.shape), np.uint8)
        for member, out in zip(samples_u8, sample_labels):
            out[:, rs, cs] = member_labels(np.multiply(member[:, :, rs, cs], np.float32(1 / 255), dtype=np.float32),
                                           spacing, config, chosen, ckpt.class_names)
        del samples_u8
    if config.uncertainty == "labels":
        unc_c, cunc_c = label_uncertainty(prob_c, ckpt.class_names, config.vertebrae, chosen)
    timings["post_s"] += time.perf_counter() - tq
    timings = {k: round(v, 3) for k, v in timings.items()}
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    provenance = build_provenance(volume, config, models, timings, tuple(chosen))
    note = f"spinesegdiff {__version__}"
    result = SegmentationResult(
        labels=volume.with_canonical(labels_c, kind="labels", produced_by=note),
        uncertainty=volume.with_canonical(unc_c, kind="image", produced_by=note),
        probabilities=[volume.with_canonical(prob_c[c], kind="image", produced_by=note) for c in range(ncls)],
        canonical_labels=labels_c,
        canonical_uncertainty=unc_c,
        canonical_probabilities=prob_c,
        canonical_class_uncertainty=cunc_c,
        slices=tuple(chosen),
        class_names=list(ckpt.class_names),
        provenance=provenance,
        canonical_sample_labels=sample_labels,
    )
    yield Progress(total, total, f"done in {timings['total_s']:.1f} s")
    return result


def run(volume: Volume, config: SegmentationConfig = SegmentationConfig(), callback=None,
        **kwargs: Any) -> SegmentationResult:
    """Drain :func:`segment` (calling ``callback(event)`` for each event) and return the result."""
    from .model.sampler import (
        run_sampler as drain,  # drains any generator that returns its result
    )

    return drain(segment(volume, config, **kwargs), callback)


def build_provenance(volume: Volume, config: SegmentationConfig, models: LoadedModels,
                     timings: dict[str, float], slices: tuple[int, ...]) -> dict[str, Any]:
    """Everything needed to know how a result was made (the JSON sidecar of every written output)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .model.checkpoint import file_sha256 as sha256_file

    try:
        monai_version = version("monai")
    except PackageNotFoundError:
        monai_version = None

    src = volume.source
    return {
        "software": {"spinesegdiff": __version__, "torch": torch.__version__, "monai": monai_version,
                     "numpy": np.__version__, "python": platform.python_version()},
        "input": {"path": str(src) if src else None,
                  "sha256": sha256_file(src) if src and Path(src).is_file() else None,
                  "shape": list(volume.shape), "affine": np.round(volume.affine, 6).tolist()},
        "checkpoint": {"path": models.diffusion_path, "sha256": sha256_file(models.diffusion_path),
                       "baseline": models.baseline_path,
                       "baseline_sha256": sha256_file(models.baseline_path) if models.baseline_path else None,
                       "spacing_mm": [float(v) for v in models.diffusion_config.spacing_mm],
                       "baseline_spacing_mm": ([float(v) for v in models.baseline_config.spacing_mm]
                                               if models.baseline_config is not None else None)},
        "config": config.to_dict(),
        "device": str(models.device),
        "engine": {"name": models.engine, "precision": models.precision},
        "slices": [int(slices[0]), int(slices[-1]) + 1] if slices else [],
        "timings": timings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
