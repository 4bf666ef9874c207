"""The SpineSegDiff dock widget: settings, a threaded run with a live denoising view, uncertainty QA, export.

Run: the pipeline generator (:func:`napari_spinesegdiff.pipeline.segment`) runs in a napari thread worker
(each step inside ``torch.inference_mode()``); only the GUI thread touches layers.  Every streamed step
writes the current x0 estimate of the slices being denoised into the ``denoising`` layer (class colours
weighted by probability, additive over the scan) and into the ``denoising trajectory`` labels layer
(step, slice, row, column; uint8 classes; at most :data:`TRAJECTORY_BUDGET_BYTES`), so the history can be
scrubbed after the run.  The worker converts each step to uint8 before handing it over, so the GUI work
per update is one slice assignment and a refresh.

Results: ``spine labels`` (fixed class colours and names), ``uncertainty`` (inferno, 0..1/e) and one hidden
``P(<class>)`` layer per class, all with the image's scale and translate.  A re-run on the same image
replaces the slices it segmented in these layers (the other slices and their edits stay); a run on another
image replaces the layers.  Cancel stops at the next denoising step: no final layer is added or changed,
and the partial ``denoising`` layer is removed.

Review: the QA tabs list structures (connected components) and slices by uncertainty; a click moves the
viewer there.  A threshold slider shows voxels above it in the ``uncertain boundary`` layer.  Export
writes the (edited) labels and the uncertainty map in the scan's geometry plus a JSON provenance sidecar.

Settings persist in ``$SPINESEGDIFF_CONFIG_DIR/widget.json`` (default ``~/.config/spinesegdiff``).
torch is imported only inside the worker.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    SpinBox,
)
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from . import CLASS_COLORS, __version__
from ._qa import (
    MAX_UNCERTAINTY,
    classes_from_probabilities,
    frame_slot,
    probability_rgb,
    slice_table,
    streamed_steps,
    structure_table,
    trajectory_frames,
    uncertain_mask,
)
from .config import SegmentationConfig
from .io.volume import Volume

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

#: Environment variable naming the folder of the widget's settings file (tests point it at tmp_path).
SETTINGS_ENV = "SPINESEGDIFF_CONFIG_DIR"
#: Memory the denoising trajectory may take (uint8 class maps of the whole canonical volume per frame).
TRAJECTORY_BUDGET_BYTES = 256 * 2**20

LABELS_NAME = "spine labels"
UNCERTAINTY_NAME = "uncertainty"
DENOISING_NAME = "denoising"
TRAJECTORY_NAME = "denoising trajectory"
OVERLAY_NAME = "uncertain boundary"
OUTPUT_KEY = "spinesegdiff_output"  # metadata flag of the layers this widget makes

LABEL_COLORS = CLASS_COLORS
SLICE_MODES = ("current slice", "all slices", "range")

TIPS = {
    "image": "The sagittal scan to segment (a 3-D image layer).",
    "checkpoint": "Diffusion model weights (.safetensors, or an official .pt/.pth file). Empty = the model "
                  "shipped with the plugin. Loading takes a few seconds the first time, then it is cached.",
    "num_classes": "Number of foreground classes. Prefilled from the checkpoint; a run whose class count does "
                   "not match the checkpoint is refused before it starts.",
    "prior": "Presegmentation the denoising starts from: the shipped baseline network (fast, the paper's "
             "setting), a labels layer (e.g. your corrections), or none (start from pure noise at t=T, which "
             "needs more steps for the same quality).",
    "steps": "Denoising (DDIM) steps. Time grows linearly: each step is one network pass per slice and "
             "ensemble member.",
    "t_start": "Noise level the presegmentation is pushed to before denoising (0..T). Higher lets the model "
               "change more of the prior; it does not change the run time (that is set by the steps).",
    "baseline_weight": "Weight of the baseline presegmentation in the final mask: (1 - w) diffusion + w "
                       "presegmentation (only with the baseline prior). 0 = the diffusion output alone, as in the "
                       "paper; 0.5 (default) was the better choice on validation scans. The uncertainty map does "
                       "not depend on it.",
    "ensemble": "Stochastic samples per slice, run as one batch. More samples give a better uncertainty map; "
                "time and memory grow linearly.",
    "batch_slices": "Slices denoised together. Larger batches are faster on a GPU but need more memory.",
    "slices": "Which sagittal slices to segment: the slice shown now (seconds), all slices (time x number of "
              "slices), or a range.",
    "slice_range": "Canonical slice range 'A:B' (B excluded) or a single index 'K'.",
    "device": "Where the model runs: auto picks a CUDA GPU, then Apple mps, then the CPU (the status line says "
              "which). A GPU is typically 10-50x faster than the CPU.",
    "seed": "Random seed of the noise; the same seed and settings give the same result.",
    "stream_every": "Show the current estimate every N denoising steps (0 = only the final result). Streaming "
                    "costs a few milliseconds per update.",
}


# ------------------------------------------------------------------------------------------------ settings


def settings_path() -> Path:
    """The JSON settings file (``$SPINESEGDIFF_CONFIG_DIR`` or ``~/.config/spinesegdiff``)."""
    folder = os.environ.get(SETTINGS_ENV) or str(Path.home() / ".config" / "spinesegdiff")
    return Path(folder) / "widget.json"


def load_settings() -> dict[str, Any]:
    """Saved widget settings, or ``{}`` when there are none (or the file is unreadable)."""
    try:
        data = json.loads(settings_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_settings(settings: dict[str, Any]) -> Path | None:
    """Write the settings; returns the path, or ``None`` when the folder cannot be written."""
    path = settings_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1, default=str))
    except OSError:
        return None
    return path


# ------------------------------------------------------------------------------------------------ geometry


def checkpoint_info(path: str | Path | None) -> dict[str, Any] | None:
    """``{"num_classes", "class_names", "T"}`` from one of our ``.safetensors`` files without loading weights
    or torch (``None`` = shipped model); ``None`` when the file carries no such metadata (official files)."""
    from .pipeline import SHIPPED_DIFFUSION

    p = Path(path) if path else SHIPPED_DIFFUSION
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="numpy") as fh:
            meta = fh.metadata() or {}
        cfg = json.loads(meta["spinesegdiff"])
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the run itself
        return None
    names = list(cfg.get("class_names") or [])
    return {"num_classes": len(names), "class_names": names, "T": int((cfg.get("schedule") or {}).get("T", 1000))}


def layer_volume(layer: Image) -> Volume:
    """The pipeline input for an image layer holding a canonical array (reader/sample layers carry
    ``canonical_affine``; any other layer is placed from its scale and translate)."""
    data = np.asarray(layer.data)
    meta = layer.metadata or {}
    source = Path(meta["source"]) if meta.get("source") else None
    if meta.get("canonical_affine") is not None:
        return Volume(data, np.asarray(meta["canonical_affine"], dtype=float), kind="image", source=source)
    vol = Volume.from_canonical(data, _spacing(layer), _origin(layer), kind="image")
    return Volume(vol.data, vol.affine, kind="image", source=source)


def _spacing(layer) -> tuple[float, float, float]:
    return tuple(abs(float(s)) or 1.0 for s in list(layer.scale)[-3:])  # type: ignore[return-value]


def _origin(layer) -> tuple[float, float, float]:
    t = [float(v) for v in list(layer.translate)[-3:]]
    return (t[0], -t[2], -t[1])  # napari shows world (x, -z, -y): see io.napari_geometry


def export_like(layer: Image) -> Volume:
    """A data-less stand-in for the scan behind ``layer`` in its *file* geometry and array order, for the
    writers: the reader's metadata, else the file ``affine`` with the matching file shape, else the
    canonical geometry."""
    from .io.orientation import SagittalOrientation
    from .io.writers import like_from_metadata

    meta = layer.metadata or {}
    canon_shape = tuple(int(s) for s in np.shape(layer.data)[-3:])
    like = like_from_metadata(meta)
    if like is not None and like.orientation.canonical_shape == canon_shape:
        return like
    source = Path(meta["source"]) if meta.get("source") else None
    if meta.get("affine") is not None:
        affine = np.asarray(meta["affine"], dtype=float).reshape(4, 4)
        for perm in set(itertools.permutations(canon_shape)):
            orient = SagittalOrientation(affine, perm)
            same = orient.canonical_shape == canon_shape
            if same and (meta.get("canonical_affine") is None
                         or np.allclose(orient.canonical_affine, meta["canonical_affine"], atol=1e-6)):
                return Volume(np.broadcast_to(np.zeros((), np.uint8), perm), affine, source=source)
    base = layer_volume(layer)
    return Volume(np.broadcast_to(np.zeros((), np.uint8), base.shape), base.affine, source=source)


# -------------------------------------------------------------------------------------------------- worker


@dataclass(frozen=True)
class StreamFrame:
    """One streamed denoising step, already reduced to uint8 in the worker thread."""

    slices: tuple[int, ...]
    step: int
    total_steps: int
    batch: int
    n_batches: int
    rgb: np.ndarray  # (n, rows, cols, 3) uint8
    classes: np.ndarray  # (n, rows, cols) uint8
    max_uncertainty: float


@dataclass
class RunState:
    """What one run shares between the GUI thread and its worker."""

    image: Any
    config: SegmentationConfig
    stream_every: int
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0  # written by the worker
    total: int = 0
    pipeline_gen: Any = None
    cancelled: bool = False
    done_at_cancel: int | None = None
    completed: bool = False
    error: str | None = None
    denoise_layer: Any = None
    trajectory: np.ndarray | None = None
    frames_used: int = 0
    batch_counts: dict[int, int] = field(default_factory=dict)


def _import_model_code() -> None:
    """Import torch, MONAI and the model code when the dock opens (about a second, once per session).

    Done on the GUI thread on purpose: a first import inside the worker holds the interpreter lock for
    long stretches and stalled the GUI by ~200 ms at the start of the first run."""
    import scipy.ndimage  # noqa: F401
    import torch  # noqa: F401

    from .model import baseline, checkpoint, diffusion, network, sampler  # noqa: F401


def _segment_in_thread(volume: Volume, config: SegmentationConfig, prior: np.ndarray | None, stream_every: int,
                       state: RunState):
    """Worker generator: yields ``Progress`` and :class:`StreamFrame`; returns the ``SegmentationResult``."""
    import torch

    from .pipeline import SegmentationError, StepUpdate, load_models, segment

    try:
        with torch.inference_mode():
            models = load_models(config)
        gen = segment(volume, config, prior_labels=prior, stream_every=stream_every, models=models)
        state.pipeline_gen = gen
        while True:
            try:
                with torch.inference_mode():  # per step: never held across a yield
                    ev = next(gen)
            except StopIteration as stop:
                return stop.value
            if isinstance(ev, StepUpdate):
                yield StreamFrame(ev.slices, ev.step, ev.total_steps, ev.batch, ev.n_batches,
                                  probability_rgb(ev.probabilities), classes_from_probabilities(ev.probabilities),
                                  float(ev.uncertainty.max()) if ev.uncertainty.size else 0.0)
            else:
                state.steps_done, state.total = ev.done, ev.total
                yield ev
    except RuntimeError as exc:  # superqt swallows RuntimeError as "worker deleted": re-raise as a sentence
        raise SegmentationError(str(exc)) from exc


def _qa_in_thread(labels: np.ndarray, uncertainty: np.ndarray, scale, class_names, slices):
    return (structure_table(labels, uncertainty, scale, class_names, slices),
            slice_table(labels, uncertainty, slices))


class _NumItem(QTableWidgetItem):
    """A table cell that shows formatted text and sorts by its number."""

    def __init__(self, value: float, text: str | None = None):
        super().__init__(text if text is not None else f"{value:.3f}")
        self.sort_value = float(value)
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))

    def __lt__(self, other: QTableWidgetItem) -> bool:
        if isinstance(other, _NumItem):
            return self.sort_value < other.sort_value
        return super().__lt__(other)


def _table(headers: list[str]) -> QTableWidget:
    t = QTableWidget(0, len(headers))
    t.setHorizontalHeaderLabels(headers)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    t.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
    t.verticalHeader().setVisible(False)
    t.horizontalHeader().setStretchLastSection(True)
    t.setToolTip("Most uncertain first; click a row to go there.")
    return t


# -------------------------------------------------------------------------------------------------- widget


class SpineSegDiffWidget(QWidget):
    """Dock widget: segment the chosen scan, watch the denoising, review the uncertainty, export."""

    #: Emitted on the GUI thread when a run ends: "done", "cancelled" or "failed".
    run_finished = Signal(str)
    #: Emitted when the QA tables have been refilled.
    qa_updated = Signal()

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._qa_worker = None
        self._pbar = None
        self._state: RunState | None = None
        self.stream_updates = 0  # streamed steps shown in the last run
        self.max_update_ms = 0.0  # longest GUI-thread handling of one streamed step in the last run
        self._result_image = None  # image layer the result layers belong to
        self._class_names: dict[int, str] = {}
        self._segmented: set[int] = set()
        self._runs: list[dict[str, Any]] = []
        self._original_labels: np.ndarray | None = None
        self._paint_events = 0
        self._pending: deque = deque()
        self._pending_timer = QTimer(self)
        self._pending_timer.setInterval(10)  # > 0 so that other timers and input get a turn between stages
        self._pending_timer.timeout.connect(self._run_pending)
        _import_model_code()
        self._build()
        self._apply_settings(load_settings())
        self._on_checkpoint_changed()
        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            ev.connect(self._reset_choices)

    # ------------------------------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.image = ComboBox(label="image", choices=self._image_choices, tooltip=TIPS["image"])
        self.checkpoint = FileEdit(label="checkpoint", mode="r", nullable=True, value=None,
                                   filter="*.safetensors *.pt *.pth *.bin", tooltip=TIPS["checkpoint"])
        line = getattr(self.checkpoint, "line_edit", None)
        if line is not None:
            line.native.setPlaceholderText("shipped model")
        self.num_classes = SpinBox(label="classes", min=1, max=64, value=3, tooltip=TIPS["num_classes"])
        self.prior = ComboBox(label="prior", choices=self._prior_choices, tooltip=TIPS["prior"])
        self.steps = SpinBox(label="timesteps", min=1, max=1000, value=10, tooltip=TIPS["steps"])
        self.t_start = SpinBox(label="t_start", min=0, max=999, value=300, tooltip=TIPS["t_start"])
        self.ensemble = SpinBox(label="ensemble", min=1, max=64, value=5, tooltip=TIPS["ensemble"])
        self.baseline_weight = FloatSpinBox(label="preseg. weight", min=0.0, max=1.0, step=0.05,
                                            value=SegmentationConfig().baseline_weight,
                                            tooltip=TIPS["baseline_weight"])
        self.batch_slices = SpinBox(label="batch slices", min=1, max=64, value=4, tooltip=TIPS["batch_slices"])
        self.slice_mode = ComboBox(label="slices", choices=list(SLICE_MODES), value="current slice",
                                   tooltip=TIPS["slices"])
        self.slice_range = LineEdit(label="range", value="0:4", tooltip=TIPS["slice_range"])
        self.device = ComboBox(label="device", choices=["auto", "cpu", "cuda", "mps"], value="auto",
                               tooltip=TIPS["device"])
        self.seed = SpinBox(label="seed", min=0, max=2**31 - 1, value=0, tooltip=TIPS["seed"])
        self.stream_every = SpinBox(label="stream every", min=0, max=1000, value=1, tooltip=TIPS["stream_every"])
        self.run_button = PushButton(text="Run")
        self.run_button.tooltip = "Segment the chosen slices in the background."
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.cancel_button.tooltip = "Stop at the next denoising step; nothing partial is kept."
        self.form = Container(widgets=[
            self.image, self.checkpoint, self.num_classes, self.prior, self.steps, self.t_start, self.ensemble,
            self.baseline_weight, self.batch_slices, self.slice_mode, self.slice_range, self.device, self.seed,
            self.stream_every,
        ])
        self._locked = [w for w in self.form] + [self.run_button]
        self.checkpoint.changed.connect(self._on_checkpoint_changed)
        self.slice_mode.changed.connect(self._on_slice_mode)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.status = QLabel("Ready.")
        self.status.setWordWrap(True)

        run_page = QWidget()
        lay = QVBoxLayout(run_page)
        lay.addWidget(self.form.native)
        row = QHBoxLayout()
        row.addWidget(self.run_button.native)
        row.addWidget(self.cancel_button.native)
        lay.addLayout(row)
        lay.addStretch(1)

        self.tabs = QTabWidget()
        self.tabs.addTab(run_page, "Segment")
        self.tabs.addTab(self._build_review(), "Review")
        outer = QVBoxLayout(self)
        outer.addWidget(self.tabs)
        outer.addWidget(self.status)
        self._on_slice_mode()

    def _build_review(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        self.structure_table = _table(["class", "level", "mean U", "max U", "mL", "slices"])
        self.slice_table = _table(["slice", "mean U", "max U", "labelled voxels"])
        self.structure_table.cellClicked.connect(lambda r, _c: self._go_to_row(self.structure_table, r))
        self.slice_table.cellClicked.connect(lambda r, _c: self._go_to_row(self.slice_table, r))
        lay.addWidget(QLabel("Structures (connected components), most uncertain first"))
        lay.addWidget(self.structure_table, 3)
        lay.addWidget(QLabel("Slices, most uncertain first"))
        lay.addWidget(self.slice_table, 2)
        row = QHBoxLayout()
        row.addWidget(QLabel("uncertain boundary >"))
        self.threshold = QSlider(Qt.Orientation.Horizontal)
        self.threshold.setRange(0, 100)
        self.threshold.setValue(50)
        self.threshold.setToolTip("Show voxels whose uncertainty is above this value in the "
                                  f"'{OVERLAY_NAME}' layer (0 .. 1/e, the largest possible value).")
        self.threshold_label = QLabel(f"{self.threshold_value():.3f}")
        row.addWidget(self.threshold, 1)
        row.addWidget(self.threshold_label)
        lay.addLayout(row)
        self._threshold_timer = QTimer(self)
        self._threshold_timer.setSingleShot(True)
        self._threshold_timer.setInterval(60)
        self._threshold_timer.timeout.connect(self.update_overlay)
        self.threshold.valueChanged.connect(self._on_threshold)
        buttons = QHBoxLayout()
        self.refresh_button = QPushButton("Refresh tables")
        self.refresh_button.setToolTip("Recompute the tables after editing the labels.")
        self.refresh_button.clicked.connect(self.refresh_qa)
        self.export_button = QPushButton("Export")
        self.export_button.setToolTip("Write the labels (with your edits) and the uncertainty map next to the "
                                      "scan, in its geometry, with a JSON provenance file.")
        self.export_button.clicked.connect(lambda: self.export_results())
        buttons.addWidget(self.refresh_button)
        buttons.addWidget(self.export_button)
        lay.addLayout(buttons)
        return page

    # --------------------------------------------------------------------------------------- choices

    def _image_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Image

        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, Image) and not layer.rgb and layer.ndim == 3
                and not (layer.metadata or {}).get(OUTPUT_KEY)]

    def _prior_choices(self, _widget=None) -> list[tuple[str, Any]]:
        from napari.layers import Labels

        out: list[tuple[str, Any]] = [("baseline (shipped presegmenter)", "baseline"), ("none (pure noise)", "none")]
        out += [(f"labels: {layer.name}", layer) for layer in self.viewer.layers
                if isinstance(layer, Labels) and layer.ndim == 3 and layer.name not in (OVERLAY_NAME,)]
        return out

    def _reset_choices(self, _event=None) -> None:
        try:
            self.form.reset_choices()
        except RuntimeError:  # the Qt side is already deleted (viewer closing)
            pass

    def _on_checkpoint_changed(self, _value=None) -> None:
        info = checkpoint_info(self.checkpoint.value)
        if info is not None:
            self.num_classes.value = info["num_classes"]
            self.t_start.max = max(0, info["T"] - 1)
            self._class_names = {i + 1: n for i, n in enumerate(info["class_names"])}

    def _on_slice_mode(self, _value=None) -> None:
        self.slice_range.enabled = self.slice_mode.value == "range" and self._worker is None

    # -------------------------------------------------------------------------------------- settings

    def settings(self) -> dict[str, Any]:
        """The persisted settings (everything but the layers)."""
        prior = self.prior.value
        return {
            "checkpoint": str(self.checkpoint.value) if self.checkpoint.value else None,
            "steps": self.steps.value, "t_start": self.t_start.value, "ensemble": self.ensemble.value,
            "baseline_weight": self.baseline_weight.value, "batch_slices": self.batch_slices.value,
            "slice_mode": self.slice_mode.value,
            "slice_range": self.slice_range.value, "device": self.device.value, "seed": self.seed.value,
            "stream_every": self.stream_every.value, "prior": prior if isinstance(prior, str) else "labels",
        }

    def _apply_settings(self, s: dict[str, Any]) -> None:
        widgets = {"steps": self.steps, "t_start": self.t_start, "ensemble": self.ensemble,
                   "baseline_weight": self.baseline_weight,
                   "batch_slices": self.batch_slices, "slice_mode": self.slice_mode, "slice_range": self.slice_range,
                   "device": self.device, "seed": self.seed, "stream_every": self.stream_every}
        for key, w in widgets.items():
            if key in s:
                try:
                    w.value = s[key]
                except (ValueError, TypeError):
                    pass  # a stale or hand-edited value: keep the default
        ckpt = s.get("checkpoint")
        if ckpt and Path(ckpt).is_file():
            self.checkpoint.value = ckpt
        if s.get("prior") in ("baseline", "none"):
            self.prior.value = s["prior"]

    # -------------------------------------------------------------------------------------------- run

    @property
    def is_running(self) -> bool:
        return self._worker is not None

    def slices_spec(self, image=None) -> str:
        """The pipeline's ``slices`` string for the chosen mode ('current slice' -> the index shown now)."""
        mode = self.slice_mode.value
        if mode == "all slices":
            return "all"
        if mode == "range":
            return self.slice_range.value.strip()
        image = image or self.image.value
        return str(self.current_slice(image))

    def current_slice(self, image) -> int:
        """The canonical slice index of ``image`` under the viewer's current position."""
        off = self.viewer.dims.ndim - 3
        k = int(round(float(image.world_to_data(tuple(self.viewer.dims.point[off:]))[0])))
        return int(np.clip(k, 0, image.data.shape[0] - 1))

    def build_config(self) -> SegmentationConfig:
        """The run's configuration from the controls (``ValueError`` with one sentence when invalid)."""
        prior = self.prior.value
        return SegmentationConfig(
            checkpoint=str(self.checkpoint.value) if self.checkpoint.value else None,
            steps=self.steps.value, t_start=self.t_start.value, ensemble=self.ensemble.value,
            baseline_weight=float(self.baseline_weight.value), num_classes=self.num_classes.value,
            device=self.device.value, seed=self.seed.value,
            slices=self.slices_spec(), batch_slices=self.batch_slices.value,
            prior=prior if isinstance(prior, str) else "labels",
        )

    def _refuse(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def run(self, _value=None):
        """Start a run in a thread worker; returns the worker (``None`` when the inputs are refused)."""
        from napari.qt.threading import create_worker

        if self._worker is not None:
            return None
        image = self.image.value
        if image is None:
            self._refuse("Open a scan (an image layer) to segment first.")
            return None
        try:
            config = self.build_config()
        except ValueError as exc:
            self._refuse(str(exc))
            return None
        info = checkpoint_info(config.checkpoint)
        if info is not None and info["num_classes"] != config.num_classes:
            self._refuse(f"The run asks for {config.num_classes} classes but the checkpoint has "
                         f"{info['num_classes']}.")
            return None
        prior = None
        if config.prior == "labels":
            prior = np.asarray(self.prior.value.data)
            if prior.shape != tuple(image.data.shape):
                self._refuse(f"The prior labels layer has shape {prior.shape}; the scan has {tuple(image.data.shape)}.")
                return None
        volume = layer_volume(image)
        save_settings(self.settings())
        self._state = state = RunState(image, config, int(self.stream_every.value))
        self.stream_updates = 0
        self.max_update_ms = 0.0
        self._jump_into_run(image, config)
        self._set_running(True)
        self.status.setText("Loading the model ...")
        worker = create_worker(_segment_in_thread, volume, config, prior, state.stream_every, state,
                               _start_thread=False, _ignore_errors=True)  # errors: _on_error
        worker.yielded.connect(self._on_event)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        if state.stream_every > 0:  # one layer per event-loop turn, before the worker competes for the CPU
            self._schedule(lambda: self._prepare_denoising(state), lambda: self._prepare_trajectory(state))
        self._schedule(worker.start)
        return worker

    def cancel(self, _value=None) -> None:
        """Ask the running worker to stop at its next step."""
        if self._worker is None or self._state is None:
            return
        self._state.cancelled = True
        self._state.done_at_cancel = self._state.steps_done
        self.status.setText("Cancelling at the next step ...")
        self._worker.quit()

    def _set_running(self, running: bool) -> None:
        for w in self._locked:
            w.enabled = not running
        self.cancel_button.enabled = running
        self.export_button.setEnabled(not running)
        self.refresh_button.setEnabled(not running)
        if not running:
            self._on_slice_mode()

    def _jump_into_run(self, image, config: SegmentationConfig) -> None:
        """Show a slice that is being segmented if the current one is not."""
        from .config import parse_slices

        chosen = parse_slices(config.slices, image.data.shape[0])
        if self.current_slice(image) not in chosen:
            self.go_to(image, (chosen[0], (image.data.shape[1] - 1) / 2, (image.data.shape[2] - 1) / 2),
                       center=False)

    def _prepare_denoising(self, st: RunState) -> None:
        """The live ``denoising`` layer: an RGB canvas of the scan's canonical shape, cleared."""
        image = st.image
        data = np.zeros((*image.data.shape, 3), np.uint8)
        layer = self._find(DENOISING_NAME)
        if layer is not None and (not getattr(layer, "rgb", False) or layer.data.shape != data.shape):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            layer = self.viewer.add_image(data, name=DENOISING_NAME, rgb=True, blending="additive",
                                          scale=tuple(image.scale), translate=tuple(image.translate),
                                          metadata={OUTPUT_KEY: True})
        else:
            layer.data = data
            layer.scale, layer.translate = tuple(image.scale), tuple(image.translate)
            layer.visible = True
        st.denoise_layer = layer

    def _prepare_trajectory(self, st: RunState) -> None:
        """The (hidden) ``denoising trajectory`` layer, sized for the requested steps within the memory budget."""
        n = trajectory_frames(len(streamed_steps(st.config.steps, st.stream_every)), st.image.data.shape,
                              TRAJECTORY_BUDGET_BYTES)
        st.trajectory = np.zeros((n, *st.image.data.shape), np.uint8)
        geo = {"scale": (1.0, *st.image.scale), "translate": (0.0, *st.image.translate)}
        self._put_layer(TRAJECTORY_NAME, st.trajectory, "labels", geo, colormap=dict(LABEL_COLORS),
                        metadata={OUTPUT_KEY: True, "axes": ["step", "slice", "row", "column"]}, visible=False)

    # -------------------------------------------------------------------------------- worker events

    def _on_event(self, ev) -> None:
        if isinstance(ev, StreamFrame):
            t0 = time.perf_counter()
            self._show_frame(ev)
            self.max_update_ms = max(self.max_update_ms, 1000 * (time.perf_counter() - t0))
            return
        from napari.utils import progress

        if self._worker is None:  # a late event of a finished run
            return
        pbar = self._pbar
        if pbar is None:
            pbar = self._pbar = progress(total=ev.total, desc="SpineSegDiff")
            self.status.setText(ev.message)
        # napari's progress widgets may process Qt events here: keep the local reference
        pbar.total = ev.total
        pbar.set_description(f"SpineSegDiff: {ev.message}")
        pbar.update(ev.done - pbar.n)
        if ev.done and self._state is not None:
            self.status.setText(f"{ev.message} ({time.perf_counter() - self._state.started:.1f} s)")

    def _show_frame(self, fr: StreamFrame) -> None:
        st = self._state
        if st is None or st.cancelled:
            return
        self.stream_updates += 1
        idx = list(fr.slices)
        layer = st.denoise_layer
        if layer is not None and layer in self.viewer.layers:
            layer.data[idx] = fr.rgb
            layer.refresh()
        if st.trajectory is not None:
            n_streamed = len(streamed_steps(fr.total_steps, st.stream_every))
            i = st.batch_counts.get(fr.batch, 0)
            st.batch_counts[fr.batch] = i + 1
            slot = frame_slot(i, n_streamed, st.trajectory.shape[0])
            st.trajectory[slot][idx] = fr.classes
            st.frames_used = max(st.frames_used, slot + 1)  # frames in use

    def _on_returned(self, result) -> None:
        st = self._state
        if st is None or st.cancelled:
            return
        st.completed = True
        self._show_result(st, result)

    def _on_error(self, exc: Exception) -> None:
        from napari.utils.notifications import show_error

        msg = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        if self._state is not None:
            self._state.error = msg
        self.status.setText(f"Failed: {msg}")
        show_error(msg)

    def _on_finished(self) -> None:
        st = self._state
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if st is not None and not st.completed:
            if st.pipeline_gen is not None:
                st.pipeline_gen.close()  # the worker is done with it: stop the sampler now
            self._remove(DENOISING_NAME)  # partial estimates, not results
            self._remove(TRAJECTORY_NAME)
            if st.error is None:
                self.status.setText(f"Cancelled after {st.steps_done} of {st.total} steps; no result was kept.")
        outcome = "done" if st is not None and st.completed else ("failed" if st and st.error else "cancelled")
        self._schedule(lambda: self._end_run(outcome))  # after the result stages

    def _end_run(self, outcome: str) -> None:
        self._worker = None
        self._set_running(False)
        self.run_finished.emit(outcome)

    # ----------------------------------------------------------------------------------------- results

    def _find(self, name: str):
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _remove(self, name: str) -> None:
        layer = self._find(name)
        if layer is not None:
            self.viewer.layers.remove(layer)

    def _merged(self, name: str, new: np.ndarray, idx: list[int], same: bool) -> tuple[np.ndarray, bool]:
        """``new`` with the other slices of the existing layer ``name`` kept when it shows the same image."""
        layer = self._find(name)
        if not same or layer is None or tuple(layer.data.shape) != tuple(new.shape):
            return new, False
        data = np.array(layer.data, copy=True)
        data[idx] = new[idx]
        return data, True

    def _show_result(self, st: RunState, res) -> None:
        """Merge the result into the result layers, one layer per event-loop turn (adding a napari layer takes
        ~0.1 s; doing them all at once would stall the GUI)."""
        image = st.image
        idx = list(res.slices)
        same = self._result_image is image
        labels, kept_l = self._merged(LABELS_NAME, res.canonical_labels, idx, same)
        unc, kept_u = self._merged(UNCERTAINTY_NAME, res.canonical_uncertainty, idx, same)
        keep = kept_l and kept_u
        if not keep:
            labels, unc = res.canonical_labels, res.canonical_uncertainty
            self._segmented, self._runs = set(), []
        class_names = {i + 1: n for i, n in enumerate(res.class_names)}
        self._result_image = image
        self._class_names = class_names
        self._segmented |= {int(i) for i in idx}
        self._runs.append(res.provenance)
        geometry = {"scale": tuple(image.scale), "translate": tuple(image.translate)}
        meta = {**(image.metadata or {}), OUTPUT_KEY: True, "source_image": image.name,
                "provenance": res.provenance}
        stages = []
        for c, name in class_names.items():
            prob, _ = self._merged(f"P({name})", res.canonical_probabilities[c - 1], idx, keep)
            stages.append(lambda n=f"P({name})", d=prob: self._put_layer(
                n, d, "image", geometry, colormap="gray", contrast_limits=(0.0, 1.0), blending="additive",
                metadata=meta, visible=False))
        stages += [
            lambda: self._put_layer(UNCERTAINTY_NAME, unc, "image", geometry, colormap="inferno",
                                    contrast_limits=(0.0, MAX_UNCERTAINTY), blending="additive", opacity=0.6,
                                    metadata=meta),
            lambda: self._put_labels(labels, class_names, geometry, meta),
            lambda: self._put_trajectory(st),
            self.update_overlay,
            lambda: self._result_shown(st, res),
        ]
        self._schedule(*stages)

    def _result_shown(self, st: RunState, res) -> None:
        den = self._find(DENOISING_NAME)
        if den is not None:
            den.visible = False
        labels = self._find(LABELS_NAME)
        if labels is not None:
            self.viewer.layers.selection.active = labels
        secs = time.perf_counter() - st.started
        self.status.setText(f"Done in {secs:.1f} s: {len(res.slices)} slices, {self.stream_updates} streamed "
                            f"steps on {res.provenance.get('device', '?')}.")
        self.tabs.setCurrentIndex(1)
        self.refresh_qa()

    def _schedule(self, *stages) -> None:
        """Run each callable in its own turn of the Qt event loop, in order."""
        self._pending.extend(stages)
        if not self._pending_timer.isActive():
            self._pending_timer.start()

    def _run_pending(self) -> None:
        if self._pending:
            self._pending.popleft()()
        if not self._pending:
            self._pending_timer.stop()

    def _put_layer(self, name: str, data: np.ndarray, kind: str, geometry: dict, **kwargs):
        """Update the layer called ``name`` (same kind) or add it; returns the layer."""
        layer = self._find(name)
        from napari.layers import Labels

        if layer is not None and (isinstance(layer, Labels) != (kind == "labels") or layer.ndim != data.ndim
                                  or getattr(layer, "rgb", False)):
            self.viewer.layers.remove(layer)
            layer = None
        if layer is None:
            add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
            return add(data, name=name, **geometry, **kwargs)
        kwargs.pop("visible", None)  # an existing layer keeps the visibility the user gave it
        layer.data = data
        layer.scale, layer.translate = geometry["scale"], geometry["translate"]
        for key in ("contrast_limits", "metadata", "features", "colormap"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        return layer

    def _put_labels(self, labels: np.ndarray, class_names: dict[int, str], geometry, meta) -> None:
        import pandas as pd

        features = pd.DataFrame({"index": [0, *class_names], "class": ["background", *class_names.values()]})
        existed = self._find(LABELS_NAME)
        layer = self._put_layer(LABELS_NAME, labels, "labels", geometry, colormap=dict(LABEL_COLORS),
                                features=features, metadata=meta, opacity=0.5)
        if existed is None or existed is not layer:
            layer.events.paint.connect(self._on_paint)
        self._original_labels = np.array(labels, copy=True)
        self._paint_events = 0

    def _put_trajectory(self, st: RunState) -> None:
        """Trim the trajectory to the frames used, show the final estimate's frame, label the step axis."""
        layer = self._find(TRAJECTORY_NAME)
        if st.trajectory is None or layer is None:
            return
        used = max(1, st.frames_used)
        if used < st.trajectory.shape[0]:
            st.trajectory = st.trajectory[:used]
            layer.data = st.trajectory
        else:
            layer.refresh()
        dims = self.viewer.dims
        if dims.ndim == 4 and max(lay.ndim for lay in self.viewer.layers) == 4:
            dims.set_current_step(0, used - 1)  # scrub back from the final estimate
            if dims.axis_labels[0] in ("0", "-4"):
                dims.axis_labels = ("denoising step", *dims.axis_labels[1:])

    def _on_paint(self, _event=None) -> None:
        self._paint_events += 1

    # ---------------------------------------------------------------------------------------------- QA

    def threshold_value(self) -> float:
        return self.threshold.value() / 100.0 * MAX_UNCERTAINTY

    def _on_threshold(self, _value: int) -> None:
        self.threshold_label.setText(f"{self.threshold_value():.3f}")
        self._threshold_timer.start()
        overlay = self._find(OVERLAY_NAME)
        if overlay is not None:
            overlay.visible = True

    def update_overlay(self) -> None:
        """(Re)draw the "uncertain boundary" layer for the slider's threshold (hidden until the slider moves)."""
        unc = self._find(UNCERTAINTY_NAME)
        if unc is None or self._result_image is None:
            return
        mask = uncertain_mask(unc.data, self.threshold_value())
        geometry = {"scale": tuple(unc.scale), "translate": tuple(unc.translate)}
        colors = {None: "transparent", 0: "transparent", 1: "cyan"}
        self._put_layer(OVERLAY_NAME, mask, "labels", geometry, colormap=colors, visible=False,
                        metadata={OUTPUT_KEY: True, "threshold": self.threshold_value()})

    def refresh_qa(self) -> None:
        """Recompute the structure and slice tables in a thread (from a copy of the current labels)."""
        from napari.qt.threading import create_worker

        labels, unc = self._find(LABELS_NAME), self._find(UNCERTAINTY_NAME)
        if labels is None or unc is None or labels.data.shape != unc.data.shape:
            return
        worker = create_worker(_qa_in_thread, np.array(labels.data, copy=True), np.asarray(unc.data),
                               tuple(labels.scale), dict(self._class_names), sorted(self._segmented),
                               _start_thread=False)
        worker.returned.connect(self._fill_tables)
        self._qa_worker = worker
        worker.start()

    def _fill_tables(self, tables) -> None:
        structures, slices = tables
        t = self.structure_table
        t.setSortingEnabled(False)
        t.setRowCount(len(structures))
        for r, s in enumerate(structures):
            first = QTableWidgetItem(s.class_name)
            first.setData(Qt.ItemDataRole.UserRole, (s.slice_index, s.centroid[1], s.centroid[2]))
            cells = [first, _NumItem(s.level, str(s.level)), _NumItem(s.mean_uncertainty),
                     _NumItem(s.max_uncertainty), _NumItem(s.volume_ml, f"{s.volume_ml:.2f}"),
                     _NumItem(s.slices[0], f"{s.slices[0]}-{s.slices[1]}")]
            for c, item in enumerate(cells):
                t.setItem(r, c, item)
        t.setSortingEnabled(True)
        t.sortItems(2, Qt.SortOrder.DescendingOrder)  # mean uncertainty
        t.resizeColumnsToContents()
        t = self.slice_table
        t.setSortingEnabled(False)
        t.setRowCount(len(slices))
        for r, s in enumerate(slices):
            first = _NumItem(s.index, str(s.index))
            first.setData(Qt.ItemDataRole.UserRole, (s.index, *s.centroid))
            cells = [first, _NumItem(s.mean_uncertainty), _NumItem(s.max_uncertainty),
                     _NumItem(s.labelled_voxels, str(s.labelled_voxels))]
            for c, item in enumerate(cells):
                t.setItem(r, c, item)
        t.setSortingEnabled(True)
        t.sortItems(1, Qt.SortOrder.DescendingOrder)
        t.resizeColumnsToContents()
        self._qa_worker = None
        self.qa_updated.emit()

    def _go_to_row(self, table: QTableWidget, row: int) -> None:
        item = table.item(row, 0)
        target = item.data(Qt.ItemDataRole.UserRole) if item is not None else None
        image = self._result_image
        if target is None or image is None or image not in self.viewer.layers:
            return
        self.go_to(image, target)

    def go_to(self, image, position, center: bool = True) -> None:
        """Move the viewer to canonical ``position`` (slice, row, column) of ``image``; centre it in view."""
        world = [float(v) for v in image.data_to_world(tuple(float(p) for p in position))]
        off = self.viewer.dims.ndim - 3
        self.viewer.dims.set_point(off, world[0])
        if center:
            full = list(self.viewer.dims.point)
            full[off:off + 3] = world
            self.viewer.scene.camera.center = tuple(full[d] for d in self.viewer.dims.displayed)

    # -------------------------------------------------------------------------------------------- export

    def export_results(self, folder: str | Path | None = None) -> list[Path]:
        """Write the labels layer (with edits) and the uncertainty map in the scan's geometry, and a JSON
        provenance sidecar, to ``folder`` (default: the scan's folder, or one asked for when the scan has
        no file).  Returns the written paths (``[]`` when nothing was written)."""
        from .io.readers import file_stem, file_suffix
        from .io.writers import write_canonical

        labels, unc, image = self._find(LABELS_NAME), self._find(UNCERTAINTY_NAME), self._result_image
        if labels is None or unc is None or image is None:
            self._refuse("Run a segmentation before exporting.")
            return []
        like = export_like(image)
        src = like.source
        if folder is None:
            folder = src.parent if src is not None else QFileDialog.getExistingDirectory(self, "Export folder")
            if not folder:
                return []
        folder = Path(folder)
        stem = file_stem(src) if src is not None else (re.sub(r"[^\w.-]+", "_", image.name).strip("_") or "scan")
        ext = file_suffix(src) if src is not None and file_suffix(src) in (".nii.gz", ".nii", ".mha", ".nrrd") \
            else ".nii.gz"
        note = f"spinesegdiff {__version__} napari"
        try:
            out_l = write_canonical(np.asarray(labels.data), folder / f"{stem}_spinesegdiff_labels{ext}", like,
                                    kind="labels", produced_by=f"{note} labels")
            out_u = write_canonical(np.asarray(unc.data, np.float32), folder / f"{stem}_spinesegdiff_uncertainty{ext}",
                                    like, kind="image", produced_by=f"{note} uncertainty")
        except ValueError as exc:
            self._refuse(str(exc))
            return []
        sidecar = folder / f"{stem}_spinesegdiff.json"
        sidecar.write_text(json.dumps(self.provenance(out_l, out_u), indent=1, default=str))
        self.status.setText(f"Exported to {folder}: {out_l.name}, {out_u.name}, {sidecar.name}.")
        return [out_l, out_u, sidecar]

    def provenance(self, labels_path: Path | None = None, uncertainty_path: Path | None = None) -> dict[str, Any]:
        """The sidecar: the runs behind the layers, the segmented slices and what was edited by hand."""
        labels = self._find(LABELS_NAME)
        changed = 0
        if labels is not None and self._original_labels is not None \
                and self._original_labels.shape == labels.data.shape:
            changed = int(np.count_nonzero(np.asarray(labels.data) != self._original_labels))
        return {
            "produced_by": f"spinesegdiff {__version__} napari widget",
            "outputs": {"labels": str(labels_path) if labels_path else None,
                        "uncertainty": str(uncertainty_path) if uncertainty_path else None},
            "image_layer": self._result_image.name if self._result_image is not None else None,
            "segmented_slices": sorted(self._segmented),
            "classes": {str(k): v for k, v in self._class_names.items()},
            "edited_layers": {LABELS_NAME: {"edited": bool(changed or self._paint_events),
                                            "changed_voxels": changed, "edit_operations": self._paint_events}},
            "runs": self._runs,
        }
